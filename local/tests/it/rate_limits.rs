//! WebSocket rate limits and `typing` coalescing (issue "Reliability and
//! security", part 3), end to end through the gateway emulator and relay:
//! a per-connection message rate answered with `RATE_LIMITED` (ids echoed,
//! the connection stays open, nothing stored), `ping` never limited, and
//! at most one `typing` per user and room every 2 s, state changes always
//! passing.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chat_test_support::TestEnv;
use common::*;
use serde_json::{Value, json};

/// An env with the production defaults spelled out (the test env turns
/// limits off).
async fn limited_env() -> TestEnv {
    let mut env = TestEnv::new().await;
    env.set("RATE_LIMIT_PER_SEC", "20")
        .set("RATE_LIMIT_BURST", "40");
    env
}

/// Sends `n` `leaveRoom` frames at once (cheap: Redis only) and returns
/// the replies.
async fn leave_burst(client: &mut Client, room: &str, n: usize) -> Vec<Value> {
    for _ in 0..n {
        client.send("leaveRoom", json!({"roomId": room})).await;
    }
    let mut replies = Vec::new();
    while replies.len() < n {
        replies.push(client.next().await);
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_quick_sends_then_rate_limited_with_ids_echoed() {
    let env = limited_env().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.direct("alice", "bob").await;
    let mut alice = Client::connect(&stack, "alice").await;
    // 120 sends at once (the sender gets its `message` without joining).
    let started = Instant::now();
    for i in 0..120 {
        alice
            .send(
                "sendMessage",
                json!({"roomId": room, "content": format!("m{i}"), "clientMessageId": format!("c{i}")}),
            )
            .await;
    }
    let (mut acked, mut refused) = (BTreeSet::new(), BTreeSet::new());
    while acked.len() + refused.len() < 120 {
        let event = alice.next().await;
        let payload = &event["payload"];
        let id: usize = payload["clientMessageId"]
            .as_str()
            .and_then(|c| c.strip_prefix('c'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("an answer to a send: {event}"));
        match event["type"].as_str() {
            Some("message") => assert!(acked.insert(id), "{event}"),
            Some("error") => {
                assert_eq!(payload["code"], "RATE_LIMITED", "{event}");
                assert_eq!(payload["requestType"], "sendMessage", "{event}");
                assert!(payload["message"].as_str().is_some_and(|m| !m.is_empty()));
                assert!(refused.insert(id), "{event}");
            }
            _ => panic!("unexpected {event}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The burst of 40 always passes; beyond it, at most what 20 a second
    // refilled meanwhile.
    assert!(
        (0..40).all(|i| acked.contains(&i)),
        "the first 40 are stored: refused {refused:?}"
    );
    let refill = (20.0 * elapsed).ceil() as usize + 1;
    assert!(
        acked.len() <= 40 + refill,
        "{} stored in {elapsed:.2} s",
        acked.len()
    );
    assert!(!refused.is_empty(), "nothing refused in {elapsed:.2} s");
    // Nothing was stored for a refused send.
    let stored: BTreeSet<usize> = stack
        .history("alice", &room)
        .await
        .iter()
        .map(|m| {
            m["clientMessageId"].as_str().expect("id")[1..]
                .parse()
                .expect("c<n>")
        })
        .collect();
    assert_eq!(stored, acked);
    // The connection stays open and usable.
    alice.ping_pong().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_never_limited_and_the_rate_recovers() {
    // A slow refill (one token every 500 ms), so that what follows the
    // burst is surely still over the rate.
    let mut env = limited_env().await;
    env.set("RATE_LIMIT_PER_SEC", "2");
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.direct("alice", "bob").await;
    let mut alice = Client::connect(&stack, "alice").await;
    // Empty the bucket, and more.
    let replies = leave_burst(&mut alice, &room, 60).await;
    // Counted, not by position: frames without `seq` are handled
    // concurrently, so a refused frame's answer can come before an
    // accepted one's (seen once in CI).
    let passed = replies.iter().filter(|r| r["type"] == "roomLeft").count();
    assert!(passed >= 40, "the burst passes: {replies:?}");
    let limited: Vec<&Value> = replies.iter().filter(|r| r["type"] == "error").collect();
    assert!(limited.len() >= 19, "60 at once exceed the burst");
    for error in &limited {
        assert_eq!(error["payload"]["code"], "RATE_LIMITED", "{error}");
        assert_eq!(error["payload"]["requestType"], "leaveRoom", "{error}");
        assert_eq!(error["payload"]["clientMessageId"], Value::Null, "{error}");
    }
    // Over the rate, sends are refused with their ids, and pings are not,
    // however many come; all of them interleaved.
    for i in 0..5 {
        alice
            .send(
                "sendMessage",
                json!({"roomId": room, "content": "too soon", "clientMessageId": format!("s{i}")}),
            )
            .await;
        for _ in 0..10 {
            alice.send("ping", json!({})).await;
        }
    }
    let (mut pongs, mut refused, mut acked) = (0, Vec::new(), 0);
    while pongs + refused.len() + acked < 55 {
        let event = alice.next().await;
        match event["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("message") => acked += 1,
            Some("error") => {
                assert_eq!(event["payload"]["code"], "RATE_LIMITED", "{event}");
                assert_eq!(event["payload"]["requestType"], "sendMessage", "{event}");
                refused.push(event["payload"]["clientMessageId"].clone());
            }
            _ => panic!("unexpected {event}"),
        }
    }
    assert_eq!(pongs, 50, "every ping is answered");
    assert!(refused.len() >= 4, "sends over the rate: {refused:?}");
    assert!(
        refused
            .iter()
            .all(|id| id.as_str().is_some_and(|s| s.starts_with('s')))
    );
    // Nothing was stored for them.
    assert_eq!(stack.history("alice", &room).await.len(), acked);
    // A second later the bucket has tokens again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    alice.say(&room, "after a second").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_is_per_connection_and_zero_turns_it_off() {
    let mut env = limited_env().await;
    env.set("RATE_LIMIT_BURST", "5");
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.direct("alice", "bob").await;
    let mut first = Client::connect(&stack, "alice").await;
    let mut second = Client::connect(&stack, "alice").await;
    let replies = leave_burst(&mut first, &room, 10).await;
    assert!(replies.iter().any(|r| r["type"] == "error"), "{replies:?}");
    // The user's other connection has its own bucket.
    let replies = leave_burst(&mut second, &room, 5).await;
    assert!(
        replies.iter().all(|r| r["type"] == "roomLeft"),
        "{replies:?}"
    );

    // With 0, nothing is limited (and no bucket is kept).
    let mut env = TestEnv::new().await;
    env.set("RATE_LIMIT_PER_SEC", "0")
        .set("RATE_LIMIT_BURST", "1");
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.direct("alice", "bob").await;
    let mut alice = Client::connect(&stack, "alice").await;
    let replies = leave_burst(&mut alice, &room, 100).await;
    assert!(
        replies.iter().all(|r| r["type"] == "roomLeft"),
        "{replies:?}"
    );
    let bucket = keys(&env).rate_conn(&alice.connection_id);
    let exists: bool = redis::cmd("EXISTS")
        .arg(&bucket)
        .query_async(&mut redis(&env).await)
        .await
        .expect("EXISTS");
    assert!(!exists, "{bucket}");
}

/// Sends a message as `from` and returns the events `to` got up to it:
/// events of one room reach a connection in publish order, so whatever
/// `typing` went out before the message has arrived by then.
async fn events_up_to_a_message(from: &mut Client, to: &mut Client, room: &str) -> Vec<Value> {
    from.say(room, "marker").await;
    let events = to.collect_until("message", 1).await;
    events
        .into_iter()
        .filter(|e| e["type"] == "typing")
        .collect()
}

fn typing(is_typing: bool) -> impl Fn(&Value) -> bool {
    move |event: &Value| {
        event["type"] == "typing" && event["payload"]["isTyping"] == json!(is_typing)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_coalesced_but_state_changes_pass() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.direct("alice", "bob").await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    alice.join(&room).await;
    bob.join(&room).await;
    alice.collect(200).await; // bob's presence, if any

    // Ten typing(true) in a burst: bob gets exactly one.
    for _ in 0..10 {
        alice
            .send("typing", json!({"roomId": room, "isTyping": true}))
            .await;
    }
    let events = events_up_to_a_message(&mut alice, &mut bob, &room).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(typing(true)(&events[0]), "{events:?}");
    assert_eq!(events[0]["payload"]["userId"], "alice");
    assert_eq!(events[0]["payload"]["roomId"], json!(room));

    // "Stopped typing" right after is never swallowed; its repeats are.
    for _ in 0..3 {
        alice
            .send("typing", json!({"roomId": room, "isTyping": false}))
            .await;
    }
    let events = events_up_to_a_message(&mut alice, &mut bob, &room).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(typing(false)(&events[0]), "{events:?}");

    // Once 2 s have passed, the same state goes out again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for _ in 0..3 {
        alice
            .send("typing", json!({"roomId": room, "isTyping": false}))
            .await;
    }
    let events = events_up_to_a_message(&mut alice, &mut bob, &room).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(typing(false)(&events[0]), "{events:?}");

    // And a new typing(true) after 2 s goes out.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    alice
        .send("typing", json!({"roomId": room, "isTyping": true}))
        .await;
    let event = bob.wait_for("typing").await;
    assert_eq!(event["isTyping"], true, "{event}");
    // The typist never gets their own typing.
    let own = alice.collect(300).await;
    assert!(
        own.iter().all(|e| e["type"] != "typing"),
        "alice got {own:?}"
    );
}
