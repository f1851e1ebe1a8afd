//! End-to-end harness: the real stack (REST, the API Gateway emulator with
//! the real handlers, the relay) bound to `127.0.0.1:0` over a fresh
//! database and a private Redis prefix, driven by real WebSocket clients
//! and a tiny HTTP/1.1 client for REST.
//!
//! # Layout
//! - [`TestStack`]: one `Stack` (gateway and/or relay) over a [`TestEnv`];
//!   several over one env (`env.sharing()`) are several instances.
//! - [`Client`]: a WebSocket client that awaits events (`expect`,
//!   `wait_for`, `collect`) and proves absence (`assert_quiet`).
//! - [`http`] and the REST shortcuts on [`TestStack`].
//! - Redis helpers: [`redis`], [`key`], [`wait_relays`].
//!
//! Set `TEST_LOG=debug` (any tracing filter) to see the stack's logs.

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::env::{TestEnv, token_with};
pub use crate::reply::{Reply, assert_timestamp};
use chat_local::{LocalSettings, Parts, Stack};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// Panics unless `frame` (`{"type", "payload"}`) matches its message in the
/// AsyncAPI document the service serves (`chat_shared::http::asyncapi`):
/// client frames when `from_client`, server events otherwise. This is how a
/// field that drifts from the contract fails the end-to-end tests.
pub fn assert_frame_conforms(frame: &Value, from_client: bool, who: &str) {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    type Validators = Mutex<HashMap<(String, bool), Arc<jsonschema::Validator>>>;
    static VALIDATORS: OnceLock<Validators> = OnceLock::new();
    let kind = frame["type"].as_str().unwrap_or_default().to_owned();
    let key = (kind.clone(), from_client);
    // A cache only: it holds whole entries, so a lock that a panicking
    // thread poisoned is still good. Nothing panics while holding it
    // (tests check that a bad frame panics, as threads of one binary).
    let cache = || {
        VALIDATORS
            .get_or_init(Validators::default)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let cached = cache().get(&key).map(Arc::clone);
    let validator = match cached {
        Some(validator) => validator,
        None => {
            let direction = if from_client { "client" } else { "server" };
            let schema = chat_shared::http::asyncapi::frame_validation_schema(&kind, from_client)
                .unwrap_or_else(|| {
                    panic!("{who}: a {direction} frame of type {kind:?} is not in the AsyncAPI document: {frame}")
                });
            let validator = Arc::new(
                jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft202012)
                    .build(&schema)
                    .expect("the AsyncAPI schemas compile"),
            );
            cache().insert(key, Arc::clone(&validator));
            validator
        }
    };
    let errors: Vec<String> = validator
        .iter_errors(frame)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{who}: this {} frame does not match the AsyncAPI document: {frame}\n{}",
        if from_client { "client" } else { "server" },
        errors.join("\n")
    );
}

/// Whether the AsyncAPI document describes frames of type `kind` in that
/// direction.
pub fn frame_schema_exists(kind: &str, from_client: bool) -> bool {
    chat_shared::http::asyncapi::frame_validation_schema(kind, from_client).is_some()
}

/// How long a test waits for an event before failing.
pub const WAIT: Duration = Duration::from_secs(10);

pub use crate::private_redis::PrivateRedis;

/// Installs the stack's logs when `TEST_LOG` is set (once per process).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        chat_shared::telemetry::init(chat_shared::config::LogFormat::Pretty, &filter);
    }
}

impl TestEnv {
    /// The local stack's own settings (`PORT`, `GATEWAY_*`) from this
    /// env, read as `chat-local` reads them beside [`TestEnv::config`].
    pub fn settings(&self) -> LocalSettings {
        LocalSettings::from_lookup(|k| self.vars.get(k).cloned()).expect("test settings are valid")
    }
}

/// One stack process (gateway and/or relay) over a test environment.
pub struct TestStack {
    pub stack: Stack,
    pub addr: Option<SocketAddr>,
}

