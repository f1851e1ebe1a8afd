//! The developer console: a single static page at `/console` that talks to
//! the service exactly as any client does (PROTOCOL.md: WebSocket `/ws`
//! plus REST `/api/v1/chat`), and an operator view at `/console/ops`.
//!
//! The pages are plain HTML, CSS and JavaScript in `local/console/`,
//! compiled into the binary with `include_str!`, so `chat-local` needs no
//! files at run time. Only the local stack serves them; no Lambda links
//! this module. The chat page runs on the TypeScript client library
//! (`clients/typescript`): its ES modules, as `npm run build` emits them,
//! are committed in `local/console/vendor/chat-client/` by
//! `scripts/build-console-lib.sh` (whose `--check` CI runs) and served at
//! `/console/lib/*.js`, so the cargo build needs neither npm nor a
//! bundler.
//!
//! Two endpoints exist only here:
//! - `POST /console/dev-token {userId, displayName?, admin?}` → `{token}`
//!   mints a token with the configured `JWT_SECRET`, so a developer can sign
//!   in by picking a user id. It is routed only when the stack is started
//!   with dev tokens (`chat-local serve --dev-tokens`); otherwise the path
//!   answers 404 like any unknown one.
//! - `GET /console/api/ops` (admin token): per-gateway connections, rooms
//!   with their subscriber counts, this process's gateway and relay
//!   counters, and errors by code; what the operator view polls.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chat_shared::auth::{AuthUser, DevClaims, TokenVerifier, bearer_from_headers, mint_hs256};
use chat_shared::domain::UserId;
use chat_shared::error::{Error, Result};
use chat_shared::http::extract::JsonObject;
use chat_shared::metrics::error_counts;
use chat_shared::service::Chat;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::metrics::Telemetry;

/// Rooms listed in the ops view at most (the busiest first).
const OPS_MAX_ROOMS: usize = 200;
/// Of those, how many get their name and type looked up in PostgreSQL.
const OPS_NAMED_ROOMS: usize = 25;
/// Connections read to group them by gateway, at most.
const OPS_MAX_CONNECTIONS: usize = 20_000;
/// Lifetime of a dev token: a working day.
const DEV_TOKEN_TTL_SECS: i64 = 12 * 3600;
/// Longest display name a dev token carries.
const MAX_DISPLAY_NAME_CHARS: usize = 100;

/// Signs development tokens the way the deployment's verifier expects them.
pub struct DevTokens {
    /// `JWT_SECRET`.
    pub secret: SecretString,
    /// `JWT_ISSUER`, when the deployment checks one.
    pub issuer: Option<String>,
    /// `JWT_AUDIENCE`, when the deployment checks one.
    pub audience: Option<String>,
}

chat_shared::debug_fields!(DevTokens {});

impl DevTokens {
    /// Tokens for the deployment `config` describes (`JWT_*`).
    pub fn from_config(config: &chat_shared::Config) -> Self {
        Self {
            secret: config.api.jwt_secret.clone(),
            issuer: config.api.jwt_issuer.clone(),
            audience: config.api.jwt_audience.clone(),
        }
    }
}

/// What the console routes share. Cheap to clone.
#[derive(Clone)]
pub struct ConsoleState {
    /// Checks the admin token of the ops endpoint.
    pub verifier: Arc<dyn TokenVerifier>,
    /// Redis (rooms, connections) and PostgreSQL (room names) for ops.
    pub chat: Chat,
    /// This process's counters.
    pub telemetry: Telemetry,
    /// `Some` only when dev tokens are enabled.
    pub dev_tokens: Option<Arc<DevTokens>>,
}

/// The console routes (pages, assets, ops data, and the dev-token endpoint
/// when enabled), ready to merge into the stack's router.
pub fn router(state: ConsoleState) -> Router {
    let mut router = Router::new()
        .route("/console", get(|| page(HTML, INDEX)))
        .route("/console/", get(|| page(HTML, INDEX)))
        .route("/console/app.js", get(|| page(JS, APP_JS)))
        .route("/console/style.css", get(|| page(CSS, STYLE_CSS)))
        .route("/console/ops", get(|| page(HTML, OPS)))
        .route("/console/ops.js", get(|| page(JS, OPS_JS)))
        .route("/console/api/ops", get(ops));
    for &(name, body) in LIB {
        router = router.route(&format!("/console/lib/{name}"), get(move || page(JS, body)));
    }
    if state.dev_tokens.is_some() {
        router = router.route("/console/dev-token", post(dev_token));
    }
    router.with_state(state)
}

const INDEX: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const STYLE_CSS: &str = include_str!("../console/style.css");
const OPS: &str = include_str!("../console/ops.html");
const OPS_JS: &str = include_str!("../console/ops.js");

/// `(name, contents)` of one module of the vendored client library.
macro_rules! lib_module {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!("../console/vendor/chat-client/", $name)),
        )
    };
}

