//! Issue 15, finding 4, at the real limit: the file-descriptor reserve.
//! `chat-local serve` runs as a child process with a low `RLIMIT_NOFILE`
//! (256, set by the shell that execs it), and its client port is filled
//! with WebSocket connections until it accepts no more (a handshake gets no
//! answer: new sockets wait in the kernel's backlog instead of failing
//! `accept` with "Too many open files"). Then, with the process's open
//! descriptors within `GATEWAY_FD_RESERVE` of the limit:
//!
//! * `/health` on the management listener answers;
//! * the Management API answers a signed call;
//! * two users connected before still chat (PostgreSQL, Redis and the
//!   relay's posts to the management listener all need descriptors);
//!
//! and once some connections close, the waiting handshake completes. No
//! `accept` ever failed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chat_test_support::stack as common;
#[path = "support/serve.rs"]
mod serve;

use std::time::Duration;

use chat_test_support::TestEnv;
use common::{Client, dev_credentials, raw_http, signed};

/// The child's soft and hard `RLIMIT_NOFILE`.
const OPEN_FILES: u64 = 256;
/// `GATEWAY_FD_RESERVE`, its default.
const RESERVE: u64 = 64;
/// How long a handshake may take before the port counts as full.
const FULL_AFTER: Duration = Duration::from_secs(3);

#[tokio::test]
async fn health_and_the_management_api_answer_when_the_client_port_is_full() {
    let env = TestEnv::new().await;
    let dir = serve::temp_dir("fd-limit");
    let server = serve::Serve::start(
        &env,
        &dir,
        "fd-limit",
        serve::Options {
            open_files: Some(OPEN_FILES),
            env: vec![("GATEWAY_FD_RESERVE", RESERVE.to_string())],
            ..serve::Options::default()
        },
    )
    .await;
    assert_eq!(server.open_files_limit(), OPEN_FILES);
    let ws = |user: &str| server.ws_url(user);

    // A pair that chats before, during and after.
    let (room, mut ann, mut ben) = server.pair("ann", "ben").await;

    // Fill the client port until a handshake gets no answer.
    let mut fill = Vec::new();
    let full = loop {
        assert!(
            fill.len() < OPEN_FILES as usize,
            "{} connections held and the port still accepts: no limit at work",
            fill.len()
        );
        let user = format!("fill{}", fill.len());
        match tokio::time::timeout(FULL_AFTER, Client::connect_url(&ws(&user), &user)).await {
            Ok(client) => fill.push(client),
            Err(_) => break fill.len(),
        }
    };
    let open = server.open_fds() as u64;
    println!(
        "client port full after {full} connections (+2): {open} descriptors open, limit {OPEN_FILES}, reserve {RESERVE}"
    );
    assert!(
        full >= 50,
        "the port was full after only {full} connections"
    );
    assert!(
        open + RESERVE + 8 >= OPEN_FILES && open < OPEN_FILES,
        "{open} descriptors open: not at the limit of {OPEN_FILES} less the reserve of {RESERVE}"
    );

    // A handshake that waits in the backlog meanwhile.
    let waiting = tokio::spawn({
        let url = ws("late");
        async move { Client::connect_url(&url, "late").await }
    });

    // The management listener answers: /health and the Management API.
    let health = common::http(server.management, "GET", "/health", None, None).await;
    assert_eq!(health.status, 200, "/health on the management listener");
    let path = format!(
        "/local/@connections/{}",
        ben.connection_id.replace('=', "%3D")
    );
    let headers = signed(&dev_credentials(), "GET", server.management, &path, b"");
    let (status, _, body) = raw_http(server.management, "GET", &path, &headers, b"").await;
    assert_eq!(status, 200, "GetConnection: {body}");
    // The pair still chats: stored, published, posted by the relay.
    for i in 0..3 {
        let content = format!("while full {i}");
        ann.send_and_await(&room, &content, &format!("full-{i}"))
            .await
            .expect("a send while the port is full");
        assert_eq!(ben.wait_for("message").await["content"], content);
    }
    assert!(!waiting.is_finished(), "the port accepted while full");

    // Room again: the waiting handshake completes.
    for client in fill.drain(..10) {
        client.close().await;
    }
    let late = tokio::time::timeout(common::WAIT, waiting)
        .await
        .expect("the waiting handshake completes once connections close")
        .expect("the late client");
    late.close().await;

    for client in fill {
        client.close().await;
    }
    ann.close().await;
    ben.close().await;
    let log = server.stop();
    assert!(
        !log.contains("accept failed") && !log.contains("Too many open files"),
        "accept failed at the limit:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
