//! The local stack: REST, `/health`, the API Gateway WebSocket emulator
//! (with the real `$connect` / `$default` / `$disconnect` handlers) and,
//! by default, the relay, in one process. Clients use one port; the
//! Management API (SigV4) and `/metrics` are on a second, internal one
//! (loopback by default), never on the client port.
//!
//! Flags pick parts, so several gateways and a separate relay can run side
//! by side against one PostgreSQL and one Redis, as they do in AWS.
//!
//! # Layout
//! - [`Stack::start`]: builds the clients once and serves the parts asked for;
//!   [`Stack::start_with`] takes [`Options`] too.
//! - [`Parts`]: which parts run in this process.
//! - [`settings`]: [`LocalSettings`], what only the local stack reads
//!   (`PORT`, `GATEWAY_*`), beside `chat-shared`'s [`Config`].
//! - [`apply_retention`]: the retention sweep `chat-local serve` runs at
//!   start-up.
//! - [`console`]: the developer console (`/console`, `/console/ops`) and its
//!   local-only endpoints.
//! - [`metrics`]: `GET /metrics` in the Prometheus text format.
//! - [`client`]: the interactive WebSocket client of `chat-local chat`.
//! - [`lambdas`]: `chat-local lambdas`, the emulators in front of the
//!   function binaries (the deployed shape, `scripts/lambda-local.sh`).

pub mod client;
pub mod console;
pub mod lambdas;
pub mod metrics;
pub mod settings;

pub use settings::LocalSettings;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use chat_gateway::{EdgeListener, Gateway, Handlers};
use chat_relay::{RelayMetrics, RelayOptions};
use chat_shared::ws::{self, WsState};
use chat_shared::{Config, bootstrap, http, store};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::console::{ConsoleState, DevTokens};
use crate::metrics::Telemetry;

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

/// Settings of the local stack beyond its [`Parts`]. The defaults are what
/// a production-like run wants: nothing extra.
#[derive(Debug, Default)]
pub struct Options {
    /// Serve `POST /console/dev-token`, which mints a token for any user id
    /// with `JWT_SECRET`. Only for a developer's own machine: anyone who
    /// reaches the port can then act as anyone. Off unless asked for
    /// (`chat-local serve --dev-tokens`, which `scripts/dev.sh` passes).
    pub dev_tokens: bool,
    /// Serve `GET /metrics` on this listener too. For a stack without a
    /// gateway (`chat-local relay --metrics-listen`); a gateway serves
    /// `/metrics` on its management listener anyway.
    pub metrics_listener: Option<TcpListener>,
    /// Where the gateway serves the Management API and `/metrics`
    /// (`GATEWAY_MANAGEMENT_LISTEN`); `127.0.0.1:0` when not given.
    pub management_listener: Option<TcpListener>,
}

/// A running stack.
pub struct Stack {
    /// Where REST, `/health` and `/ws` answer (when the gateway runs).
    pub addr: Option<SocketAddr>,
    /// The emulator, for its counters and for tests.
    pub gateway: Option<Gateway>,
    /// The relay's counters, when the relay runs in this process.
    pub relay: Option<Arc<RelayMetrics>>,
    /// Where `/metrics` answers on [`Options::metrics_listener`].
    pub metrics_addr: Option<SocketAddr>,
    /// Where the gateway's Management API (SigV4) and `/metrics` answer.
    pub management_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

/// Serves `app` on the client port behind the edge limits. On `shutdown`
/// the gateway's sockets close first (with 1001; `$disconnect` runs for
/// each), or graceful shutdown would wait for them forever.
pub(crate) fn serve_client_port(
    listener: TcpListener,
    app: axum::Router,
    settings: &LocalSettings,
    gateway: Gateway,
    shutdown: CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    let listener = EdgeListener::new(listener, settings.edge_limits()).tap_io(|_| ());
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            shutdown.cancelled().await;
            gateway.shutdown().await;
        })
        .await
        .context("serving")
    })
}

/// Serves a loopback-only port (the Management API and `/metrics`) until
/// `shutdown`; `what` names it in the error.
pub(crate) fn serve_internal(
    listener: TcpListener,
    app: axum::Router,
    shutdown: CancellationToken,
    what: &'static str,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .with_context(|| format!("serving {what}"))
    })
}

