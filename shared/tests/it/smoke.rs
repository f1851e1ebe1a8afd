//! A first end-to-end pass over the REST API on real PostgreSQL and Redis.

use crate::common;

use axum::http::StatusCode;
use common::TestApp;
use serde_json::json;

#[tokio::test]
async fn direct_room_send_and_history() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.direct("alice", "bob").await;
    let mut bus = app.subscribe_bus().await;
    let first = app.send("alice", &room, "hello").await;
    assert_eq!(first["sequenceId"], 1);
    let envelope = bus.next().await;
    assert_eq!(envelope["target"], json!({"type": "room", "roomId": room}));
    assert_eq!(envelope["event"]["type"], "message");
    assert_eq!(envelope["event"]["payload"]["id"], first["id"]);
    app.send("bob", &room, "hi").await;
    let history = app
        .get(
            &format!("/api/v1/chat/rooms/{room}/messages"),
            &app.token("alice"),
        )
        .await;
    assert_eq!(history.status, StatusCode::OK);
    assert_eq!(history.body["count"], 2);
    assert_eq!(history.body["unreadCount"], 1);
    assert_eq!(history.body["hasMore"], false);
    let health = app
        .call(axum::http::Method::GET, "/health", None, None)
        .await;
    assert_eq!(
        health.body,
        json!({"status": "ok", "postgres": "ok", "redis": "ok"})
    );
}
