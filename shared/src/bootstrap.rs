//! Building the clients once per process (a Lambda cold start, the local
//! stack, the relay): pool, Redis connection, verifier, service.

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

/// Builds the WebSocket handlers' state from `config`.
///
/// # Errors
/// When a URL is invalid or Redis does not answer.
pub async fn ws_state(config: &Config) -> anyhow::Result<WsState> {
    let app = app_state(config).await?;
    Ok(WsState {
        realtime: Realtime::new(app.chat, config.presence_ttl).with_load_limits(
            config.ws_max_in_flight,
            config.pg_max_waiting,
            config.ws_max_delivery_lag_ms,
        ),
        verifier: app.verifier,
    })
}

/// Builds the service and REST state from `config`.
///
/// # Errors
/// When a URL is invalid or Redis does not answer.
pub async fn app_state(config: &Config) -> anyhow::Result<AppState> {
    let pool = connect_pool(&config.database_url, config.pg_pool_max)?;
    let redis = connect_redis(&config.redis_url)
        .await
        .context("REDIS_URL")?;
    let store = Store::new(pool, config.message_retention);
    let keys = Keys::new(config.redis_key_prefix.clone());
    let presence = Presence::new(redis.clone(), keys.clone());
    let limiter = Limiter::new(redis.clone(), keys, config.rate_limits);
    let bus = Bus::new(
        redis,
        config.broadcast_channel.clone(),
        config.instance_id.clone(),
    );
    Ok(AppState {
        chat: Chat::new(store, presence, bus, limiter),
        verifier: Arc::new(Hs256Verifier::new(
            &config.jwt_secret,
            config.jwt_issuer.as_deref(),
            config.jwt_audience.as_deref(),
        )),
        max_waiting: config.pg_max_waiting,
    })
}
