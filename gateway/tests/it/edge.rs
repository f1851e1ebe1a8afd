//! The client port under attack (issue 15, finding 4): slowloris sockets,
//! handshake floods, connection floods from one address, and a port that
//! runs out of descriptors. Real sockets against an `EdgeListener`.

use std::time::Duration;

use chat_gateway::EdgeLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::helpers::*;

/// A socket that sends half a request head and nothing more.
async fn partial(server: &TestServer) -> TcpStream {
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websock")
        .await
        .unwrap();
    socket
}

/// Reads until the peer closes (or `limit` passes); returns what came.
async fn read_to_close(socket: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    let mut buf = [0u8; 512];
    let until = Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(until, socket.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(data),
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn slowloris_sockets_are_closed_at_the_handshake_deadline() {
    let server = TestServer::start_edge(
        config(),
        EdgeLimits {
            handshake_timeout: Duration::from_secs(1),
            ..EdgeLimits::default()
        },
    )
    .await;
    let started = Instant::now();
    let mut sockets = Vec::new();
    for _ in 0..500 {
        sockets.push(partial(&server).await);
    }
    for socket in &mut sockets {
        assert!(
            read_to_close(socket, Duration::from_secs(5))
                .await
                .is_some(),
            "a slowloris socket is still open"
        );
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
    // Honest clients still connect.
    let (mut client, _) = server.connect().await;
    assert_eq!(whoami(&mut client).await.len(), 16);
}

#[tokio::test]
async fn handshakes_over_the_cap_are_refused_at_once() {
    let server = TestServer::start_edge(
        config(),
        EdgeLimits {
            handshake_timeout: Duration::from_secs(1),
            max_handshakes: 5,
            ..EdgeLimits::default()
        },
    )
    .await;
    let mut stalled = Vec::new();
    for _ in 0..5 {
        stalled.push(partial(&server).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = partial(&server).await;
    let answer = read_to_close(&mut extra, Duration::from_millis(500))
        .await
        .expect("refused at once");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 503"));
    // Once the stalled ones time out there is room again.
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.connect().await;
}

#[tokio::test]
async fn one_address_gets_its_connection_rate_and_no_more() {
    let server = TestServer::start_edge(
        config(),
        EdgeLimits {
            connect_rate_per_ip: 5,
            ..EdgeLimits::default()
        },
    )
    .await;
    // A burst of twice the rate passes...
    let mut open = Vec::new();
    for _ in 0..10 {
        open.push(server.connect().await);
    }
    // ...the next is refused with 429.
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    let answer = read_to_close(&mut socket, Duration::from_secs(2))
        .await
        .expect("refused");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 429"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // A second later there are tokens again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    server.connect().await;
}

#[tokio::test]
async fn a_full_client_port_leaves_the_management_listener_answering() {
    let server = TestServer::start_edge(
        config(),
        EdgeLimits {
            max_sockets: Some(10),
            ..EdgeLimits::default()
        },
    )
    .await;
    let mut open = Vec::new();
    for _ in 0..10 {
        open.push(server.connect().await);
    }
    // The eleventh waits in the backlog, unanswered...
    let pending = tokio::spawn(tokio_tungstenite::connect_async(server.ws_url()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pending.is_finished(), "accepted beyond the cap");
    // ...while the management listener answers.
    let response = server
        .http("GET", "/local/@connections/AAAAAAAAAAAAAAA%3D", b"")
        .await;
    assert_eq!(response.status, 410);
    // One leaves, the waiting one gets in.
    let (mut first, _) = open.remove(0);
    close_from_client(&mut first, None).await;
    drop(first);
    let (mut client, _) = timeout(WAIT, pending).await.unwrap().unwrap().unwrap();
    assert_eq!(whoami(&mut client).await.len(), 16);
}
