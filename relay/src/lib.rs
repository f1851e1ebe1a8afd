//! The relay: the one long-running piece of the backend (ARCHITECTURE.md).
//!
//! Handlers publish every outbound event as an envelope on the Redis pub/sub
//! channels `BROADCAST_CHANNEL:{p<n>}`, one per partition (PROTOCOL.md §5;
//! sharded pub/sub on a Redis Cluster). The relay subscribes to all of them,
//! resolves each envelope's targets to WebSocket connection ids in Redis,
//! and pushes the event's JSON, byte for byte, to each connection's own
//! Management API endpoint with `PostToConnection`. It runs as an ECS
//! Fargate service in AWS, as the `relay` binary, or inside the local stack.
//!
//! Several relays share the work: each holds the leases of some of the
//! `RELAY_SHARDS` lease shards in Redis and handles only the envelopes
//! whose ordering key falls in them; when a relay joins, leaves or dies
//! the others rebalance within seconds (module `cluster`).
//!
//! Guarantees (PROTOCOL.md §2, "Who receives what"):
//! - a room's events reach each connection in publish order: envelopes are
//!   sharded by ordering key, one relay at a time handles a lease shard, each
//!   worker handles its envelopes one at a time, and each connection's
//!   posts leave one at a time in queue order;
//! - a room's `message` events reach each joined connection once each, in
//!   increasing `sequenceId`, with no gap: repeats are skipped and gaps are
//!   filled from memory or PostgreSQL (module `worker`);
//! - a `410 Gone` removes a stale connection (after a grace period for
//!   connections still in `$connect`), and expired presence leases are
//!   swept.
//!
//! # Layout
//! - `lib.rs`: [`Relay`] (wiring, [`Relay::run`], shutdown) and
//!   [`RelayOptions`].
//! - `cluster`: lease shards' leases, fair shares, handover and takeover.
//! - `subscriber`: the pub/sub subscription, with reconnects; hands each
//!   envelope of a held lease shard to its worker.
//! - `lanes`: ordering key → lease shard → worker lane, and `Work`, what
//!   a lane carries (the three meanings "shard" once had, named apart).
//! - `worker`: ordered handling per worker lane; per-room dedupe, gap fill
//!   and `Control::Sync`.
//! - `resolve`: target → connections, with batched Redis reads.
//! - `outbox`: per-connection ordered queues, the global in-flight bound,
//!   the `410` policy.
//! - [`management`], the API Gateway Management API clients.
//! - `sweeper`: removes connections whose presence lease ran out.
//! - [`metrics`], the counters.
//! - [`health`], the loopback health endpoint and `relay health`.
//! - `main.rs`: the `relay` binary, a thin shim.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chat_shared::bootstrap::Adapters;
use chat_shared::config::RelayProcessConfig;
use chat_shared::departures::Departures;
use chat_shared::presence::Presence;
use chat_shared::store::Store;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod cluster;
pub mod health;
mod lanes;
pub mod management;
pub mod metrics;
mod outbox;
mod pipeline;
mod resolve;
mod subscriber;
mod sweeper;
mod worker;

pub use cluster::ClusterOptions;
pub use management::{EndpointPolicy, Management};
pub use metrics::{MetricsSnapshot, RelayMetrics};

/// Envelopes queued per worker lane before the bus reader waits for it.
const LANE_QUEUE: usize = 1024;

