//! Oversized request heads against a real listener (hyper serving the whole
//! local stack): a request target over 8 KiB is 414, headers over 16 KiB
//! are 431, both with the API's error shape; beyond hyper's own limits (a
//! target over 64 KiB: 414; a head over about 400 KiB or more than 100
//! headers: 431) hyper answers first, without a body. After every one
//! of them the server is healthy: `/health` answers and a WebSocket client
//! connects and gets `pong`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::net::SocketAddr;

use chat_test_support::TestEnv;
use common::{Client, TestStack, WAIT, token};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `head` (a request line and headers, without the final blank line)
/// and returns the status and body of the answer. The server may answer
/// and close before it has read everything: write errors are ignored.
async fn raw(addr: SocketAddr, head: String) -> (u16, Value) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let request = format!("{head}\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    // The write half stays open until the answer is read: hyper takes a
    // half-closed connection for a client that went away.
    let write = async move {
        let _ = writer.write_all(request.as_bytes()).await;
        writer
    };
    let read = async move {
        let mut answer = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return answer,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let (_writer, answer) = tokio::time::timeout(WAIT, async { tokio::join!(write, read) })
        .await
        .expect("an answer in time");
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| serde_json::from_str(b).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    (status, body)
}

async fn assert_healthy(stack: &TestStack, context: &str) {
    let reply = stack.health().await;
    assert_eq!(reply.status, 200, "{context}: /health {:?}", reply.body);
    let mut client = Client::connect(stack, "alice").await;
    client.ping_pong().await;
    client.close().await;
}

fn assert_error_shape(body: &Value, context: &str) {
    assert_eq!(body["error"]["code"], "BAD_REQUEST", "{context}: {body}");
    assert!(body["error"]["message"].is_string(), "{context}: {body}");
}

#[tokio::test]
async fn oversized_heads_get_414_or_431_and_the_server_stays_healthy() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let addr = stack.addr();
    let alice = token("alice");
    let kib = |n: usize| "a".repeat(n * 1024);

    // Within the limits: a 4 KiB header and a 6 KiB query are served.
    let (status, _) = raw(
        addr,
        format!(
            "GET /api/v1/chat/rooms?pad={} HTTP/1.1\r\nAuthorization: Bearer {alice}\r\nX-Pad: {}",
            kib(6),
            kib(4)
        ),
    )
    .await;
    assert_eq!(status, 200, "requests within the limits are served");

    let cases: Vec<(&str, String, u16, bool)> = vec![
        (
            "a 64 KiB header on /health",
            format!("GET /health HTTP/1.1\r\nX-Pad: {}", kib(64)),
            431,
            true,
        ),
        (
            "a 64 KiB header on a REST route",
            format!(
                "GET /api/v1/chat/rooms HTTP/1.1\r\nAuthorization: Bearer {alice}\r\nX-Pad: {}",
                kib(64)
            ),
            431,
            true,
        ),
        (
            "a 64 KiB Authorization header",
            format!(
                "GET /api/v1/chat/rooms HTTP/1.1\r\nAuthorization: Bearer {}",
                kib(64)
            ),
            431,
            true,
        ),
        (
            "17 headers of 1 KiB",
            format!(
                "GET /health HTTP/1.1{}",
                (0..17)
                    .map(|i| format!("\r\nX-Pad-{i}: {}", kib(1)))
                    .collect::<String>()
            ),
            431,
            true,
        ),
        (
            "a 64 KiB header on the WebSocket handshake",
            format!(
                "GET /ws?token={alice} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 X-Pad: {}",
                kib(64)
            ),
            431,
            true,
        ),
        (
            "a 20 KiB query string on a REST route",
            format!(
                "GET /api/v1/chat/rooms?q={} HTTP/1.1\r\nAuthorization: Bearer {alice}",
                kib(20)
            ),
            414,
            true,
        ),
        (
            "a 20 KiB query string on the WebSocket handshake",
            format!("GET /ws?token={alice}&q={} HTTP/1.1", kib(20)),
            414,
            true,
        ),
        (
            "a 20 KiB path",
            format!("GET /api/v1/chat/rooms/{}/messages HTTP/1.1", kib(20)),
            414,
            true,
        ),
        // A request target over 64 KiB: hyper answers 414 itself, before
        // the router sees anything, without a body.
        (
            "a 100 KiB query string on a REST route",
            format!(
                "GET /api/v1/chat/rooms?q={} HTTP/1.1\r\nAuthorization: Bearer {alice}",
                kib(100)
            ),
            414,
            false,
        ),
        (
            "a 100 KiB query string on the WebSocket handshake",
            format!("GET /ws?token={alice}&q={} HTTP/1.1", kib(100)),
            414,
            false,
        ),
        // Past hyper's own buffer (about 400 KiB): hyper answers 431
        // before the router sees anything, without a body.
        (
            "a 1 MiB header",
            format!("GET /health HTTP/1.1\r\nX-Pad: {}", kib(1024)),
            431,
            false,
        ),
        (
            "a 1 MiB query string",
            format!("GET /health?q={} HTTP/1.1", kib(1024)),
            431,
            false,
        ),
        (
            "200 small headers",
            format!(
                "GET /health HTTP/1.1{}",
                (0..200)
                    .map(|i| format!("\r\nX-H{i}: v"))
                    .collect::<String>()
            ),
            431,
            false,
        ),
    ];
    for (what, head, want, shaped) in cases {
        let (status, body) = raw(addr, head).await;
        assert_eq!(status, want, "{what}: {body}");
        if shaped {
            assert_error_shape(&body, what);
        }
        assert_healthy(&stack, what).await;
    }
    stack.stop().await;
}
