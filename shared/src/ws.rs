//! The three WebSocket route handlers as API Gateway sees them: each takes
//! the `ApiGatewayWebsocketProxyRequest` API Gateway sends and returns the
//! integration response. `functions/ws-*` run them under `lambda_runtime`;
//! the local gateway emulator calls them directly with the same events.

use std::sync::Arc;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use http::HeaderValue;

use crate::auth::{TokenVerifier, bearer_from_headers};
use crate::error::{Error, ErrorBody};
use crate::presence::Connection;
use crate::realtime::Realtime;

/// What the three handlers share: built once per process.
#[derive(Clone)]
pub struct WsState {
    /// The WebSocket use cases.
    pub realtime: Realtime,
    /// Checks the handshake token.
    pub verifier: Arc<dyn TokenVerifier>,
}

fn response(status: u16, body: Option<String>) -> ApiGatewayProxyResponse {
    let mut r = ApiGatewayProxyResponse::default();
    r.status_code = i64::from(status);
    if body.is_some() {
        r.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    r.body = body.map(Body::Text);
    r
}

fn error_response(err: &Error) -> ApiGatewayProxyResponse {
    err.log_if_server_error("$connect failed");
    let code = err.code();
    crate::metrics::record_error(crate::metrics::ErrorSource::Handshake, code);
    response(code.status(), Some(ErrorBody::of(err).to_json()))
}

/// The Management API endpoint of the connection's API: `https://{domain}/{stage}`
/// (plain HTTP for a local emulator on a loopback address).
pub fn callback_endpoint(domain: &str, stage: &str) -> String {
    let host = domain.rsplit_once(':').map_or(domain, |(h, _)| h);
    let local = matches!(host, "localhost" | "127.0.0.1" | "[::1]") || host.starts_with("127.");
    let scheme = if local { "http" } else { "https" };
    if stage.is_empty() {
        format!("{scheme}://{domain}")
    } else {
        format!("{scheme}://{domain}/{stage}")
    }
}

/// `$connect`: a 2xx accepts the handshake, anything else refuses it.
pub async fn handle_connect(
    state: &WsState,
    event: ApiGatewayWebsocketProxyRequest,
) -> ApiGatewayProxyResponse {
    let ctx = &event.request_context;
    // `?token=a&token=b` is ambiguous: proxies and frameworks disagree on
    // which one counts, so it is refused rather than resolved.
    if event
        .multi_value_query_string_parameters
        .all("token")
        .is_some_and(|values| values.len() > 1)
    {
        return error_response(&Error::unauthorized(
            "invalid token: the token parameter must appear once",
        ));
    }
    let token = event
        .query_string_parameters
        .first("token")
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .or_else(|| bearer_from_headers(&event.headers).ok().map(str::to_owned));
    let Some(token) = token else {
        return error_response(&Error::unauthorized("missing token"));
    };
    let session = match state.verifier.verify_session(&token) {
        Ok(session) => session,
        Err(err) => return error_response(&err),
    };
    let user = session.user.clone();
    let (Some(connection_id), Some(domain)) =
        (ctx.connection_id.clone(), ctx.domain_name.as_deref())
    else {
        return error_response(&Error::bad_request(
            "connectionId and domainName are required",
        ));
    };
    let conn = Connection {
        connection_id,
        user,
        endpoint: callback_endpoint(domain, ctx.stage.as_deref().unwrap_or_default()),
        connected_at_ms: if ctx.connected_at > 0 {
            ctx.connected_at
        } else {
            chrono::Utc::now().timestamp_millis()
        },
    };
    match state.realtime.connect_session(&conn, Some(&session)).await {
        Ok(()) => response(200, None),
        Err(err) => error_response(&err),
    }
}

/// `$default`: one client message; the reply (if any) is the route response.
pub async fn handle_default(
    state: &WsState,
    event: ApiGatewayWebsocketProxyRequest,
) -> ApiGatewayProxyResponse {
    let Some(connection_id) = event.request_context.connection_id.as_deref() else {
        return response(400, None);
    };
    let body = event.body.as_deref().unwrap_or_default();
    let outcome = state
        .realtime
        .frame(connection_id, body, event.is_base64_encoded)
        .await;
    if outcome.unregistered {
        // Its registration is gone (Redis lost it): have the relay close
        // the socket, after this reply, so the client reconnects.
        let ctx = &event.request_context;
        if let Some(domain) = ctx.domain_name.as_deref() {
            let endpoint = callback_endpoint(domain, ctx.stage.as_deref().unwrap_or_default());
            state
                .realtime
                .close_unregistered(connection_id, endpoint)
                .await;
        }
    }
    response(200, outcome.reply)
}

/// `$disconnect`: cleans up; API Gateway ignores the answer.
pub async fn handle_disconnect(
    state: &WsState,
    event: ApiGatewayWebsocketProxyRequest,
) -> ApiGatewayProxyResponse {
    let Some(connection_id) = event.request_context.connection_id.as_deref() else {
        return response(400, None);
    };
    match state.realtime.disconnect(connection_id).await {
        Ok(()) => response(200, None),
        Err(err) => {
            err.log_if_server_error("$disconnect failed");
            response(500, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_endpoints() {
        assert_eq!(
            callback_endpoint("abc.execute-api.eu-west-1.amazonaws.com", "prod"),
            "https://abc.execute-api.eu-west-1.amazonaws.com/prod"
        );
        assert_eq!(
            callback_endpoint("127.0.0.1:3000", "local"),
            "http://127.0.0.1:3000/local"
        );
        assert_eq!(
            callback_endpoint("localhost:3001", "local"),
            "http://localhost:3001/local"
        );
    }
}
