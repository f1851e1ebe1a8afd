//! Redis Cluster under failure: a primary killed with SIGKILL while
//! messages flow (its replica is promoted), and a resharding
//! (`redis-cli --cluster reshard`) while messages flow.
//!
//! Each test starts a private cluster of its own (3 primaries, 3 replicas,
//! `scripts/redis-cluster.sh` on free ports) and stops it at the end: the
//! shared test Redis (or cluster) is never touched. Guarantees checked:
//! every acknowledged message (`201` from `POST /messages`) reaches the
//! other member exactly once; delivery resumes, and presence converges,
//! within 10 s of the fault. Both times are printed (`--nocapture`).
//!
//! Built and run only with `--features cluster-faults`: the cluster step
//! of `scripts/test.sh`. Needs `redis-server` and `redis-cli` (that step
//! installs them); fails, never skips, without them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chat_test_support::stack as common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_shared::presence::keys::partition_of;
use chat_test_support::TestEnv;
use common::{Client, TestStack, token, try_http, wait_relays};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// What a fault may cost at most: until delivery resumes, and until
/// presence converges.
const BOUND: Duration = Duration::from_secs(10);

/// A private Redis Cluster, stopped on drop.
struct LocalCluster {
    base: u16,
    dir: PathBuf,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/redis-cluster.sh")
}

