//! Fairness (issue 15, "Degrade everyone else"): one user's greedy and slow
//! connections must not cause refusals for other users. In a process of its
//! own (one test in this file) so that its RSS is this test's.
//!
//! A greedy user floods from nine connections at once (every frame a
//! `sendMessage`, never waiting, as fast as the gateway reads) and holds a
//! tenth connection, joined to the flooded room, that never reads. The
//! admission queue is made small (2 places, 24 waiting) so the flood
//! overflows it many times over. Meanwhile a normal user sends 40
//! messages one after another: every one must be stored and acknowledged,
//! with no `error` at all, while the greedy user is refused (its share of
//! the queue is 12), its silent connection is dropped (1008), and the
//! process's RSS stays under a stated bound.

use chat_test_support::stack as common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chat_test_support::TestEnv;
use common::{Client, TestStack, rss_kb};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Connections flooding (the per-user cap is 10: nine plus the silent one).
const FLOODERS: usize = 9;
/// The normal user's messages, one at a time.
const NORMAL_SENDS: usize = 20;
/// The process's RSS may not grow by more than this during the run: the
/// silent connection's queue (1 MiB at most), 24 queued frames, the
/// flooders' buffers, and the allocator's slack.
const RSS_GROWTH_BOUND_KB: u64 = 128 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_greedy_user_cannot_cause_refusals_for_another() {
    let mut env = TestEnv::new().await;
    env.set("WS_MAX_IN_FLIGHT", "2")
        .set("WS_MAX_QUEUED", "24")
        .set("WS_MAX_QUEUED_PER_USER", "12")
        .set("WS_MAX_QUEUE_WAIT_MS", "5000");
    let stack = TestStack::all_in_one(&env).await;
    let hog_room = stack.group("hog", &["ben"]).await;
    let room = stack.direct("ann", "ben").await;
    let mut ann = Client::connect(&stack, "ann").await;
    let mut ben = Client::connect(&stack, "ben").await;
    ann.join(&room).await;
    ben.join(&room).await;

    // The silent connection: joined to the flooded room, never read again.
    let mut silent = Client::connect(&stack, "hog").await;
    silent.join(&hog_room).await;

    let baseline_kb = rss_kb();
    let stop = Arc::new(AtomicBool::new(false));
    let hog_sent = Arc::new(AtomicU64::new(0));
    let hog_refused = Arc::new(AtomicU64::new(0));
    let hog_stored = Arc::new(AtomicU64::new(0));
    let mut flooders = Vec::new();
    for n in 0..FLOODERS {
        let client = Client::connect(&stack, "hog").await;
        let (mut sink, mut stream) = client.socket.split();
        let (stop, sent, refused, stored) = (
            Arc::clone(&stop),
            Arc::clone(&hog_sent),
            Arc::clone(&hog_refused),
            Arc::clone(&hog_stored),
        );
        let room = hog_room.clone();
        flooders.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let frame = json!({"type": "sendMessage",
                    "payload": {"roomId": room, "content": format!("flood {n}-{i}")}});
                if sink.send(Message::text(frame.to_string())).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
        flooders.push(tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Text(text) = message
                    && let Ok(event) = serde_json::from_str::<Value>(&text)
                {
                    match event["type"].as_str() {
                        Some("error") => refused.fetch_add(1, Ordering::Relaxed),
                        Some("message") => stored.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                }
            }
        }));
    }
    let peak_kb = Arc::new(AtomicU64::new(baseline_kb));
    let sampler = {
        let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak_kb));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kb(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Let the flood fill the queue first.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut refusals = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..NORMAL_SENDS {
        let started = Instant::now();
        let id = format!("ann-{i}");
        if let Err(refusal) = ann.send_and_await(&room, &format!("hello {i}"), &id).await {
            refusals.push(refusal);
        }
        slowest = slowest.max(started.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    for task in flooders {
        task.abort();
    }

    let (sent, refused, stored) = (
        hog_sent.load(Ordering::Relaxed),
        hog_refused.load(Ordering::Relaxed),
        hog_stored.load(Ordering::Relaxed),
    );
    let growth_kb = peak_kb.load(Ordering::Relaxed).saturating_sub(baseline_kb);
    println!(
        "normal user: {NORMAL_SENDS} sends, {} refused, slowest {slowest:?}; \
         greedy user: {sent} frames sent, {stored} stored, {refused} refused; \
         RSS +{growth_kb} kB (bound {RSS_GROWTH_BOUND_KB} kB)",
        refusals.len()
    );
    assert!(
        refusals.is_empty(),
        "the normal user was refused {} times: {refusals:?}",
        refusals.len()
    );
    assert!(
        refused > 0,
        "the flood never overflowed the queue ({sent} sent, {stored} stored): the test proves nothing"
    );
    assert!(
        growth_kb < RSS_GROWTH_BOUND_KB,
        "RSS grew by {growth_kb} kB (bound {RSS_GROWTH_BOUND_KB} kB)"
    );
    // Every message of the normal user is stored, in order.
    let history = stack.history("ann", &room).await;
    let contents: Vec<&str> = history
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    let want: Vec<String> = (0..NORMAL_SENDS).map(|i| format!("hello {i}")).collect();
    assert_eq!(contents, want);
    // The silent connection was dropped as a slow consumer, or is about to
    // be; either way its queue was bounded (RSS above).
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match silent.socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    })
    .await;
    println!("the silent connection: {closed:?}");
    // ben, who shares a room with ann only, got every message too.
    let got = ben.collect_until("message", NORMAL_SENDS).await;
    assert_eq!(
        got.iter().filter(|e| e["type"] == "message").count(),
        NORMAL_SENDS
    );
}
