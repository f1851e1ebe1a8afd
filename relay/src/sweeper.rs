//! The presence-lease sweeper.
//!
//! `$disconnect` is best effort in AWS, so a connection's lease in Redis is
//! the truth: every frame renews it, and a connection whose lease ran out
//! is removed here (its subscriptions with it, its user announced `offline`
//! when it was their last) and closed at API Gateway with
//! `DeleteConnection`.
//!
//! The sweep itself (removal, `DeleteConnection`) is the shared crate's
//! sweep-and-close (`chat_shared::departures`), which the maintenance job
//! runs too; this module is the loop around it.
//!
//! With several relays, only the one holding lease shard 0 sweeps, so
//! an expired connection is closed at API Gateway once. Removal would be
//! safe from several at once anyway: the disconnect script is atomic and
//! announces `offline` only when it removes the user's last connection.
//! While shard 0 has no owner (a takeover, ≈ 5.5 s) nobody sweeps; leases
//! are much longer than that.

use std::sync::Arc;
use std::time::Duration;

use chat_shared::departures::{CloseConnection, Departures, SweepLimits, SweepReport};
use tokio_util::sync::CancellationToken;

use crate::cluster::Ownership;
use crate::management::Management;
use crate::metrics::RelayMetrics;
use crate::outbox::Outboxes;

/// One step's limits: a full batch is followed by another step at once,
/// while this relay still holds lease shard 0.
const LIMITS: SweepLimits = SweepLimits {
    batch: 500,
    max_batches: 1,
    close_concurrency: 64,
};
/// How often the loop logs the counters.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// What the sweeper needs.
pub(crate) struct Sweeper {
    /// Finds and removes expired connections (sweep-and-close).
    pub(crate) departures: Departures,
    /// Closes them at API Gateway.
    pub(crate) management: Arc<Management>,
    /// Drops whatever was still queued for them.
    pub(crate) outboxes: Outboxes,
    /// Counts sweeps; the loop also logs all counters now and then.
    pub(crate) metrics: Arc<RelayMetrics>,
    /// Sweeping is the job of the holder of lease shard 0.
    pub(crate) ownership: Arc<Ownership>,
}

/// Closing a swept connection, as the relay does it: drop its queued
/// posts, then `DeleteConnection`.
struct Closer<'a> {
    management: &'a Management,
    outboxes: &'a Outboxes,
}

impl CloseConnection for Closer<'_> {
    async fn close(&self, endpoint: &str, connection_id: &str) -> Result<(), String> {
        self.management.delete(endpoint, connection_id).await
    }

    fn removed(&self, connection_id: &str) {
        self.outboxes.forget(connection_id);
    }
}

impl Sweeper {
    /// One sweep step: removes up to a batch of expired connections and
    /// closes them at API Gateway.
    ///
    /// # Errors
    /// When Redis or PostgreSQL does not answer.
    pub(crate) async fn step(&self) -> chat_shared::Result<SweepReport> {
        RelayMetrics::bump(&self.metrics.sweeps);
        let closer = Closer {
            management: &self.management,
            outboxes: &self.outboxes,
        };
        let report = self.departures.sweep_and_close(&closer, LIMITS).await?;
        self.metrics
            .swept
            .fetch_add(report.swept as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(report)
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
                    Ok(report) if report.more && !shutdown.is_cancelled() => continue,
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
