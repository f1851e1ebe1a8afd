//! Several relays over one Redis and one PostgreSQL (module `cluster`):
//! the shards split fairly, each event is delivered once, in room order;
//! a relay that dies is taken over within 10 s, one that joins takes its
//! share, one that stops hands its shards over at once; and a shard whose
//! lease is someone else's is never handled here.
//!
//! A "kill" aborts the relay's task: its lease loop, bus reader and
//! workers stop at once and nothing is given back, as after `kill -9`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_relay::{Relay, RelayMetrics, lease_shard};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::common::{Stack, WAIT, wait_for, wait_for_async};

/// A takeover must finish within this (the bound).
const TAKEOVER: Duration = Duration::from_secs(10);

/// These tests send as fast as they can: no per-connection rate limit.
fn unlimited(vars: &mut HashMap<String, String>) {
    vars.insert("RATE_LIMIT_PER_SEC".into(), "0".into());
}

/// One relay of the cluster under test.
struct Node {
    id: String,
    metrics: Arc<RelayMetrics>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Node {
    fn start(stack: &Stack) -> Self {
        let relay = Relay::from_parts(
            stack.adapters.clone(),
            SecretString::from(stack.relay_redis_url.clone()),
            stack.options.clone(),
        );
        let id = relay.id().to_owned();
        let metrics = relay.metrics();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        Self {
            id,
            metrics,
            shutdown,
            task,
        }
    }

    /// Stops the relay as a crash would: nothing drained, nothing given back.
    fn kill(self) {
        self.task.abort();
    }

    /// SIGTERM: drain, write back, give the leases back.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the relay stops within its drain timeout")
            .expect("no panic")
            .expect("run returns Ok");
    }
}

fn shards(stack: &Stack) -> usize {
    stack.options.cluster.lease_shards
}

/// The owner of every lease (`None`: free).
async fn owners(stack: &Stack) -> Vec<Option<String>> {
    let mut redis = stack.redis().await;
    let keys: Vec<String> = (0..shards(stack))
        .map(|n| stack.keys().relay_lease(n))
        .collect();
    redis::cmd("MGET")
        .arg(&keys)
        .query_async(&mut redis)
        .await
        .expect("MGET")
}

/// How many leases each of `nodes` holds (in that order).
fn counts(owners: &[Option<String>], nodes: &[&Node]) -> Vec<usize> {
    nodes
        .iter()
        .map(|n| owners.iter().flatten().filter(|o| **o == n.id).count())
        .collect()
}

/// Waits until `nodes` hold every lease between them, each its fair share
/// (differing by at most one); returns how long that took.
async fn wait_split(stack: &Stack, nodes: &[&Node], timeout: Duration) -> Duration {
    let started = Instant::now();
    let total = shards(stack);
    wait_for_async(
        &format!("{} relays holding all {total} shards fairly", nodes.len()),
        timeout,
        || async {
            let owners = owners(stack).await;
            let counts = counts(&owners, nodes);
            let fair = counts.iter().sum::<usize>() == total
                && counts
                    .iter()
                    .max()
                    .zip(counts.iter().min())
                    .is_some_and(|(a, b)| a - b <= 1);
            // The relays' own view agrees (no lease held only in Redis).
            let held: u64 = nodes
                .iter()
                .map(|n| n.metrics.snapshot().shards_owned)
                .sum();
            (fair && held == total as u64).then_some(())
        },
    )
    .await;
    started.elapsed()
}

/// Every `message` sequence id that `conn` got in `room`, in order.
fn room_sequences(stack: &Stack, conn: &str, room: &str) -> Vec<i64> {
    stack
        .gateway
        .events(conn, "message")
        .iter()
        .filter(|e| e["payload"]["roomId"] == room)
        .map(|e| e["payload"]["sequenceId"].as_i64().expect("sequenceId"))
        .collect()
}

