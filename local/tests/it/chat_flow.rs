//! Two users chat over real WebSockets through the whole local stack.

use crate::common;

use chat_test_support::TestEnv;
use common::{Client, TestStack};
use serde_json::json;

#[tokio::test]
async fn two_users_chat_type_read_and_see_presence() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;

    alice.send("joinRoom", json!({"targetUserId": "bob"})).await;
    let joined = alice.expect("roomJoined").await;
    let room = joined["room"]["id"].as_str().expect("room id").to_owned();
    assert_eq!(joined["room"]["type"], "DIRECT");
    assert_eq!(joined["messages"], json!([]));
    assert_eq!(joined["onlineUsers"], json!(["alice", "bob"]));

    let joined = bob.join(&room).await;
    assert_eq!(joined["unreadCount"], 0);

    let sent = alice.say(&room, "hello bob").await;
    assert_eq!(sent["sequenceId"], 1);
    let got = bob.expect("message").await;
    assert_eq!(got["id"], sent["id"]);
    assert_eq!(got["content"], "hello bob");

    bob.send("typing", json!({"roomId": room, "isTyping": true}))
        .await;
    let typing = alice.expect("typing").await;
    assert_eq!(
        typing,
        json!({"roomId": room, "userId": "bob", "username": "bob", "isTyping": true})
    );

    bob.send("markRead", json!({"roomId": room, "sequenceId": 1}))
        .await;
    let receipt = alice.expect("readReceipt").await;
    assert_eq!(receipt["userId"], "bob");
    assert_eq!(receipt["sequenceId"], 1);
    let receipt = bob.expect("readReceipt").await;
    assert_eq!(receipt["userId"], "bob");

    bob.send("ping", json!({})).await;
    assert!(bob.expect("pong").await["timestamp"].is_string());

    bob.close().await;
    let presence = alice.expect("presenceUpdate").await;
    assert_eq!(presence["userId"], "bob");
    assert_eq!(presence["status"], "offline");

    alice.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn connected_comes_first_even_when_the_client_sends_at_once() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    for round in 0..5 {
        let user = format!("eager{round}");
        let (socket, _) = tokio_tungstenite::connect_async(stack.ws_url(&common::token(&user)))
            .await
            .expect("handshake");
        let mut client = Client {
            socket,
            user: user.clone(),
            connection_id: String::new(),
            seq: 0,
        };
        // No waiting for `connected`: the ping goes out with the handshake.
        client
            .socket
            .send(Message::text(r#"{"type":"ping","payload":{}}"#))
            .await
            .expect("send");
        let first = client.next().await;
        assert_eq!(first["type"], "connected", "round {round}: {first}");
        assert_eq!(first["payload"]["userId"], user.as_str());
        client.expect("pong").await;
        client.close().await;
    }
    stack.stop().await;
}
