//! Test harness: a fresh PostgreSQL database per test (copied from a
//! migrated template), a random Redis key prefix and channel per test, the
//! shared crate's `Realtime` to make connections, rooms and messages, a
//! fake Management API that records what it is sent, and the relay under
//! test.
//!
//! `TEST_DATABASE_URL` and `TEST_REDIS_URL` default to the local services
//! (`scripts/test.sh` sets them). A missing service fails loudly.

#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_relay::{Relay, RelayMetrics, RelayOptions};
use chat_shared::Config;
use chat_shared::auth::AuthUser;
use chat_shared::bootstrap::Adapters;
use chat_shared::bus::JoinedTemplate;
use chat_shared::domain::{RoomId, UserId};
use chat_shared::presence::Connection;
use chat_shared::realtime::Realtime;
use chat_shared::service::NewRoom;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use chat_test_support::{fresh_database, random_suffix, redis_url};

/// Waits for `check` to give `Some`, polling every 10 ms; panics naming
/// `what` after `timeout`.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_for`] with an async check.
pub async fn wait_for_async<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The fake Management API.

/// How the fake answers posts to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Accepts posts.
    Live,
    /// Still in `$connect`: 410 until marked live.
    Pending,
    /// Closed: 410.
    Gone,
}

#[derive(Default)]
struct GatewayState {
    status: HashMap<String, Status>,
    posts: HashMap<String, Vec<String>>,
    refused: HashMap<String, usize>,
    deletes: Vec<String>,
    delay: Duration,
    paths: Vec<String>,
}

/// `POST` / `DELETE /{stage}/@connections/{id}`, recording posts per
/// connection in arrival order.
#[derive(Clone)]
pub struct FakeGateway {
    pub port: u16,
    state: Arc<Mutex<GatewayState>>,
}

/// What the fake answers.
type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::new()));
    *reply.status_mut() = status;
    reply
}

/// API Gateway's answer for a connection that is not there.
fn gone() -> Reply {
    Response::builder()
        .status(StatusCode::GONE)
        .header("x-amzn-ErrorType", "GoneException")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"message":null}"#)))
        .unwrap()
}

/// The connection id of `/{stage}/@connections/{id}` (the SDK sends the
/// `@` as `%40`), percent-decoded; `None` for any other path.
fn connection_id(path: &str) -> Option<String> {
    let mut parts = path.trim_start_matches('/').splitn(3, '/');
    let (_stage, collection, id) = (parts.next()?, parts.next()?, parts.next()?);
    let known = matches!(collection, "@connections" | "%40connections");
    let id = percent_encoding::percent_decode_str(id)
        .decode_utf8()
        .ok()?;
    (known && !id.is_empty() && !id.contains('/')).then(|| id.into_owned())
}

/// Every request: its path recorded, then `POST` or `DELETE` of a
/// connection.
async fn handle(
    state: Arc<Mutex<GatewayState>>,
    request: Request<Incoming>,
) -> Result<Reply, hyper::Error> {
    let path = request.uri().path().to_owned();
    state.lock().unwrap().paths.push(path.clone());
    let Some(id) = connection_id(&path) else {
        return Ok(reply(StatusCode::NOT_FOUND));
    };
    Ok(match *request.method() {
        Method::POST => {
            let body = request.into_body().collect().await?.to_bytes();
            post_to_connection(&state, id, &body).await
        }
        Method::DELETE => delete_connection(&state, id),
        _ => reply(StatusCode::METHOD_NOT_ALLOWED),
    })
}

async fn post_to_connection(state: &Mutex<GatewayState>, id: String, body: &[u8]) -> Reply {
    let delay = state.lock().unwrap().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut s = state.lock().unwrap();
    if s.status.get(&id) == Some(&Status::Live) {
        s.posts
            .entry(id)
            .or_default()
            .push(String::from_utf8_lossy(body).into_owned());
        reply(StatusCode::OK)
    } else {
        *s.refused.entry(id).or_default() += 1;
        gone()
    }
}

fn delete_connection(state: &Mutex<GatewayState>, id: String) -> Reply {
    let mut s = state.lock().unwrap();
    s.deletes.push(id.clone());
    match s.status.insert(id, Status::Gone) {
        Some(Status::Live) => reply(StatusCode::NO_CONTENT),
        _ => gone(),
    }
}