/// Waits until every connection has exactly `1..=n` in every room, once
/// each and in order (a duplicate or a reordering fails at once).
async fn wait_all_delivered(stack: &Stack, conns: &[String], rooms: &[String], n: i64) {
    let expected: Vec<i64> = (1..=n).collect();
    wait_for(
        &format!("messages 1..={n} in every room at every connection"),
        TAKEOVER + WAIT,
        || {
            for conn in conns {
                for room in rooms {
                    let got = room_sequences(stack, conn, room);
                    let prefix = &expected[..got.len().min(expected.len())];
                    assert!(
                        got.len() <= expected.len() && got == prefix,
                        "{conn} in {room}: {got:?} (a repeat, a gap or out of order)"
                    );
                    if got.len() < expected.len() {
                        return None;
                    }
                }
            }
            Some(())
        },
    )
    .await;
}

/// `users` connected, and `rooms` group rooms of all of them, each joined
/// by every connection.
async fn rooms_of(stack: &Stack, users: &[&str], rooms: usize) -> (Vec<String>, Vec<String>) {
    let mut conns = Vec::new();
    for user in users {
        conns.push(stack.connect(user).await);
    }
    let mut ids = Vec::new();
    for _ in 0..rooms {
        let room = stack.group(users[0], &users[1..]).await;
        for conn in &conns {
            stack.join(conn, &room).await;
        }
        ids.push(room);
    }
    (conns, ids)
}