/// The client library's ES modules that app.js imports, by file name: every
/// `.js` file in `local/console/vendor/chat-client/`, served under
/// `/console/lib/` (scripts/build-console-lib.sh lists them when it
/// refreshes the copy; the console test checks none is missing).
const LIB: &[(&str, &str)] = &[
    lib_module!("index.js"),
    lib_module!("client.js"),
    lib_module!("protocol.js"),
    lib_module!("util.js"),
];

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

async fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The binary is the version: a rebuilt stack must not serve stale JS.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `POST /console/dev-token {userId, displayName?, admin?}` → `{token, userId, expiresIn}`.
async fn dev_token(
    State(state): State<ConsoleState>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>> {
    let Some(tokens) = state.dev_tokens.as_deref() else {
        return Err(Error::not_found("no such endpoint"));
    };
    let user_id = match body.get("userId") {
        Some(Value::String(s)) => UserId::parse(s.trim(), "userId")?,
        _ => return Err(Error::bad_request("userId must be a user id")),
    };
    let display_name = match body.get("displayName") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s))
            if s.trim().chars().count() <= MAX_DISPLAY_NAME_CHARS && !s.contains('\0') =>
        {
            Some(s.trim().to_owned())
        }
        _ => {
            return Err(Error::bad_request(format!(
                "displayName must be a string of at most {MAX_DISPLAY_NAME_CHARS} characters"
            )));
        }
    };
    let admin = match body.get("admin") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        _ => return Err(Error::bad_request("admin must be a boolean")),
    };
    let mut claims = DevClaims::new(user_id.as_str(), DEV_TOKEN_TTL_SECS);
    claims.display_name = display_name;
    claims.role = admin.then(|| "admin".to_owned());
    claims.iss = tokens.issuer.clone();
    claims.aud = tokens.audience.clone();
    let token = mint_hs256(&tokens.secret, &claims)?;
    tracing::info!(user_id = %user_id, admin, "console: minted a dev token");
    Ok(Json(
        json!({"token": token, "userId": user_id, "expiresIn": DEV_TOKEN_TTL_SECS}),
    ))
}

/// The caller of an admin-only endpoint: 401 without a valid token, 403
/// when it is not an admin's.
fn admin(state: &ConsoleState, headers: &HeaderMap) -> Result<AuthUser> {
    let token = bearer_from_headers(headers)?;
    let user = state.verifier.verify(token)?;
    if !user.is_admin {
        return Err(Error::forbidden("the operator view needs an admin token"));
    }
    Ok(user)
}

/// `GET /console/api/ops` (admin only).
async fn ops(State(state): State<ConsoleState>, headers: HeaderMap) -> Result<Json<Value>> {
    admin(&state, &headers)?;
    let view = state
        .chat
        .ops_view(OPS_MAX_ROOMS, OPS_MAX_CONNECTIONS, OPS_NAMED_ROOMS)
        .await?;
    let rooms: Vec<Value> = view
        .rooms
        .iter()
        .map(|room| {
            let row = room.row.as_ref();
            json!({
                "roomId": room.room_id,
                "subscribers": room.subscribers,
                "type": row.map(|r| r.kind),
                "name": row.and_then(|r| r.name.clone()),
                "lastSequenceId": row.map(|r| r.last_sequence_id),
            })
        })
        .collect();
    let gateways: Vec<Value> = view
        .gateways
        .into_iter()
        .map(|(endpoint, connections)| json!({"endpoint": endpoint, "connections": connections}))
        .collect();
    let telemetry = &state.telemetry;
    let gateway = telemetry.gateway.as_ref().map(|g| {
        let stats = g.stats();
        json!({
            "instance": telemetry.instance_id,
            "connectionsOpen": stats.connections_open,
            "messagesIn": stats.messages_in,
            "postsOut": stats.posts_out,
        })
    });
    let relay = telemetry.relay.as_ref().map(|r| {
        let m = r.snapshot();
        json!({
            "envelopes": m.envelopes,
            "postsOk": m.posts_ok,
            "postsGone": m.posts_gone,
            "postErrors": m.post_errors,
            "outboxOverflows": m.outbox_overflows,
            "gapFills": m.gap_fills,
            "swept": m.swept,
            "pushLatencyUsSum": m.push_latency_us_sum,
            "pushLatencyCount": m.push_latency_count,
        })
    });
    let mut errors = serde_json::Map::new();
    for row in error_counts() {
        let total = errors.entry(row.code.as_str()).or_insert(Value::from(0u64));
        *total = Value::from(total.as_u64().unwrap_or(0) + row.count);
    }
    Ok(Json(json!({
        "instance": telemetry.instance_id,
        "gateway": gateway,
        "gateways": gateways,
        "gatewaysTruncated": view.gateways_truncated,
        "rooms": rooms,
        "roomsTruncated": view.rooms_truncated,
        "relay": relay,
        "errors": errors,
    })))
}
