//! A gateway served on a free port with recording handlers, and clients.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
use chat_gateway::{Gateway, GatewayConfig, Handlers, integration_response};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// What a route handler receives.
pub type Event = ApiGatewayWebsocketProxyRequest;
/// A WebSocket client.
pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any awaited event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// Every event the handlers received, in order.
#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
    changed: Notify,
}

impl Recorder {
    pub fn record(&self, event: Event) {
        self.events.lock().unwrap().push(event);
        self.changed.notify_waiters();
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// The events of one connection, in order.
    pub fn of(&self, connection_id: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|event| id_of(event) == connection_id)
            .collect()
    }

    /// Waits until `check` finds what it looks for in the events.
    pub async fn wait_for<T>(&self, what: &str, mut check: impl FnMut(&[Event]) -> Option<T>) -> T {
        let waited = timeout(WAIT, async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(found) = check(&self.events.lock().unwrap()) {
                    return found;
                }
                notified.await;
            }
        })
        .await;
        match waited {
            Ok(found) => found,
            Err(_) => panic!("timed out waiting for {what}; events: {:?}", self.summary()),
        }
    }

    /// Waits for the `$disconnect` of a connection.
    pub async fn disconnect_of(&self, connection_id: &str) -> Event {
        self.wait_for(&format!("$disconnect of {connection_id}"), |events| {
            events
                .iter()
                .find(|event| id_of(event) == connection_id && route_of(event) == "$disconnect")
                .cloned()
        })
        .await
    }

    fn summary(&self) -> Vec<(String, String)> {
        self.events()
            .iter()
            .map(|event| (route_of(event).to_owned(), id_of(event).to_owned()))
            .collect()
    }
}

pub fn id_of(event: &Event) -> &str {
    event
        .request_context
        .connection_id
        .as_deref()
        .unwrap_or_default()
}

pub fn route_of(event: &Event) -> &str {
    event
        .request_context
        .route_key
        .as_deref()
        .unwrap_or_default()
}

/// `$disconnect`'s `(disconnectStatusCode, disconnectReason)`.
pub fn status_of(event: &Event) -> (i64, String) {
    (
        event.request_context.disconnect_status_code.unwrap_or(-1),
        event
            .request_context
            .disconnect_reason
            .clone()
            .unwrap_or_default(),
    )
}

/// What the recording `$default` answers: `whoami` → `id:<connectionId>`,
/// `quiet...` → nothing, `panic` → a panic, anything else → `echo:<body>`.
fn reply(event: &Event) -> Option<String> {
    let body = event.body.as_deref().unwrap_or_default();
    match body {
        "whoami" => Some(format!("id:{}", id_of(event))),
        "panic" => panic!("the handler panics on purpose"),
        quiet if quiet.starts_with("quiet") => None,
        _ => Some(format!("echo:{body}")),
    }
}

/// Handlers that record every event; `$connect` accepts, `$default` answers
/// as [`reply`] says.
pub fn recording_handlers(recorder: &Arc<Recorder>) -> Handlers {
    let (on_connect, on_message, on_disconnect) = (
        Arc::clone(recorder),
        Arc::clone(recorder),
        Arc::clone(recorder),
    );
    Handlers::new(
        move |event: Event| {
            let recorder = Arc::clone(&on_connect);
            async move {
                recorder.record(event);
                integration_response(200, None)
            }
        },
        move |event: Event| {
            let recorder = Arc::clone(&on_message);
            async move {
                recorder.record(event.clone());
                integration_response(200, reply(&event))
            }
        },
        move |event: Event| {
            let recorder = Arc::clone(&on_disconnect);
            async move {
                recorder.record(event);
                integration_response(200, None)
            }
        },
    )
}

/// The test configuration: API Gateway's defaults, on stage `local`.
pub fn config() -> GatewayConfig {
    GatewayConfig {
        api_id: "testapi".into(),
        instance_id: "test".into(),
        ..GatewayConfig::default()
    }
}

/// A gateway served on `127.0.0.1:0` with connect info, and its
/// Management API on a second listener, as the local stack serves them.
pub struct TestServer {
    pub gateway: Gateway,
    /// The client port (`/ws`).
    pub addr: SocketAddr,
    /// The management listener (`@connections`, SigV4).
    pub management: SocketAddr,
    pub recorder: Arc<Recorder>,
    pub credentials: chat_gateway::ManagementCredentials,
}

impl TestServer {
    /// With the recording handlers.
    pub async fn start(config: GatewayConfig) -> Self {
        Self::start_with(config, recording_handlers).await
    }

    /// With the recording handlers, the client port behind an
    /// [`chat_gateway::EdgeListener`] with `limits`.
    pub async fn start_edge(config: GatewayConfig, limits: chat_gateway::EdgeLimits) -> Self {
        Self::start_inner(config, recording_handlers, Some(limits)).await
    }

    /// With handlers built around the recorder.
    pub async fn start_with(
        config: GatewayConfig,
        handlers: impl FnOnce(&Arc<Recorder>) -> Handlers,
    ) -> Self {
        Self::start_inner(config, handlers, None).await
    }

