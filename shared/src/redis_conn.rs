//! One Redis connection type over a single Redis and a Redis Cluster, so
//! that presence, the bus, the rate limiter and the relay never branch on
//! which one they talk to.
//!
//! - A single Redis (`REDIS_CLUSTER` unset or `false`): the crate's
//!   `ConnectionManager`, which reconnects by itself.
//! - A Redis Cluster (`REDIS_CLUSTER=true`; ElastiCache cluster mode,
//!   ElastiCache Serverless, a local `redis-cli --cluster create`): the
//!   crate's async cluster connection, which learns the slot map from the
//!   seed node(s) in `REDIS_URL` (one URL, or several separated by commas),
//!   follows `MOVED` and `ASK`, refreshes the slot map after a failover or
//!   a resharding and reconnects to every node by itself.
//!
//! Every script and pipeline of the service touches one hash slot (see
//! [`crate::presence::keys`]). Reads that span slots by nature (the rooms of
//! a console page, the members' online flags) go through
//! [`RedisConn::query_grouped`], which sends one pipeline per hash tag,
//! concurrently, on a cluster and one pipeline on a single Redis.
//!
//! # Retries
//! The cluster connection retries a request after `MOVED`, `ASK`,
//! `TRYAGAIN`, `CLUSTERDOWN` and connection errors (a failover), up to
//! [`CLUSTER_RETRIES`] times. A retried write can run twice when the first
//! attempt's reply was lost: every write of the service is idempotent (set
//! adds, hash sets, compare-and-set scripts, `SET` to a maximum) except
//! publishing, whose duplicates the relay drops (it deduplicates a room's
//! messages by sequence id; presence and typing repeat a state).

use std::time::Duration;

use anyhow::Context as _;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use secrecy::ExposeSecret as _;

/// How often the cluster connection retries a request (a failover takes a
/// few seconds: the retries back off up to [`CLUSTER_MAX_RETRY_WAIT`]).
pub const CLUSTER_RETRIES: u32 = 8;

/// The longest wait between two retries of the cluster connection.
const CLUSTER_MAX_RETRY_WAIT: Duration = Duration::from_millis(1500);

