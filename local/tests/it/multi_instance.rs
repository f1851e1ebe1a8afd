//! Two gateway instances and one relay over one PostgreSQL and one Redis
//! (as in AWS: many gateways or Lambda instances, one relay): members on
//! different instances hear each other, every connection gets every event
//! exactly once, and a room's messages arrive in sequence order however
//! the senders are spread.

use crate::common;

use chat_test_support::TestEnv;
use common::{Client, TestStack, sequence_ids, wait_relays};
use serde_json::json;

/// Gateway A, gateway B and a relay, over one env.
async fn instances(env: &TestEnv) -> (TestStack, TestStack, TestStack) {
    let a = TestStack::gateway(env).await;
    let b = TestStack::gateway(env).await;
    let relay = TestStack::relay(env).await;
    // `connected` goes through the relay: it must be listening first.
    wait_relays(env, 1).await;
    (a, b, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_different_gateways_get_every_event_exactly_once() {
    let env = TestEnv::new().await;
    let (a, b, relay) = instances(&env).await;
    let room = a.group("alice", &["bob", "carol"]).await;
    // Each user on both instances.
    let mut a1 = Client::connect(&a, "alice").await;
    let mut a2 = Client::connect(&b, "alice").await;
    let mut b1 = Client::connect(&b, "bob").await;
    let mut b2 = Client::connect(&a, "bob").await;
    for c in [&mut a1, &mut a2, &mut b1, &mut b2] {
        c.join(&room).await;
    }
    // Each step's event must be the very next event on every connection
    // that gets it, so a repeat of an earlier event would fail a later step.
    let mut all = [a1, a2, b1, b2];

    all[0]
        .send(
            "sendMessage",
            json!({"roomId": room, "content": "from alice on A"}),
        )
        .await;
    for c in all.iter_mut() {
        let m = c.expect("message").await;
        assert_eq!(
            (&m["content"], &m["sequenceId"]),
            (&json!("from alice on A"), &json!(1))
        );
    }
    all[2]
        .send(
            "sendMessage",
            json!({"roomId": room, "content": "from bob on B"}),
        )
        .await;
    for c in all.iter_mut() {
        let m = c.expect("message").await;
        assert_eq!(
            (&m["content"], &m["sequenceId"]),
            (&json!("from bob on B"), &json!(2))
        );
    }
    // Typing from bob on B: alice's connections on A and B, neither of bob's.
    all[2]
        .send("typing", json!({"roomId": room, "isTyping": true}))
        .await;
    for c in all[..2].iter_mut() {
        let t = c.expect("typing").await;
        assert_eq!(
            (&t["userId"], &t["isTyping"]),
            (&json!("bob"), &json!(true))
        );
    }
    // A read receipt from alice on B: everyone.
    all[1]
        .send("markRead", json!({"roomId": room, "sequenceId": 2}))
        .await;
    for c in all.iter_mut() {
        let r = c.expect("readReceipt").await;
        assert_eq!(
            (&r["userId"], &r["sequenceId"]),
            (&json!("alice"), &json!(2))
        );
    }
    // carol comes online on A and leaves: everyone hears both, once.
    let carol = Client::connect(&a, "carol").await;
    for c in all.iter_mut() {
        let p = c.expect("presenceUpdate").await;
        assert_eq!(
            (&p["userId"], &p["status"]),
            (&json!("carol"), &json!("online"))
        );
    }
    carol.close().await;
    for c in all.iter_mut() {
        let p = c.expect("presenceUpdate").await;
        assert_eq!(
            (&p["userId"], &p["status"]),
            (&json!("carol"), &json!("offline"))
        );
    }
    // Nothing more, anywhere: no duplicate of anything above.
    let leftovers = futures::future::join_all(all.iter_mut().map(|c| c.collect(400))).await;
    for (c, events) in all.iter().zip(leftovers) {
        assert!(
            events.is_empty(),
            "{} ({}): {events:?}",
            c.user,
            c.connection_id
        );
    }

    // Both instances answer the same presence.
    assert_eq!(a.online("bob", &room).await, [json!("alice"), json!("bob")]);
    assert_eq!(b.online("bob", &room).await, [json!("alice"), json!("bob")]);
    for c in all {
        c.close().await;
    }
    a.stop().await;
    b.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_messages_arrive_in_sequence_order_under_concurrent_senders() {
    const PER_SENDER: usize = 25;
    let env = TestEnv::new().await;
    let (a, b, relay) = instances(&env).await;
    let senders = ["s1", "s2", "s3", "s4"];
    let room = a.group("s1", &["s2", "s3", "s4", "r1", "r2"]).await;
    let mut clients = Vec::new();
    for (user, stack) in [
        ("s1", &a),
        ("s2", &b),
        ("s3", &a),
        ("s4", &b),
        ("r1", &a),
        ("r2", &b),
    ] {
        let mut client = Client::connect(stack, user).await;
        client.join(&room).await;
        clients.push(client);
    }
    let total = senders.len() * PER_SENDER;
    let runs = clients.into_iter().map(|mut client| {
        let room = room.clone();
        tokio::spawn(async move {
            if client.user.starts_with('s') {
                for k in 0..PER_SENDER {
                    client
                        .send(
                            "sendMessage",
                            json!({"roomId": room, "content": format!("{}-{k}", client.user)}),
                        )
                        .await;
                }
            }
            let mut events = client.collect_until("message", total).await;
            // Anything more (a duplicate) would come now.
            events.extend(client.collect(300).await);
            (client, events)
        })
    });
    let results = futures::future::join_all(runs).await;
    let mut clients = Vec::new();
    for result in results {
        let (client, events) = result.expect("client task");
        let seqs = sequence_ids(&events);
        assert_eq!(
            seqs,
            (1..=total as i64).collect::<Vec<_>>(),
            "{}: every message once, ascending",
            client.user
        );
        // Each sender's messages keep the order it sent them in.
        for sender in senders {
            let mine: Vec<String> = events
                .iter()
                .filter(|e| e["type"] == "message" && e["payload"]["senderId"] == sender)
                .map(|e| {
                    e["payload"]["content"]
                        .as_str()
                        .expect("content")
                        .to_owned()
                })
                .collect();
            let sent: Vec<String> = (0..PER_SENDER).map(|k| format!("{sender}-{k}")).collect();
            assert_eq!(
                mine, sent,
                "{} sees {sender}'s messages in order",
                client.user
            );
        }
        clients.push(client);
    }
    let history = a.history("r1", &room).await;
    assert_eq!(history.len(), total);
    for c in clients {
        c.close().await;
    }
    a.stop().await;
    b.stop().await;
    relay.stop().await;
}
