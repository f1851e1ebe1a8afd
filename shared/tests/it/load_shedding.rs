//! Admission on the WebSocket `$default` path (PROTOCOL.md §2: "under
//! overload the service sheds work promptly ... instead of queueing without
//! bound, and `ping` stays fast"): past the in-flight limit a request that
//! needs PostgreSQL waits in line and is served; only once its wait reaches
//! the bound is it answered `RATE_LIMITED` with its ids, without being
//! stored, while `ping` still answers.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use chat_shared::metrics::{ShedReason, shed_counts};
use chat_shared::presence::Connection;
use chat_shared::realtime::{AdmissionLimits, Realtime};
use common::{TestApp, TestEnv};
use serde_json::{Value, json};

fn connection(id: &str, user: &str) -> Connection {
    common::ws_connection(id, user)
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

fn limits(max_in_flight: usize, max_wait_ms: u64, max_delivery_lag_ms: u64) -> AdmissionLimits {
    AdmissionLimits {
        max_in_flight,
        max_wait: Duration::from_millis(max_wait_ms),
        max_queued: 1_000,
        max_queued_bytes: 1 << 20,
        max_queued_per_user: 1_000,
        max_queued_bytes_per_user: 1 << 20,
        max_queued_per_connection: 1_000,
        max_delivery_lag_ms,
    }
}

#[tokio::test]
async fn sends_past_the_in_flight_limit_wait_in_line_and_are_refused_only_at_the_wait_bound() {
    let env = TestEnv::new().await;
    // The WebSocket side runs as a second instance with a one-connection
    // pool, so the test can hold that connection.
    let mut small = env.sharing();
    small.set("PG_POOL_MAX", "1");
    let app = TestApp::with_env(env).await;
    app.register(&["ann", "ben"]).await;
    let room = app.direct("ann", "ben").await;
    let (state, adapters) = common::app_state(&small).await;
    let realtime = Realtime::new(state.chat.clone(), Duration::from_secs(90))
        .with_admission(limits(1, 1_500, 0));
    let ann = connection("conn-ann", "ann");
    realtime.connect(&ann).await.unwrap();

    // Hold the pool's only connection: the first send is let in and waits
    // for it, filling the one in-flight place; the next two queue behind it.
    let store = &adapters.store;
    let held = store.pool().get().await.unwrap();
    let spawn_send = |content: &'static str, id: &'static str| {
        let realtime = realtime.clone();
        let frame = send(&room, content, id);
        tokio::spawn(async move { realtime.message("conn-ann", &frame, false).await })
    };
    let first = spawn_send("one", "c-1");
    while store.waiting() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let second = spawn_send("two", "c-2");
    let third = spawn_send("three", "c-3");
    while realtime.admission_queued() < 2 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // `ping` does not queue.
    let pong = realtime
        .message("conn-ann", r#"{"type":"ping","payload":{}}"#, false)
        .await
        .expect("a pong");
    assert_eq!(
        serde_json::from_str::<Value>(&pong).unwrap()["type"],
        "pong"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    for task in [first, second, third] {
        assert_eq!(task.await.unwrap(), None, "queued sends are served");
    }
    assert_eq!(app.all_sequence_ids("ben", &room).await, [1, 2, 3]);

    // Now nobody frees the place: a queued send is refused once it has
    // waited the bound, with its ids, and is not stored.
    let held = store.pool().get().await.unwrap();
    let blocked = spawn_send("four", "c-4");
    while store.waiting() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let shed_before = shed(ShedReason::QueueWait);
    let started = std::time::Instant::now();
    let refused = realtime
        .message("conn-ann", &send(&room, "five", "c-5"), false)
        .await
        .expect("an error event");
    assert!(started.elapsed() >= Duration::from_millis(1_500));
    let refused: Value = serde_json::from_str(&refused).unwrap();
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["payload"]["code"], "RATE_LIMITED", "{refused}");
    assert_eq!(refused["payload"]["requestType"], "sendMessage");
    assert_eq!(refused["payload"]["clientMessageId"], "c-5");
    // Counted by reason (other tests of this binary may shed too).
    assert!(shed(ShedReason::QueueWait) > shed_before);
    drop(held);
    assert_eq!(
        blocked.await.unwrap(),
        None,
        "the admitted send went through"
    );
    assert_eq!(app.all_sequence_ids("ben", &room).await, [1, 2, 3, 4]);
}

#[tokio::test]
async fn sends_are_refused_while_a_relay_reports_a_high_delivery_lag_and_other_requests_pass() {
    let app = TestApp::spawn().await;
    app.register(&["ann", "ben"]).await;
    let room = app.direct("ann", "ben").await;
    let state = &app.state;
    let realtime = Realtime::new(state.chat.clone(), Duration::from_secs(90))
        .with_admission(limits(usize::MAX >> 4, 10_000, 100));
    let presence = &app.adapters.presence;
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
    // What does not add to the fan-out still goes through: the join is
    // answered (its `roomJoined` goes out on the bus).
    let mut bus = app.subscribe_bus().await;
    let joined = realtime
        .message(
            "conn-lag-ann",
            &json!({"type": "joinRoom", "payload": {"roomId": room}}).to_string(),
            false,
        )
        .await;
    assert!(joined.is_none(), "{joined:?}");
    let joined = bus.room_joined(1).await;
    assert_eq!(joined["conn-lag-ann"]["type"], "roomJoined", "{joined:?}");

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