/// How the relay behaves; [`RelayOptions::from_config`] gives the defaults.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Most `PostToConnection` calls in flight at once (`RELAY_CONCURRENCY`).
    pub concurrency: usize,
    /// A `410 Gone` for a connection younger than this is retried (API
    /// Gateway refuses posts until `$connect` has returned, and the
    /// `connected` event is published during `$connect`); for an older one
    /// it means the connection is stale.
    /// [`chat_shared::realtime::CONNECTING_WINDOW`], 30 s: a `$connect`
    /// may take up to API Gateway's 29 s integration timeout.
    pub young_connection: Duration,
    /// How often expired presence leases are swept:
    /// `PRESENCE_TTL_SECONDS / 10`, between 1 s and 5 s.
    pub sweep_interval: Duration,
    /// Workers (ordered lanes) handling envelopes in parallel; cluster
    /// shard `n` is handled by worker lane `n % lanes`. 16.
    pub lanes: usize,
    /// The lease shards and their leases (`RELAY_SHARDS`).
    pub cluster: ClusterOptions,
    /// Names this relay in leases and logs; a unique suffix is added per
    /// [`Relay`] (`INSTANCE_ID`).
    pub instance_id: String,
    /// A room's in-memory state (delivered marks, recent messages) is
    /// dropped after this long without envelopes. 5 min.
    pub room_idle: Duration,
    /// At shutdown, how long queued envelopes and posts may take to finish.
    /// 5 s (ECS waits 30 s between SIGTERM and SIGKILL).
    pub drain_timeout: Duration,
    /// Region of the Management API for `https://` endpoints (`AWS_REGION`).
    pub aws_region: String,
    /// How often the bus subscription is checked with `PING`: a connection
    /// that died without a FIN (a failover, a NAT timeout) is otherwise
    /// never noticed. 10 s.
    pub bus_ping_interval: Duration,
    /// Which Management API endpoints may be called (`MANAGEMENT_ENDPOINT`,
    /// `RELAY_ALLOWED_ENDPOINTS`) and the local emulator's key pair.
    pub endpoints: EndpointPolicy,
}

impl RelayOptions {
    /// The defaults, with what `config` sets.
    pub fn from_config(config: &RelayProcessConfig) -> Self {
        let common = &config.common;
        Self {
            concurrency: config.relay.concurrency,
            young_connection: chat_shared::realtime::CONNECTING_WINDOW,
            sweep_interval: (common.presence_ttl / 10)
                .clamp(Duration::from_secs(1), Duration::from_secs(5)),
            lanes: 16,
            cluster: ClusterOptions::new(config.relay.lease_shards),
            instance_id: common.instance_id.clone(),
            room_idle: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(5),
            aws_region: common.aws_region.clone(),
            bus_ping_interval: Duration::from_secs(10),
            endpoints: EndpointPolicy::new(&config.relay.management, &common.aws_region),
        }
    }
}

/// The relay service. Build it once ([`Relay::new`] or
/// [`Relay::from_parts`]) and [`run`](Relay::run) it until shutdown.
pub struct Relay {
    /// What the relay reads and writes: presence, the store, departures.
    stores: Stores,
    /// The pub/sub subscription needs its own connection (a subscribed
    /// connection can do nothing else), so the relay keeps the URL.
    redis_url: SecretString,
    /// The broadcast channel.
    channel: String,
    /// Behaviour knobs, fixed for the relay's life.
    options: RelayOptions,
    /// Built once: the HTTP client and one SDK client per endpoint.
    management: Arc<Management>,
    /// Shared with every task, readable from outside.
    metrics: Arc<RelayMetrics>,
    /// This relay's id in the cluster: `INSTANCE_ID` and a unique suffix,
    /// so two relays never share one by mistake.
    id: String,
}

chat_shared::debug_fields!(Relay {
    id,
    channel,
    options
});

impl Relay {
    /// Builds the relay's clients from `config`: PostgreSQL pool, Redis
    /// connection manager, Management API HTTP client.
    ///
    /// # Errors
    /// When a URL is invalid or Redis does not answer at start-up.
    pub async fn new(config: &RelayProcessConfig) -> anyhow::Result<Self> {
        Self::with_options(config, RelayOptions::from_config(config)).await
    }

    /// Like [`Relay::new`], with `options` (e.g. a local stack allowing its
    /// own gateway's endpoint).
    ///
    /// # Errors
    /// When a URL is invalid or Redis does not answer at start-up.
    pub async fn with_options(
        config: &RelayProcessConfig,
        options: RelayOptions,
    ) -> anyhow::Result<Self> {
        let adapters = chat_shared::bootstrap::adapters(&config.common)
            .await
            .context("building the relay's clients")?;
        Ok(Self::from_parts(
            adapters,
            config.common.redis_url.clone(),
            options,
        ))
    }