impl FakeGateway {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(GatewayState::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let serving = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = serving.clone();
                let service = service_fn(move |request| handle(state.clone(), request));
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Self { port, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/local", self.port)
    }

    pub fn set_status(&self, id: &str, status: Status) {
        self.state
            .lock()
            .unwrap()
            .status
            .insert(id.to_owned(), status);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// Every body posted to `id`, in order.
    pub fn posts(&self, id: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .posts
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Posts to `id` answered 410.
    pub fn refused(&self, id: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .refused
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    pub fn deletes(&self) -> Vec<String> {
        self.state.lock().unwrap().deletes.clone()
    }

    pub fn paths(&self) -> Vec<String> {
        self.state.lock().unwrap().paths.clone()
    }

    /// The events of type `kind` posted to `id`, parsed.
    pub fn events(&self, id: &str, kind: &str) -> Vec<Value> {
        self.posts(id)
            .iter()
            .map(|p| serde_json::from_str::<Value>(p).expect("posted JSON"))
            .filter(|e| e["type"] == kind)
            .collect()
    }

    /// The `sequenceId`s of the `message` events posted to `id`, in order.
    pub fn sequences(&self, id: &str) -> Vec<i64> {
        self.events(id, "message")
            .iter()
            .map(|e| e["payload"]["sequenceId"].as_i64().expect("sequenceId"))
            .collect()
    }

    /// Waits until `id` got at least `n` events of type `kind`; returns them.
    pub async fn wait_events(&self, id: &str, kind: &str, n: usize) -> Vec<Value> {
        wait_for(&format!("{n} {kind} event(s) at {id}"), WAIT, || {
            let events = self.events(id, kind);
            (events.len() >= n).then_some(events)
        })
        .await
    }

    /// Waits until `id` got the `message` with `sequence_id`; returns every
    /// message sequence id it got so far.
    pub async fn wait_sequence(&self, id: &str, sequence_id: i64) -> Vec<i64> {
        wait_for(&format!("message {sequence_id} at {id}"), WAIT, || {
            let seqs = self.sequences(id);
            seqs.contains(&sequence_id).then_some(seqs)
        })
        .await
    }
}

// ---------------------------------------------------------------------------
// The stack: shared-crate state, fake gateway, relay.

pub fn auth_user(id: &str) -> AuthUser {
    AuthUser {
        id: UserId::parse(id, "sub").expect("user id"),
        username: id.to_owned(),
        display_name: None,
        avatar: None,
        is_admin: false,
    }
}

pub struct Stack {
    pub vars: HashMap<String, String>,
    pub config: Config,
    /// Drives the use cases, as the handlers would.
    pub realtime: Realtime,
    /// What the relay is built over.
    pub adapters: Adapters,
    pub gateway: FakeGateway,
    pub options: RelayOptions,
    /// The URL the relay subscribes with (tests may give it its own user).
    pub relay_redis_url: String,
    pub metrics: Arc<RelayMetrics>,
    connections: Mutex<HashMap<String, Connection>>,
    shutdown: CancellationToken,
    relay: Option<JoinHandle<anyhow::Result<()>>>,
}

pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        chat_shared::telemetry::init(
            chat_shared::config::LogFormat::Pretty,
            "chat_relay=debug,chat_shared=info",
        );
    }
}

impl Stack {
    /// A stack with a running relay.
    pub async fn start() -> Self {
        Self::build(|_| {}).await.started().await
    }

    /// A stack whose environment `edit` may change; the relay is not
    /// started yet (see [`Stack::started`] / [`Stack::start_relay`]).
    pub async fn build(edit: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        init_logs();
        let db = fresh_database().await;
        let prefix = format!("test:{}:", random_suffix());
        let mut vars = HashMap::from([
            ("DATABASE_URL".to_owned(), db),
            ("REDIS_URL".to_owned(), redis_url()),
            (
                "REDIS_CLUSTER".to_owned(),
                chat_test_support::env::redis_cluster().to_string(),
            ),
            ("REDIS_KEY_PREFIX".to_owned(), prefix.clone()),
            ("BROADCAST_CHANNEL".to_owned(), format!("{prefix}broadcast")),
            ("JWT_SECRET".to_owned(), "relay-test-secret".to_owned()),
            ("INSTANCE_ID".to_owned(), "relay-test".to_owned()),
            ("PG_POOL_MAX".to_owned(), "16".to_owned()),
        ]);
        edit(&mut vars);
        let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("test config is valid");
        let chat = chat_shared::bootstrap::chat(&config.handlers())
            .await
            .unwrap_or_else(|e| panic!("cannot build the service (is Redis up?): {e:#}"));
        let realtime = Realtime::new(chat, config.common.presence_ttl);
        let adapters = chat_shared::bootstrap::adapters(&config.common)
            .await
            .unwrap_or_else(|e| panic!("cannot build the relay's adapters: {e:#}"));
        let gateway = FakeGateway::start().await;
        let mut options = RelayOptions::from_config(&config.relay_process());
        options.endpoints = options.endpoints.allowing(gateway.endpoint());
        Self {
            relay_redis_url: redis_url(),
            vars,
            config,
            realtime,
            adapters,
            gateway,
            options,
            metrics: Arc::new(RelayMetrics::default()),
            connections: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            relay: None,
        }
    }

    pub async fn started(mut self) -> Self {
        self.start_relay().await;
        self
    }

    pub fn channel(&self) -> String {
        self.config.common.broadcast_channel.clone()
    }

    /// Starts a relay and waits until it has subscribed to the channel.
    pub async fn start_relay(&mut self) {
        assert!(self.relay.is_none(), "a relay is already running");
        let relay = Relay::from_parts(
            self.adapters.clone(),
            SecretString::from(self.relay_redis_url.clone()),
            self.options.clone(),
        );
        self.metrics = relay.metrics();
        self.shutdown = CancellationToken::new();
        self.relay = Some(tokio::spawn(relay.run(self.shutdown.clone())));
        self.wait_subscribers(1).await;
    }

    /// Cancels the relay and waits for `run` to return.
    pub async fn stop_relay(&mut self) {
        self.shutdown.cancel();
        let relay = self.relay.take().expect("a relay is running");
        tokio::time::timeout(Duration::from_secs(15), relay)
            .await
            .expect("the relay stops within its drain timeout")
            .expect("the relay task does not panic")
            .expect("run returns Ok");
    }

    /// Waits until the channel has `n` subscribers.
    pub async fn wait_subscribers(&self, n: i64) {
        let channel = self.channel();
        let url = self.config.common.redis_url.expose_secret().to_owned();
        wait_for_async(&format!("{n} subscriber(s) on the bus"), WAIT, || {
            let (url, channel) = (url.clone(), channel.clone());
            async move {
                let count = chat_test_support::env::bus_subscribers(&url, &channel)
                    .await
                    .ok()?;
                (count == n).then_some(())
            }
        })
        .await;
    }

    pub async fn redis(&self) -> chat_shared::presence::RedisConn {
        chat_test_support::env::redis_conn().await
    }

    /// Publishes `payload` on the bus channel of `room` (as a gateway would
    /// publish an envelope of the room: `SPUBLISH` on a cluster).
    pub async fn publish_on_room(&self, room: &str, payload: &str) {
        let mut redis = self.redis().await;
        let _: i64 = redis::cmd(redis.publish_command())
            .arg(chat_shared::presence::Keys::bus_channel_of(
                &self.channel(),
                room,
            ))
            .arg(payload)
            .query_async(&mut redis)
            .await
            .expect("publish");
    }

    /// Registers a connection of `user` (as `$connect` does), connected
    /// `age` ago, answered by the fake gateway with `status`.
    pub async fn connect_with(&self, user: &str, age: Duration, status: Status) -> String {
        let id = format!(
            "{}{}=",
            user.replace(['_', '.', ':', '-'], ""),
            random_suffix()
        );
        self.gateway.set_status(&id, status);
        let conn = Connection {
            connection_id: id.clone(),
            user: auth_user(user),
            endpoint: self.gateway.endpoint(),
            connected_at_ms: chrono::Utc::now().timestamp_millis() - age.as_millis() as i64,
        };
        self.realtime.connect(&conn).await.expect("connect");
        self.connections.lock().unwrap().insert(id.clone(), conn);
        id
    }

    /// A live connection of `user`, a minute old.
    pub async fn connect(&self, user: &str) -> String {
        self.connect_with(user, Duration::from_secs(60), Status::Live)
            .await
    }

    pub fn connection(&self, id: &str) -> Connection {
        self.connections.lock().unwrap()[id].clone()
    }

    /// A GROUP room of `owner` and `members` (all known already).
    pub async fn group(&self, owner: &str, members: &[&str]) -> String {
        let (room, _) = self
            .realtime
            .chat()
            .create_room(
                &auth_user(owner),
                NewRoom::Group {
                    name: "team".into(),
                    member_ids: members.iter().map(|m| auth_user(m).id).collect(),
                },
            )
            .await
            .expect("create room");
        room.id
    }

    /// `joinRoom` from `conn`; returns the `roomJoined` payload, which the
    /// relay posts (the join itself answers nothing).
    pub async fn join(&self, conn: &str, room: &str) -> Value {
        let before = self.gateway.events(conn, "roomJoined").len();
        self.join_frame(conn, room).await;
        let joined = self
            .gateway
            .wait_events(conn, "roomJoined", before + 1)
            .await;
        joined[before]["payload"].clone()
    }

    /// The `joinRoom` frame from `conn`, handled (the subscription is made,
    /// pending, and its `Control::Joined` published), without waiting for
    /// the relay to post the `roomJoined`.
    pub async fn join_frame(&self, conn: &str, room: &str) {
        let reply = self
            .realtime
            .message(
                conn,
                &json!({"type": "joinRoom", "payload": {"roomId": room}}).to_string(),
                false,
            )
            .await;
        assert!(reply.is_none(), "joinRoom answered {reply:?}");
    }

    /// Subscribes `conn` to `room` at `watermark` as the join script does
    /// (pending, so the relay sends it nothing of the room yet), with
    /// `online` as the room's members to report online. Its
    /// `Control::Joined` goes to a channel nobody reads: the test publishes
    /// the returned template (filled) when it wants the relay to see it,
    /// or calls [`Stack::activate`] to stand for that.
    pub async fn subscribe_pending(
        &self,
        conn: &str,
        room: &str,
        watermark: i64,
        online: &[&str],
    ) -> JoinedTemplate {
        let template = self
            .adapters
            .bus
            .joined(room, conn, watermark, serde_json::Map::new())
            .expect("template");
        let online: Vec<_> = online.iter().map(|u| auth_user(u).id).collect();
        self.adapters
            .presence
            .join(
                &RoomId::parse(room).unwrap(),
                &self.connection(conn),
                watermark,
                &online,
                "unused",
                &template,
            )
            .await
            .unwrap()
            .expect("registered");
        template
    }

    /// Makes `conn`'s pending subscription to `room` a joined one, as the
    /// relay does once it has queued the `roomJoined`; whether it was
    /// pending.
    pub async fn activate(&self, conn: &str, room: &str) -> bool {
        let (_, was_pending) = self
            .adapters
            .presence
            .activate(room, conn)
            .await
            .unwrap()
            .expect("subscribed");
        was_pending
    }

    /// `sendMessage` from `conn`.
    pub async fn send(&self, conn: &str, room: &str, content: &str) {
        let reply = self
            .realtime
            .message(
                conn,
                &json!({"type": "sendMessage", "payload": {"roomId": room, "content": content}})
                    .to_string(),
                false,
            )
            .await;
        assert!(reply.is_none(), "sendMessage answered {reply:?}");
    }

    /// Any client frame from `conn`; asserts no error reply.
    pub async fn frame(&self, conn: &str, frame: Value) {
        let reply = self.realtime.message(conn, &frame.to_string(), false).await;
        if let Some(reply) = &reply {
            assert!(!reply.contains(r#""type":"error""#), "{reply}");
        }
    }

    pub fn keys(&self) -> chat_shared::presence::Keys {
        chat_shared::presence::Keys::new(self.config.common.redis_key_prefix.clone())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
