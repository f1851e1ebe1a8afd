//! PROTOCOL.md §2 end to end: every client event, every server event and
//! its shape, every error code a WebSocket client can reach, and who
//! receives what, over real WebSockets through the whole local stack.
//!
//! `RATE_LIMITED` is not sent over WebSocket yet and `INTERNAL` cannot be
//! provoked without breaking a dependency, so neither is tested here;
//! `PAYLOAD_TOO_LARGE` is REST-only (an oversized WebSocket message closes
//! with 1009, see `bad_frames.rs`).

use crate::common;

use chat_test_support::{TestEnv, token_with};
use common::{Client, TestStack, admin_token, assert_timestamp, token};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

const ERROR_KEYS: [&str; 4] = ["clientMessageId", "code", "message", "requestType"];

#[tokio::test]
async fn connected_comes_first_on_every_connection_and_ping_answers_pong() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    // `Client::connect` fails unless `connected` is the very first event.
    let url = stack.ws_url(&token("alice"));
    let (mut first, hello1) =
        Client::open(url.as_str().into_client_request().expect("url"), "alice").await;
    let (second, hello2) =
        Client::open(url.as_str().into_client_request().expect("url"), "alice").await;
    for (c, connected) in [(&first, &hello1), (&second, &hello2)] {
        assert_eq!(
            keys(connected),
            ["connectionId", "timestamp", "userId"],
            "{connected}"
        );
        assert_eq!(connected["userId"], "alice");
        assert_eq!(connected["connectionId"], c.connection_id.as_str());
        assert!(!c.connection_id.is_empty());
        assert_timestamp(&connected["timestamp"]);
    }
    assert_ne!(first.connection_id, second.connection_id);

    first.send("ping", json!({})).await;
    let pong = first.expect("pong").await;
    assert_eq!(keys(&pong), ["timestamp"]);
    assert_timestamp(&pong["timestamp"]);
    // `payload` may be left out of a ping.
    first
        .send_raw(tokio_tungstenite::tungstenite::Message::text(
            r#"{"type":"ping"}"#,
        ))
        .await;
    first.expect("pong").await;
    second.close().await;
    first.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn join_by_target_user_creates_the_direct_room_once() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;

    alice.send("joinRoom", json!({"targetUserId": "bob"})).await;
    let joined = alice.expect("roomJoined").await;
    assert_eq!(
        keys(&joined),
        ["hasMore", "messages", "onlineUsers", "room", "unreadCount"],
        "no `recovered` without afterSequenceId: {joined}"
    );
    let room = &joined["room"];
    let room_id = room["id"].as_str().expect("room id").to_owned();
    assert_eq!(room["type"], "DIRECT");
    let pair = [&room["user1"]["id"], &room["user2"]["id"]];
    assert!(pair.contains(&&json!("alice")) && pair.contains(&&json!("bob")));
    assert_eq!(
        keys(&room["user1"]),
        ["avatar", "displayName", "id", "username"]
    );
    assert_eq!(room["members"].as_array().expect("members").len(), 2);
    assert_eq!(joined["messages"], json!([]));
    assert_eq!(joined["unreadCount"], 0);
    assert_eq!(joined["hasMore"], false);
    assert_eq!(joined["onlineUsers"], json!(["alice", "bob"]));

    // One room per unordered pair, from either side.
    bob.send("joinRoom", json!({"targetUserId": "alice"})).await;
    assert_eq!(bob.expect("roomJoined").await["room"]["id"], room_id);
    alice.send("joinRoom", json!({"targetUserId": "bob"})).await;
    assert_eq!(alice.expect("roomJoined").await["room"]["id"], room_id);
    let rooms = stack.get("alice", "/rooms").await;
    assert_eq!(rooms.body["count"], 1, "{:?}", rooms.body);

    // Both joined: a message reaches both.
    let sent = alice.say(&room_id, "hi").await;
    assert_eq!(bob.expect("message").await["id"], sent["id"]);

    alice
        .send("joinRoom", json!({"targetUserId": "nobody"}))
        .await;
    let error = alice.expect_error("NOT_FOUND").await;
    assert_eq!(keys(&error), ERROR_KEYS);
    assert_eq!(error["requestType"], "joinRoom");
    assert_eq!(error["clientMessageId"], Value::Null);

    alice
        .send("joinRoom", json!({"targetUserId": "alice"}))
        .await;
    alice.expect_error("BAD_REQUEST").await;
    alice
        .send("joinRoom", json!({"targetUserId": "bad id!"}))
        .await;
    alice.expect_error("BAD_REQUEST").await;
    alice.send("joinRoom", json!({"roomId": "room_nope"})).await;
    alice.expect_error("NOT_FOUND").await;
    alice.send_invalid("joinRoom", json!({})).await;
    alice.expect_error("BAD_REQUEST").await;
    alice.ping_pong().await;
    alice.close().await;
    bob.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn room_joined_has_the_last_50_unread_read_by_and_recovery_fields() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    for i in 1..=55 {
        stack.send_rest("alice", &room, &format!("m{i}")).await;
    }
    let mut bob = Client::connect(&stack, "bob").await;
    let joined = bob.join(&room).await;
    let seqs: Vec<i64> = joined["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["sequenceId"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, (6..=55).collect::<Vec<_>>(), "the last 50, ascending");
    assert_eq!(joined["hasMore"], true);
    assert_eq!(joined["unreadCount"], 55);
    assert_eq!(joined["room"]["type"], "GROUP");
    assert_eq!(joined["onlineUsers"], json!(["bob"]));
    assert!(joined.get("recovered").is_none());

    let after = bob.join_after(&room, 50).await;
    assert_eq!(
        keys(&after),
        [
            "hasMore",
            "messages",
            "onlineUsers",
            "recovered",
            "room",
            "unreadCount"
        ]
    );
    let contents: Vec<&str> = after["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["content"].as_str().expect("content"))
        .collect();
    assert_eq!(contents, ["m51", "m52", "m53", "m54", "m55"]);
    assert_eq!(after["recovered"], true);
    assert_eq!(after["hasMore"], false);
    let nothing_missed = bob.join_after(&room, 55).await;
    assert_eq!(nothing_missed["messages"], json!([]));
    assert_eq!(nothing_missed["recovered"], true);

    // Everything after 0: all 55 (at most 100 come at once).
    let from_start = bob.join_after(&room, 0).await;
    assert_eq!(from_start["messages"].as_array().expect("list").len(), 55);
    assert_eq!(from_start["recovered"], true);

    bob.send("markRead", json!({"roomId": room, "sequenceId": 55}))
        .await;
    bob.expect("readReceipt").await;
    let mut alice = Client::connect(&stack, "alice").await;
    let joined = alice.join(&room).await;
    assert_eq!(joined["unreadCount"], 0, "alice's own messages are read");
    assert_eq!(joined["onlineUsers"], json!(["alice", "bob"]));
    let last = joined["messages"].as_array().expect("list").last().cloned();
    assert_eq!(last.expect("a message")["readBy"], json!(["bob"]));
    alice.close().await;
    bob.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn recovery_answers_at_most_100_and_says_has_more() {
    let mut env = TestEnv::new().await;
    env.set("MESSAGE_RETENTION", "0"); // keep all
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    for chunk in 0..7 {
        let sends = (0..15).map(|i| {
            let (stack, room) = (&stack, &room);
            async move {
                stack
                    .send_rest("alice", room, &format!("m{}", chunk * 15 + i))
                    .await
            }
        });
        futures::future::join_all(sends).await;
    }
    let mut bob = Client::connect(&stack, "bob").await;
    let page = bob.join_after(&room, 0).await;
    let seqs: Vec<i64> = page["messages"]
        .as_array()
        .expect("list")
        .iter()
        .map(|m| m["sequenceId"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    assert_eq!(page["hasMore"], true, "105 were missed");
    assert_eq!(page["recovered"], true);
    let rest = bob.join_after(&room, 100).await;
    assert_eq!(rest["messages"].as_array().expect("list").len(), 5);
    assert_eq!(rest["hasMore"], false);
    assert_eq!(rest["recovered"], true);
    bob.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn messages_have_the_protocol_shape_for_everyone_in_the_room() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let alice_token = token_with("alice", |c| {
        c.username = Some("alice_u".into());
        c.display_name = Some("Alice A".into());
        c.avatar = Some("https://img.example/alice.png".into());
    });
    // (A REST call refreshes the profile from its token's claims, so the
    // room is made first and the WebSocket token's profile is the current one.)
    let room = stack.group("alice", &["bob"]).await;
    let mut alice = Client::connect_url(&stack.ws_url(&alice_token), "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    alice.join(&room).await;
    bob.join(&room).await;

    alice
        .send(
            "sendMessage",
            json!({"roomId": room, "content": "look", "type": "image",
                   "metadata": {"url": "https://img.example/1.png", "w": 640},
                   "clientMessageId": "c-1"}),
        )
        .await;
    let mine = alice.expect("message").await;
    let theirs = bob.expect("message").await;
    assert_eq!(mine, theirs);
    assert_eq!(
        keys(&mine),
        [
            "clientMessageId",
            "content",
            "createdAt",
            "id",
            "metadata",
            "readBy",
            "roomId",
            "sender",
            "senderId",
            "sequenceId",
            "type"
        ]
    );
    assert!(mine["id"].as_str().expect("id").starts_with("msg_"));
    assert_eq!(mine["roomId"], room);
    assert_eq!(mine["senderId"], "alice");
    assert_eq!(mine["content"], "look");
    assert_eq!(mine["type"], "image");
    assert_eq!(
        mine["metadata"],
        json!({"url": "https://img.example/1.png", "w": 640})
    );
    assert_eq!(mine["sequenceId"], 1);
    assert_eq!(mine["clientMessageId"], "c-1");
    assert_eq!(
        mine["sender"],
        json!({"id": "alice", "username": "alice_u", "displayName": "Alice A",
               "avatar": "https://img.example/alice.png"})
    );
    assert_eq!(mine["readBy"], json!([]));
    assert_timestamp(&mine["createdAt"]);

    // Defaults: text, null metadata and clientMessageId.
    let plain = alice.say(&room, "plain").await;
    assert_eq!(plain["type"], "text");
    assert_eq!(plain["metadata"], Value::Null);
    assert_eq!(plain["clientMessageId"], Value::Null);
    assert_eq!(plain["sequenceId"], 2);
    assert_eq!(bob.expect("message").await, plain);

    // A gift may have empty content when it has metadata.
    alice
        .send(
            "sendMessage",
            json!({"roomId": room, "content": "", "type": "gift", "metadata": {"gift": "rose"}}),
        )
        .await;
    let gift = alice.expect("message").await;
    assert_eq!(gift["type"], "gift");
    assert_eq!(gift["content"], "");
    assert_eq!(bob.expect("message").await, gift);

    // readBy lists the others whose cursor reached the message.
    bob.send("markRead", json!({"roomId": room, "sequenceId": 3}))
        .await;
    bob.expect("readReceipt").await;
    alice.expect("readReceipt").await;
    let history = stack.history("alice", &room).await;
    assert_eq!(history.len(), 3);
    assert!(history.iter().all(|m| m["readBy"] == json!(["bob"])));
    alice.close().await;
    bob.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn an_idempotent_repeat_reaches_only_the_sending_connection() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut a1 = Client::connect(&stack, "alice").await;
    let mut a2 = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    for c in [&mut a1, &mut a2, &mut bob] {
        c.join(&room).await;
    }
    let frame = json!({"roomId": room, "content": "once", "clientMessageId": "c-1"});
    a1.send("sendMessage", frame.clone()).await;
    let original = a1.expect("message").await;
    assert_eq!(a2.expect("message").await, original);
    assert_eq!(bob.expect("message").await, original);

    // The same key again, even with other content: the original, to a1 only.
    a1.send(
        "sendMessage",
        json!({"roomId": room, "content": "changed", "clientMessageId": "c-1"}),
    )
    .await;
    let again = a1.expect("message").await;
    assert_eq!(again["id"], original["id"]);
    assert_eq!(again["sequenceId"], original["sequenceId"]);
    assert_eq!(again["content"], "once");
    // From the user's other connection: that connection gets it.
    a2.send("sendMessage", frame).await;
    assert_eq!(a2.expect("message").await["id"], original["id"]);
    a1.assert_quiet(300).await;
    a2.assert_quiet(0).await;
    bob.assert_quiet(0).await;

    // Over REST too: 200 with the original, nothing broadcast.
    let reply = stack
        .post(
            "alice",
            &format!("/rooms/{room}/messages"),
            json!({"content": "once", "clientMessageId": "c-1"}),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["message"]["id"], original["id"]);
    bob.assert_quiet(200).await;

    let history = stack.history("bob", &room).await;
    assert_eq!(history.len(), 1, "nothing new stored");
    // Keys are per sender: bob may use the same one.
    bob.send(
        "sendMessage",
        json!({"roomId": room, "content": "mine", "clientMessageId": "c-1"}),
    )
    .await;
    assert_eq!(bob.expect("message").await["sequenceId"], 2);
    for c in [a1, a2, bob] {
        c.close().await;
    }
    stack.stop().await;
}

#[tokio::test]
async fn typing_reaches_the_other_joined_connections_but_none_of_the_typists() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut a1 = Client::connect(&stack, "alice").await;
    let mut a2 = Client::connect(&stack, "alice").await;
    let mut b1 = Client::connect(&stack, "bob").await;
    let mut b2 = Client::connect(&stack, "bob").await; // not joined
    for c in [&mut a1, &mut a2, &mut b1] {
        c.join(&room).await;
    }
    a1.send("typing", json!({"roomId": room, "isTyping": true}))
        .await;
    let typing = b1.expect("typing").await;
    assert_eq!(
        typing,
        json!({"roomId": room, "userId": "alice", "username": "alice", "isTyping": true})
    );
    a1.send("typing", json!({"roomId": room, "isTyping": false}))
        .await;
    assert_eq!(b1.expect("typing").await["isTyping"], false);
    a1.assert_quiet(300).await;
    a2.assert_quiet(0).await;
    b2.assert_quiet(0).await;

    a1.send_invalid("typing", json!({"roomId": room})).await;
    a1.expect_error("BAD_REQUEST").await;
    a1.send_invalid("typing", json!({"roomId": room, "isTyping": "yes"}))
        .await;
    a1.expect_error("BAD_REQUEST").await;
    a1.send("typing", json!({"roomId": "room_nope", "isTyping": true}))
        .await;
    a1.expect_error("NOT_FOUND").await;
    for c in [a1, a2, b1, b2] {
        c.close().await;
    }
    stack.stop().await;
}

#[tokio::test]
async fn mark_read_sends_a_receipt_only_when_the_cursor_moves() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    let mut bob_idle = Client::connect(&stack, "bob").await; // not joined
    alice.join(&room).await;
    bob.join(&room).await;
    for i in 1..=3 {
        alice.say(&room, &format!("m{i}")).await;
        bob.expect("message").await;
    }

    bob.send("markRead", json!({"roomId": room, "sequenceId": 2}))
        .await;
    let receipt = alice.expect("readReceipt").await;
    assert_eq!(
        keys(&receipt),
        ["roomId", "sequenceId", "timestamp", "userId"]
    );
    assert_eq!(receipt["roomId"], room);
    assert_eq!(receipt["userId"], "bob");
    assert_eq!(receipt["sequenceId"], 2);
    assert_timestamp(&receipt["timestamp"]);
    assert_eq!(bob.expect("readReceipt").await["sequenceId"], 2);

    // Not moving: the same, a lower one.
    bob.send("markRead", json!({"roomId": room, "sequenceId": 2}))
        .await;
    bob.send("markRead", json!({"roomId": room, "sequenceId": 1}))
        .await;
    bob.ping_pong().await; // both handled: their replies would come first
    alice.assert_quiet(300).await;
    bob.assert_quiet(0).await;

    // Beyond the last: clamped to it.
    bob.send("markRead", json!({"roomId": room, "sequenceId": 99}))
        .await;
    assert_eq!(alice.expect("readReceipt").await["sequenceId"], 3);
    assert_eq!(bob.expect("readReceipt").await["sequenceId"], 3);
    let unread = stack.get("bob", &format!("/rooms/{room}/unread")).await;
    assert_eq!(unread.body["unreadCount"], 0);

    // REST mark-reads send receipts the same way.
    alice.say(&room, "m4").await;
    bob.expect("message").await;
    let read = stack
        .post(
            "bob",
            &format!("/rooms/{room}/read"),
            json!({"sequenceId": 4}),
        )
        .await;
    assert_eq!(read.body["markedUpTo"], 4);
    assert_eq!(alice.expect("readReceipt").await["sequenceId"], 4);
    let read = stack
        .post(
            "bob",
            &format!("/rooms/{room}/read"),
            json!({"sequenceId": 4}),
        )
        .await;
    assert_eq!(read.body["markedUpTo"], 4);
    alice.assert_quiet(300).await;
    bob.expect("readReceipt").await;
    bob.assert_quiet(0).await;
    bob_idle.assert_quiet(0).await;

    bob.send_invalid("markRead", json!({"roomId": room})).await;
    bob.expect_error("BAD_REQUEST").await;
    bob.send_invalid("markRead", json!({"roomId": room, "sequenceId": -1}))
        .await;
    bob.expect_error("BAD_REQUEST").await;
    bob.send("markRead", json!({"roomId": "room_nope", "sequenceId": 1}))
        .await;
    bob.expect_error("NOT_FOUND").await;
    for c in [alice, bob, bob_idle] {
        c.close().await;
    }
    stack.stop().await;
}

#[tokio::test]
async fn non_members_are_forbidden_and_errors_echo_the_request() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut carol = Client::connect(&stack, "carol").await;
    let mut alice = Client::connect(&stack, "alice").await;
    alice.join(&room).await;

    carol.send("joinRoom", json!({"roomId": room})).await;
    let error = carol.expect_error("FORBIDDEN").await;
    assert_eq!(keys(&error), ERROR_KEYS);
    assert_eq!(error["requestType"], "joinRoom");
    assert_eq!(error["clientMessageId"], Value::Null);

    carol
        .send(
            "sendMessage",
            json!({"roomId": room, "content": "let me in", "clientMessageId": "x-1"}),
        )
        .await;
    let error = carol.expect_error("FORBIDDEN").await;
    assert_eq!(error["requestType"], "sendMessage");
    assert_eq!(error["clientMessageId"], "x-1");

    carol
        .send("typing", json!({"roomId": room, "isTyping": true}))
        .await;
    assert_eq!(
        carol.expect_error("FORBIDDEN").await["requestType"],
        "typing"
    );
    carol
        .send("markRead", json!({"roomId": room, "sequenceId": 1}))
        .await;
    assert_eq!(
        carol.expect_error("FORBIDDEN").await["requestType"],
        "markRead"
    );
    carol
        .send(
            "sendMessage",
            json!({"roomId": "room_nope", "content": "hi", "clientMessageId": "x-2"}),
        )
        .await;
    assert_eq!(
        carol.expect_error("NOT_FOUND").await["clientMessageId"],
        "x-2"
    );
    alice.assert_quiet(200).await;

    // `system` is for admins only.
    alice
        .send(
            "sendMessage",
            json!({"roomId": room, "content": "maintenance", "type": "system",
                   "clientMessageId": "s-1"}),
        )
        .await;
    let error = alice.expect_error("FORBIDDEN").await;
    assert_eq!(error["clientMessageId"], "s-1");
    assert!(stack.history("alice", &room).await.is_empty());

    let ops_room = stack.group("alice", &["bob", "ops"]).await;
    let mut ops = Client::connect_url(&stack.ws_url(&admin_token("ops")), "ops").await;
    alice.join(&ops_room).await;
    ops.send(
        "sendMessage",
        json!({"roomId": ops_room, "content": "maintenance at 5", "type": "system"}),
    )
    .await;
    assert_eq!(ops.expect("message").await["type"], "system");
    assert_eq!(alice.expect("message").await["type"], "system");
    for c in [alice, carol, ops] {
        c.close().await;
    }
    stack.stop().await;
}

#[tokio::test]
async fn the_sending_connection_gets_its_message_joined_or_not() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut sender = Client::connect(&stack, "alice").await;
    let mut other_tab = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    bob.join(&room).await;

    let sent = sender.say(&room, "without joining").await;
    assert_eq!(sent["content"], "without joining");
    assert_eq!(bob.expect("message").await["id"], sent["id"]);
    other_tab.assert_quiet(300).await;
    sender.assert_quiet(0).await;
    for c in [sender, other_tab, bob] {
        c.close().await;
    }
    stack.stop().await;
}

#[tokio::test]
async fn leave_room_answers_room_left_and_stops_delivery() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    bob.join(&room).await;
    alice.join(&room).await;

    bob.send("leaveRoom", json!({"roomId": room})).await;
    assert_eq!(bob.expect("roomLeft").await, json!({"roomId": room}));
    alice.say(&room, "after bob left").await;
    bob.assert_quiet(300).await;

    // Also when not joined.
    bob.send("leaveRoom", json!({"roomId": room})).await;
    assert_eq!(bob.expect("roomLeft").await, json!({"roomId": room}));
    bob.send_invalid("leaveRoom", json!({})).await;
    assert_eq!(
        bob.expect_error("BAD_REQUEST").await["requestType"],
        "leaveRoom"
    );

    // Joining again: the missed message is in the snapshot, later ones arrive.
    let joined = bob.join(&room).await;
    assert_eq!(joined["messages"][0]["content"], "after bob left");
    let sent = alice.say(&room, "welcome back").await;
    assert_eq!(bob.expect("message").await["id"], sent["id"]);
    alice.close().await;
    bob.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn a_removed_member_gets_room_left_and_no_more_messages() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob", "carol"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut b1 = Client::connect(&stack, "bob").await;
    let mut b2 = Client::connect(&stack, "bob").await;
    let mut b_idle = Client::connect(&stack, "bob").await; // not joined
    let mut carol = Client::connect(&stack, "carol").await;
    for c in [&mut alice, &mut b1, &mut b2, &mut carol] {
        c.join(&room).await;
    }

    // Only the member themself or an admin may remove.
    let refused = stack
        .delete("alice", &format!("/rooms/{room}/members/bob"))
        .await;
    assert_eq!(refused.status, 403);
    let removed = stack
        .call(
            "DELETE",
            &format!("/rooms/{room}/members/bob"),
            &admin_token("ops"),
            None,
        )
        .await;
    assert_eq!(removed.status, 204, "{:?}", removed.body);
    assert_eq!(b1.expect("roomLeft").await, json!({"roomId": room}));
    assert_eq!(b2.expect("roomLeft").await, json!({"roomId": room}));

    let sent = alice.say(&room, "bob is gone").await;
    assert_eq!(carol.expect("message").await["id"], sent["id"]);
    b1.assert_quiet(300).await;
    b2.assert_quiet(0).await;
    b_idle.assert_quiet(0).await;
    b1.send("joinRoom", json!({"roomId": room})).await;
    b1.expect_error("FORBIDDEN").await;
    b1.send("sendMessage", json!({"roomId": room, "content": "hello?"}))
        .await;
    b1.expect_error("FORBIDDEN").await;

    // Removing yourself.
    let left = stack
        .delete("carol", &format!("/rooms/{room}/members/carol"))
        .await;
    assert_eq!(left.status, 204);
    assert_eq!(carol.expect("roomLeft").await, json!({"roomId": room}));
    alice.say(&room, "alone").await;
    carol.assert_quiet(300).await;
    for c in [alice, b1, b2, b_idle, carol] {
        c.close().await;
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_member_added_over_rest_can_join_at_once() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut dave = Client::connect(&stack, "dave").await;
    alice.join(&room).await;
    dave.send("joinRoom", json!({"roomId": room})).await;
    dave.expect_error("FORBIDDEN").await;

    let added = stack
        .post(
            "bob",
            &format!("/rooms/{room}/members"),
            json!({"userIds": ["dave"]}),
        )
        .await;
    assert_eq!(added.status, 200, "{:?}", added.body);
    let joined = dave.join(&room).await;
    assert_eq!(joined["room"]["id"], room);
    assert_eq!(joined["onlineUsers"], json!(["alice", "dave"]));
    let sent = alice.say(&room, "welcome dave").await;
    assert_eq!(dave.expect("message").await["id"], sent["id"]);
    let reply = dave.say(&room, "thanks").await;
    assert_eq!(alice.expect("message").await["id"], reply["id"]);
    alice.close().await;
    dave.close().await;
    stack.stop().await;
}
