//! Group commit of messages (`store` module `batch`): sends queued together
//! share one statement, and every rule still holds message by message —
//! gap-free sequence ids per room, membership and room checks, idempotency,
//! the sender's cursor, retention — and it takes fewer round trips.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeSet;

use chat_shared::ErrorCode;
use chat_shared::domain::{NewMessage, RoomId, UserId};
use chat_shared::store::{Store, Stored};
use common::{TestApp, TestEnv};
use futures::future::join_all;
use serde_json::{Map, Value, json};

fn message(content: &str, client_message_id: Option<&str>) -> NewMessage {
    let mut payload = Map::new();
    payload.insert("content".into(), json!(content));
    if let Some(id) = client_message_id {
        payload.insert("clientMessageId".into(), json!(id));
    }
    NewMessage::parse(&payload, false).unwrap()
}

fn user(id: &str) -> UserId {
    UserId::parse(id, "user").unwrap()
}

fn room(id: &str) -> RoomId {
    RoomId::parse(id).unwrap()
}

fn store(app: &TestApp) -> &Store {
    &app.adapters.store
}

/// `n` sends queued at once (the test runtime has one thread, so every send
/// is queued before a worker takes the first batch).
async fn send_all(
    store: &Store,
    sends: &[(RoomId, UserId, NewMessage)],
) -> Vec<chat_shared::Result<Stored>> {
    join_all(sends.iter().map(|(r, u, m)| store.store_message(r, u, m))).await
}

fn new_sequence(stored: &chat_shared::Result<Stored>) -> i64 {
    match stored {
        Ok(Stored::New(m)) => m.sequence_id.get(),
        other => panic!("expected a new message, got {other:?}"),
    }
}

#[tokio::test]
async fn concurrent_sends_share_statements_and_keep_every_room_gap_free() {
    let app = TestApp::spawn().await;
    app.register(&["ann", "ben", "cat", "dan"]).await;
    let ab = app.direct("ann", "ben").await;
    let cd = app.direct("cat", "dan").await;
    let group = app.group("ann", &["ben", "cat", "dan"]).await;

    let mut sends = Vec::new();
    for i in 0..30 {
        let (r, u) = match i % 5 {
            0 => (&ab, "ann"),
            1 => (&ab, "ben"),
            2 => (&cd, "dan"),
            3 => (&group, ["ann", "ben", "cat", "dan"][i % 4]),
            _ => (&group, "cat"),
        };
        sends.push((room(r), user(u), message(&format!("m{i}"), None)));
    }
    let before = chat_shared::metrics::round_trips().pg;
    let results = send_all(store(&app), &sends).await;
    let trips = chat_shared::metrics::round_trips().pg - before;
    // 30 messages in a handful of statements (other tests of this binary
    // may count too, so only an upper bound is checked).
    assert!(trips < 30, "{trips} round trips for 30 sends");

    for r in [&ab, &cd, &group] {
        let mut seqs: Vec<i64> = sends
            .iter()
            .zip(&results)
            .filter(|((room, _, _), _)| room.as_str() == r.as_str())
            .map(|(_, stored)| new_sequence(stored))
            .collect();
        seqs.sort_unstable();
        let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, expected, "room {r}");
        let member = if r.as_str() == cd.as_str() {
            "cat"
        } else {
            "ann"
        };
        assert_eq!(app.all_sequence_ids(member, r).await.len(), seqs.len());
    }
    // Within a room, queue order is sequence order.
    let ab_seqs: Vec<i64> = sends
        .iter()
        .zip(&results)
        .filter(|((room, _, _), _)| room.as_str() == ab.as_str())
        .map(|(_, s)| new_sequence(s))
        .collect();
    assert!(ab_seqs.windows(2).all(|w| w[0] < w[1]), "{ab_seqs:?}");
    // The sender's cursor moved to its newest message.
    let ben_last = sends
        .iter()
        .zip(&results)
        .filter(|((room, u, _), _)| room.as_str() == ab.as_str() && u.as_str() == "ben")
        .map(|(_, s)| new_sequence(s))
        .max()
        .unwrap();
    let total = ab_seqs.len() as i64;
    // ben's unread count: ann's messages above ben's cursor.
    let ann_after_ben = sends
        .iter()
        .zip(&results)
        .filter(|((room, u, _), s)| {
            room.as_str() == ab.as_str() && u.as_str() == "ann" && new_sequence(s) > ben_last
        })
        .count() as i64;
    assert_eq!(app.unread("ben", &ab).await, ann_after_ben);
    assert!(ben_last <= total);
}

