//! A `REDIS_URL` that points at a Redis Cluster node is refused at start-up
//! with the reason, instead of every script failing later with `CROSSSLOT`
//! or `MOVED` (issue 18: "nothing warns about it"). The node is a real
//! `redis-server --cluster-enabled yes` on a free port; without
//! `redis-server` on `PATH` the test fails, saying so (it never skips).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chat_shared::presence::connect_redis;
use chat_test_support::redis_url;
use secrecy::SecretString;

/// A private redis-server, killed on drop.
struct Node(Child, std::path::PathBuf);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn free_port() -> u16 {
    // Under 55536: a cluster node also listens on port + 10000.
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < 55_536 {
            return port;
        }
    }
}

async fn cluster_node() -> (Node, String) {
    let dir = std::env::temp_dir().join(format!(
        "chat-cluster-refused-{}",
        chat_test_support::random_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("redis-server could not be started ({e}): install Redis 7 (apt-get install redis-server)"));
    let node = Node(child, dir);
    let url = format!("redis://127.0.0.1:{port}");
    for _ in 0..100 {
        if let Ok(client) = redis::Client::open(url.as_str()) {
            if client.get_multiplexed_async_connection().await.is_ok() {
                return (node, url);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the cluster node on {url} did not answer within 5 s");
}

#[tokio::test]
async fn a_cluster_node_is_refused_at_start_up_with_the_reason() {
    let (_node, url) = cluster_node().await;
    let err = connect_redis(&SecretString::from(url))
        .await
        .expect_err("a cluster node must be refused");
    let text = format!("{err:#}");
    assert!(text.contains("Redis Cluster"), "{text}");
    assert!(text.contains("replication-group"), "{text}");
}

#[tokio::test]
async fn a_single_redis_is_accepted() {
    connect_redis(&SecretString::from(redis_url()))
        .await
        .expect("the suite's own Redis is a single node");
}