    async fn start_inner(
        config: GatewayConfig,
        handlers: impl FnOnce(&Arc<Recorder>) -> Handlers,
        limits: Option<chat_gateway::EdgeLimits>,
    ) -> Self {
        let recorder = Arc::new(Recorder::default());
        let management_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let management = management_listener.local_addr().unwrap();
        let config = GatewayConfig {
            domain_name: management.to_string(),
            ..config
        };
        let credentials = config.management_credentials.clone();
        let gateway = Gateway::new(config, handlers(&recorder));
        let management_app = gateway.management_router();
        tokio::spawn(async move {
            axum::serve(management_listener, management_app)
                .await
                .unwrap();
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = gateway.router();
        match limits {
            None => {
                tokio::spawn(async move {
                    axum::serve(
                        listener,
                        app.into_make_service_with_connect_info::<SocketAddr>(),
                    )
                    .await
                    .unwrap();
                });
            }
            Some(limits) => {
                use axum::serve::ListenerExt as _;
                let listener = chat_gateway::EdgeListener::new(listener, limits).tap_io(|_| ());
                tokio::spawn(async move {
                    axum::serve(
                        listener,
                        app.into_make_service_with_connect_info::<SocketAddr>(),
                    )
                    .await
                    .unwrap();
                });
            }
        }
        Self {
            gateway,
            addr,
            management,
            recorder,
            credentials,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Connects a client and returns it with its connection id, once the
    /// socket is live (a route response came back).
    pub async fn connect(&self) -> (Client, String) {
        let (mut client, _) = timeout(WAIT, connect_async(self.ws_url()))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        let id = whoami(&mut client).await;
        (client, id)
    }

    /// Connects with extra request headers and a query.
    pub async fn connect_with(
        &self,
        query: &str,
        headers: &[(&'static str, &str)],
    ) -> (Client, String) {
        let mut request = format!("{}{query}", self.ws_url())
            .into_client_request()
            .unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(*name, value.parse().unwrap());
        }
        let (mut client, _) = timeout(WAIT, connect_async(request))
            .await
            .unwrap()
            .unwrap();
        let id = whoami(&mut client).await;
        (client, id)
    }

    /// A Management API call on the management listener, over real HTTP,
    /// signed the way the SDK signs.
    pub async fn http(&self, method: &str, path: &str, body: &[u8]) -> HttpResponse {
        let url = format!("http://{}{path}", self.management);
        let signed = chat_gateway::sign(&self.credentials, method, &url, &[], body, "us-east-1");
        let headers: Vec<(&str, &str)> = signed
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        http(self.management, method, path, &headers, body).await
    }

    /// PostToConnection, with the id percent-encoded as the SDK sends it.
    pub async fn post(&self, connection_id: &str, body: &str) -> HttpResponse {
        let path = format!("/local/@connections/{}", encode_id(connection_id));
        self.http("POST", &path, body.as_bytes()).await
    }
}

/// Asks the recording `$default` for the connection id.
pub async fn whoami(client: &mut Client) -> String {
    client.send(Message::text("whoami")).await.unwrap();
    let reply = next_text(client).await;
    reply
        .strip_prefix("id:")
        .unwrap_or_else(|| panic!("unexpected reply {reply}"))
        .to_owned()
}

/// Percent-encodes an id the way the AWS SDK encodes a path label.
pub fn encode_id(id: &str) -> String {
    id.replace('=', "%3D")
        .replace('+', "%2B")
        .replace('/', "%2F")
}

/// The next message from the server (pongs included).
pub async fn next_message(client: &mut Client) -> Message {
    timeout(WAIT, client.next())
        .await
        .expect("no message from the gateway")
        .expect("the socket ended")
        .expect("the socket failed")
}

/// The next message, which must be text.
pub async fn next_text(client: &mut Client) -> String {
    match next_message(client).await {
        Message::Text(text) => text.as_str().to_owned(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// The next message must be a close frame; completes the closing
/// handshake and returns the frame.
pub async fn expect_close(client: &mut Client) -> CloseFrame {
    let frame = match next_message(client).await {
        Message::Close(Some(frame)) => frame,
        other => panic!("expected a close frame, got {other:?}"),
    };
    // Reading on sends our answer and sees the server drop the socket.
    let rest = timeout(WAIT, async {
        while let Some(Ok(_)) = client.next().await {}
    })
    .await;
    assert!(
        rest.is_ok(),
        "the gateway did not end the socket after closing"
    );
    frame
}

/// Closes from the client side with `frame` and completes the handshake.
pub async fn close_from_client(client: &mut Client, frame: Option<CloseFrame>) {
    client.close(frame).await.unwrap();
    let rest = timeout(WAIT, async {
        while let Some(Ok(_)) = client.next().await {}
    })
    .await;
    assert!(rest.is_ok(), "the gateway did not end the socket");
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.text()))
    }
}

/// One HTTP/1.1 request over a fresh TCP connection (`Connection: close`),
/// with `headers` (e.g. a signature) besides `Host` and `Content-Length`.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\n\
         Host: {addr}\r\n\
         {extra}\
         Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("no HTTP response")
        .unwrap();
    let split = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("no status line");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}