impl TestStack {
    pub async fn start(env: &TestEnv, parts: Parts) -> Self {
        let listener = if parts.gateway {
            Some(
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind"),
            )
        } else {
            None
        };
        Self::start_on(env, parts, listener).await
    }

    /// Like [`TestStack::start`], on a listener the test bound itself.
    pub async fn start_on(
        env: &TestEnv,
        parts: Parts,
        listener: Option<tokio::net::TcpListener>,
    ) -> Self {
        init_logs();
        let mut config = env.config();
        if config.relay.management.allowed_endpoints.is_none() {
            // A test's relays call its gateways, each on its own loopback
            // management port (tests of the allow-list itself set it).
            config.relay.management.allowed_endpoints =
                Some(vec!["http://127.0.0.1:*/local".into()]);
        }
        let relay = parts.relay;
        let stack = Stack::start(&config, &env.settings(), listener, parts)
            .await
            .expect("stack starts");
        if relay {
            // Subscribed before the test sends: on a cluster the relay's
            // sharded subscriptions take a moment, and what is published
            // before them is not seen by anyone.
            let channel = env.vars["BROADCAST_CHANNEL"].clone();
            tokio::time::timeout(WAIT, async {
                while crate::env::bus_subscribers(&env.vars["REDIS_URL"], &channel)
                    .await
                    .unwrap_or(0)
                    < 1
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the relay subscribes to the bus");
        }
        let addr = stack.addr;
        Self { stack, addr }
    }

    /// Gateway and relay in one process, as `chat-local serve` runs.
    pub async fn all_in_one(env: &TestEnv) -> Self {
        Self::start(env, Parts::default()).await
    }

    /// A gateway (REST and WebSocket) without a relay.
    pub async fn gateway(env: &TestEnv) -> Self {
        Self::start(
            env,
            Parts {
                gateway: true,
                relay: false,
            },
        )
        .await
    }

    /// A relay (and sweeper) alone.
    pub async fn relay(env: &TestEnv) -> Self {
        Self::start(
            env,
            Parts {
                gateway: false,
                relay: true,
            },
        )
        .await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("this stack runs a gateway")
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr())
    }

    /// The Management API endpoint connections of this gateway register
    /// (what `$connect` stores as their callback URL).
    pub fn endpoint(&self) -> String {
        format!(
            "http://{}/local",
            self.stack
                .management_addr
                .expect("this stack runs a gateway")
        )
    }

    /// Where the Management API and `/metrics` answer.
    pub fn management_addr(&self) -> SocketAddr {
        self.stack
            .management_addr
            .expect("this stack runs a gateway")
    }

    pub async fn stop(self) {
        self.stack.stop().await.expect("clean stop");
    }

    /// A REST call under `/api/v1/chat` with `token`.
    pub async fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Reply {
        http(
            self.addr(),
            method,
            &format!("/api/v1/chat{path}"),
            Some(token),
            body.as_ref(),
        )
        .await
    }

    pub async fn get(&self, user: &str, path: &str) -> Reply {
        self.call("GET", path, &token(user), None).await
    }

    pub async fn post(&self, user: &str, path: &str, body: Value) -> Reply {
        self.call("POST", path, &token(user), Some(body)).await
    }

    pub async fn delete(&self, user: &str, path: &str) -> Reply {
        self.call("DELETE", path, &token(user), None).await
    }

    pub async fn health(&self) -> Reply {
        http(self.addr(), "GET", "/health", None, None).await
    }

    /// Makes users known to the service (as their first REST call would).
    pub async fn register(&self, users: &[&str]) {
        for user in users {
            let reply = self.get(user, "/rooms").await;
            assert_eq!(reply.status, 200, "{:?}", reply.body);
        }
    }

    /// A GROUP room of `owner` and `members` (all registered first).
    pub async fn group(&self, owner: &str, members: &[&str]) -> String {
        self.register(members).await;
        let body = json!({"type": "GROUP", "name": "team", "memberIds": members});
        self.room_from(owner, "/rooms", body, 201).await
    }

    /// The DIRECT room of two users (both registered first).
    pub async fn direct(&self, user: &str, target: &str) -> String {
        self.register(&[user, target]).await;
        let body = json!({"targetUserId": target});
        self.room_from(user, "/direct", body, 200).await
    }

    /// The id of the room a `POST path` by `user` answers with `status`.
    async fn room_from(&self, user: &str, path: &str, body: Value, status: u16) -> String {
        let reply = self.post(user, path, body).await;
        assert_eq!(reply.status, status, "{:?}", reply.body);
        reply.body["room"]["id"]
            .as_str()
            .expect("room id")
            .to_owned()
    }

    /// Every stored message of a room (up to 100), as `user` reads them.
    pub async fn history(&self, user: &str, room: &str) -> Vec<Value> {
        let reply = self
            .get(user, &format!("/rooms/{room}/messages?limit=100"))
            .await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        reply.body["messages"].as_array().expect("messages").clone()
    }

    /// `GET /rooms/:id/online`, as `user`.
    pub async fn online(&self, user: &str, room: &str) -> Vec<Value> {
        let reply = self.get(user, &format!("/rooms/{room}/online")).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(
            reply.body["count"].as_u64().expect("count") as usize,
            reply.body["onlineUsers"].as_array().expect("list").len()
        );
        reply.body["onlineUsers"].as_array().expect("list").clone()
    }

    /// `POST /rooms/:id/messages` as `user`; returns the stored message.
    pub async fn send_rest(&self, user: &str, room: &str, content: &str) -> Value {
        let reply = self
            .post(
                user,
                &format!("/rooms/{room}/messages"),
                json!({"content": content}),
            )
            .await;
        assert_eq!(reply.status, 201, "{:?}", reply.body);
        reply.body["message"].clone()
    }
}

pub fn token(user: &str) -> String {
    token_with(user, |_| {})
}

pub fn admin_token(user: &str) -> String {
    token_with(user, |c| c.role = Some("admin".into()))
}

/// One HTTP/1.1 request on its own connection (`Connection: close`).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Reply {
    try_http(addr, method, path, token, body, WAIT)
        .await
        .unwrap_or_else(|| panic!("{method} {path}: no whole answer within {WAIT:?}"))
}

