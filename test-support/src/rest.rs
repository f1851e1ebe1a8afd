//! The REST app over a fresh database ([`TestApp`], driven with `oneshot`),
//! a listener on the test's bus channel, and assertions on the shapes of
//! PROTOCOL.md §4 (errors, messages, rooms, profiles, timestamps).

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use chat_shared::auth::{DevClaims, mint_hs256};
use chat_shared::bootstrap::Adapters;
use chat_shared::http::{AppState, app};
use futures::StreamExt;
use http_body_util::BodyExt;
use secrecy::SecretString;
use serde_json::Value;
use tower::ServiceExt;

pub use crate::env::{SECRET, TestEnv, base64url, redis_url, token_with};
pub use crate::reply::{Reply, assert_timestamp};

/// The REST state over `env`, and the adapters under it.
pub async fn app_state(env: &TestEnv) -> (AppState, Adapters) {
    let config = env.config().handlers();
    let adapters = chat_shared::bootstrap::adapters(&config.common)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot build the app (is Redis at {} up?): {e:#}",
                redis_url()
            )
        });
    let chat = chat_shared::bootstrap::chat_over(adapters.clone(), &config.api);
    let state = chat_shared::bootstrap::app_state_over(chat, &config.api);
    (state, adapters)
}

/// The REST app over a fresh database, driven with `oneshot`.
pub struct TestApp {
    pub env: TestEnv,
    pub state: AppState,
    /// The adapters under `state`, for tests that look at the stores
    /// directly (the service itself exposes none).
    pub adapters: Adapters,
    pub router: Router,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::with_env(TestEnv::new().await).await
    }

    pub async fn with_env(env: TestEnv) -> Self {
        let (state, adapters) = app_state(&env).await;
        let router = app(state.clone());
        Self {
            env,
            state,
            adapters,
            router,
        }
    }

    pub fn token(&self, user: &str) -> String {
        token_with(user, |_| {})
    }

    pub fn admin_token(&self, user: &str) -> String {
        token_with(user, |c| c.role = Some("admin".into()))
    }

    /// Sends a request; `body` may be JSON or raw text.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Body>,
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            builder = builder.header("authorization", format!("Bearer {t}"));
        }
        let has_body = body.is_some();
        if has_body {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(body.unwrap_or_else(Body::empty))
            .expect("request");
        self.oneshot(request).await
    }

    /// Runs one request through the router.
    async fn oneshot(&self, request: Request<Body>) -> Reply {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        Reply::new(status, headers, &bytes)
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Reply {
        self.call(
            Method::POST,
            path,
            Some(token),
            Some(Body::from(body.to_string())),
        )
        .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Reply {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    /// Makes users known (as their first authenticated call would).
    pub async fn register(&self, users: &[&str]) {
        for u in users {
            let r = self.get("/api/v1/chat/rooms", &self.token(u)).await;
            assert_eq!(r.status, StatusCode::OK, "registering {u}: {:?}", r.body);
        }
    }

    /// A DIRECT room between two (registered) users; returns its id.
    pub async fn direct(&self, a: &str, b: &str) -> String {
        let r = self
            .post(
                "/api/v1/chat/direct",
                &self.token(a),
                serde_json::json!({"targetUserId": b}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        r.body["room"]["id"].as_str().expect("room id").to_owned()
    }

    /// A GROUP room created by `owner` with `members`.
    pub async fn group(&self, owner: &str, members: &[&str]) -> String {
        let r = self
            .post(
                "/api/v1/chat/rooms",
                &self.token(owner),
                serde_json::json!({"type": "GROUP", "name": "team", "memberIds": members}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        r.body["room"]["id"].as_str().expect("room id").to_owned()
    }

    /// Sends `content` over REST and returns the message.
    pub async fn send(&self, user: &str, room: &str, content: &str) -> Value {
        let r = self
            .post(
                &format!("/api/v1/chat/rooms/{room}/messages"),
                &self.token(user),
                serde_json::json!({"content": content}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        r.body["message"].clone()
    }

    /// Subscribes to this test's bus channels (every partition's: one
    /// connection, so envelopes arrive in publish order).
    pub async fn subscribe_bus(&self) -> BusListener {
        let client = redis::Client::open(redis_url()).expect("redis url");
        let mut pubsub = client.get_async_pubsub().await.expect("redis pubsub");
        pubsub
            .psubscribe(format!("{}:*", self.env.vars["BROADCAST_CHANNEL"]))
            .await
            .expect("subscribe");
        BusListener { pubsub }
    }
}

pub struct BusListener {
    pubsub: redis::aio::PubSub,
}

impl BusListener {
    /// The next envelope, or panics after 5 s.
    pub async fn next(&mut self) -> Value {
        let msg = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            self.pubsub.on_message().next(),
        )
        .await
        .expect("an envelope within 5 s")
        .expect("stream open");
        let payload: String = msg.get_payload().expect("string payload");
        serde_json::from_str(&payload).expect("envelope is JSON")
    }

    /// The `roomJoined` events of the next `n` `Control::Joined` envelopes
    /// (what the relay would post for joins), by connection id; other
    /// envelopes are skipped. Panics after 5 s without one.
    pub async fn room_joined(&mut self, n: usize) -> std::collections::HashMap<String, Value> {
        let mut joined = std::collections::HashMap::new();
        while joined.len() < n {
            let envelope = self.next().await;
            if envelope["control"]["type"] == "joined" {
                let connection_id = envelope["control"]["connectionId"]
                    .as_str()
                    .expect("connectionId")
                    .to_owned();
                joined.insert(connection_id, envelope["event"].clone());
            }
        }
        joined
    }

    /// Asserts nothing arrives within `ms`.
    pub async fn assert_quiet(&mut self, ms: u64) {
        let got = tokio::time::timeout(
            std::time::Duration::from_millis(ms),
            self.pubsub.on_message().next(),
        )
        .await;
        if let Ok(Some(msg)) = got {
            let payload: String = msg.get_payload().unwrap_or_default();
            panic!("unexpected envelope: {payload}");
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers for the REST suites (rest_auth, rest_rooms, rest_messages, sequence).

/// Where the REST API lives.
pub const API: &str = "/api/v1/chat";

impl TestApp {
    /// Sends a request with exactly these headers (no `authorization` or
    /// `content-type` added): for malformed `Authorization` headers.
    pub async fn call_with_headers(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, axum::http::HeaderValue)],
        body: Option<Body>,
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, value.clone());
        }
        let request = builder
            .body(body.unwrap_or_else(Body::empty))
            .expect("request");
        self.oneshot(request).await
    }

    /// Sends a raw (possibly malformed) body with a bearer token.
    pub async fn post_raw(&self, path: &str, token: &str, raw: impl Into<Body>) -> Reply {
        self.call(Method::POST, path, Some(token), Some(raw.into()))
            .await
    }

    /// `POST /rooms/:room/messages` with any body; returns the reply as is.
    pub async fn send_body(&self, user: &str, room: &str, body: Value) -> Reply {
        self.post(
            &format!("{API}/rooms/{room}/messages"),
            &self.token(user),
            body,
        )
        .await
    }

    /// `GET /rooms/:room/messages?<query>` as `user`, expecting 200.
    pub async fn history(&self, user: &str, room: &str, query: &str) -> Value {
        let path = if query.is_empty() {
            format!("{API}/rooms/{room}/messages")
        } else {
            format!("{API}/rooms/{room}/messages?{query}")
        };
        let r = self.get(&path, &self.token(user)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        r.body
    }

    /// Every stored sequence id of a room, oldest first, read page by page
    /// with `afterSequenceId`.
    pub async fn all_sequence_ids(&self, user: &str, room: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .history(user, room, &format!("afterSequenceId={after}&limit=100"))
                .await;
            let messages = page["messages"].as_array().expect("messages");
            ids.extend(
                messages
                    .iter()
                    .map(|m| m["sequenceId"].as_i64().expect("sequenceId")),
            );
            if page["hasMore"] != Value::Bool(true) {
                break;
            }
            after = *ids.last().expect("a full page is not empty");
        }
        ids
    }

    /// `POST /rooms/:room/read` as `user`, expecting 200; returns `markedUpTo`.
    pub async fn mark_read(&self, user: &str, room: &str, sequence_id: i64) -> i64 {
        let r = self
            .post(
                &format!("{API}/rooms/{room}/read"),
                &self.token(user),
                serde_json::json!({ "sequenceId": sequence_id }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body["markedUpTo"].as_i64().expect("markedUpTo")
    }

    /// `GET /rooms/:room/unread` as `user`, expecting 200.
    pub async fn unread(&self, user: &str, room: &str) -> i64 {
        let r = self
            .get(&format!("{API}/rooms/{room}/unread"), &self.token(user))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body["unreadCount"].as_i64().expect("unreadCount")
    }

    /// The `GET /rooms` entry of `room` as `user` sees it.
    pub async fn room_entry(&self, user: &str, room: &str) -> Value {
        let r = self.get(&format!("{API}/rooms"), &self.token(user)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body["rooms"]
            .as_array()
            .expect("rooms")
            .iter()
            .find(|e| e["id"] == room)
            .cloned()
            .unwrap_or_else(|| panic!("{room} not in {user}'s rooms"))
    }

    /// This test's Redis key prefix.
    pub fn redis_prefix(&self) -> &str {
        &self.env.vars["REDIS_KEY_PREFIX"]
    }

    /// Marks `user` online the way the WebSocket side does: in the online set.
    pub async fn set_online(&self, user: &str) {
        let client = redis::Client::open(redis_url()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let key = chat_shared::presence::Keys::new(self.redis_prefix()).online_of(user);
        let _: i64 = redis::cmd("SADD")
            .arg(key)
            .arg(user)
            .query_async(&mut conn)
            .await
            .expect("SADD");
    }
}

/// The error code PROTOCOL §4 pairs with a status.
pub fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "BAD_REQUEST",
        401 => "UNAUTHORIZED",
        403 => "FORBIDDEN",
        404 => "NOT_FOUND",
        409 => "CONFLICT",
        413 => "PAYLOAD_TOO_LARGE",
        429 => "RATE_LIMITED",
        500 => "INTERNAL",
        503 => "UNAVAILABLE",
        other => panic!("{other} is not an error status of the contract"),
    }
}

/// Asserts `reply` is an error with this status and exactly the body
/// `{"error": {"code": <code of the status>, "message": <non-empty string>}}`.
/// Returns the message. `context` names the request in failures.
pub fn expect_error(reply: &Reply, status: StatusCode, context: &str) -> String {
    assert_eq!(
        reply.status, status,
        "{context}: status (body {})",
        reply.body
    );
    let body = reply
        .body
        .as_object()
        .unwrap_or_else(|| panic!("{context}: error body is not an object: {}", reply.body));
    assert_eq!(
        body.len(),
        1,
        "{context}: only `error` at the top: {}",
        reply.body
    );
    let error = body
        .get("error")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("{context}: no `error` object: {}", reply.body));
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["code", "message"],
        "{context}: error fields: {}",
        reply.body
    );
    assert_eq!(
        error["code"],
        code_for(status),
        "{context}: code: {}",
        reply.body
    );
    let message = error["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: message is not a string: {}", reply.body));
    assert!(!message.trim().is_empty(), "{context}: empty message");
    let content_type = reply
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{context}: content-type {content_type:?}"
    );
    message.to_owned()
}

/// Asserts a success status, showing the body on failure.
pub fn expect_status(reply: &Reply, status: StatusCode, context: &str) {
    assert_eq!(reply.status, status, "{context}: body {}", reply.body);
}

/// The keys of a JSON object, sorted.
pub fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .cloned()
        .collect();
    keys.sort_unstable();
    keys
}

/// Asserts a profile has exactly `{id, username, displayName, avatar}`.
pub fn assert_profile(value: &Value, id: &str) {
    assert_eq!(
        keys(value),
        ["avatar", "displayName", "id", "username"],
        "{value}"
    );
    assert_eq!(value["id"], id, "{value}");
    assert!(value["username"].is_string(), "{value}");
    for field in ["displayName", "avatar"] {
        assert!(
            value[field].is_string() || value[field].is_null(),
            "{value}"
        );
    }
}

/// Asserts a message object has exactly the fields of PROTOCOL §2.
pub fn assert_message(value: &Value) {
    assert_eq!(
        keys(value),
        [
            "clientMessageId",
            "content",
            "createdAt",
            "id",
            "metadata",
            "readBy",
            "roomId",
            "sender",
            "senderId",
            "sequenceId",
            "type"
        ],
        "{value}"
    );
    assert!(
        value["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_")),
        "{value}"
    );
    assert!(value["roomId"].is_string(), "{value}");
    assert!(value["content"].is_string(), "{value}");
    assert!(
        ["text", "image", "gift", "system"].contains(&value["type"].as_str().unwrap_or_default()),
        "{value}"
    );
    assert!(
        value["metadata"].is_null() || value["metadata"].is_object(),
        "{value}"
    );
    assert!(
        value["sequenceId"].as_i64().is_some_and(|n| n >= 1),
        "{value}"
    );
    assert!(
        value["clientMessageId"].is_null() || value["clientMessageId"].is_string(),
        "{value}"
    );
    let sender_id = value["senderId"].as_str().expect("senderId");
    assert_profile(&value["sender"], sender_id);
    let read_by = value["readBy"].as_array().expect("readBy is an array");
    assert!(
        read_by.iter().all(|u| u.is_string() && u != sender_id),
        "readBy never holds the sender: {value}"
    );
    assert_timestamp(&value["createdAt"]);
}

/// Asserts a room object has the fields of PROTOCOL §4 (and the baseline's
/// `callId`, `lastSequenceId`, `createdAt`), typed as the contract says.
pub fn assert_room(value: &Value) {
    assert_eq!(
        keys(value),
        [
            "callId",
            "createdAt",
            "id",
            "lastMessageAt",
            "lastMessageText",
            "lastSequenceId",
            "members",
            "name",
            "type",
            "user1",
            "user2"
        ],
        "{value}"
    );
    assert!(
        value["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("room_")),
        "{value}"
    );
    let kind = value["type"].as_str().expect("type");
    let members = value["members"].as_array().expect("members");
    for m in members {
        assert_profile(m, m["id"].as_str().expect("member id"));
    }
    match kind {
        "DIRECT" => {
            assert_eq!(members.len(), 2, "{value}");
            for side in ["user1", "user2"] {
                let id = value[side]["id"].as_str().expect("DIRECT side id");
                assert_profile(&value[side], id);
                assert!(
                    members.contains(&value[side]),
                    "{side} is a member: {value}"
                );
            }
            assert_ne!(value["user1"]["id"], value["user2"]["id"]);
        }
        "GROUP" | "CALL" => {
            assert!(
                value["user1"].is_null() && value["user2"].is_null(),
                "{value}"
            );
        }
        other => panic!("unknown room type {other}"),
    }
    assert!(
        value["lastSequenceId"].as_i64().is_some_and(|n| n >= 0),
        "{value}"
    );
    if value["lastMessageAt"].is_null() {
        assert!(value["lastMessageText"].is_null(), "{value}");
    } else {
        assert_timestamp(&value["lastMessageAt"]);
        assert!(value["lastMessageText"].is_string(), "{value}");
    }
    assert_timestamp(&value["createdAt"]);
}

/// The member ids of a room object, in order.
pub fn member_ids(room: &Value) -> Vec<String> {
    room["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect()
}

/// The sequence ids of a page's `messages`.
pub fn sequence_ids(page: &Value) -> Vec<i64> {
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["sequenceId"].as_i64().expect("sequenceId"))
        .collect()
}

/// An unsigned token (`alg: none`, empty signature) for `user`, otherwise valid.
pub fn unsigned_token(user: &str) -> String {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let exp = chrono::Utc::now().timestamp() + 3600;
    let payload = base64url(
        serde_json::json!({"sub": user, "exp": exp, "role": "admin"})
            .to_string()
            .as_bytes(),
    );
    format!("{header}.{payload}.")
}

/// A token for `user` that expired a minute ago, correctly signed.
pub fn expired_token(user: &str) -> String {
    token_with(user, |c| c.exp = chrono::Utc::now().timestamp() - 60)
}

/// A token for `user` signed with the wrong secret.
pub fn forged_token(user: &str) -> String {
    mint_hs256(
        &SecretString::from("not-the-secret"),
        &DevClaims::new(user, 3600),
    )
    .expect("mint")
}

/// Signs arbitrary claims with the suite's secret and `alg`.
pub fn sign_claims(alg: jsonwebtoken::Algorithm, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// Every authenticated REST route of PROTOCOL §4, with a valid body where
/// it takes one: `(method, path, body)`. `room` is a room `user` may use;
/// `other` a second known user.
pub fn authed_routes(room: &str, other: &str) -> Vec<(Method, String, Option<Value>)> {
    use serde_json::json;
    vec![
        (Method::GET, format!("{API}/rooms"), None),
        (
            Method::POST,
            format!("{API}/rooms"),
            Some(json!({"type": "GROUP", "name": "g", "memberIds": [other]})),
        ),
        (Method::GET, format!("{API}/rooms/{room}/messages"), None),
        (
            Method::POST,
            format!("{API}/rooms/{room}/messages"),
            Some(json!({"content": "hi"})),
        ),
        (Method::GET, format!("{API}/rooms/{room}/unread"), None),
        (
            Method::POST,
            format!("{API}/rooms/{room}/read"),
            Some(json!({"sequenceId": 1})),
        ),
        (Method::GET, format!("{API}/rooms/{room}/online"), None),
        (
            Method::POST,
            format!("{API}/direct"),
            Some(json!({"targetUserId": other})),
        ),
        (Method::DELETE, format!("{API}/rooms/{room}/cleanup"), None),
        (
            Method::POST,
            format!("{API}/rooms/{room}/members"),
            Some(json!({"userIds": [other]})),
        ),
        (
            Method::DELETE,
            format!("{API}/rooms/{room}/members/{other}"),
            None,
        ),
    ]
}

impl TestApp {
    /// Calls one of [`authed_routes`] with `token`.
    pub async fn call_route(
        &self,
        route: &(Method, String, Option<Value>),
        token: Option<&str>,
    ) -> Reply {
        let (method, path, body) = route;
        self.call(
            method.clone(),
            path,
            token,
            body.as_ref().map(|b| Body::from(b.to_string())),
        )
        .await
    }
}

/// A registered WebSocket connection of `user`, old enough that no reply
/// waits for its `connected` greeting (for tests that drive `Realtime`
/// directly).
pub fn ws_connection(id: &str, user: &str) -> chat_shared::presence::Connection {
    chat_shared::presence::Connection {
        connection_id: id.to_owned(),
        user: chat_shared::auth::AuthUser {
            id: chat_shared::domain::UserId::parse(user, "user").expect("user id"),
            username: user.to_owned(),
            display_name: None,
            avatar: None,
            is_admin: false,
        },
        endpoint: "http://127.0.0.1:9/local".to_owned(),
        connected_at_ms: chrono::Utc::now().timestamp_millis() - 60_000,
    }
}
