//! `connected` is the first event a client sees (PROTOCOL.md §2), also for
//! a client that sends its first frame the moment the handshake completes,
//! before the relay has posted `connected`: the reply to that frame waits
//! (bounded) for the greeting.

use crate::common;

use std::time::Duration;

use chat_test_support::TestEnv;
use common::{TestStack, handshake, token};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// The next JSON event on `socket` (transport pings and pongs skipped).
async fn next_event(socket: &mut common::Socket) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("an event within 10 s")
            .expect("the socket stays open")
            .expect("a frame");
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).expect("JSON");
        }
    }
}

fn join_frame(target: &str) -> Message {
    Message::text(json!({"type": "joinRoom", "payload": {"targetUserId": target}}).to_string())
}

#[tokio::test]
async fn a_first_frame_waits_for_the_greeting_but_not_forever() {
    let env = TestEnv::new().await;
    // A gateway without a relay: nobody posts `connected`.
    let gateway = TestStack::gateway(&env).await;
    gateway.register(&["alice", "bob"]).await;
    let request = gateway
        .ws_url(&token("alice"))
        .into_client_request()
        .expect("url");
    let mut socket = handshake(request).await.expect("handshake");
    let sent = std::time::Instant::now();
    // (A `ping`: its `pong` is the route response, as every reply but a
    // `roomJoined`, which the relay posts.)
    let ping = json!({"type": "ping", "payload": {}}).to_string();
    socket.send(Message::text(ping)).await.expect("send");
    // The reply waits for the greeting (ARCHITECTURE.md, "`connected`
    // first")...
    let early = tokio::time::timeout(Duration::from_millis(300), socket.next()).await;
    assert!(early.is_err(), "nothing before the greeting: {early:?}");
    // ...for at most 500 ms: a relay that is down delays a client's
    // replies, it does not stop them.
    let reply = next_event(&mut socket).await;
    assert_eq!(reply["type"], "pong", "{reply}");
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
        "the reply came after {waited:?}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_burst_of_clients_that_send_at_once_all_see_connected_first() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    const CLIENTS: usize = 100;
    let users: Vec<String> = (0..CLIENTS).map(|i| format!("u{i}")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    stack.register(&names).await;
    let mut tasks = Vec::new();
    for pair in users.chunks(2) {
        for (me, other) in [(&pair[0], &pair[1]), (&pair[1], &pair[0])] {
            let request = stack.ws_url(&token(me)).into_client_request().expect("url");
            let other = other.clone();
            tasks.push(tokio::spawn(async move {
                let mut socket = handshake(request).await.expect("handshake");
                socket.send(join_frame(&other)).await.expect("send");
                let first = next_event(&mut socket).await;
                // The partner coming online may be announced before the
                // reply lands; nothing else may come first.
                let mut second = next_event(&mut socket).await;
                while second["type"] == "presenceUpdate" {
                    second = next_event(&mut socket).await;
                }
                (first, second)
            }));
        }
    }
    for task in tasks {
        let (first, second) = task.await.expect("client task");
        assert_eq!(first["type"], "connected", "{first}");
        assert_eq!(second["type"], "roomJoined", "{second}");
    }
    stack.stop().await;
}