/// Like [`http`], for servers that may be down: `None` when nothing (or
/// no whole answer) comes within `limit`.
pub async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    limit: Duration,
) -> Option<Reply> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    let raw = tokio::time::timeout(limit, async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        Some(raw)
    })
    .await
    .ok()??;
    parse_response(&raw)
}

/// The answer in `raw`; `None` when it is not a whole HTTP/1.1 answer.
fn parse_response(raw: &[u8]) -> Option<Reply> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())?;
    let mut headers = http::HeaderMap::new();
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        headers.append(
            http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
            http::HeaderValue::from_str(value.trim()).ok()?,
        );
    }
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .get_all("transfer-encoding")
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Some(Reply::new(
        http::StatusCode::from_u16(status).ok()?,
        headers,
        &body,
    ))
}

/// A chunked body's data, as far as it goes (a body cut short gives what
/// came).
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&data[..end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("0").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || data.len() < end + 2 + size {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[(end + 4 + size).min(data.len())..];
    }
    out
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The handshake of `request`: the socket, or the refusal (status and body).
pub async fn handshake(request: Request) -> Result<Socket, (u16, Value)> {
    match connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null))
                .unwrap_or(Value::Null);
            Err((status, body))
        }
        Err(other) => panic!("handshake failed without an HTTP answer: {other}"),
    }
}