    /// A relay over adapters the caller already has (the local stack,
    /// tests). `redis_url` is for the pub/sub subscription on the bus's
    /// channel.
    pub fn from_parts(adapters: Adapters, redis_url: SecretString, options: RelayOptions) -> Self {
        let channel = adapters.bus.channel().to_owned();
        let stores = Stores {
            departures: Departures::new(
                adapters.store.clone(),
                adapters.presence.clone(),
                adapters.bus,
            ),
            store: adapters.store,
            presence: adapters.presence,
        };
        let management = Arc::new(Management::new(
            options.aws_region.clone(),
            options.endpoints.clone(),
        ));
        let id = unique_id(&options.instance_id);
        Self {
            stores,
            redis_url,
            channel,
            options,
            management,
            metrics: Arc::new(RelayMetrics::default()),
            id,
        }
    }

    /// The relay's counters (live: keep the `Arc` and read it any time).
    pub fn metrics(&self) -> Arc<RelayMetrics> {
        self.metrics.clone()
    }

    /// The presence adapter the relay reads routes from (its health
    /// endpoint pings Redis through it).
    pub fn presence(&self) -> &Presence {
        &self.stores.presence
    }

    /// This relay's id, as its lease shards' leases in Redis hold it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs the lease loop, the bus subscription, the workers, the
    /// outboxes and the sweeper until `shutdown` is cancelled; then stops
    /// reading, finishes queued envelopes and posts (for at most
    /// `drain_timeout`), writes the delivered marks back, gives its lease shards'
    /// leases back and returns.
    ///
    /// Dropping the returned future instead (aborting its task) stops
    /// everything at once without giving anything back, as a crash would:
    /// the leases then expire by themselves.
    ///
    /// # Errors
    /// Only when the Redis URL is invalid; Redis being down is retried.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let target = chat_shared::redis_conn::RedisTarget {
            url: self.redis_url.clone(),
            cluster: self.stores.presence.redis().is_cluster(),
        };
        if !target.cluster {
            redis::Client::open(self.redis_url.expose_secret())
                .context("REDIS_URL is not a valid Redis URL")?;
        }
        let channels = (0..chat_shared::presence::keys::PARTITIONS)
            .map(|p| chat_shared::presence::Keys::bus_channel(&self.channel, p))
            .collect();
        let outboxes = outbox::Outboxes::new(
            self.management.clone(),
            self.stores.clone(),
            self.metrics.clone(),
            self.options.concurrency,
            self.options.young_connection,
        );
        let lease_shards = self.options.cluster.lease_shards.max(1);
        let ownership = Arc::new(cluster::Ownership::new(lease_shards));
        let missed = Arc::new(Mutex::new(cluster::Missed::new(
            lease_shards,
            self.options.cluster.missed_window(),
        )));
        let mut workers = JoinSet::new();
        let mut senders = Vec::with_capacity(self.options.lanes.max(1));
        for _ in 0..self.options.lanes.max(1) {
            let (tx, rx) = mpsc::channel(LANE_QUEUE);
            senders.push(tx);
            let worker = worker::Worker::new(
                self.stores.clone(),
                outboxes.clone(),
                self.management.clone(),
                self.metrics.clone(),
                self.options.room_idle,
                ownership.clone(),
                missed.clone(),
            );
            workers.spawn(worker.run(rx));
        }
        // Spawned into a set owned by this future, so that dropping it
        // (a crash in tests) stops the lease renewals too.
        let mut background = JoinSet::new();
        let (refresh, refresh_requests) = cluster::Cluster::refresh_channel();
        let cluster_stop = CancellationToken::new();
        background.spawn(
            cluster::Cluster {
                id: self.id.clone(),
                redis: self.stores.presence.redis(),
                keys: self.stores.presence.keys().clone(),
                options: self.options.cluster.clone(),
                ownership: ownership.clone(),
                missed: missed.clone(),
                workers: senders.iter().map(mpsc::Sender::downgrade).collect(),
                metrics: self.metrics.clone(),
                draining: shutdown.clone(),
            }
            .run(cluster_stop.clone(), refresh_requests),
        );
        background.spawn(report_delivery_lag(
            self.stores.presence.clone(),
            self.metrics.clone(),
            self.id.clone(),
            cluster_stop.clone(),
        ));
        background.spawn(
            sweeper::Sweeper {
                departures: self.stores.departures.clone(),
                management: self.management.clone(),
                outboxes: outboxes.clone(),
                metrics: self.metrics.clone(),
                ownership: ownership.clone(),
            }
            .run(self.options.sweep_interval, shutdown.clone()),
        );
        tracing::info!(
            relay = %self.id,
            channel = %self.channel,
            lanes = self.options.lanes,
            lease_shards,
            concurrency = self.options.concurrency,
            "relay started"
        );
        subscriber::BusReader {
            target,
            channels,
            workers: senders,
            ownership,
            missed,
            refresh,
            metrics: self.metrics.clone(),
            ping_interval: self.options.bus_ping_interval,
            relay_id: self.id.clone(),
        }
        .run(shutdown)
        .await;

        // The reader dropped the worker senders: each worker finishes its
        // queue, waits for its posts, writes its marks back and stops;
        // then the outboxes drain. The leases are renewed meanwhile, and
        // given back last, so no other relay posts to a connection before
        // this one's last post.
        let deadline = tokio::time::Instant::now() + self.options.drain_timeout;
        let drained = tokio::time::timeout_at(deadline, async {
            while workers.join_next().await.is_some() {}
            outboxes.drained().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                pending_connections = outboxes.active(),
                "shutdown: gave up waiting for queued posts"
            );
            workers.abort_all();
        }
        cluster_stop.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(5), async {
            while background.join_next().await.is_some() {}
        })
        .await;
        if stopped.is_err() {
            tracing::warn!("shutdown: the lease loop or the sweeper did not stop in time");
        }
        tracing::info!("relay stopped");
        Ok(())
    }
}

