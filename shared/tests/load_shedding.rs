//! Load shedding on the WebSocket `$default` path (PROTOCOL.md §2: "under
//! overload the service sheds work promptly ... instead of queueing without
//! bound, and `ping` stays fast"): past the in-flight limit a request that
//! needs PostgreSQL is answered `RATE_LIMITED` with its ids, without waiting
//! and without being stored, while `ping` still answers.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chat_shared::auth::AuthUser;
use chat_shared::domain::UserId;
use chat_shared::metrics::{ShedReason, shed_counts};
use chat_shared::presence::Connection;
use chat_shared::realtime::Realtime;
use common::{TestApp, TestEnv};
use serde_json::{Value, json};

fn connection(id: &str, user: &str) -> Connection {
    Connection {
        connection_id: id.to_owned(),
        user: AuthUser {
            id: UserId::parse(user, "user").unwrap(),
            username: user.to_owned(),
            display_name: None,
            avatar: None,
            is_admin: false,
        },
        endpoint: "http://127.0.0.1:9/local".to_owned(),
        // Old enough that no reply waits for the `connected` greeting.
        connected_at_ms: chrono::Utc::now().timestamp_millis() - 60_000,
    }
}

/// How many requests this process has shed for `reason`.
fn shed(reason: ShedReason) -> u64 {
    shed_counts()
        .into_iter()
        .find_map(|(r, n)| (r == reason).then_some(n))
        .unwrap()
}

fn send(room: &str, content: &str, client_message_id: &str) -> String {
    json!({"type": "sendMessage", "payload": {"roomId": room, "content": content,
           "clientMessageId": client_message_id}})
    .to_string()
}

#[tokio::test]
async fn sends_past_the_in_flight_limit_are_refused_at_once_and_pings_still_answer() {
    let env = TestEnv::new().await;
    // The WebSocket side runs as a second instance with a one-connection
    // pool, so the test can hold that connection.
    let mut small = env.sharing();
    small.set("PG_POOL_MAX", "1");
    let app = TestApp::with_env(env).await;
    app.register(&["ann", "ben"]).await;
    let room = app.direct("ann", "ben").await;
    let state = chat_shared::bootstrap::app_state(&small.config())
        .await
        .unwrap();
    let realtime = Realtime::new(state.chat.clone(), Duration::from_secs(90)).with_load_limits(
        1,
        usize::MAX,
        0,
    );
    let ann = connection("conn-ann", "ann");
    realtime.connect(&ann).await.unwrap();

    // Hold the pool's only connection: the first send is let in and waits
    // for it, filling the one in-flight place.
    let store = state.chat.store();
    let held = store.pool().get().await.unwrap();
    let first = tokio::spawn({
        let realtime = realtime.clone();
        let frame = send(&room, "one", "c-1");
        async move { realtime.message("conn-ann", &frame, false).await }
    });
    while store.waiting() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    let shed_before = shed(ShedReason::InFlight);
    let refused = realtime
        .message("conn-ann", &send(&room, "two", "c-2"), false)
        .await
        .expect("an error event");
    let refused: Value = serde_json::from_str(&refused).unwrap();
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["payload"]["code"], "RATE_LIMITED", "{refused}");
    assert_eq!(refused["payload"]["requestType"], "sendMessage");
    assert_eq!(refused["payload"]["clientMessageId"], "c-2");
    // Counted by reason (other tests of this binary may shed too).
    assert!(shed(ShedReason::InFlight) > shed_before);

    let pong = realtime
        .message("conn-ann", r#"{"type":"ping","payload":{}}"#, false)
        .await
        .expect("a pong");
    assert_eq!(
        serde_json::from_str::<Value>(&pong).unwrap()["type"],
        "pong"
    );

    drop(held);
    assert_eq!(first.await.unwrap(), None, "the admitted send went through");
    // Only the admitted message was stored; its place is free again.
    assert_eq!(app.all_sequence_ids("ben", &room).await, [1]);
    let again = realtime
        .message("conn-ann", &send(&room, "three", "c-3"), false)
        .await;
    assert_eq!(again, None, "accepted once there is room");
    assert_eq!(app.all_sequence_ids("ben", &room).await, [1, 2]);
}

#[tokio::test]
async fn sends_are_refused_while_a_relay_reports_a_high_delivery_lag_and_other_requests_pass() {
    let app = TestApp::spawn().await;
    app.register(&["ann", "ben"]).await;
    let room = app.direct("ann", "ben").await;
    let state = &app.state;
    let realtime = Realtime::new(state.chat.clone(), Duration::from_secs(90)).with_load_limits(
        usize::MAX,
        usize::MAX,
        100,
    );
    let presence = state.chat.presence();
    let ann = connection("conn-lag-ann", "ann");
    realtime.connect(&ann).await.unwrap();

    // One relay is 10 s behind (another is fine): every send is refused with
    // its ids, and nothing is stored.
    presence
        .report_delivery_lag("relay-a", 10_000)
        .await
        .unwrap();
    presence.report_delivery_lag("relay-b", 0).await.unwrap();
    let shed_before = shed(ShedReason::DeliveryLag);
    let refused = realtime
        .message("conn-lag-ann", &send(&room, "one", "c-1"), false)
        .await
        .expect("an error event");
    let refused: Value = serde_json::from_str(&refused).unwrap();
    assert_eq!(refused["payload"]["code"], "RATE_LIMITED", "{refused}");
    assert_eq!(refused["payload"]["requestType"], "sendMessage");
    assert_eq!(refused["payload"]["clientMessageId"], "c-1");
    assert!(shed(ShedReason::DeliveryLag) > shed_before);
    assert!(app.all_sequence_ids("ben", &room).await.is_empty());
    // What does not add to the fan-out still goes through.
    let joined = realtime
        .message(
            "conn-lag-ann",
            &json!({"type": "joinRoom", "payload": {"roomId": room}}).to_string(),
            false,
        )
        .await
        .expect("roomJoined");
    assert!(joined.contains(r#""type":"roomJoined""#), "{joined}");

    // The relay caught up: sends pass again.
    presence.report_delivery_lag("relay-a", 3).await.unwrap();
    let accepted = realtime
        .message("conn-lag-ann", &send(&room, "two", "c-2"), false)
        .await;
    assert_eq!(accepted, None, "accepted once the lag is low");
    assert_eq!(app.all_sequence_ids("ben", &room).await, [1]);

    // A relay that stops reporting is forgotten after a second.
    presence
        .report_delivery_lag("relay-a", 10_000)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let accepted = realtime
        .message("conn-lag-ann", &send(&room, "three", "c-3"), false)
        .await;
    assert_eq!(accepted, None, "a stale report does not shed");
    assert_eq!(app.all_sequence_ids("ben", &room).await, [1, 2]);
}
