//! Building the clients once per process (a Lambda cold start, the local
//! stack, the relay), and handing each process the adapters it needs:
//! [`adapters`] (PostgreSQL, Redis, the bus) for every process,
//! [`chat`] (the service over them) for the handlers, [`app_state`] for
//! REST and [`ws_state`] for the WebSocket handlers. The relay takes the
//! adapters alone: it builds no service and no REST state.
//! Also the runtime of the long-running processes.

use anyhow::Context as _;

use crate::bus::Bus;
use crate::config::{ApiConfig, CommonConfig, HandlerConfig};
use crate::limits::Limiter;
use crate::presence::{Keys, Presence, RedisConn, connect_redis};
use crate::service::Chat;
use crate::store::{Store, connect_pool};

/// The Tokio runtime of a long-running process (the local stack, a gateway,
/// the relay), sized like `#[tokio::main]`: `TOKIO_WORKER_THREADS` when set,
/// else the CPUs the process may use (a container's CPU quota).
///
/// One thread gets the current-thread scheduler, not a multi-thread one
/// with a single worker. The latter runs a task woken by the running task
/// next (its "LIFO slot"), so each request handed to the Redis connection
/// or to a pipelined HTTP connection was written at once, alone; on the
/// current-thread scheduler a woken task waits its turn, and the requests
/// queued meanwhile leave together. Measured on the local stack at 6,000
/// DIRECT messages/s (docs/BENCHMARKS.md, "Single runs behind the
/// defaults"): the relay's writes to Redis fell from one per envelope to
/// about one in four, and Redis's own reads and writes by more than half.
///
/// # Errors
/// When the runtime cannot be built (out of threads or file descriptors).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let threads = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        // Reads TOKIO_WORKER_THREADS itself.
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}

/// The adapters every process talks to the stores through.
#[derive(Debug, Clone)]
pub struct Adapters {
    /// PostgreSQL.
    pub store: Store,
    /// Connections, subscriptions and presence in Redis.
    pub presence: Presence,
    /// The pub/sub bus.
    pub bus: Bus,
    /// The Redis connection they share (the rate limiter takes it too).
    pub redis: RedisConn,
    /// The Redis key schema under this deployment's prefix.
    pub keys: Keys,
}

/// Builds the adapters from the common configuration: the PostgreSQL
/// pool, one Redis connection (single or cluster), presence and the bus over it.
///
/// # Errors
/// When a URL is invalid or Redis does not answer.
pub async fn adapters(config: &CommonConfig) -> anyhow::Result<Adapters> {
    let pool = connect_pool(&config.database_url, config.pg_pool_max)?;
    let redis = connect_redis(&config.redis_target())
        .await
        .context("REDIS_URL")?;
    let keys = Keys::new(config.redis_key_prefix.clone());
    Ok(Adapters {
        store: Store::new(pool, config.message_retention),
        presence: Presence::new(redis.clone(), keys.clone()),
        bus: Bus::new(
            redis.clone(),
            config.broadcast_channel.clone(),
            config.instance_id.clone(),
            keys.clone(),
        ),
        redis,
        keys,
    })
}

/// The service of the handlers over `adapters`, with the rate limits of
/// `api`.
pub fn chat_over(adapters: Adapters, api: &ApiConfig) -> Chat {
    let limiter = Limiter::new(adapters.redis, adapters.keys, api.rate_limits);
    Chat::new(adapters.store, adapters.presence, adapters.bus, limiter)
}

/// Builds the service of the REST and WebSocket handlers.
///
/// # Errors
/// When a URL is invalid or Redis does not answer.
pub async fn chat(config: &HandlerConfig) -> anyhow::Result<Chat> {
    Ok(chat_over(adapters(&config.common).await?, &config.api))
}

/// The token verifier of `api`.
pub fn verifier(api: &ApiConfig) -> std::sync::Arc<crate::auth::Hs256Verifier> {
    std::sync::Arc::new(crate::auth::Hs256Verifier::new(
        &api.jwt_secret,
        api.jwt_issuer.as_deref(),
        api.jwt_audience.as_deref(),
    ))
}

/// Builds the WebSocket handlers' state from `config`.
///
/// # Errors
/// When a URL is invalid or Redis does not answer.
#[cfg(feature = "ws")]
pub async fn ws_state(config: &HandlerConfig) -> anyhow::Result<crate::ws::WsState> {
    Ok(ws_state_over(chat(config).await?, config))
}

/// The WebSocket handlers' state over an existing service.
#[cfg(feature = "ws")]
pub fn ws_state_over(chat: Chat, config: &HandlerConfig) -> crate::ws::WsState {
    let verifier = verifier(&config.api);
    crate::ws::WsState {
        realtime: crate::realtime::Realtime::new(chat, config.common.presence_ttl)
            .with_admission(config.api.admission_limits())
            .with_sessions(config.api.session_policy(), verifier.clone()),
        verifier,
    }
}

/// Builds the REST state from `config`.
///
/// # Errors
/// When a URL is invalid or Redis does not answer.
#[cfg(feature = "http")]
pub async fn app_state(config: &HandlerConfig) -> anyhow::Result<crate::http::AppState> {
    Ok(app_state_over(chat(config).await?, &config.api))
}

/// The REST state over an existing service.
#[cfg(feature = "http")]
pub fn app_state_over(chat: Chat, api: &ApiConfig) -> crate::http::AppState {
    crate::http::AppState {
        chat,
        verifier: verifier(api),
        max_waiting: api.pg_max_waiting,
    }
}
