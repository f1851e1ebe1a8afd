//! What order a sender's messages are stored in when it sends several
//! without waiting (issue 16, "Dispatch"; PROTOCOL.md §2 "Order of a
//! sender's frames"), over real sockets against the whole local stack.
//!
//! The gateway invokes `$default` for several messages of one connection
//! at once, as API Gateway does (`GATEWAY_DISPATCH=concurrent`, the
//! default), so without help the messages race to PostgreSQL and may be
//! stored in another order than sent. A client that numbers its frames
//! (`seq`) gets them stored in that order; a v1 client gets each message
//! stored once, in no promised order, unless the gateway is serial.

use crate::common;

use std::collections::HashSet;

use chat_test_support::TestEnv;
use common::{Client, TestStack, assert_frame_conforms};
use futures::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Messages sent in one burst: several times the gateway's eight
/// invocations at once; three bursts stay within one history page (100).
const BURST: usize = 30;

/// Sends `sendMessage` frames `{tag}1..={tag}N` back to back, without
/// waiting for anything in between; numbered `seq_from + 1 ..` when given.
async fn send_burst(client: &mut Client, room: &str, n: usize, seq_from: Option<usize>, tag: &str) {
    for i in 1..=n {
        let mut frame = json!({"type": "sendMessage",
            "payload": {"roomId": room, "content": format!("{tag}{i}"), "clientMessageId": format!("{tag}-{i}")}});
        if let Some(from) = seq_from {
            frame["seq"] = json!(from + i);
        }
        assert_frame_conforms(&frame, true, &client.user);
        client
            .socket
            .feed(Message::text(frame.to_string()))
            .await
            .expect("send");
    }
    client.socket.flush().await.expect("flush");
}

/// Waits for the sender's own acknowledgement of each of `n` messages;
/// fails on any `error`.
async fn await_acks(client: &mut Client, n: usize) {
    let mut acked = HashSet::new();
    while acked.len() < n {
        let event = client.next().await;
        match event["type"].as_str() {
            Some("message") => {
                acked.insert(event["payload"]["clientMessageId"].to_string());
            }
            Some("error") => panic!("a send was refused: {event}"),
            _ => {}
        }
    }
}

/// The contents of the room's messages in `sequenceId` order.
async fn stored(stack: &TestStack, user: &str, room: &str) -> Vec<String> {
    let history = stack.history(user, room).await;
    let mut messages: Vec<(i64, String)> = history
        .iter()
        .map(|m| {
            (
                m["sequenceId"].as_i64().expect("sequenceId"),
                m["content"].as_str().expect("content").to_owned(),
            )
        })
        .collect();
    messages.sort();
    messages.into_iter().map(|(_, content)| content).collect()
}

fn in_sent_order(tag: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{tag}{i}")).collect()
}

/// Pairs of stored messages in the opposite order to how they were sent.
fn inversions(stored: &[String], tag: &str) -> usize {
    let index: Vec<usize> = stored
        .iter()
        .map(|c| c.trim_start_matches(tag).parse().expect("tagged content"))
        .collect();
    index
        .iter()
        .enumerate()
        .map(|(i, a)| index[i + 1..].iter().filter(|b| *b < a).count())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn numbered_sends_without_waiting_are_stored_in_the_order_sent() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("ann", &["ben"]).await;
    let mut ann = Client::connect(&stack, "ann").await;
    // Three bursts of numbered frames on one connection (numbers go on
    // from burst to burst): each is stored exactly in the order sent.
    let mut seq_base = 0;
    for tag in ["a", "b", "c"] {
        let n = BURST;
        send_burst(&mut ann, &room, n, Some(seq_base), tag).await;
        seq_base += n;
        await_acks(&mut ann, n).await;
        let all = stored(&stack, "ann", &room).await;
        let burst: Vec<String> = all.into_iter().filter(|c| c.starts_with(tag)).collect();
        assert_eq!(
            burst,
            in_sent_order(tag, n),
            "burst {tag}: {} pairs stored out of the order sent",
            inversions(&burst, tag)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v1_sends_without_waiting_are_each_stored_once() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("ann", &["ben"]).await;
    let mut ann = Client::connect(&stack, "ann").await;
    send_burst(&mut ann, &room, BURST, None, "v").await;
    await_acks(&mut ann, BURST).await;
    let all = stored(&stack, "ann", &room).await;
    let mut sorted = all.clone();
    sorted.sort();
    let mut want = in_sent_order("v", BURST);
    want.sort();
    assert_eq!(sorted, want, "every message stored once");
    // The order is not promised (concurrent dispatch): say what it was.
    println!(
        "v1 burst of {BURST} under concurrent dispatch: {} pairs stored out of the order sent",
        inversions(&all, "v")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serial_dispatch_stores_v1_sends_in_arrival_order() {
    let mut env = TestEnv::new().await;
    env.set("GATEWAY_DISPATCH", "serial");
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("ann", &["ben"]).await;
    let mut ann = Client::connect(&stack, "ann").await;
    send_burst(&mut ann, &room, BURST, None, "s").await;
    await_acks(&mut ann, BURST).await;
    assert_eq!(
        stored(&stack, "ann", &room).await,
        in_sent_order("s", BURST)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_seq_is_refused_and_changes_nothing() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("ann", &["ben"]).await;
    let mut ann = Client::connect(&stack, "ann").await;
    for seq in [json!(0), json!(-3), json!("1"), json!(1.5)] {
        let frame = json!({"type": "sendMessage", "seq": seq,
            "payload": {"roomId": room, "content": "x", "clientMessageId": "bad-seq"}});
        ann.socket
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
        let error = ann.expect_error("BAD_REQUEST").await;
        assert_eq!(error["clientMessageId"], "bad-seq", "{error}");
        assert_eq!(error["requestType"], "sendMessage", "{error}");
    }
    assert!(stored(&stack, "ann", &room).await.is_empty());
    // The connection is fine, and numbering starts at 1.
    let frame = json!({"type": "sendMessage", "seq": 1,
        "payload": {"roomId": room, "content": "ok", "clientMessageId": "good"}});
    ann.socket
        .send(Message::text(frame.to_string()))
        .await
        .expect("send");
    let ack: Value = ann.expect("message").await;
    assert_eq!(ack["content"], "ok");
}
