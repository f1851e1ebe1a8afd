//! A reconnect storm on one gateway with the production defaults (issue
//! "Load users can trust"): 500 clients connect and all send their
//! `joinRoom` at once, half of them racing their partner to create a DIRECT
//! room by `targetUserId`, half rejoining a GROUP room with
//! `afterSequenceId` to recover 20 missed messages. Every join is answered
//! `roomJoined`: a burst the service can carry is queued, never refused.
//! (The benchmark's S6 runs the same storm with 10,000 clients over two
//! gateways; docs/BENCHMARKS.md.)

use crate::common;

use std::time::{Duration, Instant};

use chat_test_support::TestEnv;
use common::*;
use serde_json::{Value, json};

const CLIENTS: usize = 500;
const GROUPS: usize = 5;
const MISSED: i64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_joins_at_once_on_one_gateway_with_default_settings_are_all_answered() {
    let mut env = TestEnv::new().await;
    // The production defaults: no test overrides of the pool or the rates.
    for key in [
        "PG_POOL_MAX",
        "RATE_LIMIT_PER_SEC",
        "REST_RATE_LIMIT_PER_SEC",
    ] {
        env.vars.remove(key);
    }
    let stack = TestStack::all_in_one(&env).await;

    // Half the clients are in GROUP rooms with 5 + 20 messages each.
    let per_group = CLIENTS / 2 / GROUPS;
    let group_users: Vec<String> = (0..CLIENTS / 2).map(|i| format!("g{i:03}")).collect();
    let mut group_of = Vec::new();
    for g in 0..GROUPS {
        let members = &group_users[g * per_group..(g + 1) * per_group];
        let others: Vec<&str> = members[1..].iter().map(String::as_str).collect();
        stack.register(&[members[0].as_str()]).await;
        let room = stack.group(&members[0], &others).await;
        for i in 0..5 + MISSED {
            stack.send_rest(&members[0], &room, &format!("m{i}")).await;
        }
        group_of.extend(std::iter::repeat_n(room, per_group));
    }
    // The other half pair up for DIRECT rooms that do not exist yet.
    let direct_users: Vec<String> = (0..CLIENTS / 2).map(|i| format!("d{i:03}")).collect();

    // Everyone connects (a connection makes its user known).
    let all: Vec<String> = group_users.iter().chain(&direct_users).cloned().collect();
    let clients = futures::future::join_all(all.iter().map(|u| Client::connect(&stack, u))).await;

    // Then every client sends its join at once and waits for the answer.
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            let frame = if i < group_users.len() {
                json!({"roomId": group_of[i], "afterSequenceId": 5})
            } else {
                let d = i - group_users.len();
                let partner = if d % 2 == 0 { d + 1 } else { d - 1 };
                json!({"targetUserId": direct_users[partner]})
            };
            tokio::spawn(async move {
                client.send("joinRoom", frame).await;
                loop {
                    let event = client.next().await;
                    match event["type"].as_str() {
                        Some("roomJoined" | "error") => return (client, event),
                        _ => continue,
                    }
                }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        let answer = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("every join is answered within a minute")
            .expect("client task");
        answers.push(answer);
    }
    let took = started.elapsed();

    let errors: Vec<&Value> = answers
        .iter()
        .map(|(_, event)| event)
        .filter(|event| event["type"] == "error")
        .collect();
    assert!(
        errors.is_empty(),
        "{} of {CLIENTS} joins failed, e.g. {}",
        errors.len(),
        errors[0]
    );
    for (i, (client, event)) in answers.iter().enumerate() {
        let payload = &event["payload"];
        if i < group_users.len() {
            assert_eq!(payload["recovered"], true, "{}: {payload}", client.user);
            let recovered: Vec<i64> = payload["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .map(|m| m["sequenceId"].as_i64().expect("sequenceId"))
                .collect();
            assert_eq!(
                recovered,
                (6..=5 + MISSED).collect::<Vec<_>>(),
                "{} recovers the {MISSED} missed messages",
                client.user
            );
        } else {
            assert_eq!(payload["room"]["type"], "DIRECT", "{payload}");
        }
    }
    // Each DIRECT pair raced and still got one room between them.
    let direct = &answers[group_users.len()..];
    for pair in direct.chunks(2) {
        assert_eq!(
            pair[0].1["payload"]["room"]["id"], pair[1].1["payload"]["room"]["id"],
            "{} and {}",
            pair[0].0.user, pair[1].0.user
        );
    }
    eprintln!("{CLIENTS} joins at once answered in {took:?}, none refused");

    // The connections still work: a DIRECT pair talks.
    let mut direct = answers.split_off(group_users.len()).into_iter();
    let (mut a, joined) = direct.next().expect("a");
    let (mut b, _) = direct.next().expect("b");
    let room = joined["payload"]["room"]["id"]
        .as_str()
        .expect("room id")
        .to_owned();
    a.say(&room, "after the storm").await;
    let heard = b.wait_for("message").await;
    assert_eq!(heard["content"], "after the storm");
}
