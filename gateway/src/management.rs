//! The Management API: `POST`, `GET` and `DELETE
//! /{stage}/@connections/{connectionId}`, the PostToConnection,
//! GetConnection and DeleteConnection calls of `apigatewaymanagementapi`.
//!
//! These routes are served only on the management listener, never on the
//! client port, and every request must carry a valid SigV4 signature made
//! with the configured [`crate::ManagementCredentials`] (module `sigv4`);
//! anything else gets 403 `ForbiddenException`, as from API Gateway, and
//! changes nothing. The id in the path arrives
//! percent-encoded (`=` as `%3D`) and is decoded; `@` may be encoded too.
//! Errors carry `x-amzn-ErrorType`, which is how the SDK tells them apart
//! (`is_gone_exception()` needs it), and a JSON `{"message": ...}` body.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::Message;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::Shared;
use crate::connection::{Cause, PostError};
use crate::event::iso_millis;

/// The `@connections` routes for `stage`, each behind the SigV4 check.
pub(crate) fn routes(shared: &Arc<Shared>) -> Router<Arc<Shared>> {
    let stage = &shared.config.stage;
    let methods = || {
        post(post_to_connection)
            .get(get_connection)
            .delete(delete_connection)
    };
    Router::new()
        .route(
            &format!("/{stage}/@connections/{{connection_id}}"),
            methods(),
        )
        .route(
            &format!("/{stage}/%40connections/{{connection_id}}"),
            methods(),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(shared),
            require_sigv4,
        ))
}

/// Lets a request through only with a valid signature; reads the body (up
/// to the message limit) to check it, and hands it on.
async fn require_sigv4(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let limit = shared.config.max_message_bytes;
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        return ManagementError::PayloadTooLarge(limit).into_response();
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if let Err(why) = crate::sigv4::verify(
        &shared.config.management_credentials,
        parts.method.as_str(),
        target,
        &parts.headers,
        &bytes,
        SystemTime::now(),
    ) {
        tracing::debug!(%why, method = %parts.method, "Management API call refused");
        return ManagementError::Forbidden.into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// A Management API error, in the shape the AWS SDK parses.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ManagementError {
    /// No live connection has this id: unknown, closed, or still in
    /// `$connect` (410 `GoneException`).
    #[error("the connection is gone")]
    Gone,
    /// A post larger than the message limit (413 `PayloadTooLargeException`).
    #[error("the payload is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The connection's outbound queue is full (429 `LimitExceededException`).
    #[error("too many messages are waiting to be sent to this connection")]
    LimitExceeded,
    /// Unsigned, or not signed with the configured credentials (403
    /// `ForbiddenException`).
    #[error("Forbidden")]
    Forbidden,
}

impl IntoResponse for ManagementError {
    fn into_response(self) -> Response {
        let (status, error_type, message) = match &self {
            // API Gateway's GoneException carries no message.
            Self::Gone => (StatusCode::GONE, "GoneException", Value::Null),
            Self::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLargeException",
                self.to_string().into(),
            ),
            Self::LimitExceeded => (
                StatusCode::TOO_MANY_REQUESTS,
                "LimitExceededException",
                self.to_string().into(),
            ),
            Self::Forbidden => (
                StatusCode::FORBIDDEN,
                "ForbiddenException",
                self.to_string().into(),
            ),
        };
        let mut response = (status, json!({ "message": message }).to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert("x-amzn-ErrorType", HeaderValue::from_static(error_type));
        response
    }
}

/// PostToConnection: sends the body to the client as one message, 200 with
/// an empty body. UTF-8 data goes as a text frame; anything else as a binary
/// frame, since a text frame must be UTF-8.
async fn post_to_connection(
    State(shared): State<Arc<Shared>>,
    Path(connection_id): Path<String>,
    body: Body,
) -> Result<StatusCode, ManagementError> {
    let limit = shared.config.max_message_bytes;
    // The only failures are the limit and a client that stopped sending,
    // which reads no answer anyway.
    let data = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ManagementError::PayloadTooLarge(limit))?;
    let message = match String::from_utf8(data.to_vec()) {
        Ok(text) => Message::Text(text.into()),
        Err(_) => Message::Binary(data),
    };
    shared
        .registry
        .post(&connection_id, message)
        .map_err(|error| match error {
            PostError::Gone => ManagementError::Gone,
            PostError::Full => ManagementError::LimitExceeded,
        })?;
    shared.stats.posts_out.fetch_add(1, Ordering::Relaxed);
    Ok(StatusCode::OK)
}

/// GetConnection: `{"connectedAt", "identity": {"sourceIp", "userAgent"},
/// "lastActiveAt"}`.
async fn get_connection(
    State(shared): State<Arc<Shared>>,
    Path(connection_id): Path<String>,
) -> Result<Response, ManagementError> {
    let info = shared
        .registry
        .live(&connection_id)
        .ok_or(ManagementError::Gone)?
        .info();
    let mut identity = json!({ "sourceIp": info.source_ip });
    if let (Some(user_agent), Some(identity)) = (info.user_agent, identity.as_object_mut()) {
        identity.insert("userAgent".into(), user_agent.into());
    }
    let body = json!({
        "connectedAt": iso_millis(info.connected_at),
        "identity": identity,
        "lastActiveAt": iso_millis(info.last_active_at),
    });
    Ok(axum::Json(body).into_response())
}

