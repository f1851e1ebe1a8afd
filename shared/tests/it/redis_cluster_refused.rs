//! A `REDIS_URL` that points at a Redis Cluster node is refused at start-up
//! with the reason, instead of every script failing later with `CROSSSLOT`
//! or `MOVED` (issue 18: "nothing warns about it"). The node is a real
//! `redis-server --cluster-enabled yes` on a free port; without
//! `redis-server` on `PATH` the test fails, saying so (it never skips).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chat_shared::presence::connect_redis;
use chat_test_support::{PrivateRedis, random_suffix, redis_url};
use secrecy::SecretString;

#[tokio::test]
async fn a_cluster_node_is_refused_at_start_up_with_the_reason() {
    // Its own cluster state file: the node writes one into --dir.
    let nodes = format!("chat-test-nodes-{}.conf", random_suffix());
    let node =
        PrivateRedis::start_with(&["--cluster-enabled", "yes", "--cluster-config-file", &nodes])
            .await;
    let refused = connect_redis(&SecretString::from(node.url())).await;
    let _ = std::fs::remove_file(std::env::temp_dir().join(&nodes));
    let text = format!("{:#}", refused.expect_err("a cluster node must be refused"));
    assert!(text.contains("Redis Cluster"), "{text}");
    assert!(text.contains("replication-group"), "{text}");
}

#[tokio::test]
async fn a_single_redis_is_accepted() {
    connect_redis(&SecretString::from(redis_url()))
        .await
        .expect("the suite's own Redis is a single node");
}
