//! Joining a room while its messages flow: whatever moment a join reads its
//! snapshot, the snapshot and the live `message` events together hold every
//! message from the snapshot on, once each and in order. A message stored
//! after the snapshot but fanned out before the subscription existed is the
//! race (docs/ARCHITECTURE.md, "Entering a room"): the join's Redis script
//! sees it and has the relay push it. (Mid-flood, the relay's gap fill on
//! the next message would also repair a miss; the deterministic test of the
//! script's own push is `relay/tests/it/ordering.rs`,
//! `sync_pushes_what_a_late_joiner_missed`.) This one checks the whole
//! path end to end: snapshot, subscription, live events, no duplicates.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use chat_test_support::TestEnv;
use common::*;
use serde_json::json;

const MESSAGES: i64 = 300;
const JOINERS: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_during_a_flood_miss_nothing() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let joiners: Vec<String> = (0..JOINERS).map(|i| format!("j{i:02}")).collect();
    let names: Vec<&str> = joiners.iter().map(String::as_str).collect();
    let room = stack.group("alice", &names).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut clients = Vec::new();
    for name in &joiners {
        clients.push(Client::connect(&stack, name).await);
    }

    // Alice floods the room without waiting; the joiners join one after
    // another while it flows.
    let flood_room = room.clone();
    let flood = tokio::spawn(async move {
        for i in 0..MESSAGES {
            alice
                .send(
                    "sendMessage",
                    json!({"roomId": flood_room, "content": format!("m{i}")}),
                )
                .await;
        }
        // Her own acknowledgements: all stored.
        let mut acked = 0;
        while acked < MESSAGES {
            if alice.next().await["type"] == "message" {
                acked += 1;
            }
        }
        alice
    });
    let mut tasks = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(15 * i as u64)).await;
            client.send("joinRoom", json!({"roomId": room})).await;
            let mut seen: Vec<i64> = Vec::new();
            let mut snapshot_from = None;
            loop {
                let event = tokio::time::timeout(Duration::from_secs(20), client.next())
                    .await
                    .unwrap_or_else(|_| panic!("{}: stalled after {:?}", client.user, seen.last()));
                match event["type"].as_str() {
                    Some("roomJoined") => {
                        let messages: Vec<i64> = event["payload"]["messages"]
                            .as_array()
                            .expect("messages")
                            .iter()
                            .map(|m| m["sequenceId"].as_i64().expect("sequenceId"))
                            .collect();
                        snapshot_from = Some(messages.first().copied().unwrap_or(1));
                        seen.extend(messages);
                    }
                    Some("message") => {
                        assert!(
                            snapshot_from.is_some(),
                            "{}: a message before roomJoined",
                            client.user
                        );
                        seen.push(event["payload"]["sequenceId"].as_i64().expect("sequenceId"));
                    }
                    Some("error") => panic!("{}: {event}", client.user),
                    _ => {}
                }
                if seen.last() == Some(&MESSAGES) {
                    return (client.user.clone(), snapshot_from.unwrap_or(1), seen);
                }
            }
        }));
    }
    flood.await.expect("flood");
    for task in tasks {
        let (user, from, seen) = task.await.expect("joiner");
        let unique: BTreeSet<i64> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "{user}: duplicates in {seen:?}");
        let expected: Vec<i64> = (from..=MESSAGES).collect();
        assert_eq!(seen, expected, "{user}: a gap or disorder");
    }
}