/// How long connecting and each request may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Where Redis is and how to talk to it (`REDIS_URL`, `REDIS_CLUSTER`).
#[derive(Clone)]
pub struct RedisTarget {
    /// One URL, or on a cluster one or more seed URLs separated by commas.
    pub url: secrecy::SecretString,
    /// A Redis Cluster (`REDIS_CLUSTER=true`).
    pub cluster: bool,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl RedisTarget {
    /// The seed URLs (one for a single Redis).
    pub fn urls(&self) -> Vec<String> {
        self.url
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// A cluster client (for the relay's sharded subscription, built with
    /// `builder` adjustments such as RESP3 and a push sender).
    ///
    /// # Errors
    /// When a URL is invalid.
    pub fn cluster_builder(&self) -> anyhow::Result<redis::cluster::ClusterClientBuilder> {
        let urls = self.urls();
        anyhow::ensure!(!urls.is_empty(), "REDIS_URL names no node");
        Ok(redis::cluster::ClusterClientBuilder::new(urls)
            .retries(CLUSTER_RETRIES)
            .max_retry_wait(CLUSTER_MAX_RETRY_WAIT.as_millis() as u64)
            .connection_timeout(TIMEOUT)
            .response_timeout(TIMEOUT))
    }
}

/// A Redis connection, single or cluster (see the module docs). Cheap to
/// clone: clones share the connection(s).
#[derive(Clone)]
pub enum RedisConn {
    /// A single Redis (or a replication group's primary endpoint).
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterHandle),
}

/// The cluster connection, replaced by a fresh one (new slot map, new
/// node connections) when a request times out: after a resharding that
/// moved a slot under a multi-key script the crate's connection was seen
/// to time out on that slot for good, while a new connection works at
/// once. Clones share the slot.
#[derive(Clone)]
pub struct ClusterHandle {
    current: std::sync::Arc<std::sync::RwLock<ClusterConnection>>,
    target: RedisTarget,
    rebuilding: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ClusterHandle {
    fn get(&self) -> ClusterConnection {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// After `err`: a timeout starts one rebuild in the background (the
    /// request that saw it fails as it would have; the next ones use the
    /// new connection).
    fn after_error(&self, err: &redis::RedisError) {
        use std::sync::atomic::Ordering;
        if !err.is_timeout() || self.rebuilding.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            match cluster_connection(&this.target).await {
                Ok(fresh) => {
                    *this
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
                    tracing::warn!("a Redis Cluster request timed out; connection rebuilt");
                }
                Err(err) => {
                    tracing::warn!(error = %err, "rebuilding the Redis Cluster connection failed");
                }
            }
            this.rebuilding.store(false, Ordering::Release);
        });
    }
}

async fn cluster_connection(target: &RedisTarget) -> anyhow::Result<ClusterConnection> {
    let client = target
        .cluster_builder()?
        .build()
        .context("REDIS_URL is not a valid list of Redis Cluster node URLs")?;
    client
        .get_async_connection()
        .await
        .context("connecting to the Redis Cluster")
}

/// Whether an `INFO cluster` answer says cluster mode is on.
fn cluster_enabled(info: &str) -> bool {
    info.lines().any(|line| line.trim() == "cluster_enabled:1")
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_cluster() {
            "RedisConn::Cluster"
        } else {
            "RedisConn::Single"
        })
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(handle) => Box::pin(async move {
                let mut conn = handle.get();
                let answer = conn.req_packed_command(cmd).await;
                if let Err(err) = &answer {
                    handle.after_error(err);
                }
                answer
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(handle) => Box::pin(async move {
                let mut conn = handle.get();
                let answer = conn.req_packed_commands(cmd, offset, count).await;
                if let Err(err) = &answer {
                    handle.after_error(err);
                }
                answer
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(handle) => handle.get().get_db(),
        }
    }
}

impl RedisConn {
    /// Connects to `target`.
    ///
    /// # Errors
    /// When the URL is invalid or Redis does not answer at start-up.
    pub async fn connect(target: &RedisTarget) -> anyhow::Result<Self> {
        if target.cluster {
            let conn = cluster_connection(target).await?;
            return Ok(Self::Cluster(ClusterHandle {
                current: std::sync::Arc::new(std::sync::RwLock::new(conn)),
                target: target.clone(),
                rebuilding: std::sync::Arc::default(),
            }));
        }
        let client = redis::Client::open(target.url.expose_secret())
            .context("REDIS_URL is not a valid Redis URL")?;
        // One quick retry when a reconnect fails: the manager's default (six,
        // backing off to 3.2 s) kept every request waiting about 9 s while
        // Redis was down. Failing fast is what callers can act on (503 with
        // Retry-After, INTERNAL "retry later"); the next command starts a new
        // reconnect anyway, so recovery is not slower.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1);
        let mut conn = client
            .get_connection_manager_with_config(config)
            .await
            .context("connecting to Redis")?;
        // A cluster node named without REDIS_CLUSTER=true would answer the
        // first script on another slot with MOVED: say so at start-up. A
        // server that does not answer INFO (an ACL without it) is taken for
        // what the configuration says.
        let info: redis::RedisResult<String> = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut conn)
            .await;
        if info.is_ok_and(|info| cluster_enabled(&info)) {
            anyhow::bail!(
                "REDIS_URL is a Redis Cluster node (INFO cluster: cluster_enabled:1), \
                 but REDIS_CLUSTER is not true: set REDIS_CLUSTER=true (template: \
                 RedisMode cluster or serverless)"
            );
        }
        Ok(Self::Single(conn))
    }

    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// The command that publishes on a bus channel: `SPUBLISH` on a cluster
    /// (sharded pub/sub: the message goes to the shard that owns the
    /// channel's slot only), `PUBLISH` on a single Redis, where the crate's
    /// async client has no `SSUBSCRIBE` for the relay to read it with (see
    /// `docs/ARCHITECTURE.md`, "Redis Cluster").
    pub fn publish_command(&self) -> &'static str {
        if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// Runs commands that may live in different slots: one pipeline per
    /// hash tag (`tags[i]` is command `i`'s), the pipelines concurrently,
    /// on a cluster; one pipeline on a single Redis. Answers in the order
    /// of `commands`. Counts its round trips.
    ///
    /// # Errors
    /// When Redis does not answer.
    pub async fn query_grouped(
        &self,
        commands: Vec<(String, Cmd)>,
    ) -> redis::RedisResult<Vec<Value>> {
        use crate::metrics::CountedRedis;
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        if !self.is_cluster() {
            let mut pipe = redis::pipe();
            for (_, cmd) in &commands {
                pipe.add_command(cmd.clone());
            }
            return pipe.query_async(&mut CountedRedis(self.clone())).await;
        }
        let mut groups: std::collections::BTreeMap<String, (Vec<usize>, Vec<Cmd>)> =
            std::collections::BTreeMap::new();
        for (i, (key, cmd)) in commands.into_iter().enumerate() {
            let tag = crate::presence::keys::hash_tag(&key).to_owned();
            let (indexes, cmds) = groups.entry(tag).or_default();
            indexes.push(i);
            cmds.push(cmd);
        }
        let total: usize = groups.values().map(|(i, _)| i.len()).sum();
        let answers = futures::future::try_join_all(groups.into_values().map(|(indexes, cmds)| {
            let mut conn = CountedRedis(self.clone());
            async move {
                // A lone command goes as a command, not a one-command
                // pipeline: the cluster connection follows `ASK` (a slot
                // being migrated) for commands; a pipeline's redirections
                // were seen to time out during a resharding.
                let values: Vec<Value> = if let [cmd] = cmds.as_slice() {
                    vec![cmd.query_async(&mut conn).await?]
                } else {
                    let mut pipe = redis::pipe();
                    for cmd in cmds {
                        pipe.add_command(cmd);
                    }
                    pipe.query_async(&mut conn).await?
                };
                redis::RedisResult::Ok((indexes, values))
            }
        }))
        .await?;
        let mut out = vec![Value::Nil; total];
        for (indexes, values) in answers {
            for (i, v) in indexes.into_iter().zip(values) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}
