//! The bus subscription: reads envelopes from the bus channels (one per
//! partition, `<BROADCAST_CHANNEL>:{p<n>}`; every relay reads all of them,
//! so that it can note what it drops) and hands each to its shard's worker, when this relay holds the envelope's
//! lease shard (module `cluster`); otherwise notes what a later owner
//! must catch up on, and drops it.
//!
//! On a single Redis the channels are read with `SUBSCRIBE` on one pub/sub
//! connection. On a Redis Cluster they are read with `SSUBSCRIBE` (sharded
//! pub/sub, RESP3 pushes) through a cluster connection, which holds one
//! connection per node that owns a channel's slot: each envelope crosses
//! only its shard. The crate's single-node async client has no
//! `SSUBSCRIBE` (and Redis before 7 none at all), so a single Redis keeps
//! `SUBSCRIBE`; the publishers pick the matching command
//! (`RedisConn::publish_command`).
//!
//! This loop owns reconnection for both: on a closed connection, a node's
//! disconnection, a channel the cluster moved away (the server's
//! `SUNSUBSCRIBE` after a resharding or a failover), a failed health check
//! or a failed subscribe it waits
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
    /// Where Redis is: a new subscription (single or cluster) is opened
    /// for each (re)subscription.
    pub(crate) target: chat_shared::redis_conn::RedisTarget,
    /// The bus channels (every partition's).
    pub(crate) channels: Vec<String>,
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
        if self.target.cluster {
            self.listen_sharded(shutdown, backoff).await
        } else {
            self.listen_single(shutdown, backoff).await
        }
    }

    /// Subscribed; counts it, asks for a lease renewal and resets the
    /// backoff (see the module docs).
    async fn subscribed(&self, backoff: &mut Duration) {
        RelayMetrics::bump(&self.metrics.subscriptions);
        *backoff = MIN_BACKOFF;
        tracing::info!(
            channels = self.channels.len(),
            sharded = self.target.cluster,
            "subscribed to the bus"
        );
        self.refresh.now(REFRESH_TIMEOUT).await;
    }

    /// `SUBSCRIBE` on a single Redis.
    async fn listen_single(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Duration,
    ) -> anyhow::Result<()> {
        use secrecy::ExposeSecret as _;
        let client = redis::Client::open(self.target.url.expose_secret())
            .context("REDIS_URL is not a valid Redis URL")?;
        let (mut sink, mut stream) = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let pubsub = client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&self.channels).await?;
            redis::RedisResult::Ok((sink, stream))
        })
        .await
        .context("connecting to Redis timed out")?
        .context("subscribing to the bus")?;
        self.subscribed(backoff).await;
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

    /// `SSUBSCRIBE` on a Redis Cluster: every channel on the node that owns
    /// its slot, messages as RESP3 pushes.
    async fn listen_sharded(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Duration,
    ) -> anyhow::Result<()> {
        let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
        let client = self
            .target
            .cluster_builder()?
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()
            .context("REDIS_URL is not a valid list of Redis Cluster node URLs")?;
        let mut conn = tokio::time::timeout(CONNECT_TIMEOUT * 4, async {
            let conn = client.get_async_connection().await?;
            // One channel per call (they are in different slots), all at
            // once: the connection multiplexes them over the nodes.
            futures::future::try_join_all(self.channels.iter().map(|channel| {
                let mut conn = conn.clone();
                async move { conn.ssubscribe(channel).await }
            }))
            .await?;
            redis::RedisResult::Ok(conn)
        })
        .await
        .context("connecting to the Redis Cluster timed out")?
        .context("subscribing to the bus")?;
        self.subscribed(backoff).await;
        let mut health = tokio::time::interval(self.ping_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        health.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                push = pushes.recv() => {
                    let Some(push) = push else {
                        anyhow::bail!("the cluster connection closed");
                    };
                    match push.kind {
                        redis::PushKind::SMessage => {
                            if let Some(message) = redis::Msg::from_push_info(push) {
                                self.dispatch(&message).await;
                            }
                        }
                        redis::PushKind::Disconnection => {
                            anyhow::bail!("a cluster node's connection dropped");
                        }
                        redis::PushKind::SUnsubscribe => {
                            anyhow::bail!("the cluster moved a bus channel (resharding or failover)");
                        }
                        _ => {}
                    }
                }
                _ = health.tick() => {
                    tokio::time::timeout(CONNECT_TIMEOUT, redis::cmd("PING").query_async::<redis::Value>(&mut conn))
                        .await
                        .context("PING on the cluster connection timed out")?
                        .context("PING on the cluster connection")?;
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