/// A WebSocket client that records what it receives.
pub struct Client {
    pub socket: Socket,
    pub user: String,
    pub connection_id: String,
    /// The `seq` of the last numbered frame [`Client::send`] sent: like the
    /// client library, it numbers every frame but `ping`, so the server
    /// handles them in the order sent although the gateway invokes
    /// `$default` for several at once (PROTOCOL.md, "Order of a sender's
    /// frames").
    pub seq: u64,
}

impl Client {
    /// Connects and waits for `connected`.
    pub async fn connect(stack: &TestStack, user: &str) -> Self {
        Self::connect_url(&stack.ws_url(&token(user)), user).await
    }

    pub async fn connect_url(url: &str, user: &str) -> Self {
        let request = url.into_client_request().expect("a valid URL");
        Self::connect_request(request, user).await
    }

    /// Connects with a prepared upgrade request and waits for `connected`,
    /// which must be the first event.
    pub async fn connect_request(request: Request, user: &str) -> Self {
        Self::open(request, user).await.0
    }

    /// Like [`Client::connect_request`], also returning the `connected`
    /// payload.
    pub async fn open(request: Request, user: &str) -> (Self, Value) {
        let socket = handshake(request)
            .await
            .unwrap_or_else(|(status, body)| panic!("handshake refused: {status} {body}"));
        let mut client = Self {
            socket,
            user: user.to_owned(),
            connection_id: String::new(),
            seq: 0,
        };
        let connected = client.expect("connected").await;
        assert_eq!(connected["userId"], user);
        client.connection_id = connected["connectionId"].as_str().expect("id").to_owned();
        (client, connected)
    }

    /// Sends a frame, numbered (`seq`) unless it is a `ping`, which must
    /// conform to the AsyncAPI document ([`assert_frame_conforms`]);
    /// deliberately bad ones go through [`Client::send_invalid`] (not
    /// numbered).
    pub async fn send(&mut self, kind: &str, payload: Value) {
        let mut frame = json!({"type": kind, "payload": payload});
        if kind != "ping" {
            self.seq += 1;
            frame["seq"] = json!(self.seq);
        }
        assert_frame_conforms(&frame, true, &self.user);
        self.socket
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
    }

    /// Sends a frame that breaks the contract on purpose (bad-input tests).
    pub async fn send_invalid(&mut self, kind: &str, payload: Value) {
        let frame = json!({"type": kind, "payload": payload}).to_string();
        self.socket.send(Message::text(frame)).await.expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.expect("send");
    }

