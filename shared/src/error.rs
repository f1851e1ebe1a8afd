//! The one error type of the use cases, and the protocol's error codes.
//!
//! Client mistakes carry a message meant for the client. Dependency failures
//! carry their cause for the logs only: the client sees "internal error" (500)
//! or "a dependency is unavailable" (503). The REST adapter turns an [`Error`]
//! into `{"error": {"code", "message"}}`; the WebSocket adapter into an
//! `error` event.

use serde::Serialize;

/// The error codes of PROTOCOL.md §2 and §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Malformed JSON, unknown type, bad field.
    BadRequest,
    /// Missing, malformed, expired or wrongly signed token.
    Unauthorized,
    /// Not a member, not an admin.
    Forbidden,
    /// Unknown room, user or route.
    NotFound,
    /// A request that conflicts with stored state.
    Conflict,
    /// A body or message over its size limit.
    PayloadTooLarge,
    /// Over a rate limit, or the service is shedding load.
    RateLimited,
    /// A bug or an unexpected dependency answer.
    Internal,
    /// PostgreSQL or Redis cannot be reached (REST).
    Unavailable,
    /// PostgreSQL or Redis cannot be reached, or did not answer in time
    /// (WebSocket): retry with backoff.
    ServiceUnavailable,
}

impl ErrorCode {
    /// The HTTP status REST answers with.
    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::PayloadTooLarge => 413,
            Self::RateLimited => 429,
            Self::Internal => 500,
            Self::Unavailable | Self::ServiceUnavailable => 503,
        }
    }

    /// The wire name (`BAD_REQUEST`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "BAD_REQUEST",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Forbidden => "FORBIDDEN",
            Self::NotFound => "NOT_FOUND",
            Self::Conflict => "CONFLICT",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::RateLimited => "RATE_LIMITED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
            Self::ServiceUnavailable => "SERVICE_UNAVAILABLE",
        }
    }

    /// The code a WebSocket `error` event carries: a dependency that is
    /// down or timed out is `SERVICE_UNAVAILABLE` there (PROTOCOL.md §2,
    /// "Retrying"), never `INTERNAL`, so a client knows to retry.
    pub fn on_websocket(self) -> Self {
        match self {
            Self::Unavailable => Self::ServiceUnavailable,
            other => other,
        }
    }
}

/// Why a use case failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client sent something invalid; the message says what.
    #[error("{0}")]
    BadRequest(String),
    /// The token was missing or refused.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The room, user or route does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with stored state.
    #[error("{0}")]
    Conflict(String),
    /// A body or field over its limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Too many requests; retry after this many seconds.
    #[error("{message}")]
    RateLimited {
        /// Shown to the client.
        message: String,
        /// Seconds until a retry may succeed (`Retry-After`).
        retry_after_secs: u64,
    },
    /// PostgreSQL or Redis did not answer.
    #[error("dependency unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// Anything else; the cause is logged, never shown.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl Error {
    /// A `BAD_REQUEST`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest(message.into())
    }

    /// An `UNAUTHORIZED`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::Unauthorized(message.into())
    }

    /// A `FORBIDDEN`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::Forbidden(message.into())
    }

    /// A `NOT_FOUND`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(message.into())
    }

    /// A `RATE_LIMITED`.
    pub fn rate_limited(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self::RateLimited {
            message: message.into(),
            retry_after_secs,
        }
    }

    /// An `INTERNAL` error from anything.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        Self::Internal(cause.into())
    }

    /// The protocol code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::Unauthorized(_) => ErrorCode::Unauthorized,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            Self::RateLimited { .. } => ErrorCode::RateLimited,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The message for the client: the cause of a 5xx stays in the logs.
    pub fn client_message(&self) -> String {
        match self {
            Self::Unavailable(_) => "a dependency is unavailable, retry later".to_owned(),
            Self::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        }
    }

    /// `Retry-After` seconds, for the errors a client should retry.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Self::Unavailable(_) => Some(1),
            _ => None,
        }
    }

    /// Logs a server-side failure with its whole cause chain; client errors
    /// are not logged (they are the client's business, and may be noisy).
    pub fn log_if_server_error(&self, context: &str) {
        match self {
            Self::Unavailable(cause) => {
                tracing::warn!(
                    error = format!("{cause:#}"),
                    "{context}: dependency unavailable"
                );
            }
            Self::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "{context}: internal error");
            }
            _ => {}
        }
    }
}

/// The error shape of every REST failure and refused handshake:
/// `{"error": {"code", "message"}}` (PROTOCOL §4). What is sent and what the
/// OpenAPI description shows are this one type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The `error` object, and the first two fields of a WebSocket `error`
/// event's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// The protocol's error code; on REST it matches the HTTP status.
    pub code: ErrorCode,
    /// For people; a 5xx only ever says "internal error" or "a dependency
    /// is unavailable, retry later".
    pub message: String,
}

impl ErrorDetail {
    /// What a REST response (or a refused handshake) says of `err`.
    pub fn of(err: &Error) -> Self {
        Self {
            code: err.code(),
            message: err.client_message(),
        }
    }

    /// What a WebSocket `error` event says of `err` (see
    /// [`ErrorCode::on_websocket`]).
    pub fn on_websocket(err: &Error) -> Self {
        Self {
            code: err.code().on_websocket(),
            message: err.client_message(),
        }
    }
}

impl ErrorBody {
    /// The body for `code` with `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }

    /// The body of a REST response (or a refused handshake) for `err`.
    pub fn of(err: &Error) -> Self {
        Self {
            error: ErrorDetail::of(err),
        }
    }

    /// The body as JSON text.
    pub fn to_json(&self) -> String {
        // Two strings and a unit enum: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"error":{"code":"INTERNAL","message":"internal error"}}"#.to_owned()
        })
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(err: tokio_postgres::Error) -> Self {
        // Closed connections, and the SQLSTATE classes 08 (connection
        // exception) and 57P (operator intervention: shutdown, restart), mean
        // the database is not there right now: 503, retry.
        let unavailable = err.is_closed()
            || err.code().is_some_and(|c| {
                let c = c.code();
                c.starts_with("08") || c.starts_with("57P")
            })
            || err.code().is_none() && err.as_db_error().is_none();
        if unavailable {
            Self::Unavailable(err.into())
        } else {
            Self::Internal(err.into())
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        match err {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => Self::Unavailable(other.into()),
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        if err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_timeout()
        {
            Self::Unavailable(err.into())
        } else {
            Self::Internal(err.into())
        }
    }
}

impl From<redis::ParsingError> for Error {
    fn from(err: redis::ParsingError) -> Self {
        Self::Internal(err.into())
    }
}

/// The result type of the use cases.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_clients_are_told_to_retry_an_outage() {
        assert_eq!(
            ErrorCode::Unavailable.on_websocket().as_str(),
            "SERVICE_UNAVAILABLE"
        );
        assert_eq!(ErrorCode::Forbidden.on_websocket(), ErrorCode::Forbidden);
        assert_eq!(ErrorCode::Unavailable.status(), 503, "REST keeps its 503");
    }

    #[test]
    fn the_error_body_is_the_documented_shape() {
        let body = ErrorBody::of(&Error::not_found("no such room"));
        assert_eq!(
            body.to_json(),
            r#"{"error":{"code":"NOT_FOUND","message":"no such room"}}"#
        );
        let hidden = ErrorBody::of(&Error::internal(anyhow::anyhow!("secret cause")));
        assert_eq!(
            hidden.to_json(),
            r#"{"error":{"code":"INTERNAL","message":"internal error"}}"#
        );
    }
}