/// What the relay's tasks read and write through, cloned into each.
#[derive(Debug, Clone)]
pub(crate) struct Stores {
    /// Stored messages, for gap fills and catch-ups.
    pub(crate) store: Store,
    /// Subscriptions, routes, watermarks, greetings.
    pub(crate) presence: Presence,
    /// Removing stale and expired connections.
    pub(crate) departures: Departures,
}

/// The lease shard (of `lease_shards`, `RELAY_SHARDS`) that handles an
/// ordering key (a room id, a user id for presence, a connection id):
/// whoever holds lease `relay:lease:{n}` for it delivers its events.
pub fn lease_shard(key: &str, lease_shards: usize) -> usize {
    lanes::lease_shard_of_key(key, lease_shards)
}

/// `instance` with a suffix unique to this process and call: the time in
/// nanoseconds, the process id and a counter.
fn unique_id(instance: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
    format!("{instance}-{:x}-{:x}-{n}", std::process::id(), nanos)
}

/// How often the relay reports its delivery lag.
const LAG_REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// Reports the largest delivery lag of each interval to Redis, where every
/// gateway's lease renewal reads it to shed sends while the fan-out is
/// behind (`chat_shared::realtime::Realtime::with_admission`). A relay
/// that stops reporting is forgotten after a second.
async fn report_delivery_lag(
    presence: Presence,
    metrics: Arc<RelayMetrics>,
    relay: String,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(LAG_REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let lag = metrics
            .delivery_lag_ms
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        if let Err(err) = presence.report_delivery_lag(&relay, lag).await {
            tracing::debug!(error = %err, "reporting the delivery lag failed");
        }
    }
}
