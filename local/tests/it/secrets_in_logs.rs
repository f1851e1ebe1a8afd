//! No secret or token ever reaches the logs. The real binary
//! (`chat-local serve`, with its own telemetry set-up) runs as a child
//! process at `RUST_LOG=trace`, once with JSON and once with pretty logs,
//! while it serves authenticated REST calls, refuses bad tokens, upgrades
//! WebSockets with `?token=` and with `Authorization: Bearer`, renews and
//! refuses sessions with `authenticate` frames, relays messages and shuts
//! down. Its whole output is then searched for the JWT
//! secret, every token used and every token's signature.
//!
//! Also: the configuration's `Debug` output (what a careless
//! `tracing::debug!(?config)` would print) holds no secret.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chat_shared::auth::{DevClaims, mint_hs256};
use chat_test_support::TestEnv;
use common::{Client, handshake, http};
use secrecy::SecretString;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// A secret no test prints on purpose, so any occurrence is a leak.
const SECRET: &str = "logs-test-secret-9c1f7e2a4b";

fn mint(secret: &str, user: &str, ttl: i64) -> String {
    mint_hs256(&SecretString::from(secret), &DevClaims::new(user, ttl)).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    log: std::path::PathBuf,
    addr: SocketAddr,
}

impl Server {
    fn start(env: &TestEnv, format: &str, dir: &std::path::Path) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join(format!("serve-{format}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_chat-local"))
            .args(["serve", "--no-migrate", "--listen", &addr.to_string()])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.vars.iter().filter(|(k, _)| k.as_str() != "JWT_SECRET"))
            .env("JWT_SECRET", SECRET)
            .env("RUST_LOG", "trace")
            .env("LOG_FORMAT", format)
            .env("INSTANCE_ID", format!("logs-{format}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("chat-local starts");
        Self { child, log, addr }
    }

    async fn wait_healthy(&mut self) {
        for _ in 0..200 {
            if let Ok(Ok(_)) = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(self.addr),
            )
            .await
            {
                let reply = http(self.addr, "GET", "/health", None, None).await;
                if reply.status == 200 {
                    return;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "chat-local exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("chat-local never became healthy");
    }

    /// Stops with SIGTERM (a graceful shutdown logs too) and returns the log.
    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

/// Drives the server through everything that handles a token; returns
/// every token it used.
async fn exercise(addr: SocketAddr) -> Vec<String> {
    let alice = mint(SECRET, "alice", 3600);
    let bob = mint(SECRET, "bob", 3600);
    let expired = mint(SECRET, "alice", -60);
    let forged = mint("not-the-secret", "alice", 3600);
    let unsigned = {
        let claims = alice.split('.').nth(1).unwrap();
        format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.")
    };

    // Authenticated REST.
    assert_eq!(
        http(addr, "GET", "/api/v1/chat/rooms", Some(&bob), None)
            .await
            .status,
        200
    );
    let created = http(
        addr,
        "POST",
        "/api/v1/chat/rooms",
        Some(&alice),
        Some(&json!({"type": "GROUP", "name": "logs", "memberIds": ["bob"]})),
    )
    .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let room = created.body["room"]["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/chat/rooms/{room}/messages");
    let sent = http(
        addr,
        "POST",
        &path,
        Some(&alice),
        Some(&json!({"content": "hi"})),
    )
    .await;
    assert_eq!(sent.status, 201);
    assert_eq!(http(addr, "GET", &path, Some(&bob), None).await.status, 200);

    // Refused tokens, including the secret itself passed as a token.
    for bad in [&expired, &forged, &unsigned, &SECRET.to_owned()] {
        let reply = http(addr, "GET", "/api/v1/chat/rooms", Some(bad), None).await;
        assert_eq!(reply.status, 401);
    }
    // Tokens in query strings, where no REST route reads them.
    let reply = http(addr, "GET", &format!("/nope?token={alice}"), None, None).await;
    assert_eq!(reply.status, 404);
    let reply = http(
        addr,
        "GET",
        &format!("/api/v1/chat/rooms?token={alice}"),
        None,
        None,
    )
    .await;
    assert_eq!(reply.status, 401);

    // WebSockets: ?token= and a bearer header; traffic; refusals.
    let base = format!("ws://{addr}/ws");
    let mut a = Client::connect_url(&format!("{base}?token={alice}"), "alice").await;
    let mut request = base.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {bob}").parse().unwrap());
    let mut b = Client::connect_request(request, "bob").await;
    a.join(&room).await;
    b.join(&room).await;
    a.send("typing", json!({"roomId": room, "isTyping": true}))
        .await;
    b.wait_for("typing").await;
    a.say(&room, "over the socket").await;
    b.wait_for("message").await;
    a.send("sendMessage", json!({"roomId": room, "content": ""}))
        .await;
    a.expect_error("BAD_REQUEST").await;
    for bad in [&expired, &forged, &unsigned] {
        let url = format!("{base}?token={bad}");
        let refused = handshake(url.as_str().into_client_request().unwrap()).await;
        assert_eq!(refused.err().map(|(status, _)| status), Some(401));
        let mut request = base.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {bad}").parse().unwrap());
        let refused = handshake(request).await;
        assert_eq!(refused.err().map(|(status, _)| status), Some(401));
    }
    // Tokens inside frames: a session renewed with `authenticate`, and one
    // refused (which closes that socket).
    let renewed = mint(SECRET, "alice", 7200);
    a.send("authenticate", json!({"token": renewed})).await;
    a.expect("authenticated").await;
    let mut c = Client::connect_url(&format!("{base}?token={alice}"), "alice").await;
    c.send("authenticate", json!({"token": forged})).await;
    c.expect_error("UNAUTHORIZED").await;
    c.expect_close().await;
    a.close().await;
    b.close().await;
    vec![alice, bob, expired, forged, unsigned, renewed]
}

#[tokio::test]
async fn no_secret_or_token_reaches_the_logs() {
    let env = TestEnv::new().await;
    let dir = std::env::temp_dir().join(format!("chat-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for format in ["json", "pretty"] {
        let mut server = Server::start(&env, format, &dir);
        server.wait_healthy().await;
        let tokens = exercise(server.addr).await;
        let log = server.stop();

        // The logs are real and verbose: the test would see a leak.
        assert!(
            log.lines().count() > 50,
            "{format}: too little logged:\n{log}"
        );
        assert!(log.contains("connected"), "{format}: no connection logged");
        assert!(
            log.contains("TRACE") || log.contains("\"level\":\"TRACE\""),
            "{format}: not at trace level"
        );

        let mut needles = vec![("the JWT secret".to_owned(), SECRET.to_owned())];
        for (i, token) in tokens.iter().enumerate() {
            needles.push((format!("token {i}"), token.clone()));
            let signature = token.rsplit('.').next().unwrap();
            if !signature.is_empty() {
                needles.push((format!("token {i}'s signature"), signature.to_owned()));
            }
        }
        for (what, needle) in needles {
            if let Some(at) = log.find(&needle) {
                let line = log[..at].rsplit('\n').next().unwrap_or_default();
                panic!("{format} logs contain {what} after: {line}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_configuration_debug_output_holds_no_secret() {
    let mut env = TestEnv {
        vars: std::collections::HashMap::new(),
    };
    env.set(
        "DATABASE_URL",
        "postgres://chat:db-password-5e1@127.0.0.1:5432/chat",
    )
    .set("REDIS_URL", "redis://:redis-password-77a@127.0.0.1:6379")
    .set("JWT_SECRET", SECRET);
    let shown = format!("{:?} {:#?}", env.config(), env.config());
    for secret in [SECRET, "db-password-5e1", "redis-password-77a"] {
        assert!(
            !shown.contains(secret),
            "Config's Debug shows {secret}: {shown}"
        );
    }
}