/// Serves the emulator's internal port: its Management API, `metrics`
/// (`/metrics`) and `/health`, which answers here even while the client
/// port is full (the file-descriptor reserve).
pub(crate) fn serve_management_port(
    listener: TcpListener,
    gateway: &Gateway,
    metrics: axum::Router,
    shutdown: CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    let internal = gateway
        .management_router()
        .merge(metrics)
        .route("/health", axum::routing::get(|| async { "ok" }));
    serve_internal(listener, internal, shutdown, "the Management API")
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
    /// Starts the parts in `parts` with the default [`Options`]; the
    /// gateway serves on `listener`, as `settings` say.
    ///
    /// # Errors
    /// When Redis does not answer or a URL is invalid.
    pub async fn start(
        config: &Config,
        settings: &LocalSettings,
        listener: Option<TcpListener>,
        parts: Parts,
    ) -> anyhow::Result<Self> {
        Self::start_with(config, settings, listener, parts, Options::default()).await
    }

    /// Starts the parts in `parts` with `options`; the gateway serves on
    /// `listener` (REST, `/health`, `/ws` and the console) and on its
    /// management listener (the Management API and `/metrics`), with the
    /// stage and limits of `settings` (which a stack without a gateway
    /// does not use).
    ///
    /// # Errors
    /// When Redis does not answer or a URL is invalid.
    pub async fn start_with(
        config: &Config,
        settings: &LocalSettings,
        listener: Option<TcpListener>,
        parts: Parts,
        options: Options,
    ) -> anyhow::Result<Self> {
        let ws_state = bootstrap::ws_state(&config.handlers()).await?;
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut addr = None;
        let mut gateway = None;
        let mut management_addr = None;
        let management_listener = if parts.gateway {
            let listener = match options.management_listener {
                Some(listener) => listener,
                None => TcpListener::bind("127.0.0.1:0")
                    .await
                    .context("binding the management listener")?,
            };
            management_addr = Some(listener.local_addr()?);
            Some(listener)
        } else {
            None
        };
        // The relay is built first so the gateway's `/metrics` and ops
        // view can read its counters. In one process with the gateway it
        // may call that gateway's endpoint.
        let relay = if parts.relay {
            let mut relay_options = RelayOptions::from_config(&config.relay_process());
            if let Some(management) = management_addr {
                relay_options.endpoints = relay_options
                    .endpoints
                    .allowing(format!("http://{management}/{}", settings.gateway.stage));
            }
            Some(chat_relay::Relay::with_options(&config.relay_process(), relay_options).await?)
        } else {
            None
        };
        let relay_metrics = relay.as_ref().map(chat_relay::Relay::metrics);
        if parts.gateway {
            let listener = listener.context("the gateway needs a listener")?;
            addr = Some(listener.local_addr()?);
            let app_state = http::AppState {
                chat: ws_state.realtime.chat().clone(),
                verifier: Arc::clone(&ws_state.verifier),
                max_waiting: config.api.pg_max_waiting,
            };
            let management_listener =
                management_listener.context("the gateway needs a management listener")?;
            let emulator = Gateway::new(
                settings.gateway_config(config, management_listener.local_addr()?),
                handlers(ws_state.clone()),
            );
            let telemetry = Telemetry {
                instance_id: config.common.instance_id.clone(),
                gateway: Some(emulator.clone()),
                relay: relay_metrics.clone(),
            };
            let console = console::router(ConsoleState {
                verifier: Arc::clone(&ws_state.verifier),
                chat: app_state.chat.clone(),
                telemetry: telemetry.clone(),
                dev_tokens: options
                    .dev_tokens
                    .then(|| Arc::new(DevTokens::from_config(config))),
            });
            tasks.push(serve_management_port(
                management_listener,
                &emulator,
                metrics::router(telemetry),
                shutdown.clone(),
            ));
            let app = http::app(app_state)
                .merge(emulator.router())
                .merge(console)
                // Oversized request lines and headers get a clear 414 / 431
                // (REST, /health and the WebSocket handshake alike).
                .layer(axum::middleware::from_fn(http::limit_request_head));
            tasks.push(serve_client_port(
                listener,
                app,
                settings,
                emulator.clone(),
                shutdown.clone(),
            ));
            gateway = Some(emulator);
        }
        let mut metrics_addr = None;
        if let Some(listener) = options.metrics_listener {
            metrics_addr = Some(listener.local_addr()?);
            let app = metrics::router(Telemetry {
                instance_id: config.common.instance_id.clone(),
                gateway: gateway.clone(),
                relay: relay_metrics.clone(),
            });
            tasks.push(serve_internal(listener, app, shutdown.clone(), "/metrics"));
        }
        if let Some(relay) = relay {
            let stop = shutdown.clone();
            tasks.push(tokio::spawn(async move { relay.run(stop).await }));
        }
        Ok(Self {
            addr,
            gateway,
            relay: relay_metrics,
            metrics_addr,
            management_addr,
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

/// Applies `MESSAGE_RETENTION` to every room once and returns how many
/// messages went. Sends only delete what they push out of their room's
/// window, so this removes the surplus left when the setting was lowered
/// since the last start; `chat-local serve` runs it in the background at
/// start-up, as the maintenance Lambda does on a schedule in AWS.
///
/// # Errors
/// When `DATABASE_URL` is invalid or PostgreSQL fails.
pub async fn apply_retention(config: &Config) -> anyhow::Result<u64> {
    let common = &config.common;
    let pool = store::connect_pool(&common.database_url, 1)?;
    let store = store::Store::new(pool, common.message_retention);
    Ok(store.cleanup_all(common.message_retention).await?)
}
