//! `GET {ws_path}`: the opening handshake, gated by `$connect`.
//!
//! As in API Gateway, the upgrade request waits for the `$connect`
//! integration: a 2xx answer upgrades the connection, anything else refuses
//! the handshake with that status and body. The connection id exists (in the
//! connecting state) from before `$connect` runs until the socket closes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use aws_lambda_events::apigw::ApiGatewayProxyResponse;
use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument as _;

use crate::connection::{self, Cause};
use crate::event::{self, ConnectionMeta};
use crate::{Shared, handler};

/// A socket's read buffer. tungstenite zero-fills the whole buffer before
/// each read, so every idle connection keeps all of it resident: its default
/// of 128 KiB made an idle connection cost ~140 kB. Chat frames are small,
/// and a larger frame grows the buffer for as long as it needs. (The write
/// buffer only grows with what is written, so it keeps its default.)
const READ_BUFFER_BYTES: usize = 1024;

/// The handler of `GET {ws_path}`.
pub(crate) async fn upgrade(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    if shared.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let started = Instant::now();
    let (mut parts, _body) = request.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };

    let source_ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |info| info.0.ip());
    let header_text = |name: HeaderName| {
        parts
            .headers
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    };
    // The callback endpoint comes from configuration: the client's `Host`
    // reaches nothing the relay uses.
    let domain_name = shared.config.domain_name.clone();
    let user_agent = header_text(header::USER_AGENT);
    let now = now_millis();

    let mut pending = Pending::new(
        Arc::clone(&shared),
        ConnectionMeta {
            connection_id: shared.registry.reserve(),
            connected_at: now,
            domain_name,
            source_ip,
            user_agent,
        },
    );
    let event = event::connect_event(
        &shared.config,
        &pending.meta,
        &parts.headers,
        parts.uri.query(),
        now,
    );
    let invoked = tokio::time::timeout(
        shared.config.integration_timeout,
        handler::invoke(&shared.handlers.connect, "$connect", event),
    )
    .await
    .ok()
    .flatten();
    let Some(response) = invoked else {
        return internal_error();
    };
    if !(200..300).contains(&response.status_code) {
        tracing::debug!(
            connection_id = %pending.meta.connection_id,
            status = response.status_code,
            "$connect refused the connection"
        );
        return refusal(response);
    }

    pending.connected = true;
    let mut upgraded = upgrade
        .max_message_size(shared.config.max_message_bytes)
        .max_frame_size(shared.config.max_frame_bytes)
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_failed_upgrade(|error| tracing::debug!(%error, "upgrade failed"))
        .on_upgrade(move |socket| pending.go_live(socket, started));
    // API Gateway returns the subprotocol `$connect` chose.
    if let Some(protocol) = response.headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        upgraded
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, protocol.clone());
    }
    upgraded
}

/// A connection between the start of `$connect` and its socket going live.
///
/// Dropping it without going live (`$connect` refused or failed, the upgrade
/// failed, the client left) removes the id from the registry; if `$connect`
/// had succeeded, `$disconnect` still runs, so that whatever `$connect`
/// stored gets cleaned up.
struct Pending {
    shared: Arc<Shared>,
    meta: Arc<ConnectionMeta>,
    /// `$connect` answered 2xx.
    connected: bool,
    /// Set once the socket task owns the connection.
    handed_over: bool,
    /// Keeps [`crate::Gateway::shutdown`] waiting for this connection.
    _tracked: TaskTrackerToken,
}

impl Pending {
    fn new(shared: Arc<Shared>, meta: ConnectionMeta) -> Self {
        let tracked = shared.tracker.token();
        Self {
            shared,
            meta: Arc::new(meta),
            connected: false,
            handed_over: false,
            _tracked: tracked,
        }
    }

    async fn go_live(mut self, socket: axum::extract::ws::WebSocket, started: Instant) {
        self.handed_over = true;
        let span = tracing::info_span!(
            "connection",
            instance_id = %self.shared.config.instance_id,
            connection_id = %self.meta.connection_id,
        );
        connection::serve(
            Arc::clone(&self.shared),
            Arc::clone(&self.meta),
            socket,
            started,
        )
        .instrument(span)
        .await;
        // `self` (and its tracker token) is dropped only now, after `$disconnect`.
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.handed_over {
            return;
        }
        self.shared.registry.remove(&self.meta.connection_id);
        if self.connected {
            let shared = Arc::clone(&self.shared);
            let meta = Arc::clone(&self.meta);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(self.shared.tracker.track_future(async move {
                    connection::disconnect(&shared, &meta, &Cause::Dropped).await;
                }));
            }
        }
    }
}

/// The handshake refusal for a non-2xx `$connect` response: its status,
/// headers and body.
fn refusal(response: ApiGatewayProxyResponse) -> Response {
    let Some(status) = u16::try_from(response.status_code)
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
    else {
        return internal_error();
    };
    let body = handler::response_text(&response).unwrap_or_default();
    let mut refused = Response::new(Body::from(body));
    *refused.status_mut() = status;
    // `multiValueHeaders` wins where both name a header, as in API Gateway.
    let headers = refused.headers_mut();
    for (name, value) in &response.multi_value_headers {
        if !is_hop_by_hop(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    for (name, value) in &response.headers {
        if !is_hop_by_hop(name) && !response.multi_value_headers.contains_key(name) {
            headers.insert(name.clone(), value.clone());
        }
    }
    refused
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::UPGRADE,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
    ]
    .contains(name)
}

/// What API Gateway answers when the `$connect` integration fails.
fn internal_error() -> Response {
    let mut response = (
        StatusCode::INTERNAL_SERVER_ERROR,
        r#"{"message": "Internal server error"}"#,
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Now, truncated to milliseconds as every API Gateway timestamp is.
fn now_millis() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}
