//! Request extractors whose every rejection uses the API's error shape.

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde_json::{Map, Value};
use std::collections::HashMap;

use crate::auth::{AuthUser, bearer_from_headers};
use crate::domain::{RoomId, UserId};
use crate::error::Error;

use super::AppState;

/// The authenticated caller. Every token failure is a 401; there is no
/// anonymous fallback. The request is then charged to the user's REST
/// request rate (429 `RATE_LIMITED` with `Retry-After` beyond it), and the
/// user is recorded (or their profile refreshed) on the way in, as
/// PROTOCOL §1 requires.
#[derive(Debug, Clone)]
pub struct Caller(pub AuthUser);

/// Like [`Caller`], for a route that sends a message: the request is
/// charged to the user's send rate too, in the same Redis round trip.
#[derive(Debug, Clone)]
pub struct SendingCaller(pub AuthUser);

/// Verifies the token and that it is not revoked, charges the user's rate buckets (the send bucket
/// too when `send`), then records the user. The limit comes before
/// PostgreSQL, so a refused request costs one Redis call.
async fn caller(parts: &Parts, state: &AppState, send: bool) -> Result<AuthUser, Error> {
    let token = bearer_from_headers(&parts.headers)?;
    let session = state.verifier.verify_session(token)?;
    state.chat.admit_rest_caller(session, send).await
}

impl<S> FromRequestParts<S> for Caller
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        caller(parts, &AppState::from_ref(state), false)
            .await
            .map(Self)
    }
}

impl<S> FromRequestParts<S> for SendingCaller
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        caller(parts, &AppState::from_ref(state), true)
            .await
            .map(Self)
    }
}

/// A JSON object body. Malformed JSON or a non-object is 400; a body over
/// the limit is 413.
#[derive(Debug, Clone)]
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::PayloadTooLarge("request body exceeds 256 KiB".into())
            } else {
                Error::bad_request("could not read the request body")
            }
        })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(Error::bad_request("body must be a JSON object")),
            Err(_) if bytes.is_empty() => Err(Error::bad_request("body must be a JSON object")),
            Err(_) => Err(Error::bad_request("malformed JSON body")),
        }
    }
}

/// Query parameters as strings (each route parses its own).
#[derive(Debug, Clone)]
pub struct Params(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(map) = Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|_| Error::bad_request("malformed query string"))?;
        Ok(Self(map))
    }
}

/// The `:roomId` path segment, parsed.
#[derive(Debug, Clone)]
pub struct RoomPath(pub RoomId);

impl<S: Send + Sync> FromRequestParts<S> for RoomPath {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|_| Error::bad_request("malformed path"))?;
        let raw = params
            .get("roomId")
            .ok_or_else(|| Error::bad_request("roomId is required"))?;
        Ok(Self(RoomId::parse(raw)?))
    }
}

/// The `:roomId` and `:userId` path segments, parsed.
#[derive(Debug, Clone)]
pub struct RoomUserPath(pub RoomId, pub UserId);

impl<S: Send + Sync> FromRequestParts<S> for RoomUserPath {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|_| Error::bad_request("malformed path"))?;
        let room = params
            .get("roomId")
            .ok_or_else(|| Error::bad_request("roomId is required"))?;
        let user = params
            .get("userId")
            .ok_or_else(|| Error::bad_request("userId is required"))?;
        Ok(Self(RoomId::parse(room)?, UserId::parse(user, "userId")?))
    }
}
