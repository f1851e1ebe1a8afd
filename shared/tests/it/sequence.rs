//! Sequence ids under concurrency (PROTOCOL §3): many senders at once, each
//! request on its own pooled PostgreSQL connection, get ids 1..N with no gap
//! and no duplicate, per room; concurrent repeats of one `clientMessageId`
//! store one message; concurrent mark-reads announce one move.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use axum::http::StatusCode;
use common::{API, TestApp, TestEnv, expect_status};
use serde_json::{Value, json};

const SENDERS: usize = 10;
const PER_SENDER: usize = 25;

fn user(i: usize) -> String {
    format!("user{i:02}")
}

/// An app that keeps every message, a group with `SENDERS` members.
async fn setup(retention: &str) -> (Arc<TestApp>, Vec<String>, String) {
    let mut env = TestEnv::new().await;
    env.set("MESSAGE_RETENTION", retention);
    let app = TestApp::with_env(env).await;
    let users: Vec<String> = (0..SENDERS).map(user).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    app.register(&refs).await;
    let room = app.group(&users[0], &refs[1..]).await;
    (Arc::new(app), users, room)
}

/// Sends `count` messages from `sender`, one after another, cycling through
/// `rooms`; returns `(room, sequenceId, content)` of each.
async fn send_many(
    app: Arc<TestApp>,
    sender: String,
    rooms: Vec<String>,
    count: usize,
) -> Vec<(String, i64, String)> {
    let mut sent = Vec::with_capacity(count);
    for i in 0..count {
        let room = &rooms[i % rooms.len()];
        let content = format!("{sender}#{i}");
        let reply = app
            .send_body(&sender, room, json!({"content": content}))
            .await;
        expect_status(&reply, StatusCode::CREATED, &content);
        assert_eq!(reply.body["message"]["content"], content.as_str());
        sent.push((
            room.clone(),
            reply.body["message"]["sequenceId"].as_i64().unwrap(),
            content,
        ));
    }
    sent
}

/// Runs one `send_many` task per user, all at once.
async fn send_concurrently(
    app: &Arc<TestApp>,
    users: &[String],
    rooms: &[String],
    count: usize,
) -> Vec<Vec<(String, i64, String)>> {
    let tasks: Vec<_> = users
        .iter()
        .map(|u| tokio::spawn(send_many(Arc::clone(app), u.clone(), rooms.to_vec(), count)))
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("sender task"));
    }
    results
}

