//! Finding 4 of issue 15 against the whole local stack, with a normal
//! user measured during the attack (the gateway's own tests,
//! `gateway/tests/it/edge.rs`, check the deadline itself): 400 sockets that
//! never finish their request head hold the client port while a pair
//! chats. The pair gets no refusal at all, `/health` answers, every
//! slowloris socket is closed by the handshake deadline, and the process's
//! RSS stays under a stated bound. In a file of its own so that the RSS is
//! this test's.

use chat_test_support::stack as common;

use std::time::{Duration, Instant};

use chat_test_support::TestEnv;
use common::{Client, TestStack, rss_kb};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Sockets that send half a request head and stop.
const SLOW: usize = 400;
/// The normal user's messages, one after another.
const SENDS: usize = 20;
/// Most the process may grow by: 400 sockets' buffers and tasks, and
/// the allocator's slack.
const RSS_GROWTH_BOUND_KB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pair_chats_unharmed_while_slowloris_sockets_hold_the_port() {
    let mut env = TestEnv::new().await;
    env.set("GATEWAY_HANDSHAKE_TIMEOUT_SECONDS", "2");
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.direct("ann", "ben").await;
    let mut ann = Client::connect(&stack, "ann").await;
    let mut ben = Client::connect(&stack, "ben").await;
    ann.join(&room).await;
    ben.join(&room).await;
    let baseline_kb = rss_kb();

    let opened = Instant::now();
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let mut socket = TcpStream::connect(stack.addr()).await.expect("connect");
        socket
            .write_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
            .await
            .expect("half a head");
        slow.push(socket);
    }
    let mut peak_kb = rss_kb();

    let mut refusals = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..SENDS {
        let started = Instant::now();
        let id = format!("ann-{i}");
        if let Err(refusal) = ann.send_and_await(&room, &format!("hi {i}"), &id).await {
            refusals.push(refusal);
        }
        slowest = slowest.max(started.elapsed());
        peak_kb = peak_kb.max(rss_kb());
    }
    assert_eq!(
        stack.health().await.status,
        200,
        "/health during the attack"
    );

    // Each slowloris socket is closed by the server at the deadline.
    let mut closed = 0;
    for socket in &mut slow {
        let mut buf = [0u8; 512];
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if ended.is_ok() {
            closed += 1;
        }
    }
    let all_closed_after = opened.elapsed();
    let growth_kb = peak_kb.saturating_sub(baseline_kb);
    println!(
        "{SLOW} slowloris sockets: {closed} closed by {all_closed_after:?}; normal user: \
         {SENDS} sends, {} refused, slowest {slowest:?}; RSS +{growth_kb} kB (bound \
         {RSS_GROWTH_BOUND_KB} kB)",
        refusals.len()
    );
    assert!(
        refusals.is_empty(),
        "the normal user was refused: {refusals:?}"
    );
    assert_eq!(closed, SLOW, "every slowloris socket is closed");
    assert!(
        growth_kb < RSS_GROWTH_BOUND_KB,
        "RSS grew by {growth_kb} kB (bound {RSS_GROWTH_BOUND_KB} kB)"
    );
    let got = ben.collect_until("message", SENDS).await;
    assert_eq!(got.iter().filter(|e| e["type"] == "message").count(), SENDS);
}
