//! Message and frame size limits, idle timeout, maximum lifetime, pings.

use std::time::Duration;

use chat_gateway::GatewayConfig;
use futures::{SinkExt, StreamExt};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::helpers::*;

const MAX_MESSAGE: usize = 1024;

fn limits() -> GatewayConfig {
    GatewayConfig {
        max_message_bytes: MAX_MESSAGE,
        max_frame_bytes: 2 * MAX_MESSAGE,
        ..config()
    }
}

/// Sends `text` as fragments of `size` bytes.
async fn send_fragmented(client: &mut Client, text: &str, size: usize) {
    let chunks: Vec<&[u8]> = text.as_bytes().chunks(size).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let last = i == chunks.len() - 1;
        client
            .send(Message::Frame(Frame::message(chunk.to_vec(), opcode, last)))
            .await
            .unwrap();
    }
}

async fn assert_closed_with(server: &TestServer, client: &mut Client, id: &str, code: u16) {
    // The close frame is the first thing the client gets: no error message.
    let frame = expect_close(client).await;
    assert_eq!(u16::from(frame.code), code, "{frame:?}");
    let disconnect = server.recorder.disconnect_of(id).await;
    assert_eq!(status_of(&disconnect).0, i64::from(code));
}

#[tokio::test]
async fn a_message_of_exactly_the_limit_is_accepted() {
    let server = TestServer::start(limits()).await;
    let (mut client, _) = server.connect().await;
    let text = "a".repeat(MAX_MESSAGE);
    client.send(Message::text(text.clone())).await.unwrap();
    assert_eq!(next_text(&mut client).await, format!("echo:{text}"));
}

#[tokio::test]
async fn a_message_over_the_limit_closes_with_1009() {
    let server = TestServer::start(limits()).await;
    let (mut client, id) = server.connect().await;
    client
        .send(Message::text("a".repeat(MAX_MESSAGE + 1)))
        .await
        .unwrap();
    assert_closed_with(&server, &mut client, &id, 1009).await;
    assert_eq!(server.gateway.connection_count(), 0);
}

#[tokio::test]
async fn a_fragmented_message_of_exactly_the_limit_is_accepted() {
    let server = TestServer::start(limits()).await;
    let (mut client, _) = server.connect().await;
    let text = "b".repeat(MAX_MESSAGE);
    send_fragmented(&mut client, &text, 100).await;
    assert_eq!(next_text(&mut client).await, format!("echo:{text}"));
}

#[tokio::test]
async fn a_fragmented_message_over_the_limit_closes_with_1009() {
    let server = TestServer::start(limits()).await;
    let (mut client, id) = server.connect().await;
    send_fragmented(&mut client, &"b".repeat(MAX_MESSAGE + 1), 100).await;
    assert_closed_with(&server, &mut client, &id, 1009).await;
}

#[tokio::test]
async fn a_frame_over_the_limit_closes_with_1009() {
    let server = TestServer::start(GatewayConfig {
        max_message_bytes: MAX_MESSAGE,
        max_frame_bytes: 256,
        ..config()
    })
    .await;
    let (mut client, id) = server.connect().await;
    // Within the frame limit, a message of the full size still passes.
    let text = "c".repeat(MAX_MESSAGE);
    send_fragmented(&mut client, &text, 256).await;
    assert_eq!(next_text(&mut client).await, format!("echo:{text}"));
    client.send(Message::text("c".repeat(257))).await.unwrap();
    assert_closed_with(&server, &mut client, &id, 1009).await;
}

#[tokio::test]
async fn an_idle_connection_closes_with_1001() {
    let server = TestServer::start(GatewayConfig {
        idle_timeout: Duration::from_millis(300),
        ..config()
    })
    .await;
    let (mut client, id) = server.connect().await;
    let since = Instant::now();
    let frame = expect_close(&mut client).await;
    assert!(
        since.elapsed() >= Duration::from_millis(250),
        "{:?}",
        since.elapsed()
    );
    assert_eq!(u16::from(frame.code), 1001);
    assert_eq!(frame.reason.as_str(), "Going away");
    let disconnect = server.recorder.disconnect_of(&id).await;
    assert_eq!(status_of(&disconnect), (1001, "Going away".into()));
}

#[tokio::test]
async fn pings_are_activity() {
    let server = TestServer::start(GatewayConfig {
        idle_timeout: Duration::from_millis(300),
        ..config()
    })
    .await;
    let (mut client, id) = server.connect().await;
    // Two idle timeouts' worth of pings only: the connection stays open.
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..7 {
        ticks.tick().await;
        client
            .send(Message::Ping(b"keepalive".to_vec().into()))
            .await
            .unwrap();
        assert_eq!(
            next_message(&mut client).await,
            Message::Pong(b"keepalive".to_vec().into())
        );
    }
    assert_eq!(whoami(&mut client).await, id);
    // Then silence closes it.
    let frame = expect_close(&mut client).await;
    assert_eq!(u16::from(frame.code), 1001);
}

