//! The relay's two ways to the emulator's Management API deliver alike: the
//! AWS SDK (the default, the path AWS runs: SigV4, timeouts, error mapping)
//! and the pipelined local client (`RELAY_LOCAL_FAST_PATH=true`).

use crate::common;

use chat_test_support::TestEnv;
use common::*;

async fn exchange(fast_path: bool) {
    let mut env = TestEnv::new().await;
    env.set(
        "RELAY_LOCAL_FAST_PATH",
        if fast_path { "true" } else { "false" },
    );
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.direct("alice", "bob").await;
    // `connected` itself comes through the relay's posts.
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    alice.join(&room).await;
    bob.join(&room).await;
    for i in 0..20 {
        alice.say(&room, &format!("m{i}")).await;
    }
    let events = bob.collect_until("message", 20).await;
    assert_eq!(
        sequence_ids(&events),
        (1..=20).collect::<Vec<_>>(),
        "fast path: {fast_path}"
    );
    // Bob's socket drops; the offline update reaches alice through the
    // same path.
    drop(bob);
    let offline = alice.wait_for("presenceUpdate").await;
    assert_eq!(offline["status"], "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_path_is_the_default_and_delivers() {
    exchange(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_local_path_delivers_alike() {
    exchange(true).await;
}