/// Waits until every subscription of `rooms` has its watermark written
/// back at `n` (what a successor would start from).
async fn wait_marks_written(stack: &Stack, rooms: &[String], n: i64) {
    let presence = &stack.adapters.presence;
    let rooms: Vec<&str> = rooms.iter().map(String::as_str).collect();
    wait_for_async("watermarks written back", WAIT, || async {
        let subs = presence.subscribers(&rooms).await.ok()?;
        subs.iter()
            .flatten()
            .all(|s| s.watermark >= n)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_split_the_shards_and_deliver_each_event_once_in_order() {
    const EACH: usize = 6;
    let stack = Arc::new(Stack::build(unlimited).await);
    let nodes = [
        Node::start(&stack),
        Node::start(&stack),
        Node::start(&stack),
    ];
    wait_split(&stack, &nodes.iter().collect::<Vec<_>>(), WAIT).await;

    let users = ["u0", "u1", "u2", "u3", "u4"];
    let (conns, rooms) = rooms_of(&stack, &users, 8).await;
    // Every sender writes to every room at once.
    let mut senders = Vec::new();
    for conn in conns.clone() {
        let (stack, rooms) = (stack.clone(), rooms.clone());
        senders.push(tokio::spawn(async move {
            for i in 0..EACH {
                for room in &rooms {
                    stack.send(&conn, room, &format!("{conn} #{i}")).await;
                }
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let total = (users.len() * EACH) as i64;
    wait_all_delivered(&stack, &conns, &rooms, total).await;
    // Other events, once each: `connected`, and typing to the others.
    stack
        .frame(
            &conns[0],
            json!({"type": "typing", "payload": {"roomId": rooms[3], "isTyping": true}}),
        )
        .await;
    for conn in &conns[1..] {
        stack.gateway.wait_events(conn, "typing", 1).await;
    }
    // A late duplicate would arrive within this.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for conn in &conns {
        assert_eq!(stack.gateway.events(conn, "connected").len(), 1, "{conn}");
        let typing = stack.gateway.events(conn, "typing").len();
        assert_eq!(typing, usize::from(*conn != conns[0]), "{conn}");
    }
    wait_all_delivered(&stack, &conns, &rooms, total).await;

    // Every relay read every envelope, and exactly one handled each.
    let m: Vec<_> = nodes.iter().map(|n| n.metrics.snapshot()).collect();
    let read = m[0].envelopes;
    assert!(m.iter().all(|s| s.envelopes == read), "{m:?}");
    let handled: u64 = m.iter().map(|s| s.envelopes - s.envelopes_not_owned).sum();
    assert_eq!(handled, read, "{m:?}");
    assert!(
        m.iter().filter(|s| s.posts_ok > 0).count() >= 2,
        "the work is spread: {m:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relays_shards_are_taken_over_within_ten_seconds() {
    let stack = Stack::build(unlimited).await;
    let nodes = vec![
        Node::start(&stack),
        Node::start(&stack),
        Node::start(&stack),
    ];
    wait_split(&stack, &nodes.iter().collect::<Vec<_>>(), WAIT).await;
    let (conns, rooms) = rooms_of(&stack, &["alice", "bob", "carol"], 9).await;
    for room in &rooms {
        stack.send(&conns[0], room, "before").await;
    }
    wait_all_delivered(&stack, &conns, &rooms, 1).await;
    wait_marks_written(&stack, &rooms, 1).await;

    // The victim: the relay of the first room (so it has rooms to lose).
    let before = owners(&stack).await;
    let shard_owner = |key: &str| before[lease_shard(key, shards(&stack))].clone();
    let victim_id = shard_owner(&rooms[0]).expect("every shard has an owner");
    let victims_rooms = rooms
        .iter()
        .filter(|r| shard_owner(r).as_deref() == Some(victim_id.as_str()))
        .count();
    let (victims, survivors): (Vec<Node>, Vec<Node>) =
        nodes.into_iter().partition(|n| n.id == victim_id);
    victims.into_iter().for_each(Node::kill);
    let killed = Instant::now();
    // Sent while the victim's shards have no owner: nobody delivers them
    // now, and no later message is sent to trigger a gap fill.
    for room in &rooms {
        stack.send(&conns[1], room, "during the takeover").await;
    }
    // New connections meanwhile, two of them on the victim's shards: each
    // must get its `connected`.
    let mut late = Vec::new();
    let mut on_victim = 0;
    for i in 0..40 {
        let conn = stack.connect(&format!("late{i}")).await;
        if shard_owner(&conn).as_deref() == Some(victim_id.as_str()) {
            on_victim += 1;
        }
        late.push(conn);
        if on_victim == 2 {
            break;
        }
    }
    assert_eq!(on_victim, 2, "connection ids spread over the shards");

    let survivors_ref: Vec<&Node> = survivors.iter().collect();
    wait_split(&stack, &survivors_ref, TAKEOVER).await;
    let takeover = killed.elapsed();
    eprintln!(
        "takeover of a killed relay's shards (it handled {victims_rooms} of {} rooms): {takeover:?}",
        rooms.len()
    );
    assert!(takeover < TAKEOVER, "{takeover:?}");
    assert!(
        owners(&stack)
            .await
            .iter()
            .all(|o| o.as_deref() != Some(victim_id.as_str())),
        "nothing left with the dead relay"
    );
    // What nobody handled during the gap arrives without another message.
    wait_all_delivered(&stack, &conns, &rooms, 2).await;
    for conn in &late {
        stack.gateway.wait_events(conn, "connected", 1).await;
    }
    // Delivery goes on as before.
    for room in &rooms {
        stack.send(&conns[2], room, "after").await;
    }
    wait_all_delivered(&stack, &conns, &rooms, 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_all_delivered(&stack, &conns, &rooms, 3).await;
    for conn in &late {
        assert_eq!(stack.gateway.events(conn, "connected").len(), 1, "{conn}");
    }
    let acquired: u64 = survivors
        .iter()
        .map(|n| n.metrics.snapshot().shards_acquired)
        .sum();
    assert!(acquired >= 64, "start-up and takeover: {acquired}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_relays_take_their_share_without_repeats_or_gaps() {
    const ROUNDS: usize = 40;
    let stack = Arc::new(Stack::build(unlimited).await);
    let first = Node::start(&stack);
    wait_split(&stack, &[&first], WAIT).await;
    let (conns, rooms) = rooms_of(&stack, &["alice", "bob"], 8).await;

    // Messages flow in every room while two more relays join.
    let sender = {
        let (stack, rooms, conn) = (stack.clone(), rooms.clone(), conns[0].clone());
        tokio::spawn(async move {
            for i in 0..ROUNDS {
                for room in &rooms {
                    stack.send(&conn, room, &format!("#{i}")).await;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = Node::start(&stack);
    let joined = wait_split(&stack, &[&first, &second], WAIT).await;
    let third = Node::start(&stack);
    let joined_again = wait_split(&stack, &[&first, &second, &third], WAIT).await;
    eprintln!("rebalanced to 2 relays in {joined:?}, to 3 in {joined_again:?}");
    sender.await.unwrap();
    wait_all_delivered(&stack, &conns, &rooms, ROUNDS as i64).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_all_delivered(&stack, &conns, &rooms, ROUNDS as i64).await;
    let released = first.metrics.snapshot().shards_released;
    assert!(
        released >= 42,
        "the first relay handed its extras over: {released}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_relay_hands_its_shards_over_at_once() {
    let stack = Stack::build(unlimited).await;
    let a = Node::start(&stack);
    let b = Node::start(&stack);
    wait_split(&stack, &[&a, &b], WAIT).await;
    let (conns, rooms) = rooms_of(&stack, &["alice", "bob"], 8).await;
    for room in &rooms {
        stack.send(&conns[0], room, "one").await;
    }
    wait_all_delivered(&stack, &conns, &rooms, 1).await;
    a.stop().await;
    let handover = wait_split(&stack, &[&b], Duration::from_secs(3)).await;
    eprintln!("a stopped relay's shards taken over in {handover:?}");
    for room in &rooms {
        stack.send(&conns[1], room, "two").await;
    }
    wait_all_delivered(&stack, &conns, &rooms, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_all_delivered(&stack, &conns, &rooms, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_leased_to_someone_else_is_not_handled_until_it_is_free() {
    let stack = Stack::build(unlimited).await;
    let conns = [stack.connect("alice").await, stack.connect("bob").await];
    let rooms = [stack.group("alice", &["bob"]).await];
    let room = &rooms[0];
    let shard = lease_shard(room, shards(&stack));
    let lease = stack.keys().relay_lease(shard);
    let mut redis = stack.redis().await;
    let _: () = redis::cmd("SET")
        .arg(&lease)
        .arg("another-relay")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    let node = Node::start(&stack);
    wait_for("the relay holding every other shard", WAIT, || {
        (node.metrics.snapshot().shards_owned == shards(&stack) as u64 - 1).then_some(())
    })
    .await;
    // The joins' `roomJoined`s go by the room too: not ours either.
    for conn in &conns {
        stack.join_frame(conn, room).await;
    }
    stack.send(&conns[0], room, "not ours").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(room_sequences(&stack, &conns[1], room), Vec::<i64>::new());
    assert!(stack.gateway.events(&conns[1], "roomJoined").is_empty());
    assert!(node.metrics.snapshot().envelopes_not_owned >= 3);

    // The other owner goes away: the relay takes the shard and catches up.
    let _: () = redis::cmd("DEL")
        .arg(&lease)
        .query_async(&mut redis)
        .await
        .unwrap();
    wait_all_delivered(&stack, &conns, &rooms, 1).await;
    // Each got its `roomJoined` first, then the message.
    for conn in &conns {
        let kinds: Vec<Value> = stack
            .gateway
            .posts(conn)
            .iter()
            .map(|p| serde_json::from_str::<Value>(p).unwrap()["type"].clone())
            .filter(|kind| kind != "connected")
            .collect();
        assert_eq!(kinds, ["roomJoined", "message"], "{conn}");
    }
    let owner: Option<String> = redis::cmd("GET")
        .arg(&lease)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(owner.as_deref(), Some(node.id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_relay_sweeps_an_expired_connection() {
    let stack = Stack::build(|vars| {
        unlimited(vars);
        vars.insert("PRESENCE_TTL_SECONDS".into(), "1".into());
    })
    .await;
    let nodes = [Node::start(&stack), Node::start(&stack)];
    wait_split(&stack, &nodes.iter().collect::<Vec<_>>(), WAIT).await;
    let gone = stack.connect("bob").await;
    wait_for("the expired connection closed", WAIT, || {
        stack.gateway.deletes().contains(&gone).then_some(())
    })
    .await;
    // Another sweep round of both relays.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deletes = stack.gateway.deletes();
    assert_eq!(
        deletes.iter().filter(|d| **d == gone).count(),
        1,
        "{deletes:?}"
    );
    let swept: HashMap<&str, u64> = nodes
        .iter()
        .map(|n| (n.id.as_str(), n.metrics.snapshot().swept))
        .collect();
    assert_eq!(swept.values().sum::<u64>(), 1, "{swept:?}");
}