#[tokio::test]
async fn pings_are_answered_with_pongs() {
    let server = TestServer::start(config()).await;
    let (mut client, _) = server.connect().await;
    client
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut client).await,
        Message::Pong(b"are you there".to_vec().into())
    );
}

#[tokio::test]
async fn the_lifetime_limit_closes_with_1001_even_when_active() {
    let server = TestServer::start(GatewayConfig {
        max_lifetime: Duration::from_millis(300),
        ..config()
    })
    .await;
    let (client, id) = server.connect().await;
    let (mut sender, mut receiver) = client.split();
    let since = Instant::now();
    let frame = timeout(WAIT, async {
        // Activity does not extend the lifetime.
        let mut ticks = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    let _ = sender.send(Message::text("quiet")).await;
                }
                message = receiver.next() => match message {
                    Some(Ok(Message::Close(Some(frame)))) => break frame,
                    other => panic!("expected a close frame, got {other:?}"),
                },
            }
        }
    })
    .await
    .expect("no close frame");
    assert!(
        since.elapsed() >= Duration::from_millis(200),
        "{:?}",
        since.elapsed()
    );
    assert_eq!(u16::from(frame.code), 1001);
    // Answer the close and see the socket end.
    timeout(WAIT, async {
        while let Some(Ok(_)) = receiver.next().await {}
    })
    .await
    .unwrap();
    let disconnect = server.recorder.disconnect_of(&id).await;
    assert_eq!(status_of(&disconnect), (1001, "Going away".into()));
}

/// A client that stops reading is not allowed to pile up memory: once
/// its queue holds `max_queued_bytes` the next post is refused with 429
/// and the connection is closed with 1008 (its `$disconnect` says so).
#[tokio::test]
async fn a_client_that_does_not_read_is_closed_with_1008() {
    let server = TestServer::start(GatewayConfig {
        max_queued_bytes: 256 * 1024,
        ..config()
    })
    .await;
    let (_client, id) = server.connect().await;
    let chunk = "x".repeat(64 * 1024);
    let mut accepted = 0usize;
    let refused = loop {
        let response = server.post(&id, &chunk).await;
        match response.status {
            200 => accepted += 1,
            status => {
                break response
                    .header("x-amzn-ErrorType")
                    .map(str::to_owned)
                    .map(|t| (status, t));
            }
        }
        // Socket buffers take a few MB before the queue fills.
        assert!(accepted < 2000, "never refused");
    };
    let (status, error_type) = refused.expect("an error type");
    assert!(status == 429 || status == 410, "{status}");
    if status == 429 {
        assert_eq!(error_type, "LimitExceededException");
    }
    let disconnect = server.recorder.disconnect_of(&id).await;
    assert_eq!(status_of(&disconnect), (1008, "Slow consumer".into()));
    assert!(server.gateway.connection(&id).is_none());
}

/// Application pings are bounded per connection: beyond the rate (and its
/// burst of ten times the rate) the gateway answers `RATE_LIMITED` itself and
/// `$default` never sees them; other messages are not affected.
#[tokio::test]
async fn pings_over_the_rate_are_answered_without_reaching_the_handler() {
    let server = TestServer::start(GatewayConfig {
        max_pings_per_sec: 2,
        ..config()
    })
    .await;
    let (mut client, id) = server.connect().await;
    let ping = r#"{"type":"ping","payload":{}}"#;
    for _ in 0..30 {
        client.send(Message::text(ping)).await.unwrap();
    }
    client.send(Message::text("after")).await.unwrap();
    let mut echoed = 0;
    let mut limited = 0;
    loop {
        let text = next_text(&mut client).await;
        if text == "echo:after" {
            break;
        }
        if text.starts_with("echo:") {
            echoed += 1;
        } else {
            assert!(text.contains(r#""code":"RATE_LIMITED""#), "{text}");
            limited += 1;
        }
    }
    assert_eq!(echoed + limited, 30);
    assert!(
        (20..=22).contains(&echoed),
        "{echoed} pings reached $default"
    );
    let defaults = server
        .recorder
        .of(&id)
        .iter()
        .filter(|event| route_of(event) == "$default")
        .count();
    // whoami, the pings let through, and "after".
    assert_eq!(defaults, 1 + echoed + 1);
}
