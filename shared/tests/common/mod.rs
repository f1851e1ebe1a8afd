//! Test harness: a fresh PostgreSQL database per test (copied from a
//! migrated template) and a random Redis key prefix and channel per test,
//! so tests never share data and may run in any order, in parallel.
//!
//! `TEST_DATABASE_URL` (a server where we may create databases) and
//! `TEST_REDIS_URL` default to the local services; `scripts/test.sh` sets
//! them. A missing service fails the test loudly: nothing is skipped.

#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use chat_shared::Config;
use chat_shared::auth::{DevClaims, mint_hs256};
use chat_shared::http::{AppState, app};
use futures::StreamExt;
use http_body_util::BodyExt;
use secrecy::SecretString;
use serde_json::Value;
use tokio_postgres::NoTls;
use tower::ServiceExt;

pub const SECRET: &str = "test-secret-for-the-suite";

pub fn admin_db_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..12)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

fn with_database(url: &str, db: &str) -> String {
    let mut config: tokio_postgres::Config = url.parse().expect("TEST_DATABASE_URL parses");
    config.dbname(db);
    // Rebuild a URL from the parts we use.
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    match config.get_password() {
        Some(pw) => format!(
            "postgres://{user}:{}@{host}:{port}/{db}",
            String::from_utf8_lossy(pw)
        ),
        None => format!("postgres://{user}@{host}:{port}/{db}"),
    }
}

/// Creates a fresh database from the migrated template and returns its URL.
pub async fn fresh_database() -> String {
    let admin = admin_db_url();
    let (client, conn) = tokio_postgres::connect(&admin, NoTls).await.unwrap_or_else(|e| {
        panic!("cannot reach PostgreSQL at TEST_DATABASE_URL={admin}: {e}. Run scripts/test.sh, which starts it.")
    });
    tokio::spawn(conn);
    // The template's name carries a hash of the migrations, so a changed
    // migration gets a new template.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("migrations dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    for f in &files {
        std::fs::read_to_string(f)
            .expect("migration")
            .hash(&mut hasher);
    }
    let template = format!("chat_template_{:x}", hasher.finish());
    client
        .execute("SELECT pg_advisory_lock(727274)", &[])
        .await
        .expect("lock");
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
        .await
        .expect("query")
        .is_some();
    if !exists {
        let building = format!("{template}_building");
        client
            .execute(&format!("DROP DATABASE IF EXISTS {building}"), &[])
            .await
            .expect("drop");
        client
            .execute(&format!("CREATE DATABASE {building}"), &[])
            .await
            .expect("create template");
        chat_shared::store::migrate(&SecretString::from(with_database(&admin, &building)))
            .await
            .expect("migrations apply");
        client
            .execute(
                &format!("ALTER DATABASE {building} RENAME TO {template}"),
                &[],
            )
            .await
            .expect("rename template");
    }
    let db = format!("chat_test_{}", random_suffix());
    let created = client
        .execute(&format!("CREATE DATABASE {db} TEMPLATE {template}"), &[])
        .await;
    client
        .execute("SELECT pg_advisory_unlock(727274)", &[])
        .await
        .expect("unlock");
    created.expect("create test database");
    with_database(&admin, &db)
}

/// A test's own configuration: its database, Redis prefix and channel.
pub struct TestEnv {
    pub vars: HashMap<String, String>,
}

impl TestEnv {
    pub async fn new() -> Self {
        let db = fresh_database().await;
        let prefix = format!("test:{}:", random_suffix());
        let vars = HashMap::from([
            ("DATABASE_URL".to_owned(), db),
            ("REDIS_URL".to_owned(), redis_url()),
            ("REDIS_KEY_PREFIX".to_owned(), prefix.clone()),
            ("BROADCAST_CHANNEL".to_owned(), format!("{prefix}broadcast")),
            ("JWT_SECRET".to_owned(), SECRET.to_owned()),
            ("INSTANCE_ID".to_owned(), "test".to_owned()),
            ("PG_POOL_MAX".to_owned(), "24".to_owned()),
        ]);
        Self { vars }
    }

    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.vars.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn config(&self) -> Config {
        Config::from_lookup(|k| self.vars.get(k).cloned()).expect("test config is valid")
    }
}

/// The REST app over a fresh database, driven with `oneshot`.
pub struct TestApp {
    pub env: TestEnv,
    pub state: AppState,
    pub router: Router,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::with_env(TestEnv::new().await).await
    }

    pub async fn with_env(env: TestEnv) -> Self {
        let state = chat_shared::bootstrap::app_state(&env.config())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot build the app (is Redis at {} up?): {e:#}",
                    redis_url()
                )
            });
        let router = app(state.clone());
        Self { env, state, router }
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
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Reply {
            status,
            headers,
            body,
        }
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

    /// Subscribes to this test's bus channel.
    pub async fn subscribe_bus(&self) -> BusListener {
        let client = redis::Client::open(redis_url()).expect("redis url");
        let mut pubsub = client.get_async_pubsub().await.expect("redis pubsub");
        pubsub
            .subscribe(&self.env.vars["BROADCAST_CHANNEL"])
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

pub fn token_with(user: &str, edit: impl FnOnce(&mut DevClaims)) -> String {
    let mut claims = DevClaims::new(user, 3600);
    edit(&mut claims);
    mint_hs256(&SecretString::from(SECRET), &claims).expect("mint")
}
