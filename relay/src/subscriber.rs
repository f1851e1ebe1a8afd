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
/// How often a sharded subscription probes each of its channels (see
/// [`Probes`]).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a round of probes may take to publish.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// What a probe's payload starts with; an envelope starts with `{`.
const PROBE_PREFIX: &str = "probe:";

/// The liveness check of a sharded subscription. A cluster moves a
/// channel's slot in a resharding or a failover, and the crate's
/// connection re-routes, refreshes and resubscribes by itself; but a
/// subscription was seen to stop receiving one channel's messages after a
/// resharding while every `PING` still answered (a `PING` goes to any
/// node). So every [`PROBE_INTERVAL`] the reader publishes a probe of its
/// own on every channel and checks that the previous round came back
/// through the subscription; a channel whose probe did not is a lost
/// subscription (resubscribe, and catch up from PostgreSQL).
struct Probes {
    /// This subscription's token, unique per process and subscription:
    /// other relays' probes on the same channels are ignored.
    token: String,
    /// The round being published.
    round: u64,
    /// The last round each channel's probe came back in.
    seen: Vec<u64>,
}

impl Probes {
    fn new(relay_id: &str, channels: usize) -> Self {
        static SUBSCRIPTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SUBSCRIPTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            token: format!("{relay_id}.{n}"),
            round: 0,
            seen: vec![0; channels],
        }
    }

    fn payload(&self) -> String {
        format!("{PROBE_PREFIX}{}:{}", self.token, self.round)
    }

    /// Notes a probe that came back on channel `index`; `false` when
    /// `payload` is no probe at all (an envelope).
    fn came_back(&mut self, index: Option<usize>, payload: &[u8]) -> bool {
        let Some(rest) = payload.strip_prefix(PROBE_PREFIX.as_bytes()) else {
            return false;
        };
        // The token is the relay id, which may hold a `:`; the round not.
        let rest = std::str::from_utf8(rest).unwrap_or_default();
        if let (Some((token, round)), Some(index)) = (rest.rsplit_once(':'), index)
            && token == self.token
            && let (Ok(round), Some(seen)) = (round.parse::<u64>(), self.seen.get_mut(index))
        {
            *seen = (*seen).max(round);
        }
        true
    }

    /// Starts the next round. Fails naming a channel whose probe of the
    /// round before did not come back.
    fn next_round(&mut self, channels: &[String]) -> anyhow::Result<()> {
        if self.round > 0
            && let Some(lost) = self.seen.iter().position(|seen| *seen < self.round)
        {
            anyhow::bail!(
                "bus channel {} delivered no probe within {PROBE_INTERVAL:?}",
                channels[lost]
            );
        }
        self.round += 1;
        Ok(())
    }
}

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
    /// How often a single Redis subscription is checked with `PING` (a
    /// cluster's is probed instead: [`Probes`]).
    pub(crate) ping_interval: Duration,
    /// This relay's id (its probes carry it).
    pub(crate) relay_id: String,
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
        self.ownership.subscribed();
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
        let conn = tokio::time::timeout(CONNECT_TIMEOUT * 4, async {
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
        let index: std::collections::HashMap<&str, usize> = self
            .channels
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        let mut probes = Probes::new(&self.relay_id, self.channels.len());
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                push = pushes.recv() => {
                    let Some(push) = push else {
                        anyhow::bail!("the cluster connection closed");
                    };
                    match push.kind {
                        redis::PushKind::SMessage => {
                            let Some(message) = redis::Msg::from_push_info(push) else {
                                continue;
                            };
                            // Looked at in place: envelopes are parsed once, by `dispatch`.
                            let channel = index.get(message.get_channel_name()).copied();
                            if !probes.came_back(channel, message.get_payload_bytes()) {
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
                _ = probe.tick() => {
                    probes.next_round(&self.channels)?;
                    let payload = probes.payload();
                    tokio::time::timeout(
                        PROBE_TIMEOUT,
                        futures::future::try_join_all(self.channels.iter().map(|channel| {
                            let mut conn = conn.clone();
                            let payload = payload.clone();
                            async move {
                                redis::cmd("SPUBLISH")
                                    .arg(channel)
                                    .arg(payload)
                                    .query_async::<i64>(&mut conn)
                                    .await
                            }
                        })),
                    )
                    .await
                    .context("probing the bus channels timed out")?
                    .context("probing the bus channels")?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_passes_only_when_every_channel_s_own_probe_came_back() {
        let channels = vec!["c:{p0}".to_owned(), "c:{p1}".to_owned()];
        // A relay id may hold a `:` (it starts with INSTANCE_ID).
        let mut probes = Probes::new("gw:1-abc", channels.len());
        probes.next_round(&channels).expect("the first round");
        let payload = probes.payload();
        assert!(
            !probes.came_back(Some(0), br#"{"origin":"gw"}"#),
            "an envelope"
        );
        assert!(probes.came_back(Some(0), payload.as_bytes()));
        // Another relay's probe is a probe, but not ours.
        assert!(probes.came_back(Some(1), b"probe:other.0:1"));
        let lost = probes.next_round(&channels).expect_err("channel 1 lost");
        assert!(lost.to_string().contains("c:{p1}"), "{lost}");
        let mut probes = Probes::new("gw:1-abc", channels.len());
        probes.next_round(&channels).expect("the first round");
        let payload = probes.payload();
        for i in 0..2 {
            probes.came_back(Some(i), payload.as_bytes());
        }
        probes.next_round(&channels).expect("every probe came back");
    }
}
