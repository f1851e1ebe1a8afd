//! The relay's health endpoint and `relay health`, the container health
//! check (ECS task definition, Dockerfile `HEALTHCHECK`).

use std::process::Command;

use chat_relay::health;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::common::Stack;

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

fn relay_health(addr: &str) -> bool {
    Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("health")
        .env("RELAY_HEALTH_LISTEN", addr)
        .status()
        .expect("runs relay health")
        .success()
}

#[tokio::test]
async fn healthy_while_redis_answers_and_the_check_command_says_so() {
    let stack = Stack::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(health::serve(
        listener,
        stack.adapters.presence.clone(),
        shutdown.clone(),
    ));

    let ok = get(addr, "/health").await;
    assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
    assert!(ok.ends_with(r#"{"status":"ok","redis":"ok"}"#), "{ok}");
    let other = get(addr, "/metrics").await;
    assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
    assert!(health::check(addr).await);

    // The container's check command, as ECS and Docker run it.
    let addr_text = addr.to_string();
    let healthy = tokio::task::spawn_blocking(move || relay_health(&addr_text))
        .await
        .unwrap();
    assert!(healthy, "relay health exits 0 for a healthy relay");

    // Nothing listening: unhealthy, exit 1.
    shutdown.cancel();
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    assert!(!health::check(closed_addr).await);
    let unhealthy = tokio::task::spawn_blocking(move || relay_health(&closed_addr.to_string()))
        .await
        .unwrap();
    assert!(!unhealthy, "relay health exits 1 when nothing answers");
    // A bad address is a start-up error, not a healthy answer.
    assert!(
        !tokio::task::spawn_blocking(|| relay_health("not-an-address"))
            .await
            .unwrap()
    );
}
