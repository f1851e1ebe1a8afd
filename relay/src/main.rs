//! `relay`: the relay service binary (ECS Fargate in AWS, a container in
//! `docker-compose.local.yml`). Reads the configuration, builds the clients
//! once and runs [`chat_relay::Relay`] until SIGTERM or ctrl-c.

use anyhow::Context as _;
use chat_relay::Relay;
use chat_shared::{Config, telemetry};
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc, measured as in `chat-local`'s
/// `main.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    chat_shared::bootstrap::runtime()
        .context("building the runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    telemetry::init(config.log_format, &config.log_filter);
    let relay = Relay::new(&config).await?;
    let shutdown = CancellationToken::new();
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
