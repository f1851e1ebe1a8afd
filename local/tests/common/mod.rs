//! End-to-end harness: the real stack (REST, the API Gateway emulator with
//! the real handlers, the relay) bound to `127.0.0.1:0` over a fresh
//! database and a private Redis prefix, driven by real WebSocket clients.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use chat_local::{Parts, Stack};
use chat_shared::testing::{TestEnv, token_with};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// How long a test waits for an event before failing.
pub const WAIT: Duration = Duration::from_secs(10);

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
        let stack = Stack::start(&env.config(), listener, parts)
            .await
            .expect("stack starts");
        let addr = stack.addr;
        Self { stack, addr }
    }

    /// Gateway and relay in one process, as `chat-local serve` runs.
    pub async fn all_in_one(env: &TestEnv) -> Self {
        Self::start(env, Parts::default()).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("this stack runs a gateway")
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr())
    }

    pub fn api(&self, path: &str) -> String {
        format!("http://{}/api/v1/chat{path}", self.addr())
    }

    pub async fn stop(self) {
        self.stack.stop().await.expect("clean stop");
    }
}

pub fn token(user: &str) -> String {
    token_with(user, |_| {})
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client that records what it receives.
pub struct Client {
    pub socket: Socket,
    pub user: String,
    pub connection_id: String,
}

impl Client {
    /// Connects and waits for `connected`.
    pub async fn connect(stack: &TestStack, user: &str) -> Self {
        Self::connect_url(&stack.ws_url(&token(user)), user).await
    }

    pub async fn connect_url(url: &str, user: &str) -> Self {
        let (socket, _) = connect_async(url).await.expect("handshake accepted");
        let mut client = Self {
            socket,
            user: user.to_owned(),
            connection_id: String::new(),
        };
        let connected = client.expect("connected").await;
        assert_eq!(connected["userId"], user);
        client.connection_id = connected["connectionId"].as_str().expect("id").to_owned();
        client
    }

    pub async fn send(&mut self, kind: &str, payload: Value) {
        let frame = json!({"type": kind, "payload": payload}).to_string();
        self.socket.send(Message::text(frame)).await.expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.expect("send");
    }

    /// The next JSON event (ignoring transport pings), or panics after WAIT.
    pub async fn next(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no event within {WAIT:?}", self.user))
                .expect("socket open")
                .expect("socket ok");
            match msg {
                Message::Text(text) => {
                    return serde_json::from_str(&text).expect("events are JSON");
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("{}: unexpected frame {other:?}", self.user),
            }
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

    /// joinRoom by id; returns the roomJoined payload.
    pub async fn join(&mut self, room_id: &str) -> Value {
        self.send("joinRoom", json!({"roomId": room_id})).await;
        self.expect("roomJoined").await
    }

    /// sendMessage; returns the sender's own `message` event payload.
    pub async fn say(&mut self, room_id: &str, content: &str) -> Value {
        self.send(
            "sendMessage",
            json!({"roomId": room_id, "content": content}),
        )
        .await;
        self.wait_for("message").await
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}
