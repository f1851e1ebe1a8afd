//! Building the clients once per process (a Lambda cold start, the local
//! stack, the relay): pool, Redis connection, verifier, service; and the
//! runtime of the long-running processes.

use std::sync::Arc;

use anyhow::Context as _;

use crate::auth::Hs256Verifier;
use crate::bus::Bus;
use crate::config::Config;
use crate::http::AppState;
use crate::limits::Limiter;
use crate::presence::{Keys, Presence, connect_redis};
use crate::realtime::Realtime;
use crate::service::Chat;
use crate::store::{Store, connect_pool};
use crate::ws::WsState;

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

/// Builds the WebSocket handlers' state from `config`.
///
/// # Errors
/// When a URL is invalid or Redis does not answer.
pub async fn ws_state(config: &Config) -> anyhow::Result<WsState> {
    let app = app_state(config).await?;
    Ok(WsState {
        realtime: Realtime::new(app.chat, config.presence_ttl)
            .with_admission(config.admission_limits())
            .with_sessions(config.session_policy(), app.verifier.clone()),
        verifier: app.verifier,
    })
}

/// Builds the service over its stores from `config`: what the relay needs
/// (it verifies no tokens, so it needs no `JWT_SECRET`).
///
/// # Errors
/// When a URL is invalid or Redis does not answer.
pub async fn chat(config: &Config) -> anyhow::Result<Chat> {
    let pool = connect_pool(&config.database_url, config.pg_pool_max)?;
    let redis = connect_redis(&config.redis_url)
        .await
        .context("REDIS_URL")?;
    let store = Store::new(pool, config.message_retention);
    let keys = Keys::new(config.redis_key_prefix.clone());
    let presence = Presence::new(redis.clone(), keys.clone());
    let limiter = Limiter::new(redis.clone(), keys.clone(), config.rate_limits);
    let bus = Bus::new(
        redis,
        config.broadcast_channel.clone(),
        config.instance_id.clone(),
        keys,
    );
    Ok(Chat::new(store, presence, bus, limiter))
}

/// Builds the service and REST state from `config`.
///
/// # Errors
/// When `JWT_SECRET` is missing, a URL is invalid or Redis does not answer.
pub async fn app_state(config: &Config) -> anyhow::Result<AppState> {
    let secret = config.require_jwt_secret()?;
    Ok(AppState {
        chat: chat(config).await?,
        verifier: Arc::new(Hs256Verifier::new(
            secret,
            config.jwt_issuer.as_deref(),
            config.jwt_audience.as_deref(),
        )),
        max_waiting: config.pg_max_waiting,
    })
}