/// A base port whose six ports and their cluster-bus ports (+10000) are
/// free.
fn free_base() -> u16 {
    let seed = std::process::id() as u64 ^ chrono::Utc::now().timestamp_subsec_nanos() as u64;
    for i in 0..200u64 {
        let base = 20_000 + ((seed.wrapping_mul(7919) + i * 97) % 3000) as u16;
        let free = (0..6).all(|k| {
            std::net::TcpListener::bind(("127.0.0.1", base + k)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", base + k + 10_000)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no six free ports for a private Redis Cluster");
}

impl LocalCluster {
    fn start() -> Self {
        let base = free_base();
        let dir = std::env::temp_dir().join(format!("chat-cluster-{base}-{}", std::process::id()));
        let out = std::process::Command::new("bash")
            .arg(script())
            .arg("start")
            .env("REDIS_CLUSTER_BASE_PORT", base.to_string())
            .env("REDIS_CLUSTER_DIR", &dir)
            .output()
            .expect("bash runs scripts/redis-cluster.sh");
        assert!(
            out.status.success(),
            "scripts/redis-cluster.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { base, dir }
    }

    fn urls(&self) -> String {
        (0..6)
            .map(|k| format!("redis://127.0.0.1:{}", self.base + k))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A plain connection to one node.
    async fn node(port: u16) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("URL")
            .get_multiplexed_async_connection()
            .await
            .expect("node answers")
    }

    /// The primary (id, port) that serves `key`'s slot, asked of a live
    /// node.
    async fn primary_of(&self, key: &str, ask: u16) -> (String, u16) {
        let mut conn = Self::node(ask).await;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("KEYSLOT");
        self.primaries(ask)
            .await
            .into_iter()
            .find(|(_, _, ranges)| ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|(id, port, _)| (id, port))
            .expect("a primary serves every slot")
    }

    /// The primaries: id, port, slot ranges (from `CLUSTER NODES`).
    async fn primaries(&self, ask: u16) -> Vec<(String, u16, Vec<(i64, i64)>)> {
        let mut conn = Self::node(ask).await;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .expect("CLUSTER NODES");
        nodes
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("ip:port@bus");
                let ranges = f[8..]
                    .iter()
                    .filter(|r| !r.starts_with('['))
                    .map(|r| match r.split_once('-') {
                        Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                        None => (r.parse().unwrap(), r.parse().unwrap()),
                    })
                    .collect();
                (f[0].to_owned(), port, ranges)
            })
            .collect()
    }

    /// SIGKILLs the node on `port`.
    async fn kill(&self, port: u16) {
        let mut conn = Self::node(port).await;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .expect("INFO");
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .map(|p| p.trim().to_owned())
            .expect("process_id");
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -KILL {pid}");
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(script())
            .arg("stop")
            .env("REDIS_CLUSTER_BASE_PORT", self.base.to_string())
            .env("REDIS_CLUSTER_DIR", &self.dir)
            .output();
    }
}

/// `POST path` as `user`; `None` when no whole answer came (the cluster
/// is failing over).
async fn try_post(addr: SocketAddr, path: &str, user: &str, body: &Value) -> Option<(u16, Value)> {
    let reply = try_http(
        addr,
        "POST",
        path,
        Some(&token(user)),
        Some(body),
        Duration::from_secs(15),
    )
    .await?;
    Some((reply.status.as_u16(), reply.body))
}

/// `GET /rooms/:id/online` as `user`, without panicking.
async fn try_online(addr: SocketAddr, room: &str, user: &str) -> Option<Vec<String>> {
    let path = format!("/api/v1/chat/rooms/{room}/online");
    let reply = try_http(
        addr,
        "GET",
        &path,
        Some(&token(user)),
        None,
        Duration::from_secs(5),
    )
    .await?;
    Some(
        reply.body["onlineUsers"]
            .as_array()?
            .iter()
            .filter_map(|u| u["userId"].as_str().or(u.as_str()).map(str::to_owned))
            .collect(),
    )
}

/// What the sender and the reader saw.
#[derive(Default)]
struct Traffic {
    /// Acknowledged sends: sequence id → when the send started.
    acked: BTreeMap<i64, Instant>,
    /// Sends that got no `201` (allowed during a fault): when they started.
    failed: Vec<Instant>,
    /// Sequence ids delivered to the reader, with when, in arrival order.
    delivered: Vec<(i64, Instant)>,
}

/// A user in the room's partition (so their presence lives on the same
/// shard as the room), named `prefix` and a number.
fn user_in_partition_of(room: &str, prefix: &str) -> String {
    (0..100_000)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| partition_of(u) == partition_of(room))
        .expect("every partition has users")
}

/// The scenario of both tests: a room of alice and bob (and carol, in the
/// room's partition, offline), alice sending over REST, bob reading over
/// WebSocket; `fault` runs once traffic flows and returns the instant the
/// bounds count from (a kill: when it happened; a resharding, which takes
/// a while with messages flowing: when it ended). Then carol connects; delivery resumption and presence
/// convergence are timed from the fault.
async fn under_fault<F, Fut>(name: &str, fault: F)
where
    F: FnOnce(Arc<LocalCluster>, String) -> Fut,
    Fut: std::future::Future<Output = Instant>,
{
    let cluster = Arc::new(LocalCluster::start());
    let mut env = TestEnv::new().await;
    env.set("REDIS_URL", &cluster.urls());
    env.set("REDIS_CLUSTER", "true");
    // Keep every message: the room gets 40 a second, and the default
    // retention (100 per room) would delete, within a bus outage of 2.5 s,
    // messages the relay then cannot catch up from PostgreSQL (what
    // `recovered: false` tells a rejoining client).
    env.set("MESSAGE_RETENTION", "0");
    let stack = TestStack::all_in_one(&env).await;
    wait_relays(&env, 1).await;
    let addr = stack.addr();
    let room_probe = stack.group("alice", &["bob"]).await;
    let carol = user_in_partition_of(&room_probe, "carol");
    stack.register(&[carol.as_str()]).await;
    let reply = stack
        .post(
            "alice",
            &format!("/rooms/{room_probe}/members"),
            json!({"userIds": [carol]}),
        )
        .await;
    assert!(
        reply.status.as_u16() < 300,
        "adding {carol}: {:?}",
        reply.body
    );
    let room = room_probe;
    let mut bob = Client::connect(&stack, "bob").await;
    bob.join(&room).await;

    let traffic = Arc::new(Mutex::new(Traffic::default()));
    let stop = Arc::new(AtomicBool::new(false));
    // The reader reads until everything acknowledged has arrived (or the
    // wait for it gave up), not merely until the sender stops: deliveries
    // may lag the sends by seconds while the cluster heals.
    let read_all = Arc::new(AtomicBool::new(false));
    let sender = {
        let (traffic, stop, room) = (traffic.clone(), stop.clone(), room.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let started = Instant::now();
                let sent = try_post(
                    addr,
                    &format!("/api/v1/chat/rooms/{room}/messages"),
                    "alice",
                    &json!({"content": format!("m{i}")}),
                )
                .await;
                {
                    let mut t = traffic.lock().unwrap();
                    match sent {
                        Some((201, body)) => {
                            let seq = body["message"]["sequenceId"].as_i64().expect("sequenceId");
                            t.acked.insert(seq, started);
                        }
                        _ => t.failed.push(started),
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let reader = {
        let (traffic, read_all) = (traffic.clone(), read_all.clone());
        tokio::spawn(async move {
            loop {
                let frame =
                    tokio::time::timeout(Duration::from_millis(200), bob.socket.next()).await;
                match frame {
                    Ok(Some(Ok(Message::Text(text)))) => {
                        let event: Value = serde_json::from_str(&text).expect("JSON");
                        if event["type"] == "message" {
                            let seq = event["payload"]["sequenceId"].as_i64().expect("seq");
                            traffic
                                .lock()
                                .unwrap()
                                .delivered
                                .push((seq, Instant::now()));
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(None | Some(Err(_))) => panic!("bob's socket closed"),
                    Err(_) if read_all.load(Ordering::Relaxed) => return bob,
                    Err(_) => {}
                }
            }
        })
    };
    // Traffic flows before the fault.
    wait_until(
        "deliveries before the fault",
        Duration::from_secs(20),
        || traffic.lock().unwrap().delivered.len() >= 20,
    )
    .await;

    let began = fault(cluster.clone(), room.clone()).await;

    // Presence: carol comes online (retrying while the cluster heals) and
    // everyone's view of the room converges on it.
    let presence = {
        let (room, carol) = (room.clone(), carol.clone());
        async move {
            loop {
                let url = stack_ws(addr, &carol);
                if let Ok(Ok((socket, _))) = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio_tungstenite::connect_async(url),
                )
                .await
                {
                    loop {
                        if let Some(online) = try_online(addr, &room, "alice").await
                            && online.iter().any(|u| u == &carol)
                        {
                            return (Instant::now(), socket);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (converged, _carol_socket) = tokio::time::timeout(BOUND * 3, presence)
        .await
        .unwrap_or_else(|_| panic!("{name}: {carol}'s presence never converged"));
    let presence_after = converged - began;

    // Delivery resumes: a message sent after the fault reaches bob.
    wait_until("delivery after the fault", BOUND * 3, || {
        let t = traffic.lock().unwrap();
        t.delivered
            .iter()
            .any(|(seq, _)| t.acked.get(seq).is_some_and(|s| *s > began))
    })
    .await;
    // Keep sending a little longer, then stop and let everything arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    sender.await.expect("sender");
    arrives_within(
        "every acknowledged message delivered",
        Duration::from_secs(30),
        || {
            let t = traffic.lock().unwrap();
            let got: BTreeSet<i64> = t.delivered.iter().map(|(s, _)| *s).collect();
            t.acked.keys().all(|s| got.contains(s))
        },
    )
    .await;
    // Anything more (a duplicate) shows within half a second.
    tokio::time::sleep(Duration::from_millis(500)).await;
    read_all.store(true, Ordering::Relaxed);
    let _bob = reader.await.expect("reader");

    stack.stop().await;
    let t = traffic.lock().unwrap();
    let resumed = t
        .delivered
        .iter()
        .filter(|(seq, _)| t.acked.get(seq).is_some_and(|s| *s > began))
        .map(|(_, at)| *at)
        .min()
        .expect("a message sent after the fault was delivered");
    let delivery_after = resumed - began;
    let mut seen = BTreeSet::new();
    let duplicates: Vec<i64> = t
        .delivered
        .iter()
        .filter(|(s, _)| !seen.insert(*s))
        .map(|(s, _)| *s)
        .collect();
    let lost: Vec<i64> = t
        .acked
        .keys()
        .filter(|s| !seen.contains(s))
        .copied()
        .collect();
    println!(
        "{name}: acknowledged {} messages ({} sends refused during the fault), delivered {}; \
         delivery resumed {} ms and presence converged {} ms after the fault",
        t.acked.len(),
        t.failed.len(),
        t.delivered.len(),
        delivery_after.as_millis(),
        presence_after.as_millis()
    );
    let first = t.acked.values().min().copied().unwrap_or(began);
    assert!(
        lost.is_empty(),
        "{name}: acknowledged but never delivered: {lost:?} (the fault began at +{} ms; \
         those were sent at {:?} ms; the last delivery at {:?} ms)",
        (began - first).as_millis(),
        lost.iter()
            .map(|s| (t.acked[s] - first).as_millis())
            .collect::<Vec<_>>(),
        t.delivered.last().map(|(_, at)| (*at - first).as_millis()),
    );
    assert!(
        duplicates.is_empty(),
        "{name}: delivered twice: {duplicates:?}"
    );
    let order: Vec<i64> = t.delivered.iter().map(|(s, _)| *s).collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "{name}: out of order: {order:?}"
    );
    assert!(
        delivery_after <= BOUND,
        "{name}: delivery resumed after {delivery_after:?}"
    );
    assert!(
        presence_after <= BOUND,
        "{name}: presence converged after {presence_after:?}"
    );
}

fn stack_ws(addr: SocketAddr, user: &str) -> String {
    format!("ws://{addr}/ws?token={}", token(user))
}

/// Whether `check` holds within `within` (the assertions after it say
/// what is missing).
async fn arrives_within(_what: &str, within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !check() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_primary_loses_no_acknowledged_message() {
    under_fault("failover", |cluster, room| async move {
        // The primary of the room's partition: its messages, its
        // subscribers and its bus channel live there.
        let keys = chat_shared::presence::Keys::new("");
        let (_, port) = cluster
            .primary_of(&keys.room_conns(&room), cluster.base)
            .await;
        let began = Instant::now();
        cluster.kill(port).await;
        began
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resharding_loses_no_acknowledged_message() {
    under_fault("resharding", |cluster, room| async move {
        let keys = chat_shared::presence::Keys::new("");
        // redis-cli refuses to reshard while the nodes' views of the slot
        // map still differ (gossip settles a moment after start-up).
        let check = format!("127.0.0.1:{}", cluster.base);
        let settled = Instant::now() + Duration::from_secs(20);
        while !tokio::process::Command::new("redis-cli")
            .args(["--cluster", "check", &check])
            .output()
            .await
            .expect("redis-cli runs")
            .status
            .success()
        {
            assert!(Instant::now() < settled, "the cluster's nodes never agreed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (from, port) = cluster
            .primary_of(&keys.room_conns(&room), cluster.base)
            .await;
        let primaries = cluster.primaries(cluster.base).await;
        // Another primary that serves slots (a node just made a replica
        // may still be listed as a master without any for a moment).
        let (to, _, _) = primaries
            .iter()
            .find(|(id, _, ranges)| *id != from && !ranges.is_empty())
            .expect("another primary");
        let slots: i64 = primaries
            .iter()
            .find(|(id, _, _)| *id == from)
            .map(|(_, _, r)| r.iter().map(|(a, b)| b - a + 1).sum())
            .expect("the source's slots");
        let began = Instant::now();
        // Every slot of the room's primary moves, the room's among them.
        let out = tokio::process::Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{port}")])
            .args(["--cluster-from", &from, "--cluster-to", to])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()
            .await
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster reshard failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let (now_from, _) = cluster
            .primary_of(&keys.room_conns(&room), cluster.base)
            .await;
        assert_eq!(&now_from, to, "the room's slot moved");
        println!(
            "resharding: {slots} slots moved in {} ms (times below count from its end)",
            began.elapsed().as_millis()
        );
        // Messages flowed all through the move (they are checked like the
        // rest); the bounds count from when it ended.
        Instant::now()
    })
    .await;
}

/// Redis round trips per operation: the process's
/// `chat_redis_round_trips_total` (gateway and relay in one process, so a
/// send counts its fan-out too), less the relay's idle background (lease
/// renewals, lag reports), measured first over a quiet second: a REST
/// send, a WebSocket join, a frame's lease renewal (a `ping`).
async fn round_trips_per_operation(redis_url: &str, cluster: bool) -> [f64; 3] {
    const N: usize = 40;
    let mut env = TestEnv::new().await;
    env.set("REDIS_URL", redis_url);
    env.set("REDIS_CLUSTER", if cluster { "true" } else { "false" });
    let stack = TestStack::all_in_one(&env).await;
    wait_relays(&env, 1).await;
    let mut rooms = Vec::new();
    for _ in 0..N {
        rooms.push(stack.group("alice", &["bob"]).await);
    }
    let mut alice = Client::connect(&stack, "alice").await;
    let count = || chat_shared::metrics::round_trips().redis as f64;
    let quiet = Instant::now();
    let before = count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_per_sec = (count() - before) / quiet.elapsed().as_secs_f64();
    let per_op = |before: f64, started: Instant| {
        ((count() - before) - idle_per_sec * started.elapsed().as_secs_f64()) / N as f64
    };

    let (before, started) = (count(), Instant::now());
    for room in &rooms {
        stack.send_rest("alice", room, "hello").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sends = per_op(before, started);

    let (before, started) = (count(), Instant::now());
    for room in &rooms {
        alice.join(room).await;
    }
    let joins = per_op(before, started);

    let (before, started) = (count(), Instant::now());
    for _ in 0..N {
        alice.ping_pong().await;
    }
    let frames = per_op(before, started);
    alice.close().await;
    stack.stop().await;
    [sends, joins, frames]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_trips_per_send_join_and_frame_on_a_cluster_and_a_single_redis() {
    let single = round_trips_per_operation(&chat_test_support::env::redis_url(), false).await;
    let cluster = LocalCluster::start();
    let on_cluster = round_trips_per_operation(&cluster.urls(), true).await;
    // One slot per step: a cluster adds requests only where a step's reads
    // span slots (sent concurrently), never a sequential step. A send adds
    // none; a frame one (the user's revocation, in its own slot); a join
    // one per partition of the members' online flags (here two).
    for (what, s, c, extra) in [
        ("REST send", single[0], on_cluster[0], 0.0),
        ("WebSocket join", single[1], on_cluster[1], 4.0),
        ("frame (lease renewal)", single[2], on_cluster[2], 1.0),
    ] {
        println!("redis round trips per {what}: single {s:.2}, cluster {c:.2}");
        assert!(
            c <= s + extra + 0.3,
            "{what}: {c:.2} on a cluster vs {s:.2} on a single Redis"
        );
    }
}