    /// The next frame that is not a transport ping or pong (a close too),
    /// or panics after WAIT.
    pub async fn next_frame(&mut self) -> Option<Message> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no frame within {WAIT:?}", self.user));
            match msg {
                None => return None,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(text))) => {
                    // Every event the server sends must match the contract.
                    if let Ok(event) = serde_json::from_str::<Value>(&text) {
                        assert_frame_conforms(&event, false, &self.user);
                    }
                    return Some(Message::Text(text));
                }
                Some(Ok(msg)) => return Some(msg),
                Some(Err(e)) => panic!("{}: socket failed: {e}", self.user),
            }
        }
    }

    /// The next JSON event, or panics after WAIT (or on a close).
    pub async fn next(&mut self) -> Value {
        match self.next_frame().await {
            Some(Message::Text(text)) => serde_json::from_str(&text).expect("events are JSON"),
            other => panic!("{}: expected an event, got {other:?}", self.user),
        }
    }

    /// The payload of the next event, which must be of type `kind`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let event = self.next().await;
        assert_eq!(
            event["type"], kind,
            "{}: expected {kind}, got {event}",
            self.user
        );
        event["payload"].clone()
    }

    /// Skips events until one of type `kind` arrives; returns its payload.
    /// Sends one `sendMessage` and waits for its own echo (by
    /// `clientMessageId`); `Err` with the `error` event when it is refused
    /// instead.
    pub async fn send_and_await(
        &mut self,
        room: &str,
        content: &str,
        client_message_id: &str,
    ) -> Result<(), Value> {
        self.send(
            "sendMessage",
            json!({"roomId": room, "content": content, "clientMessageId": client_message_id}),
        )
        .await;
        loop {
            let event = self.next().await;
            match event["type"].as_str() {
                Some("message") if event["payload"]["clientMessageId"] == client_message_id => {
                    return Ok(());
                }
                Some("error") => return Err(event),
                _ => {}
            }
        }
    }

    pub async fn wait_for(&mut self, kind: &str) -> Value {
        loop {
            let event = self.next().await;
            if event["type"] == kind {
                return event["payload"].clone();
            }
        }
    }

    /// Asserts that no event arrives within `ms`.
    pub async fn assert_quiet(&mut self, ms: u64) {
        if let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(Duration::from_millis(ms), self.socket.next()).await
        {
            panic!("{}: unexpected event {text}", self.user);
        }
    }

    /// Every event that arrives within `ms` (whole events, in order).
    pub async fn collect(&mut self, ms: u64) -> Vec<Value> {
        let until = tokio::time::Instant::now() + Duration::from_millis(ms);
        let mut events = Vec::new();
        while let Ok(frame) = tokio::time::timeout_at(until, self.socket.next()).await {
            match frame {
                Some(Ok(Message::Text(text))) => {
                    events.push(serde_json::from_str(&text).expect("events are JSON"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("{}: unexpected frame {other:?}", self.user),
            }
        }
        events
    }

    /// Collects events until `count` of type `kind` have arrived (failing
    /// after WAIT); returns every event seen, in order.
    pub async fn collect_until(&mut self, kind: &str, count: usize) -> Vec<Value> {
        let mut events = Vec::new();
        let mut seen = 0;
        while seen < count {
            let event = self.next().await;
            if event["type"] == kind {
                seen += 1;
            }
            events.push(event);
        }
        events
    }

    /// Sends a frame and returns the payload of the `error` that must come
    /// back next, after checking its code.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let error = self.expect("error").await;
        assert_eq!(error["code"], code, "{}: {error}", self.user);
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{error}"
        );
        error
    }

    /// `ping` answers `pong`: the connection is usable.
    pub async fn ping_pong(&mut self) {
        self.send("ping", json!({})).await;
        let pong = self.expect("pong").await;
        assert_timestamp(&pong["timestamp"]);
    }

    /// The next frame must be a close; returns its frame.
    pub async fn expect_close(&mut self) -> Option<CloseFrame> {
        match self.next_frame().await {
            Some(Message::Close(frame)) => frame,
            other => panic!("{}: expected a close, got {other:?}", self.user),
        }
    }

    /// joinRoom by id; returns the roomJoined payload.
    pub async fn join(&mut self, room_id: &str) -> Value {
        self.send("joinRoom", json!({"roomId": room_id})).await;
        self.expect("roomJoined").await
    }

    /// joinRoom with `afterSequenceId`; returns the roomJoined payload.
    pub async fn join_after(&mut self, room_id: &str, after: i64) -> Value {
        self.send(
            "joinRoom",
            json!({"roomId": room_id, "afterSequenceId": after}),
        )
        .await;
        self.expect("roomJoined").await
    }

    /// sendMessage; returns the sender's own `message` event payload, which
    /// must be the next `message` this connection gets (other events before
    /// it are skipped).
    pub async fn say(&mut self, room_id: &str, content: &str) -> Value {
        self.send(
            "sendMessage",
            json!({"roomId": room_id, "content": content}),
        )
        .await;
        let message = self.wait_for("message").await;
        assert_eq!(
            (&message["senderId"], &message["content"]),
            (&json!(self.user), &json!(content)),
            "{}: the next message is not the one just sent",
            self.user
        );
        message
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
        // Wait for the server's answer, so `$disconnect` has begun.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, self.socket.next()).await {}
    }
}

