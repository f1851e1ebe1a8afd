//! `relay`: the relay service binary (ECS Fargate in AWS, a container in
//! `docker-compose.local.yml`). Reads the configuration, builds the clients
//! once and runs [`chat_relay::Relay`] until SIGTERM or ctrl-c, with its
//! health endpoint ([`chat_relay::health`]).
//!
//! `relay health` is the container health check: it asks a running relay's
//! endpoint and exits 0 when it is healthy, 1 when not.

use anyhow::Context as _;
use chat_relay::{Relay, health};
use chat_shared::config::RelayProcessConfig;
use chat_shared::telemetry;
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc, measured as in `chat-local`'s
/// `main.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let runtime = chat_shared::bootstrap::runtime().context("building the runtime")?;
    match std::env::args().nth(1).as_deref() {
        None => runtime.block_on(run()),
        Some("health") => {
            let healthy = runtime.block_on(health::check(health::listen_addr()?));
            std::process::exit(if healthy { 0 } else { 1 })
        }
        Some(other) => anyhow::bail!("unknown argument {other:?}; usage: relay [health]"),
    }
}

async fn run() -> anyhow::Result<()> {
    let config = RelayProcessConfig::from_env()?;
    telemetry::init(config.common.log_format, &config.common.log_filter);
    let health_addr = health::listen_addr()?;
    let relay = Relay::new(&config).await?;
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(health_addr)
        .await
        .with_context(|| format!("binding the health endpoint on {health_addr}"))?;
    tokio::spawn(health::serve(
        listener,
        relay.presence().clone(),
        shutdown.clone(),
    ));
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    relay.run(shutdown).await.context("relay")
}

/// Cancels `shutdown` on SIGTERM (what ECS sends) or ctrl-c.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; ctrl-c only");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    shutdown.cancel();
}
