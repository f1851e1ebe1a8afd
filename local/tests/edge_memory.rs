//! Bounded memory per connection (issue 15, finding 3), in a process of
//! its own so that its RSS is this test's: eight connections that stop
//! reading are fed through the (signed) Management API until the gateway
//! drops them with 1008, the process's RSS stays under a stated bound, and
//! an unrelated pair chats meanwhile without a single refusal.

use chat_test_support::stack as common;

use std::time::Duration;

use chat_test_support::TestEnv;
use common::{Client, TestStack, feed_until_refused, rss_kb};
use serde_json::json;

/// Slow consumers fed at once.
const SLOW: usize = 8;
/// Size of each post (under the 128 KiB message limit).
const POST_BYTES: usize = 100 * 1024;
/// Most the process may grow while they are fed: 8 × (1 MiB of queue +
/// buffers) and the allocator's slack. Before the byte bound, eight such
/// connections took it from 100 MB to 1.26 GB.
const RSS_GROWTH_BOUND_KB: u64 = 96 * 1024;

/// A signed PostToConnection; the status code.
#[tokio::test]
async fn clients_that_do_not_read_are_dropped_and_memory_stays_bounded() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let management = stack.management_addr();
    let room = stack.direct("alice", "bob").await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    alice.join(&room).await;
    bob.join(&room).await;
    let gateway = stack.stack.gateway.clone().expect("a gateway");

    let mut slow = Vec::new();
    for n in 0..SLOW {
        // Connected, then never read again.
        slow.push(Client::connect(&stack, &format!("slow{n}")).await);
    }
    let before = rss_kb();

    let feeders: Vec<_> = slow
        .iter()
        .map(|client| {
            let id = client.connection_id.clone();
            tokio::spawn(feed_until_refused(management, id, POST_BYTES))
        })
        .collect();

    // Meanwhile the unrelated pair chats: every send acknowledged and
    // delivered, none refused.
    for i in 0..20 {
        let content = format!("m{i}");
        alice
            .send(
                "sendMessage",
                json!({"roomId": room, "content": content, "clientMessageId": format!("c-{i}")}),
            )
            .await;
        // The sender's acknowledgement is the `message` itself; a
        // refusal would be an `error`.
        let ack = alice.next().await;
        assert_eq!(ack["type"], "message", "refused: {ack}");
        let message = bob.wait_for("message").await;
        assert_eq!(message["content"], content);
    }

    let mut peak = before;
    for feeder in feeders {
        let accepted = feeder.await.expect("feeder");
        peak = peak.max(rss_kb());
        // 1 MiB of queue, plus what the kernel's socket buffers took.
        assert!(accepted >= 10, "only {accepted} accepted before a refusal");
    }
    // Every slow consumer is gone.
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
    let growth = peak.saturating_sub(before);
    eprintln!("RSS before {before} kB, peak {peak} kB, growth {growth} kB");
    assert!(
        growth < RSS_GROWTH_BOUND_KB,
        "RSS grew {growth} kB (bound {RSS_GROWTH_BOUND_KB} kB)"
    );
    drop(slow);
    stack.stop().await;
}
