//! The local stack: REST, `/health`, the API Gateway WebSocket emulator
//! (with the real `$connect` / `$default` / `$disconnect` handlers) and,
//! by default, the relay, in one process on one port.
//!
//! Flags pick parts, so several gateways and a separate relay can run side
//! by side against one PostgreSQL and one Redis, as they do in AWS.
//!
//! # Layout
//! - [`Stack::start`]: builds the clients once and serves the parts asked for.
//! - [`Parts`]: which parts run in this process.
//! - [`client`]: the interactive WebSocket client of `chat-local chat`.

pub mod client;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use chat_gateway::{Gateway, GatewayConfig, Handlers};
use chat_shared::ws::{self, WsState};
use chat_shared::{Config, bootstrap, http};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Which parts of the stack this process runs.
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    /// REST, `/health` and the WebSocket gateway on the listener.
    pub gateway: bool,
    /// The relay (pub/sub → PostToConnection) and the presence sweeper.
    pub relay: bool,
}

impl Default for Parts {
    fn default() -> Self {
        Self {
            gateway: true,
            relay: true,
        }
    }
}

/// A running stack.
pub struct Stack {
    /// Where REST, `/health` and `/ws` answer (when the gateway runs).
    pub addr: Option<SocketAddr>,
    /// The emulator, for its counters and for tests.
    pub gateway: Option<Gateway>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

/// The emulator's settings from the configuration.
pub fn gateway_config(config: &Config) -> GatewayConfig {
    GatewayConfig {
        stage: config.gateway.stage.clone(),
        max_message_bytes: config.gateway.max_message_bytes,
        max_frame_bytes: config.gateway.max_frame_bytes,
        idle_timeout: config.gateway.idle_timeout,
        max_lifetime: config.gateway.max_lifetime,
        instance_id: config.instance_id.clone(),
        ..GatewayConfig::default()
    }
}

/// The three route integrations, calling the real Lambda handlers.
pub fn handlers(state: WsState) -> Handlers {
    let (s1, s2, s3) = (state.clone(), state.clone(), state);
    Handlers::new(
        move |event| {
            let state = s1.clone();
            async move { ws::handle_connect(&state, event).await }
        },
        move |event| {
            let state = s2.clone();
            async move { ws::handle_default(&state, event).await }
        },
        move |event| {
            let state = s3.clone();
            async move { ws::handle_disconnect(&state, event).await }
        },
    )
}

impl Stack {
    /// Starts the parts in `parts`; the gateway serves on `listener`.
    ///
    /// # Errors
    /// When Redis does not answer or a URL is invalid.
    pub async fn start(
        config: &Config,
        listener: Option<TcpListener>,
        parts: Parts,
    ) -> anyhow::Result<Self> {
        let ws_state = bootstrap::ws_state(config).await?;
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut addr = None;
        let mut gateway = None;
        if parts.gateway {
            let listener = listener.context("the gateway needs a listener")?;
            addr = Some(listener.local_addr()?);
            let app_state = http::AppState {
                chat: ws_state.realtime.chat().clone(),
                verifier: Arc::clone(&ws_state.verifier),
                max_waiting: config.pg_max_waiting,
            };
            let emulator = Gateway::new(gateway_config(config), handlers(ws_state.clone()));
            let app = http::app(app_state).merge(emulator.router());
            let stop = shutdown.clone();
            let closing = emulator.clone();
            tasks.push(tokio::spawn(async move {
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async move {
                    stop.cancelled().await;
                    // Close the sockets first (with 1001, running
                    // $disconnect), or graceful shutdown would wait for
                    // them forever.
                    closing.shutdown().await;
                })
                .await
                .context("serving")
            }));
            gateway = Some(emulator);
        }
        if parts.relay {
            let relay = chat_relay::Relay::new(config).await?;
            let stop = shutdown.clone();
            tasks.push(tokio::spawn(async move { relay.run(stop).await }));
        }
        Ok(Self {
            addr,
            gateway,
            shutdown,
            tasks,
        })
    }

    /// Stops every part gracefully: sockets close with 1001, the relay
    /// drains its in-flight pushes.
    ///
    /// # Errors
    /// When a part failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until every part has stopped (after [`Stack::stop`], or a
    /// failure).
    ///
    /// # Errors
    /// When a part failed.
    pub async fn wait(self) -> anyhow::Result<()> {
        for task in self.tasks {
            task.await.context("a stack task panicked")??;
        }
        Ok(())
    }

    /// A token that stops the stack when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}