/// DeleteConnection: 204 at once; the socket then closes with 1000 after
/// every post accepted before, and `$disconnect` runs.
async fn delete_connection(
    State(shared): State<Arc<Shared>>,
    Path(connection_id): Path<String>,
) -> Result<StatusCode, ManagementError> {
    let connection = shared
        .registry
        .remove_live(&connection_id)
        .ok_or(ManagementError::Gone)?;
    connection.request_close(Cause::Deleted);
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;
    use crate::{Gateway, GatewayConfig, Handlers, integration_response};

    fn gateway() -> Gateway {
        let ok = |_| async { integration_response(200, None) };
        Gateway::new(GatewayConfig::default(), Handlers::new(ok, ok, ok))
    }

    /// A request signed with the gateway's (default) credentials.
    fn signed(gateway: &Gateway, method: &str, path: &str, body: Vec<u8>) -> Request<Body> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "gw.test");
        let url = format!("http://gw.test{path}");
        let credentials = &gateway.shared.config.management_credentials;
        for (name, value) in crate::sigv4::sign(credentials, method, &url, &[], &body, "us-east-1")
        {
            request = request.header(name, value);
        }
        request.body(Body::from(body)).unwrap()
    }

    async fn call(gateway: &Gateway, method: &str, path: &str, body: &'static str) -> Response {
        let request = signed(gateway, method, path, body.as_bytes().to_vec());
        gateway.management_router().oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn unsigned_calls_are_forbidden_and_the_client_port_has_no_management_api() {
        let gateway = gateway();
        let mut messages =
            crate::connection::test_connection(&gateway.shared.registry, "DDDDDDDDDDDDDDD=", 4);
        let path = "/local/@connections/DDDDDDDDDDDDDDD%3D";
        for method in ["POST", "GET", "DELETE"] {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "gw.test")
                .body(Body::from("forged"))
                .unwrap();
            let response = gateway.management_router().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{method}");
            assert_eq!(response.headers()["x-amzn-errortype"], "ForbiddenException");
            let request = signed(&gateway, method, path, b"forged".to_vec());
            let response = gateway.router().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method}");
        }
        assert!(messages.try_recv().is_none(), "nothing reached the socket");
        assert!(
            gateway.connection("DDDDDDDDDDDDDDD=").is_some(),
            "still live"
        );
    }

    #[tokio::test]
    async fn ids_with_any_base64_character_are_decoded() {
        let gateway = gateway();
        let id = "a/b+c_d-e012345=";
        let mut messages = crate::connection::test_connection(&gateway.shared.registry, id, 4);
        let response = call(
            &gateway,
            "POST",
            "/local/@connections/a%2Fb%2Bc_d-e012345%3D",
            "one",
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        let response = call(
            &gateway,
            "POST",
            "/local/%40connections/a%2Fb+c_d-e012345=",
            "two",
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(messages.try_recv().unwrap(), Message::Text("one".into()));
        assert_eq!(messages.try_recv().unwrap(), Message::Text("two".into()));
        assert_eq!(gateway.stats().posts_out, 2);
    }

    #[tokio::test]
    async fn a_full_queue_is_limit_exceeded() {
        let gateway = gateway();
        let _messages =
            crate::connection::test_connection(&gateway.shared.registry, "AAAAAAAAAAAAAAA=", 1);
        let first = call(
            &gateway,
            "POST",
            "/local/@connections/AAAAAAAAAAAAAAA%3D",
            "a",
        )
        .await;
        assert_eq!(first.status(), StatusCode::OK);
        let second = call(
            &gateway,
            "POST",
            "/local/@connections/AAAAAAAAAAAAAAA%3D",
            "b",
        )
        .await;
        assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            second.headers()["x-amzn-errortype"],
            "LimitExceededException"
        );
    }

    #[tokio::test]
    async fn non_utf8_posts_are_binary() {
        let gateway = gateway();
        let mut messages =
            crate::connection::test_connection(&gateway.shared.registry, "BBBBBBBBBBBBBBB=", 1);
        let request = signed(
            &gateway,
            "POST",
            "/local/@connections/BBBBBBBBBBBBBBB%3D",
            vec![0xff, 0x00],
        );
        let response = gateway.management_router().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            messages.try_recv().unwrap(),
            Message::Binary(vec![0xff, 0x00].into())
        );
    }

    #[tokio::test]
    async fn gone_is_recognisable_by_the_sdk() {
        let gateway = gateway();
        for method in ["POST", "GET", "DELETE"] {
            let response = call(
                &gateway,
                method,
                "/local/@connections/CCCCCCCCCCCCCCC%3D",
                "x",
            )
            .await;
            assert_eq!(response.status(), StatusCode::GONE, "{method}");
            assert_eq!(response.headers()["x-amzn-errortype"], "GoneException");
            assert_eq!(response.headers()["content-type"], "application/json");
            let body = axum::body::to_bytes(response.into_body(), 1024)
                .await
                .unwrap();
            assert_eq!(body, r#"{"message":null}"#);
        }
    }
}
