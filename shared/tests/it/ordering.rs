//! Frames that carry `seq` are handled in `seq` order even when their
//! `$default` invocations run in different processes, as Lambda runs them
//! (issue 16; `shared/src/realtime/ordering.rs`): the turn is kept in
//! Redis, and each process here is a `Realtime` of its own (its own Redis
//! connection and its own in-process wake-ups, so it only learns of the
//! other's progress through Redis). Also: what happens when a predecessor
//! never arrives, or arrives late, or the wait runs over its bound.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use chat_shared::realtime::{OrderingLimits, Realtime};
use common::{TestApp, TestEnv};
use serde_json::{Value, json};

fn send(room: &str, seq: u64, content: &str) -> String {
    json!({"type": "sendMessage", "seq": seq,
           "payload": {"roomId": room, "content": content, "clientMessageId": content}})
    .to_string()
}

/// A `$default` process of its own over the same database and Redis.
async fn process(env: &TestEnv, limits: OrderingLimits) -> Realtime {
    let state = chat_shared::bootstrap::app_state(&env.config().handlers())
        .await
        .unwrap();
    Realtime::new(state.chat.clone(), Duration::from_secs(90)).with_ordering(limits)
}

/// The room's contents in `sequenceId` order.
async fn stored(app: &TestApp, room: &str) -> Vec<String> {
    let page = app.history("ann", room, "limit=100").await;
    let mut messages: Vec<(i64, String)> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["sequenceId"].as_i64().unwrap(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    messages.sort();
    messages.into_iter().map(|(_, c)| c).collect()
}

struct Setup {
    app: TestApp,
    room: String,
    a: Realtime,
    b: Realtime,
}

async fn setup(limits: OrderingLimits) -> Setup {
    let env = TestEnv::new().await;
    let app = TestApp::with_env(env.sharing()).await;
    app.register(&["ann", "ben"]).await;
    let room = app.direct("ann", "ben").await;
    let a = process(&env, limits).await;
    let b = process(&env, limits).await;
    a.connect(&common::ws_connection("conn-ann", "ann"))
        .await
        .unwrap();
    Setup { app, room, a, b }
}

fn spawn_frame(realtime: &Realtime, body: String) -> tokio::task::JoinHandle<Option<String>> {
    let realtime = realtime.clone();
    tokio::spawn(async move { realtime.message("conn-ann", &body, false).await })
}

fn error_code(reply: Option<String>) -> Option<String> {
    let reply: Value = serde_json::from_str(&reply?).unwrap();
    assert_eq!(reply["type"], "error", "{reply}");
    reply["payload"]["code"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn frames_are_stored_in_seq_order_whichever_process_gets_them_first() {
    let Setup { app, room, a, b } = setup(OrderingLimits::DEFAULT).await;
    // Process B gets frames 3 and 2 first; A gets frame 1 300 ms later (a
    // cold start). Without the turn, B would store 3 and 2 at once.
    let three = spawn_frame(&b, send(&room, 3, "three"));
    let two = spawn_frame(&b, send(&room, 2, "two"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(stored(&app, &room).await.is_empty(), "2 and 3 waited for 1");
    let one = spawn_frame(&a, send(&room, 1, "one"));
    // A frame that goes to A again (4) after them.
    let four = spawn_frame(&a, send(&room, 4, "four"));
    for task in [one, two, three, four] {
        assert_eq!(task.await.unwrap(), None, "a send has no reply but its ack");
    }
    assert_eq!(stored(&app, &room).await, ["one", "two", "three", "four"]);
}

#[tokio::test]
async fn a_missing_predecessor_is_given_up_after_the_gap_and_refused_when_it_comes() {
    let limits = OrderingLimits {
        gap_wait: Duration::from_millis(400),
        ..OrderingLimits::DEFAULT
    };
    let Setup { app, room, a, b } = setup(limits).await;
    // Frame 1 never arrives (a throttled invocation): 2 and 3 wait the gap,
    // then go, in order.
    let started = Instant::now();
    let three = spawn_frame(&a, send(&room, 3, "three"));
    let two = spawn_frame(&b, send(&room, 2, "two"));
    assert_eq!(two.await.unwrap(), None);
    assert_eq!(three.await.unwrap(), None);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
    assert_eq!(stored(&app, &room).await, ["two", "three"]);
    // Frame 1 comes after all: storing it now would break the order, so it
    // is refused, and nothing is stored.
    assert_eq!(
        error_code(a.message("conn-ann", &send(&room, 1, "one"), false).await).as_deref(),
        Some("CONFLICT")
    );
    // So is a repeat of a number already used.
    assert_eq!(
        error_code(b.message("conn-ann", &send(&room, 3, "again"), false).await).as_deref(),
        Some("CONFLICT")
    );
    assert_eq!(stored(&app, &room).await, ["two", "three"]);
    // The next number goes at once.
    let started = Instant::now();
    assert_eq!(
        b.message("conn-ann", &send(&room, 4, "four"), false).await,
        None
    );
    assert!(started.elapsed() < Duration::from_millis(400));
    assert_eq!(stored(&app, &room).await, ["two", "three", "four"]);
}

#[tokio::test]
async fn a_frame_that_waits_past_its_bound_is_refused_and_stores_nothing() {
    let limits = OrderingLimits {
        gap_wait: Duration::from_secs(5),
        max_wait: Duration::from_millis(300),
        ..OrderingLimits::DEFAULT
    };
    let Setup { app, room, a, .. } = setup(limits).await;
    let started = Instant::now();
    let reply = a.message("conn-ann", &send(&room, 2, "two"), false).await;
    assert_eq!(error_code(reply).as_deref(), Some("RATE_LIMITED"));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(stored(&app, &room).await.is_empty());
    // Frames without `seq` are not held up by the numbered ones.
    let v1 = json!({"type": "sendMessage",
        "payload": {"roomId": room, "content": "v1"}})
    .to_string();
    assert_eq!(a.message("conn-ann", &v1, false).await, None);
    assert_eq!(stored(&app, &room).await, ["v1"]);
}

#[tokio::test]
async fn a_frame_whose_handling_is_abandoned_gives_its_turn_back_at_once() {
    let limits = OrderingLimits {
        claim: Duration::from_secs(20),
        max_wait: Duration::from_secs(5),
        ..OrderingLimits::DEFAULT
    };
    let env = TestEnv::new().await;
    let app = TestApp::with_env(env.sharing()).await;
    app.register(&["ann", "ben"]).await;
    let room = app.direct("ann", "ben").await;
    // A process with a one-connection pool, so the test can hold it.
    let mut small = env.sharing();
    small.set("PG_POOL_MAX", "1");
    let (state, adapters) = common::app_state(&small).await;
    let realtime = Realtime::new(state.chat.clone(), Duration::from_secs(90)).with_ordering(limits);
    realtime
        .connect(&common::ws_connection("conn-ann", "ann"))
        .await
        .unwrap();
    let store = &adapters.store;
    let held = store.pool().get().await.unwrap();
    // Frame 1 (a join) holds the turn while it waits for the pool; then
    // its handling is abandoned (as when a handler panics).
    let join = json!({"type": "joinRoom", "seq": 1, "payload": {"roomId": room}}).to_string();
    let one = spawn_frame(&realtime, join);
    while store.waiting() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    one.abort();
    assert!(one.await.is_err(), "cancelled");
    drop(held);
    // Frame 2 goes at once, not after the 20 s claim (nor the 5 s wait).
    let started = Instant::now();
    assert_eq!(
        realtime
            .message("conn-ann", &send(&room, 2, "two"), false)
            .await,
        None
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stored(&app, &room).await, ["two"]);
}