/// A Redis connection to the env's Redis, single or cluster (for checking
/// keys).
pub async fn redis(env: &TestEnv) -> chat_shared::presence::RedisConn {
    crate::env::redis_conn_at(&env.vars["REDIS_URL"]).await
}

/// The env's key schema.
pub fn keys(env: &TestEnv) -> chat_shared::presence::Keys {
    chat_shared::presence::Keys::new(env.vars["REDIS_KEY_PREFIX"].clone())
}

/// How many connection leases the env's partitions hold.
pub async fn lease_count(env: &TestEnv) -> i64 {
    let keys = keys(env);
    let mut redis = redis(env).await;
    let mut total = 0;
    for p in 0..chat_shared::presence::keys::PARTITIONS {
        let n: i64 = redis::cmd("ZCARD")
            .arg(keys.leases(p))
            .query_async(&mut redis)
            .await
            .expect("ZCARD");
        total += n;
    }
    total
}

/// A key under the env's prefix.
pub fn key(env: &TestEnv, suffix: &str) -> String {
    format!("{}{suffix}", env.vars["REDIS_KEY_PREFIX"])
}

/// Waits until exactly `n` relays are subscribed to the env's bus channel
/// (only relays subscribe to it): a relay that was just started is ready,
/// one that was stopped is gone.
pub async fn wait_relays(env: &TestEnv, n: i64) {
    let channel = env.vars["BROADCAST_CHANNEL"].clone();
    tokio::time::timeout(WAIT, async {
        loop {
            let subscribers = crate::env::bus_subscribers(&env.vars["REDIS_URL"], &channel)
                .await
                .expect("PUBSUB NUMSUB");
            if subscribers == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} relay(s) never subscribed to {channel}"));
}

/// The `message` events' sequence ids among `events`, in arrival order.
pub fn sequence_ids(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| e["payload"]["sequenceId"].as_i64().expect("sequenceId"))
        .collect()
}

/// How many of `events` are of type `kind`.
pub fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["type"] == kind).count()
}

/// One raw HTTP/1.1 request: the status code, the lower-cased head and
/// the body.
pub async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("an answer")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

pub fn signed(
    credentials: &chat_gateway::ManagementCredentials,
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
) -> Vec<(String, String)> {
    let url = format!("http://{addr}{path}");
    chat_gateway::sign(credentials, method, &url, &[], body, "us-east-1")
}

pub fn dev_credentials() -> chat_gateway::ManagementCredentials {
    chat_gateway::ManagementCredentials {
        access_key_id: chat_shared::config::DEV_MANAGEMENT_ACCESS_KEY_ID.into(),
        secret_access_key: chat_shared::config::DEV_MANAGEMENT_SECRET_ACCESS_KEY.into(),
    }
}

/// This process's resident set size (kB), for memory bounds in tests.
pub fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// One signed `POST @connections/{id}` to the Management API at
/// `management`: its status.
pub async fn signed_post(management: SocketAddr, connection_id: &str, body: &[u8]) -> u16 {
    let path = format!("/local/@connections/{}", connection_id.replace('=', "%3D"));
    let headers = signed(&dev_credentials(), "POST", management, &path, body);
    raw_http(management, "POST", &path, &headers, body).await.0
}

/// Posts `bytes`-byte bodies to a connection that does not read until the
/// gateway refuses one (429) or finds the connection gone (410); how many
/// it accepted. Panics on any other status, or if it never refuses.
pub async fn feed_until_refused(
    management: SocketAddr,
    connection_id: String,
    bytes: usize,
) -> usize {
    let body = vec![b'x'; bytes];
    let mut accepted = 0usize;
    loop {
        match signed_post(management, &connection_id, &body).await {
            200 => accepted += 1,
            429 | 410 => return accepted,
            other => panic!("unexpected status {other}"),
        }
        assert!(accepted < 1000, "never refused");
    }
}