/// Checks one room: the returned ids are exactly 1..=n, each sender's ids
/// increase, and history holds exactly 1..=n with the contents sent.
async fn check_room(
    app: &TestApp,
    room: &str,
    results: &[Vec<(String, i64, String)>],
    reader: &str,
) {
    let mut by_seq: BTreeMap<i64, String> = BTreeMap::new();
    for sent in results {
        let mine: Vec<i64> = sent
            .iter()
            .filter(|(r, ..)| r == room)
            .map(|(_, s, _)| *s)
            .collect();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "one sender's ids increase: {mine:?}"
        );
        for (r, seq, content) in sent {
            if r == room {
                assert!(
                    by_seq.insert(*seq, content.clone()).is_none(),
                    "sequence id {seq} given twice"
                );
            }
        }
    }
    let n = by_seq.len() as i64;
    assert!(n > 0);
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>(),
        "no gaps"
    );
    let stored = app.all_sequence_ids(reader, room).await;
    assert_eq!(
        stored,
        (1..=n).collect::<Vec<_>>(),
        "history holds exactly 1..={n}"
    );
    // Contents are where their sender's answer said.
    let mut after = 0;
    loop {
        let page = app
            .history(reader, room, &format!("afterSequenceId={after}&limit=100"))
            .await;
        for m in page["messages"].as_array().unwrap() {
            let seq = m["sequenceId"].as_i64().unwrap();
            assert_eq!(m["content"], by_seq[&seq].as_str(), "content of {seq}");
            after = seq;
        }
        if page["hasMore"] != true {
            break;
        }
    }
    assert_eq!(app.room_entry(reader, room).await["lastSequenceId"], n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_senders_get_gap_free_ids_in_one_room() {
    let (app, users, room) = setup("0").await;
    let mut bus = app.subscribe_bus().await;
    let results = send_concurrently(&app, &users, std::slice::from_ref(&room), PER_SENDER).await;
    check_room(&app, &room, &results, &users[0]).await;
    // Each message was published exactly once.
    let total = SENDERS * PER_SENDER;
    let mut published = HashSet::new();
    for _ in 0..total {
        let envelope = bus.next().await;
        assert_eq!(envelope["event"]["type"], "message");
        let seq = envelope["event"]["payload"]["sequenceId"].as_i64().unwrap();
        assert!(published.insert(seq), "{seq} published twice");
    }
    assert_eq!(published.len(), total);
    bus.assert_quiet(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_senders_in_two_interleaved_rooms() {
    let (app, users, room_a) = setup("0").await;
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let room_b = app.group(&users[1], &refs).await;
    // Each sender alternates between the rooms; half start with each.
    let tasks: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let rooms = if i % 2 == 0 {
                vec![room_a.clone(), room_b.clone()]
            } else {
                vec![room_b.clone(), room_a.clone()]
            };
            tokio::spawn(send_many(
                Arc::clone(&app),
                u.clone(),
                rooms,
                2 * PER_SENDER,
            ))
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("sender task"));
    }
    check_room(&app, &room_a, &results, &users[2]).await;
    check_room(&app, &room_b, &results, &users[3]).await;
    let per_room = (SENDERS * PER_SENDER) as i64;
    assert_eq!(
        app.all_sequence_ids(&users[0], &room_a).await.len() as i64,
        per_room
    );
    assert_eq!(
        app.all_sequence_ids(&users[0], &room_b).await.len() as i64,
        per_room
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_senders_with_retention_keep_the_newest() {
    // Default retention (100): every id is still handed out once, and
    // exactly the newest 100 remain.
    let (app, users, room) = setup("100").await;
    let results = send_concurrently(&app, &users, std::slice::from_ref(&room), PER_SENDER).await;
    let mut ids: Vec<i64> = results.iter().flatten().map(|(_, s, _)| *s).collect();
    ids.sort_unstable();
    let n = (SENDERS * PER_SENDER) as i64;
    assert_eq!(ids, (1..=n).collect::<Vec<_>>());
    assert_eq!(
        app.all_sequence_ids(&users[0], &room).await,
        ((n - 99)..=n).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_repeats_of_one_client_message_id_store_one_message() {
    let (app, users, room) = setup("0").await;
    let mut bus = app.subscribe_bus().await;
    const REPEATS: usize = 8;
    let mut tasks = Vec::new();
    for i in 0..REPEATS {
        let app = Arc::clone(&app);
        let sender = users[0].clone();
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            app.send_body(
                &sender,
                &room,
                json!({"content": format!("try {i}"), "clientMessageId": "once"}),
            )
            .await
        }));
    }
    // Meanwhile other members send without a key.
    let others = send_concurrently(&app, &users[1..5], std::slice::from_ref(&room), 10);
    let (others, replies) = tokio::join!(others, async {
        let mut replies = Vec::new();
        for t in tasks {
            replies.push(t.await.expect("repeat task"));
        }
        replies
    });
    let created: Vec<&common::Reply> = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .collect();
    let repeated: Vec<&common::Reply> = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .collect();
    assert_eq!(
        created.len(),
        1,
        "exactly one 201: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(repeated.len(), REPEATS - 1);
    let original = &created[0].body["message"];
    for r in &repeated {
        assert_eq!(r.body["message"]["id"], original["id"]);
        assert_eq!(r.body["message"]["sequenceId"], original["sequenceId"]);
        assert_eq!(r.body["message"]["content"], original["content"]);
        assert_eq!(r.body["message"]["createdAt"], original["createdAt"]);
    }
    // 40 plain messages and one keyed one: 1..=41, the key stored once.
    let ids = app.all_sequence_ids(&users[0], &room).await;
    assert_eq!(ids, (1..=41).collect::<Vec<_>>());
    let mut keyed = 0;
    let mut after = 0;
    loop {
        let page = app
            .history(&users[0], &room, &format!("afterSequenceId={after}"))
            .await;
        for m in page["messages"].as_array().unwrap() {
            if m["clientMessageId"] == "once" {
                keyed += 1;
                assert_eq!(m["id"], original["id"]);
            }
            after = m["sequenceId"].as_i64().unwrap();
        }
        if page["hasMore"] != true {
            break;
        }
    }
    assert_eq!(keyed, 1);
    let plain: usize = others.iter().map(Vec::len).sum();
    assert_eq!(plain, 40);
    // One message event per stored message: 41, then nothing.
    let mut published = HashSet::new();
    for _ in 0..41 {
        let envelope = bus.next().await;
        assert!(
            published.insert(
                envelope["event"]["payload"]["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            )
        );
    }
    bus.assert_quiet(300).await;
    // The next keyed send is simply the next id.
    let next = app
        .send_body(
            &users[0],
            &room,
            json!({"content": "later", "clientMessageId": "twice"}),
        )
        .await;
    expect_status(&next, StatusCode::CREATED, "next");
    assert_eq!(next.body["message"]["sequenceId"], 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mark_reads_announce_each_move_once() {
    let (app, users, room) = setup("0").await;
    for i in 0..10 {
        app.send(&users[0], &room, &format!("m{i}")).await;
    }
    let mut bus = app.subscribe_bus().await;
    let reader = users[1].clone();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let app = Arc::clone(&app);
        let reader = reader.clone();
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            app.post(
                &format!("{API}/rooms/{room}/read"),
                &app.token(&reader),
                json!({"sequenceId": 7}),
            )
            .await
        }));
    }
    for t in tasks {
        let reply = t.await.expect("reader task");
        expect_status(&reply, StatusCode::OK, "read");
        assert_eq!(
            reply.body,
            json!({"success": true, "roomId": room, "markedUpTo": 7})
        );
    }
    let envelope = bus.next().await;
    assert_eq!(envelope["event"]["type"], "readReceipt");
    assert_eq!(envelope["event"]["payload"]["sequenceId"], 7);
    assert_eq!(
        envelope["event"]["payload"]["userId"],
        Value::String(reader.clone())
    );
    bus.assert_quiet(300).await;
    assert_eq!(app.unread(&reader, &room).await, 3);
}
