//! The bus subscription: reads envelopes from the Redis pub/sub channel and
//! hands each to its shard's worker, when this relay holds the envelope's
//! lease shard (module `cluster`); otherwise notes what a later owner
//! must catch up on, and drops it.
//!
//! A pub/sub connection does not reconnect by itself (unlike the
//! `ConnectionManager` the rest of the relay uses), so this loop does: on a
//! closed connection, a failed health check or a failed subscribe it waits
//! (backoff from 100 ms doubling to 5 s, reset after a good subscribe) and
//! subscribes again. Envelopes published while no subscription exists are
//! lost, as pub/sub goes; the next `message` of a room fills that room's gap
//! from PostgreSQL.
//!
//! Losing the subscription revokes every lease shard locally (Redis may
//! have restarted without its leases, and another relay may take them).
//! After each successful `SUBSCRIBE` the reader asks the lease loop for a
//! renewal and only then reads: pub/sub keeps what arrives meanwhile on
//! the connection, so nothing published after the subscription is
//! dropped for want of a lease.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use chat_shared::bus::Envelope;
use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Missed, Ownership, Refresh};
use crate::lanes::{Work, lane_of, lease_shard_of};
use crate::metrics::RelayMetrics;

/// First wait before resubscribing.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait before resubscribing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long connecting and subscribing may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the reader waits for the lease renewal after subscribing.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the channel and feeds the shards.
pub(crate) struct BusReader {
    /// Opens a new pub/sub connection for each (re)subscription.
    pub(crate) client: redis::Client,
    /// The broadcast channel.
    pub(crate) channel: String,
    /// One sender per worker; dropped when the reader returns, which lets
    /// the workers finish their queues and stop.
    pub(crate) workers: Vec<mpsc::Sender<Work>>,
    /// Which lease shards this relay handles.
    pub(crate) ownership: Arc<Ownership>,
    /// Where dropped envelopes are noted.
    pub(crate) missed: Arc<Mutex<Missed>>,
    /// Asks the lease loop for a renewal.
    pub(crate) refresh: Refresh,
    /// Counts envelopes and subscriptions.
    pub(crate) metrics: Arc<RelayMetrics>,
    /// How often the subscription is checked with `PING`.
    pub(crate) ping_interval: Duration,
}

impl BusReader {
    /// Subscribes, and resubscribes after failures, until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut backoff = MIN_BACKOFF;
        while !shutdown.is_cancelled() {
            match self.listen(&shutdown, &mut backoff).await {
                Ok(()) => {}
                Err(err) => {
                    self.ownership.revoke_all();
                    tracing::warn!(
                        error = format!("{err:#}"),
                        retry_in_ms = backoff.as_millis() as u64,
                        "bus subscription lost; lease shards revoked until renewed"
                    );
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One subscription, until it fails or `shutdown`.
    async fn listen(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Duration,
    ) -> anyhow::Result<()> {
        let (mut sink, mut stream) = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let pubsub = self.client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&self.channel).await?;
            redis::RedisResult::Ok((sink, stream))
        })
        .await
        .context("connecting to Redis timed out")?
        .context("subscribing to the bus")?;
        RelayMetrics::bump(&self.metrics.subscriptions);
        *backoff = MIN_BACKOFF;
        tracing::info!(channel = %self.channel, "subscribed to the bus");
        self.refresh.now(REFRESH_TIMEOUT).await;
        let mut health = tokio::time::interval(self.ping_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        health.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                message = stream.next() => {
                    let Some(message) = message else {
                        anyhow::bail!("the pub/sub connection closed");
                    };
                    self.dispatch(&message).await;
                }
                _ = health.tick() => {
                    tokio::time::timeout(CONNECT_TIMEOUT, sink.ping::<redis::Value>())
                        .await
                        .context("PING on the pub/sub connection timed out")?
                        .context("PING on the pub/sub connection")?;
                }
            }
        }
    }

    /// Parses one bus message and queues it on its shard (waiting while
    /// that shard is full: back-pressure instead of unbounded memory).
    async fn dispatch(&self, message: &redis::Msg) {
        let envelope = message
            .get_payload::<String>()
            .map_err(anyhow::Error::from)
            .and_then(|p| serde_json::from_str::<Envelope>(&p).map_err(anyhow::Error::from));
        let envelope = match envelope {
            Ok(envelope) => envelope,
            Err(err) => {
                RelayMetrics::bump(&self.metrics.bad_envelopes);
                tracing::warn!(error = %err, "ignoring a bus message that is not an envelope");
                return;
            }
        };
        RelayMetrics::bump(&self.metrics.envelopes);
        let shard = lease_shard_of(&envelope, self.ownership.shards());
        if !self.ownership.dispatches(shard) {
            RelayMetrics::bump(&self.metrics.envelopes_not_owned);
            self.missed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .note(shard, envelope);
            return;
        }
        let Some(tx) = self.workers.get(lane_of(shard, self.workers.len())) else {
            return;
        };
        if tx.send(Work::Envelope { shard, envelope }).await.is_err() {
            tracing::error!(shard, "a worker stopped; envelope dropped");
        }
    }
}
