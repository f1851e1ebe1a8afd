//! The presence-lease sweeper.
//!
//! `$disconnect` is best effort in AWS, so a connection's lease in Redis is
//! the truth: every frame renews it, and a connection whose lease ran out
//! is removed here (its subscriptions with it, its user announced `offline`
//! when it was their last) and closed at API Gateway with
//! `DeleteConnection`.
//!
//! With several relays, only the one holding cluster shard 0 sweeps, so
//! an expired connection is closed at API Gateway once. Removal would be
//! safe from several at once anyway: the disconnect script is atomic and
//! announces `offline` only when it removes the user's last connection.
//! While shard 0 has no owner (a takeover, ≈ 5.5 s) nobody sweeps; leases
//! are much longer than that.

use std::sync::Arc;
use std::time::Duration;

use chat_shared::realtime::Realtime;
use tokio_util::sync::CancellationToken;

use crate::cluster::Ownership;
use crate::management::Management;
use crate::metrics::RelayMetrics;
use crate::outbox::Outboxes;

/// Most connections removed per sweep step; a full batch is followed by
/// another step at once.
const BATCH: usize = 500;
/// How often the loop logs the counters.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// What the sweeper needs.
pub(crate) struct Sweeper {
    /// Finds and removes expired connections (`Realtime::sweep_expired`).
    pub(crate) realtime: Realtime,
    /// Closes them at API Gateway.
    pub(crate) management: Arc<Management>,
    /// Drops whatever was still queued for them.
    pub(crate) outboxes: Outboxes,
    /// Counts sweeps; the loop also logs all counters now and then.
    pub(crate) metrics: Arc<RelayMetrics>,
    /// Sweeping is the job of the holder of cluster shard 0.
    pub(crate) ownership: Arc<Ownership>,
}

impl Sweeper {
    /// One sweep: removes up to a batch of expired connections and closes
    /// them at API Gateway. Returns how many were removed.
    ///
    /// # Errors
    /// When Redis or PostgreSQL does not answer.
    pub(crate) async fn step(&self) -> chat_shared::Result<usize> {
        RelayMetrics::bump(&self.metrics.sweeps);
        let removed = self.realtime.sweep_expired(BATCH).await?;
        self.metrics
            .swept
            .fetch_add(removed.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for (connection_id, _) in &removed {
            self.outboxes.forget(connection_id);
        }
        let closes = removed.iter().filter_map(|(connection_id, endpoint)| {
            let endpoint = endpoint.as_deref()?;
            Some(async move {
                if let Err(cause) = self.management.delete(endpoint, connection_id).await {
                    tracing::debug!(%connection_id, %cause, "DeleteConnection failed (best effort)");
                }
            })
        });
        futures::future::join_all(closes).await;
        if !removed.is_empty() {
            tracing::info!(removed = removed.len(), "swept expired connections");
        }
        Ok(removed.len())
    }

    /// Sweeps every `interval` until `shutdown`.
    pub(crate) async fn run(self, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_report = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            while self.ownership.holds(0) {
                match self.step().await {
                    Ok(n) if n == BATCH && !shutdown.is_cancelled() => continue,
                    Ok(_) => break,
                    Err(err) => {
                        tracing::warn!(error = %err, "sweep failed; will retry");
                        break;
                    }
                }
            }
            if last_report.elapsed() >= REPORT_EVERY {
                last_report = tokio::time::Instant::now();
                let m = self.metrics.snapshot();
                tracing::info!(
                    envelopes = m.envelopes,
                    posts_ok = m.posts_ok,
                    posts_gone = m.posts_gone,
                    post_errors = m.post_errors,
                    gap_fills = m.gap_fills,
                    swept = m.swept,
                    active_outboxes = self.outboxes.active(),
                    mean_push_us = m.mean_push_latency().map(|d| d.as_micros() as u64),
                    "relay counters"
                );
            }
        }
    }
}
