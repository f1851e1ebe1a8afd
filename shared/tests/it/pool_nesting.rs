//! A request holds at most one PostgreSQL connection at a time
//! (`chat_shared::store::Conn`). With a pool of ONE connection, a request
//! that held a connection and asked the pool for a second would wait for
//! itself until the pool's wait timeout (5 s) and fail `UNAVAILABLE`;
//! many such requests at once would all fail. These run the request types
//! that used to do that (first-time DIRECT joins, `POST /direct`) and the
//! ones that use several statements, many at once, on a pool of one: all
//! must succeed, well within the timeout.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use chat_shared::presence::Connection;
use chat_shared::realtime::Realtime;
use common::{TestApp, TestEnv};
use serde_json::json;

const PAIRS: usize = 40;

fn connection(id: &str, user: &str) -> Connection {
    common::ws_connection(id, user)
}

/// The app (REST router and WebSocket handlers) with `PG_POOL_MAX=1`.
async fn one_connection_app() -> (TestApp, Realtime) {
    let mut env = TestEnv::new().await;
    env.set("PG_POOL_MAX", "1");
    let app = TestApp::with_env(env).await;
    let realtime = Realtime::new(app.state.chat.clone(), Duration::from_secs(90));
    (app, realtime)
}

#[tokio::test]
async fn first_time_direct_joins_and_post_direct_at_once_on_a_pool_of_one() {
    let (app, realtime) = one_connection_app().await;
    let users: Vec<String> = (0..PAIRS * 2).map(|i| format!("u{i:03}")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    app.register(&names).await;
    for (i, user) in users.iter().enumerate() {
        realtime
            .connect(&connection(&format!("c{i}"), user))
            .await
            .unwrap();
    }

    // The joins' `roomJoined`s go out on the bus (for the relay).
    let mut bus = app.subscribe_bus().await;
    let started = Instant::now();
    // Each pair's two members race to create their DIRECT room: one over
    // WebSocket (`joinRoom` by targetUserId), one over REST (POST /direct).
    let tokens: Vec<String> = users.iter().map(|u| app.token(u)).collect();
    let mut joins = Vec::new();
    let mut posts = Vec::new();
    for pair in 0..PAIRS {
        let (a, b) = (2 * pair, 2 * pair + 1);
        let frame = json!({"type": "joinRoom", "payload": {"targetUserId": users[b]}}).to_string();
        let realtime = realtime.clone();
        let connection_id = format!("c{a}");
        joins.push(tokio::spawn(async move {
            realtime.message(&connection_id, &frame, false).await
        }));
        posts.push(app.post(
            "/api/v1/chat/direct",
            &tokens[b],
            json!({"targetUserId": users[a]}),
        ));
    }
    let posted = futures::future::join_all(posts).await;
    for (pair, join) in joins.into_iter().enumerate() {
        let reply = join.await.unwrap();
        assert!(reply.is_none(), "pair {pair}: {reply:?}");
    }
    let mut joined = bus.room_joined(PAIRS).await;
    let mut rooms = Vec::new();
    for (pair, post) in posted.iter().enumerate() {
        let reply = joined
            .remove(&format!("c{}", 2 * pair))
            .expect("its roomJoined");
        assert_eq!(reply["type"], "roomJoined", "pair {pair}: {reply}");
        assert_eq!(post.status, StatusCode::OK, "pair {pair}: {:?}", post.body);
        // Both sides of the race got the one room of the pair.
        assert_eq!(
            reply["payload"]["room"]["id"], post.body["room"]["id"],
            "pair {pair}"
        );
        rooms.push(reply["payload"]["room"]["id"].clone());
    }
    rooms.sort_by_key(|r| r.to_string());
    rooms.dedup();
    assert_eq!(rooms.len(), PAIRS, "one room per pair");
    // Nobody waited out the pool timeout (5 s).
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn requests_with_several_statements_at_once_on_a_pool_of_one() {
    let (app, realtime) = one_connection_app().await;
    app.register(&["ann", "ben", "cat"]).await;
    let room = app.group("ann", &["ben", "cat"]).await;
    app.send("ann", &room, "hello").await;
    realtime.connect(&connection("c-ben", "ben")).await.unwrap();

    let started = Instant::now();
    let token = app.token("ben");
    let paths = [
        "/api/v1/chat/rooms".to_owned(),
        format!("/api/v1/chat/rooms/{room}/messages"),
        format!("/api/v1/chat/rooms/{room}/unread"),
        format!("/api/v1/chat/rooms/{room}/online"),
    ];
    let mut rest = Vec::new();
    for _ in 0..10 {
        for path in &paths {
            rest.push(app.get(path, &token));
        }
    }
    let mut frames = Vec::new();
    for i in 0..20 {
        let realtime = realtime.clone();
        let frame = if i % 2 == 0 {
            json!({"type": "joinRoom", "payload": {"roomId": room, "afterSequenceId": 0}})
        } else {
            json!({"type": "markRead", "payload": {"roomId": room, "sequenceId": 1}})
        }
        .to_string();
        frames.push(tokio::spawn(async move {
            realtime.message("c-ben", &frame, false).await
        }));
    }
    for reply in futures::future::join_all(rest).await {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    }
    for frame in frames {
        let reply = frame.await.unwrap();
        assert!(reply.is_none(), "{reply:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}
