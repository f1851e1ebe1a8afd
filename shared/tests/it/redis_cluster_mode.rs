//! A `REDIS_URL` that points at a Redis Cluster node without
//! `REDIS_CLUSTER=true` is refused at start-up with the fix, instead of
//! every script on another slot failing later with `MOVED` (issue 18:
//! "nothing warns about it"). The node is a real `redis-server
//! --cluster-enabled yes` on a free port; without `redis-server` on `PATH`
//! the test fails, saying so (it never skips).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chat_shared::presence::connect_redis;
use chat_shared::redis_conn::RedisTarget;
use chat_test_support::{PrivateRedis, random_suffix, redis_url};
use secrecy::SecretString;

fn single(url: String) -> RedisTarget {
    RedisTarget {
        url: SecretString::from(url),
        cluster: false,
    }
}

#[tokio::test]
async fn a_cluster_node_named_as_a_single_redis_is_refused_with_the_fix() {
    // Its own cluster state file: the node writes one into --dir.
    let nodes = format!("chat-test-nodes-{}.conf", random_suffix());
    let node =
        PrivateRedis::start_with(&["--cluster-enabled", "yes", "--cluster-config-file", &nodes])
            .await;
    let refused = connect_redis(&single(node.url())).await;
    let _ = std::fs::remove_file(std::env::temp_dir().join(&nodes));
    let text = format!("{:#}", refused.expect_err("a cluster node must be refused"));
    assert!(text.contains("Redis Cluster node"), "{text}");
    assert!(text.contains("REDIS_CLUSTER=true"), "{text}");
}

#[tokio::test]
async fn a_single_redis_is_accepted() {
    connect_redis(&single(redis_url()))
        .await
        .expect("the suite's own Redis is a single node");
}
