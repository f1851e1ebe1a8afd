//! The REST API of PROTOCOL.md §4 as one axum [`Router`].
//!
//! `functions/rest` runs [`app`] under `lambda_http`; the local stack serves
//! it directly, beside the WebSocket gateway. Every failure, including
//! unknown routes, bad bodies and refused tokens, answers with the API's
//! error shape.
//!
//! # Layout
//! - [`extract`]: the caller, JSON body, query and path extractors.
//! - [`routes`]: one handler per route under `/api/v1/chat`.
//! - [`openapi`]: the OpenAPI description, served at `/api/v1/openapi.json`.
//! - `error`: [`crate::Error`] as an HTTP response.

pub mod asyncapi;
mod error;
pub mod extract;
pub mod openapi;
pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::auth::TokenVerifier;
use crate::error::Error;
use crate::service::Chat;

/// Largest REST request body (PROTOCOL §4): 256 KiB.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The use cases.
    pub chat: Chat,
    /// Checks bearer tokens.
    pub verifier: Arc<dyn TokenVerifier>,
    /// Shed load (429) while more requests than this wait for PostgreSQL.
    pub max_waiting: usize,
}

/// The whole REST API: `/health` plus `/api/v1/chat/*`.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route(openapi::OPENAPI_PATH, get(openapi::serve))
        .route(asyncapi::ASYNCAPI_PATH, get(asyncapi::serve))
        .nest("/api/v1/chat", routes::router(state.clone()))
        .fallback(not_found)
        // A known path with another method is "no such endpoint" too (as
        // the baseline answers), not axum's bare 405 without the error body.
        .method_not_allowed_fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(catch_panics())
        .with_state(state)
}

/// Turns a handler that panicked into a 500 `INTERNAL` with the API's
/// error body, logged with the panic's message, instead of a dropped
/// connection (the release binaries unwind, `panic = "unwind"`, so one
/// bad request fails alone and the process goes on).
pub fn catch_panics()
-> tower_http::catch_panic::CatchPanicLayer<fn(Box<dyn std::any::Any + Send + 'static>) -> Response>
{
    fn answer(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        Error::internal(anyhow::anyhow!("handler panicked: {message}")).into_response()
    }
    tower_http::catch_panic::CatchPanicLayer::custom(answer as fn(_) -> _)
}

/// Longest request target (path and query string) the service reads.
/// Longer is 414 `URI Too Long`. API Gateway refuses long ones too.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Largest header section (names, values and their separators) the service
/// reads. Larger is 431 `Request Header Fields Too Large`. API Gateway's
/// HTTP APIs allow 10 KiB of request line and headers; a token is well
/// under 4 KiB. (Beyond about 400 KiB hyper itself answers 431, without a
/// body, before any of this runs.)
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Refuses a request whose target or headers exceed [`MAX_URI_BYTES`] /
/// [`MAX_HEADER_BYTES`], with the API's error shape (code `BAD_REQUEST`,
/// the HTTP status saying which limit). Applied in front of every route
/// the local stack serves, the WebSocket handshake included.
pub async fn limit_request_head(request: Request, next: Next) -> Response {
    let uri_bytes = request
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len());
    if uri_bytes > MAX_URI_BYTES {
        return head_too_large(
            StatusCode::URI_TOO_LONG,
            "the request target (path and query) exceeds 8 KiB",
        );
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return head_too_large(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the request headers exceed 16 KiB",
        );
    }
    next.run(request).await
}

fn head_too_large(status: StatusCode, message: &str) -> Response {
    let body = crate::error::ErrorBody::new(crate::error::ErrorCode::BadRequest, message);
    (status, axum::Json(body)).into_response()
}

/// Answers 429 at once while the PostgreSQL pool has too many waiters,
/// instead of queueing without bound.
pub(crate) async fn shed_load(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if state.chat.store_waiting() > state.max_waiting {
        return Error::rate_limited("server busy, retry later", 1).into_response();
    }
    next.run(request).await
}

async fn not_found() -> Error {
    Error::not_found("no such endpoint")
}

/// `GET /health`: 200 when PostgreSQL and Redis answer within 2 s, else 503
/// naming the one that is down.
#[utoipa::path(get, path = "/health", tag = "service", security(()),
    responses(
        (status = 200, description = "PostgreSQL and Redis answer", body = openapi::Health),
        (status = 503, description = "A dependency does not answer", body = openapi::Health)))]
async fn health(State(state): State<AppState>) -> Response {
    let health = state.chat.health(Duration::from_secs(2)).await;
    let all_ok = health.postgres && health.redis;
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = openapi::Health {
        postgres: openapi::HealthWord::of(health.postgres),
        redis: openapi::HealthWord::of(health.redis),
        status: openapi::HealthWord::of(all_ok),
    };
    (status, axum::Json(body)).into_response()
}