#[tokio::test]
async fn one_refused_message_does_not_fail_its_batch_mates() {
    let app = TestApp::spawn().await;
    app.register(&["ann", "ben", "eve"]).await;
    let ab = app.direct("ann", "ben").await;
    let sends = vec![
        (room(&ab), user("ann"), message("first", None)),
        (room(&ab), user("eve"), message("intruder", None)),
        (
            room("room_01JDOESNOTEXIST0000000000"),
            user("ann"),
            message("lost", None),
        ),
        (room(&ab), user("ben"), message("second", None)),
    ];
    let results = send_all(store(&app), &sends).await;
    assert_eq!(new_sequence(&results[0]), 1);
    assert_eq!(
        results[1].as_ref().err().map(chat_shared::Error::code),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(
        results[2].as_ref().err().map(chat_shared::Error::code),
        Some(ErrorCode::NotFound)
    );
    // The refused ones took no sequence id.
    assert_eq!(new_sequence(&results[3]), 2);
    assert_eq!(app.all_sequence_ids("ann", &ab).await, [1, 2]);
}

#[tokio::test]
async fn repeats_of_one_client_message_id_store_it_once() {
    let app = TestApp::spawn().await;
    app.register(&["ann", "ben"]).await;
    let ab = app.direct("ann", "ben").await;
    let mut sends: Vec<(RoomId, UserId, NewMessage)> = (0..8)
        .map(|_| (room(&ab), user("ann"), message("once", Some("c-1"))))
        .collect();
    sends.push((room(&ab), user("ben"), message("other", Some("c-1"))));
    let results = send_all(store(&app), &sends).await;
    let mut ids = BTreeSet::new();
    let mut new = 0;
    for r in &results[..8] {
        match r.as_ref().unwrap() {
            Stored::New(m) => {
                new += 1;
                ids.insert(m.id.clone());
            }
            Stored::Duplicate(m) => {
                ids.insert(m.id.clone());
            }
        }
    }
    assert_eq!(new, 1, "stored once");
    assert_eq!(ids.len(), 1, "every repeat answers the original");
    // The same key from another sender is another message.
    assert!(matches!(results[8], Ok(Stored::New(_))));
    assert_eq!(app.all_sequence_ids("ben", &ab).await, [1, 2]);
}

#[tokio::test]
async fn retention_applies_to_batches() {
    let mut env = TestEnv::new().await;
    env.set("MESSAGE_RETENTION", "3");
    let app = TestApp::with_env(env).await;
    app.register(&["ann", "ben"]).await;
    let ab = app.direct("ann", "ben").await;
    let sends: Vec<_> = (0..10)
        .map(|i| {
            (
                room(&ab),
                user(if i % 2 == 0 { "ann" } else { "ben" }),
                message(&format!("m{i}"), None),
            )
        })
        .collect();
    let results = send_all(store(&app), &sends).await;
    assert_eq!(results.iter().map(new_sequence).max(), Some(10));
    assert_eq!(app.all_sequence_ids("ann", &ab).await, [8, 9, 10]);
    let next: Value = app.send("ann", &ab, "after").await;
    assert_eq!(next["sequenceId"], 11);
    assert_eq!(app.all_sequence_ids("ann", &ab).await, [9, 10, 11]);
}

#[tokio::test]
async fn the_retention_window_slides_over_batches_and_single_sends() {
    // Sends delete exactly what they push out of the window, so the window
    // must stay exact whatever mix of batch sizes (below, at and above the
    // retention) and single sends moves it.
    let mut env = TestEnv::new().await;
    env.set("MESSAGE_RETENTION", "4");
    let app = TestApp::with_env(env).await;
    app.register(&["ann", "ben"]).await;
    let ab = app.direct("ann", "ben").await;
    let mut last = 0;
    for size in [1, 2, 3, 4, 5, 9, 1, 2, 7, 3] {
        let sends: Vec<_> = (0..size)
            .map(|i| {
                (
                    room(&ab),
                    user("ann"),
                    message(&format!("m{last}-{i}"), None),
                )
            })
            .collect();
        send_all(store(&app), &sends).await;
        last += size;
        let single: Value = app.send("ben", &ab, "single").await;
        last += 1;
        assert_eq!(single["sequenceId"], last);
        let kept: Vec<i64> = ((last - 3).max(1)..=last).collect();
        assert_eq!(app.all_sequence_ids("ann", &ab).await, kept, "after {last}");
    }
}

#[tokio::test]
async fn a_lowered_retention_leaves_a_surplus_for_the_sweep() {
    // Instance A kept 10; instance B, over the same database, keeps 3. B's
    // sends delete only what they push out of the window; the sweep
    // (`cleanup_all`, run by the maintenance job and at `chat-local serve`
    // start-up) removes the rest.
    let mut keep_10 = TestEnv::new().await;
    keep_10.set("MESSAGE_RETENTION", "10");
    let mut keep_3 = keep_10.sharing();
    keep_3.set("MESSAGE_RETENTION", "3");
    let a = TestApp::with_env(keep_10).await;
    let b = TestApp::with_env(keep_3).await;
    a.register(&["ann", "ben"]).await;
    let ab = a.direct("ann", "ben").await;
    for i in 1..=10 {
        a.send("ann", &ab, &format!("a{i}")).await;
    }
    b.send("ben", &ab, "b1").await;
    let ids = b.all_sequence_ids("ann", &ab).await;
    assert_eq!(ids.first(), Some(&1), "{ids:?}");
    assert!(!ids.contains(&8), "the window's own message goes: {ids:?}");
    assert_eq!(store(&b).cleanup_all(3).await.unwrap(), 7);
    assert_eq!(b.all_sequence_ids("ann", &ab).await, [9, 10, 11]);
}

/// The batch statement's plan depends on `random_page_cost` (docs of
/// `store::SESSION_SETUP`): every pooled session, new ones included, runs
/// with 1.1, whatever else the URL sets.
#[tokio::test]
async fn pooled_sessions_price_random_reads_for_ssds() {
    let env = TestEnv::new().await;
    let url = env.vars["DATABASE_URL"].clone();
    let joiner = if url.contains('?') { '&' } else { '?' };
    for url in [
        url.clone(),
        format!("{url}{joiner}application_name=chat-test"),
    ] {
        let pool = chat_shared::store::connect_pool(&url.into(), 2).unwrap();
        let (a, b) = (pool.get().await.unwrap(), pool.get().await.unwrap());
        for client in [&a, &b] {
            let row = client
                .query_one("SHOW random_page_cost", &[])
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), "1.1");
        }
    }
}
