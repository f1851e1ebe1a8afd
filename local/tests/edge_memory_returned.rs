//! Issue 15, finding 3, second half: memory taken by slow consumers is
//! given back once they are gone. Eight connections that stop reading are
//! fed through the (signed) Management API until the gateway drops them
//! (each outbound queue is bounded at 1 MiB), three rounds in a row, in a
//! process of its own so that its RSS (read with the harness's reader) is
//! this test's.
//!
//! What is measured, honestly: RSS before any slow consumer, at the peak of
//! each round, and after each round's consumers closed. The allocator here
//! is the test binary's (the system allocator; the shipped binary uses
//! mimalloc), and an allocator may keep freed pages for reuse rather than
//! hand them to the kernel at once. So the bounds are two: after each round
//! RSS is back within [`KEPT_BOUND_KB`] of where it started (most of the
//! round's growth given back), and the rounds do not add up (the third
//! round ends within [`DRIFT_BOUND_KB`] of the first): what is kept is
//! reused, not leaked.
//!
//! The same rounds then run against the shipped binary (`chat-local serve`
//! as a child process, on mimalloc), whose RSS is read from `/proc` (after
//! the in-process rounds, not beside them: this process's own RSS would
//! count the feeding). mimalloc keeps the first round's pages for reuse
//! (measured 2026-12-06: +14 MiB at the first peak, +14 MiB after the
//! close, and the next two rounds peaked within 0.6 MiB of the first), so
//! its bounds are what that means: what it keeps is at most about one
//! round ([`SERVE_KEPT_BOUND_KB`]) and later rounds reuse it instead of
//! adding to it ([`DRIFT_BOUND_KB`] between the first round's peak and every
//! later one's peak, and the level after the last round). Whether it gives
//! the first round's pages back at once varies from run to run, so the
//! levels after each round are not compared with each other (a CI run saw
//! +5.5 MiB kept after the first round and +14 MiB after the next two,
//! with every peak within 1 MiB of the first).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chat_test_support::stack as common;
#[path = "support/serve.rs"]
mod serve;

use std::net::SocketAddr;
use std::time::Duration;

use chat_test_support::TestEnv;
use common::{Client, TestStack, feed_until_refused, rss_kb, signed_post};

/// Slow consumers per round.
const SLOW: usize = 8;
/// Rounds.
const ROUNDS: usize = 3;
/// Size of each post (under the 128 KiB message limit).
const POST_BYTES: usize = 100 * 1024;
/// Most RSS may stay above its starting level once a round's consumers
/// closed. A round takes about 10.6 MiB at its peak (8 queues of up to
/// 1 MiB, plus buffers); measured here, about 0.2 MiB stays after the
/// close (2026-12-06: +10,896 kB at the peak, +208 kB after). The bound
/// leaves room for an allocator that keeps some freed pages for reuse,
/// and none for one that keeps the round's memory.
const KEPT_BOUND_KB: u64 = 4 * 1024;
/// Most the level after the last round may exceed the level after the
/// first (and, for the shipped binary, a round's peak the first round's):
/// memory kept is reused, not piled up round after round. Measured over
/// three rounds: +12 kB in process, +0.6 MiB in the shipped binary; a
/// round takes 11-16 MiB.
const DRIFT_BOUND_KB: u64 = 4 * 1024;

/// The shipped binary (mimalloc): most RSS may stay above its starting
/// level after a round, about one round's peak growth (+14 MiB measured)
/// and some slack; two rounds' worth kept would fail.
const SERVE_KEPT_BOUND_KB: u64 = 24 * 1024;

/// A signed PostToConnection; the status code.
/// Feeds every one of `slow` (connections that do not read) until the
/// gateway refuses (429) or finds it gone (410); returns the peak of `rss`.
async fn feed(management: SocketAddr, slow: &[Client], rss: &dyn Fn() -> u64) -> u64 {
    let feeders: Vec<_> = slow
        .iter()
        .map(|client| {
            let id = client.connection_id.clone();
            tokio::spawn(feed_until_refused(management, id, POST_BYTES))
        })
        .collect();
    let mut peak = rss();
    for feeder in feeders {
        let accepted = feeder.await.expect("feeder");
        assert!(accepted >= 10, "only {accepted} accepted before a refusal");
        peak = peak.max(rss());
    }
    peak
}

/// One round in this process: `SLOW` consumers connect, stop reading, are
/// fed until dropped, and are closed. Returns the peak RSS seen (kB).
async fn round(stack: &TestStack, n: usize) -> u64 {
    let gateway = stack.stack.gateway.clone().expect("a gateway");
    let mut slow = Vec::new();
    for i in 0..SLOW {
        slow.push(Client::connect(stack, &format!("slow{n}-{i}")).await);
    }
    let mut peak = feed(stack.management_addr(), &slow, &rss_kb).await;
    // The gateway dropped every one of them (1008).
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while slow
        .iter()
        .any(|c| gateway.connection(&c.connection_id).is_some())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a slow consumer is still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak = peak.max(rss_kb());
    drop(slow);
    peak
}

