//! Recovery after a dropped connection (PROTOCOL.md §2, `roomJoined` with
//! `afterSequenceId`): the client gets exactly what it missed and
//! `recovered: true`, or `recovered: false` when retention already deleted
//! some of it.

use crate::common;

use chat_test_support::TestEnv;
use common::{Client, TestStack, sequence_ids};
use serde_json::{Value, json};

fn seqs(joined: &Value) -> Vec<i64> {
    joined["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["sequenceId"].as_i64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn a_reconnecting_client_gets_exactly_what_it_missed() {
    let env = TestEnv::new().await;
    let a = TestStack::all_in_one(&env).await;
    let b = TestStack::gateway(&env).await; // it reconnects elsewhere
    let room = a.group("alice", &["bob", "carol"]).await;
    let mut alice = Client::connect(&a, "alice").await;
    let mut carol = Client::connect(&a, "carol").await;
    let mut bob = Client::connect(&a, "bob").await;
    for c in [&mut alice, &mut carol, &mut bob] {
        c.join(&room).await;
    }
    for i in 1..=3 {
        alice.say(&room, &format!("before {i}")).await;
        carol.expect("message").await;
    }
    let last_seen = sequence_ids(&bob.collect_until("message", 3).await);
    assert_eq!(last_seen, [1, 2, 3]);

    // bob's network goes away: no close frame, the TCP connection drops.
    drop(bob);
    for p in [
        alice.expect("presenceUpdate").await,
        carol.expect("presenceUpdate").await,
    ] {
        assert_eq!(
            (&p["userId"], &p["status"]),
            (&json!("bob"), &json!("offline"))
        );
    }
    for i in 4..=6 {
        alice.say(&room, &format!("missed {i}")).await;
        carol.expect("message").await;
        carol.say(&room, &format!("missed {i}b")).await;
        alice.expect("message").await;
    }

    let mut bob = Client::connect(&b, "bob").await;
    let joined = bob.join_after(&room, 3).await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(joined["hasMore"], false);
    assert_eq!(seqs(&joined), (4..=9).collect::<Vec<_>>());
    assert_eq!(joined["messages"][0]["content"], "missed 4");
    assert_eq!(joined["messages"][5]["content"], "missed 6b");
    assert_eq!(joined["unreadCount"], 9, "bob never marked anything read");

    // Live again: the next message once, and none of the recovered ones.
    let live = carol.say(&room, "welcome back").await;
    assert_eq!(bob.expect("message").await["id"], live["id"]);
    bob.assert_quiet(300).await;
    for c in [alice, carol, bob] {
        c.close().await;
    }
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn past_the_retention_window_recovered_is_false() {
    let mut env = TestEnv::new().await;
    env.set("MESSAGE_RETENTION", "5");
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    alice.join(&room).await;
    bob.join(&room).await;
    for i in 1..=2 {
        alice.say(&room, &format!("seen {i}")).await;
    }
    assert_eq!(sequence_ids(&bob.collect_until("message", 2).await), [1, 2]);
    drop(bob);
    let offline = alice.wait_for("presenceUpdate").await;
    assert_eq!(offline["status"], "offline");

    // Seven more while away: retention keeps 5..=9, so 3 and 4 are gone.
    for i in 3..=9 {
        alice.say(&room, &format!("away {i}")).await;
    }
    let mut bob = Client::connect(&stack, "bob").await;
    let joined = bob.join_after(&room, 2).await;
    assert_eq!(joined["recovered"], false, "3 and 4 were deleted");
    assert_eq!(seqs(&joined), (5..=9).collect::<Vec<_>>());

    // A client that had 4 missed nothing that was deleted.
    let joined = bob.join_after(&room, 4).await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(seqs(&joined), (5..=9).collect::<Vec<_>>());
    // The reload a client does after `recovered: false`.
    let reload = bob.join(&room).await;
    assert_eq!(seqs(&reload), (5..=9).collect::<Vec<_>>());
    assert_eq!(reload["hasMore"], false);
    let history = stack.history("bob", &room).await;
    let stored: Vec<&Value> = history.iter().map(|m| &m["sequenceId"]).collect();
    assert_eq!(
        stored,
        [5, 6, 7, 8, 9].map(Value::from).iter().collect::<Vec<_>>()
    );
    alice.close().await;
    bob.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn a_lowered_retention_is_applied_at_start_up() {
    // Ten messages kept under MESSAGE_RETENTION=10; the next start keeps 3.
    let mut env = TestEnv::new().await;
    env.set("MESSAGE_RETENTION", "10");
    let a = TestStack::all_in_one(&env).await;
    let room = a.group("alice", &["bob"]).await;
    for i in 1..=10 {
        a.send_rest("alice", &room, &format!("m{i}")).await;
    }
    a.stop().await;
    env.set("MESSAGE_RETENTION", "3");
    let deleted = chat_local::apply_retention(&env.config())
        .await
        .expect("the sweep runs");
    assert_eq!(deleted, 7);
    let b = TestStack::all_in_one(&env).await;
    let kept: Vec<i64> = b
        .history("bob", &room)
        .await
        .iter()
        .map(|m| m["sequenceId"].as_i64().expect("sequenceId"))
        .collect();
    assert_eq!(kept, [8, 9, 10]);
    b.stop().await;
}
