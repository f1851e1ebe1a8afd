//! Frames a client should not send (PROTOCOL.md §2): each gets the right
//! `error` (or close code), the connection stays usable, the rest of the
//! room hears nothing, and nothing is stored.

use crate::common;

use chat_test_support::TestEnv;
use common::{Client, TestStack};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// 128 KiB: the largest message the gateway accepts.
const MAX_MESSAGE: usize = 131_072;
/// 32 KiB: the largest frame (API Gateway's limit, the emulator's default).
const MAX_FRAME: usize = 32_768;

/// Sends `text` as one message in fragments of at most [`MAX_FRAME`] bytes,
/// as a client library does with a message over the frame limit.
async fn send_fragmented(client: &mut Client, text: &str) {
    let chunks: Vec<&[u8]> = text.as_bytes().chunks(MAX_FRAME).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let last = i == chunks.len() - 1;
        client
            .send_raw(Message::Frame(Frame::message(chunk.to_vec(), opcode, last)))
            .await;
    }
}

/// Frames with the error each must get: (frame, requestType, clientMessageId).
/// Every one is `BAD_REQUEST`.
fn bad_frames(room: &str) -> Vec<(String, Value, Value)> {
    let send = |payload: Value| json!({"type": "sendMessage", "payload": payload}).to_string();
    let null = Value::Null;
    let s = |v: &str| Value::from(v);
    let long_content = "é".repeat(4001);
    let big_metadata = json!({"k": "x".repeat(8192 - 8 + 1)});
    assert_eq!(big_metadata.to_string().len(), 8193);
    vec![
        // Not JSON, or not an object.
        (r#"{"type":"ping""#.into(), null.clone(), null.clone()),
        ("hello".into(), null.clone(), null.clone()),
        (
            r#"{"type":"ping","payload":{"x":"\ud800"}}"#.into(),
            null.clone(),
            null.clone(),
        ),
        ("[1,2]".into(), null.clone(), null.clone()),
        (r#""ping""#.into(), null.clone(), null.clone()),
        ("42".into(), null.clone(), null.clone()),
        ("null".into(), null.clone(), null.clone()),
        // No usable type.
        (r#"{"payload":{}}"#.into(), null.clone(), null.clone()),
        (
            r#"{"type":5,"payload":{}}"#.into(),
            null.clone(),
            null.clone(),
        ),
        (
            r#"{"type":"shout","payload":{}}"#.into(),
            s("shout"),
            null.clone(),
        ),
        (
            r#"{"type":"PING","payload":{}}"#.into(),
            s("PING"),
            null.clone(),
        ),
        // A payload that is not an object.
        (
            r#"{"type":"sendMessage","payload":"hi"}"#.into(),
            s("sendMessage"),
            null.clone(),
        ),
        (
            r#"{"type":"joinRoom","payload":[1]}"#.into(),
            s("joinRoom"),
            null.clone(),
        ),
        // Missing fields.
        (
            send(json!({"content": "hi", "clientMessageId": "m-1"})),
            s("sendMessage"),
            s("m-1"),
        ),
        (
            send(json!({"roomId": room, "clientMessageId": "m-2"})),
            s("sendMessage"),
            s("m-2"),
        ),
        (
            json!({"type": "joinRoom", "payload": {}}).to_string(),
            s("joinRoom"),
            null.clone(),
        ),
        (
            json!({"type": "leaveRoom", "payload": {}}).to_string(),
            s("leaveRoom"),
            null.clone(),
        ),
        (
            json!({"type": "typing", "payload": {"roomId": room}}).to_string(),
            s("typing"),
            null.clone(),
        ),
        (
            json!({"type": "markRead", "payload": {"roomId": room}}).to_string(),
            s("markRead"),
            null.clone(),
        ),
        // Wrong types.
        (
            send(json!({"roomId": 5, "content": "hi"})),
            s("sendMessage"),
            null.clone(),
        ),
        (
            send(json!({"roomId": room, "content": 5})),
            s("sendMessage"),
            null.clone(),
        ),
        (
            send(json!({"roomId": room, "content": "hi", "type": "video"})),
            s("sendMessage"),
            null.clone(),
        ),
        (
            send(json!({"roomId": room, "content": "hi", "type": 1})),
            s("sendMessage"),
            null.clone(),
        ),
        (
            send(json!({"roomId": room, "content": "hi", "metadata": "x"})),
            s("sendMessage"),
            null.clone(),
        ),
        (
            send(json!({"roomId": room, "content": "hi", "metadata": [1]})),
            s("sendMessage"),
            null.clone(),
        ),
        (
            send(json!({"roomId": room, "content": "hi", "clientMessageId": 7})),
            s("sendMessage"),
            null.clone(),
        ),
        (
            send(json!({"roomId": room, "content": "hi", "clientMessageId": ""})),
            s("sendMessage"),
            s(""),
        ),
        (
            send(json!({"roomId": room, "content": "hi", "clientMessageId": "x".repeat(65)})),
            s("sendMessage"),
            Value::from("x".repeat(65)),
        ),
        (
            json!({"type": "joinRoom", "payload": {"roomId": 5}}).to_string(),
            s("joinRoom"),
            null.clone(),
        ),
        (
            json!({"type": "joinRoom", "payload": {"roomId": room, "afterSequenceId": "3"}})
                .to_string(),
            s("joinRoom"),
            null.clone(),
        ),
        (
            json!({"type": "joinRoom", "payload": {"roomId": room, "afterSequenceId": -1}})
                .to_string(),
            s("joinRoom"),
            null.clone(),
        ),
        (
            json!({"type": "joinRoom", "payload": {"roomId": room, "afterSequenceId": 1.5}})
                .to_string(),
            s("joinRoom"),
            null.clone(),
        ),
        (
            json!({"type": "markRead", "payload": {"roomId": room, "sequenceId": "1"}}).to_string(),
            s("markRead"),
            null.clone(),
        ),
        (
            json!({"type": "typing", "payload": {"roomId": room, "isTyping": 1}}).to_string(),
            s("typing"),
            null.clone(),
        ),
        // Content: empty, blank, too long, NUL.
        (
            send(json!({"roomId": room, "content": "", "clientMessageId": "c-empty"})),
            s("sendMessage"),
            s("c-empty"),
        ),
        (
            send(json!({"roomId": room, "content": " \t\n\u{3000}\u{feff}"})),
            s("sendMessage"),
            null.clone(),
        ),
        (
            send(json!({"roomId": room, "content": long_content, "clientMessageId": "c-long"})),
            s("sendMessage"),
            s("c-long"),
        ),
        (
            send(json!({"roomId": room, "content": "a\u{0}b"})),
            s("sendMessage"),
            null.clone(),
        ),
        (
            send(json!({"roomId": room, "type": "image", "content": ""})),
            s("sendMessage"),
            null.clone(),
        ),
        (
            send(json!({"roomId": room, "type": "image", "content": "  ", "metadata": {"u": 1}})),
            s("sendMessage"),
            null.clone(),
        ),
        // Metadata over 8 KiB.
        (
            send(
                json!({"roomId": room, "content": "hi", "metadata": big_metadata, "clientMessageId": "c-meta"}),
            ),
            s("sendMessage"),
            s("c-meta"),
        ),
    ]
}

#[tokio::test]
async fn bad_frames_get_bad_request_and_the_connection_stays_usable() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    alice.join(&room).await;
    bob.join(&room).await;

    for (frame, request_type, client_message_id) in bad_frames(&room) {
        alice.send_raw(Message::text(frame.clone())).await;
        let error = alice.expect("error").await;
        let shown: String = frame.chars().take(120).collect();
        assert_eq!(error["code"], "BAD_REQUEST", "{shown}: {error}");
        assert_eq!(error["requestType"], request_type, "{shown}: {error}");
        assert_eq!(
            error["clientMessageId"], client_message_id,
            "{shown}: {error}"
        );
        assert!(error["message"].is_string(), "{shown}: {error}");
        alice.ping_pong().await;
    }

    bob.assert_quiet(300).await;
    assert!(
        stack.history("bob", &room).await.is_empty(),
        "nothing stored"
    );

    // A binary frame: API Gateway refuses it and closes with 1003, no
    // `error` first.
    alice
        .send_raw(Message::binary(br#"{"type":"ping","payload":{}}"#.to_vec()))
        .await;
    let close = alice.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1003, "{close:?}");
    bob.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn the_limits_themselves_are_accepted() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    bob.join(&room).await;

    // 4,000 characters (8,000 bytes: characters are scalar values).
    let content = "é".repeat(4000);
    let sent = alice.say(&room, &content).await;
    assert_eq!(sent["content"], content);
    // Metadata of exactly 8 KiB serialized.
    let metadata = json!({"k": "x".repeat(8192 - 8)});
    assert_eq!(metadata.to_string().len(), 8192);
    alice
        .send(
            "sendMessage",
            json!({"roomId": room, "content": "meta", "metadata": metadata}),
        )
        .await;
    assert_eq!(alice.expect("message").await["metadata"], metadata);
    // 64-character clientMessageId.
    alice
        .send(
            "sendMessage",
            json!({"roomId": room, "content": "id", "clientMessageId": "k".repeat(64)}),
        )
        .await;
    alice.expect("message").await;
    assert_eq!(bob.collect_until("message", 3).await.len(), 3);
    assert_eq!(stack.history("alice", &room).await.len(), 3);
    alice.close().await;
    bob.close().await;
    stack.stop().await;
}

/// A valid `sendMessage` padded with white space between JSON tokens to
/// exactly `size` bytes.
fn padded_send(room: &str, content: &str, size: usize) -> String {
    let head =
        json!({"type": "sendMessage", "payload": {"roomId": room, "content": content}}).to_string();
    let (open, close) = head.split_at(head.len() - 1);
    assert!(open.len() + close.len() <= size);
    let frame = format!("{open}{}{close}", " ".repeat(size - head.len()));
    assert_eq!(frame.len(), size);
    frame
}

#[tokio::test]
async fn a_message_of_exactly_128_kib_in_fragments_is_accepted_and_a_larger_one_closes_with_1009() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    bob.join(&room).await;

    // One frame of exactly 32 KiB is fine.
    alice
        .send_raw(Message::text(padded_send(&room, "one frame", MAX_FRAME)))
        .await;
    let one = alice.expect("message").await;
    assert_eq!(one["content"], "one frame");
    assert_eq!(bob.expect("message").await["id"], one["id"]);

    send_fragmented(&mut alice, &padded_send(&room, "just fits", MAX_MESSAGE)).await;
    let sent = alice.expect("message").await;
    assert_eq!(sent["content"], "just fits");
    assert_eq!(bob.expect("message").await["id"], sent["id"]);
    alice.ping_pong().await;

    send_fragmented(&mut alice, &padded_send(&room, "too big", MAX_MESSAGE + 1)).await;
    // No `error` first: the close is the next frame.
    let close = alice.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009, "{close:?}");

    // The connection is gone ($disconnect ran): bob hears alice go
    // offline, and nothing else.
    let presence = bob.expect("presenceUpdate").await;
    assert_eq!(presence["userId"], "alice");
    assert_eq!(presence["status"], "offline");
    bob.assert_quiet(300).await;
    let history = stack.history("bob", &room).await;
    assert_eq!(history.len(), 2);
    assert_eq!(history[1]["content"], "just fits");
    bob.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn a_single_frame_over_32_kib_closes_with_1009_as_on_aws() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    alice
        .send_raw(Message::text(padded_send(
            &room,
            "one frame too big",
            MAX_FRAME + 1,
        )))
        .await;
    let close = alice.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009, "{close:?}");
    assert!(
        stack.history("bob", &room).await.is_empty(),
        "nothing stored"
    );
    stack.stop().await;
}