/// RSS once the process has settled: the lowest of a few readings over a
/// second (freed memory may be returned a moment after the close).
async fn settled(rss: &dyn Fn() -> u64) -> u64 {
    let mut low = u64::MAX;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        low = low.min(rss());
    }
    low
}

async fn settled_rss_kb() -> u64 {
    settled(&rss_kb).await
}

/// Checks one round's figures against the bounds.
fn check_round(who: &str, n: usize, before: u64, peak: u64, after: u64) {
    eprintln!(
        "{who} round {n}: RSS before {before} kB, peak {peak} kB (+{} kB), after close {after} kB (+{} kB)",
        peak.saturating_sub(before),
        after.saturating_sub(before)
    );
    assert!(
        peak.saturating_sub(before) >= 4 * 1024,
        "{who} round {n}: the slow consumers barely took memory (+{} kB): nothing to give back",
        peak.saturating_sub(before)
    );
    assert!(
        after.saturating_sub(before) < KEPT_BOUND_KB,
        "{who} round {n}: RSS stays {} kB above where it started (bound {KEPT_BOUND_KB} kB)",
        after.saturating_sub(before)
    );
}

fn check_drift(who: &str, after: &[u64]) {
    let drift = after[after.len() - 1].saturating_sub(after[0]);
    assert!(
        drift < DRIFT_BOUND_KB,
        "{who}: RSS after the last round is {drift} kB above the first's (bound {DRIFT_BOUND_KB} kB): memory piles up"
    );
}

#[tokio::test]
async fn memory_held_by_slow_consumers_is_given_back_after_they_close() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    // The process's own start-up (pools, first connections) is done.
    let mut warm = Client::connect(&stack, "warm").await;
    warm.ping_pong().await;
    let before = settled_rss_kb().await;

    let mut after = Vec::new();
    for n in 0..ROUNDS {
        let peak = round(&stack, n).await;
        let settled = settled_rss_kb().await;
        check_round("in-process", n, before, peak, settled);
        after.push(settled);
    }
    check_drift("in-process", &after);
    // The process still serves.
    warm.ping_pong().await;
    warm.close().await;
    stack.stop().await;

    shipped_binary_rounds().await;
}

/// The rounds against `chat-local serve` as a child process.
async fn shipped_binary_rounds() {
    let env = TestEnv::new().await;
    let dir = serve::temp_dir("memory-returned");
    let server = serve::Serve::start(&env, &dir, "memory", serve::Options::default()).await;
    let rss = || server.rss_kb();
    let mut warm = server.connect("warm").await;
    warm.ping_pong().await;
    let before = settled(&rss).await;

    let mut after = Vec::new();
    let mut first_peak = None;
    for n in 0..ROUNDS {
        let mut slow = Vec::new();
        for i in 0..SLOW {
            let user = format!("slow{n}-{i}");
            slow.push(server.connect(&user).await);
        }
        let mut peak = feed(server.management, &slow, &rss).await;
        // Dropped (1008): the Management API finds each one gone.
        let deadline = tokio::time::Instant::now() + common::WAIT;
        for client in &slow {
            while signed_post(server.management, &client.connection_id, b"{}").await != 410 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "a slow consumer is still open"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        peak = peak.max(rss());
        drop(slow);
        let settled = settled(&rss).await;
        eprintln!(
            "chat-local serve round {n}: RSS before {before} kB, peak {peak} kB (+{} kB), after close {settled} kB (+{} kB)",
            peak.saturating_sub(before),
            settled.saturating_sub(before)
        );
        let first = *first_peak.get_or_insert(peak);
        assert!(
            peak.saturating_sub(before) >= 4 * 1024 || n > 0,
            "the slow consumers barely took memory (+{} kB)",
            peak.saturating_sub(before)
        );
        assert!(
            settled.saturating_sub(before) < SERVE_KEPT_BOUND_KB,
            "chat-local serve round {n}: RSS stays {} kB above where it started (bound {SERVE_KEPT_BOUND_KB} kB)",
            settled.saturating_sub(before)
        );
        assert!(
            peak.saturating_sub(first) < DRIFT_BOUND_KB,
            "chat-local serve round {n}: peak {} kB above the first round's (bound {DRIFT_BOUND_KB} kB): \
             the memory kept is not reused",
            peak.saturating_sub(first)
        );
        after.push(settled);
    }
    // mimalloc may give a round's pages back or keep them for reuse, and
    // which it does after the first round varies (measured after the first
    // close: +5.5 MiB in one run, +14 MiB in another), so the levels after
    // each round are not compared with each other. What must hold is that
    // the memory kept is what one round took: the level after the last
    // round is within the bound of the first round's peak.
    let last = after[after.len() - 1];
    let first = first_peak.expect("a round ran");
    assert!(
        last.saturating_sub(first) < DRIFT_BOUND_KB,
        "chat-local serve: RSS after the last round is {} kB above the first round's peak \
         (bound {DRIFT_BOUND_KB} kB): memory piles up",
        last.saturating_sub(first)
    );
    warm.ping_pong().await;
    warm.close().await;
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
