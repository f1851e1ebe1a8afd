//! The deployed shape, locally: the API Gateway emulators in front of the
//! real function binaries (`chat-local lambdas`, which
//! `scripts/lambda-local.sh` starts next to `cargo lambda watch`).
//!
//! Nothing here calls a handler in process. On the client port, `/ws` is
//! the WebSocket emulator whose `$connect`, `$default` and `$disconnect`
//! integrations invoke `ws-connect`, `ws-message` and `ws-disconnect`
//! through the Lambda Invoke API ([`chat_gateway::LambdaFunction`]), and
//! `/health` and `/api/v1/*` are the HTTP API emulator invoking `rest`
//! ([`chat_gateway::http_api`]); the console is served as by `chat-local
//! serve`. The internal listener has the Management API (SigV4), which
//! the functions' pushes reach through the relay (a separate `chat-local
//! relay` process on the AWS SDK path), and `/metrics` with each
//! function's invocation counters (`chat_lambda_*`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use chat_gateway::lambda::InvocationStats;
use chat_gateway::{FunctionOptions, Gateway, Handlers, LambdaClient, LambdaFunction, http_api};
use chat_shared::metrics::{CONTENT_TYPE, Exposition, Kind};
use chat_shared::{Config, bootstrap, http};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::LocalSettings;
use crate::console::{self, ConsoleState, DevTokens};
use crate::metrics::Telemetry;

/// The function names the integrations invoke (for `cargo lambda watch`,
/// the binaries' names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionNames {
    /// `$connect`.
    pub connect: String,
    /// `$default`.
    pub default: String,
    /// `$disconnect`.
    pub disconnect: String,
    /// The HTTP API's integration.
    pub rest: String,
}

impl Default for FunctionNames {
    /// The binaries of `functions/`.
    fn default() -> Self {
        Self {
            connect: "ws-connect".into(),
            default: "ws-message".into(),
            disconnect: "ws-disconnect".into(),
            rest: "rest".into(),
        }
    }
}

/// How the emulators reach the functions.
#[derive(Debug, Clone)]
pub struct LambdaOptions {
    /// The Lambda Invoke API, e.g. `http://127.0.0.1:9000` (`cargo lambda
    /// watch --invoke-port 9000`).
    pub invoke_url: String,
    /// Which function each integration invokes.
    pub functions: FunctionNames,
    /// Reserved concurrency and timeout, the same for every function.
    pub function: FunctionOptions,
    /// Serve `POST /console/dev-token` (see [`crate::Options::dev_tokens`]).
    pub dev_tokens: bool,
}

/// The running emulators.
pub struct Emulators {
    /// Where `/ws`, `/health`, `/api/v1` and `/console` answer.
    pub addr: SocketAddr,
    /// Where the Management API and `/metrics` answer.
    pub management_addr: SocketAddr,
    /// The WebSocket emulator.
    pub gateway: Gateway,
    /// The four functions, for their counters.
    pub functions: Vec<LambdaFunction>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Emulators {
    /// Starts both emulators: clients on `listener`, the Management API and
    /// `/metrics` on `management_listener`, with the stage and limits of
    /// `settings`. The console's ops view and dev tokens use PostgreSQL and
    /// Redis from `config`; the integrations only use the Invoke API.
    ///
    /// # Errors
    /// A bad invoke URL, or Redis not answering (the console).
    pub async fn start(
        config: &Config,
        settings: &LocalSettings,
        listener: TcpListener,
        management_listener: TcpListener,
        options: LambdaOptions,
    ) -> anyhow::Result<Self> {
        let client = LambdaClient::new(&options.invoke_url)?;
        let function = |name: &str| client.function(name, options.function);
        let connect = function(&options.functions.connect);
        let default = function(&options.functions.default);
        let disconnect = function(&options.functions.disconnect);
        let rest = function(&options.functions.rest);
        let functions = vec![
            connect.clone(),
            default.clone(),
            disconnect.clone(),
            rest.clone(),
        ];

        let addr = listener.local_addr()?;
        let management_addr = management_listener.local_addr()?;
        let gateway = Gateway::new(
            settings.gateway_config(config, management_addr),
            Handlers::new(connect, default, disconnect),
        );
        let ws_state = bootstrap::ws_state(&config.handlers()).await?;
        let telemetry = Telemetry {
            instance_id: config.common.instance_id.clone(),
            gateway: Some(gateway.clone()),
            relay: None,
        };
        let console = console::router(ConsoleState {
            verifier: Arc::clone(&ws_state.verifier),
            chat: ws_state.realtime.chat().clone(),
            telemetry: telemetry.clone(),
            dev_tokens: options
                .dev_tokens
                .then(|| Arc::new(DevTokens::from_config(config))),
        });

        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        tasks.push(crate::serve_management_port(
            management_listener,
            &gateway,
            metrics_router(telemetry, functions.clone()),
            shutdown.clone(),
        ));

        let app = http_api::router(rest)
            .merge(gateway.router())
            .merge(console)
            .fallback(http_api::not_found)
            .layer(axum::middleware::from_fn(http::limit_request_head));
        tasks.push(crate::serve_client_port(
            listener,
            app,
            settings,
            gateway.clone(),
            shutdown.clone(),
        ));
        Ok(Self {
            addr,
            management_addr,
            gateway,
            functions,
            shutdown,
            tasks,
        })
    }

    /// A token that stops the emulators when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until both listeners have stopped (after the token was
    /// cancelled, or a failure).
    ///
    /// # Errors
    /// When serving failed.
    pub async fn wait(self) -> anyhow::Result<()> {
        for task in self.tasks {
            task.await.context("an emulator task panicked")??;
        }
        Ok(())
    }

    /// Stops both emulators: sockets close with 1001 and each gets its
    /// `$disconnect` invocation.
    ///
    /// # Errors
    /// When serving failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// `FunctionOptions` from seconds and a count, as the command line gives them.
pub fn function_options(reserved_concurrency: usize, timeout_secs: u64) -> FunctionOptions {
    FunctionOptions {
        reserved_concurrency,
        timeout: Duration::from_secs(timeout_secs),
    }
}

#[derive(Clone)]
struct MetricsState {
    telemetry: Telemetry,
    functions: Arc<Vec<LambdaFunction>>,
}

/// `GET /metrics`: the gateway's counters plus, per function,
/// `chat_lambda_invocations_total`, `chat_lambda_errors_total`,
/// `chat_lambda_throttles_total` and `chat_lambda_duration_seconds_total`.
fn metrics_router(telemetry: Telemetry, functions: Vec<LambdaFunction>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .with_state(MetricsState {
            telemetry,
            functions: Arc::new(functions),
        })
}

/// A metric family of [`InvocationStats`]: name, help, value.
type Family = (&'static str, &'static str, fn(&InvocationStats) -> f64);

async fn serve_metrics(State(state): State<MetricsState>) -> impl IntoResponse {
    let mut text = state.telemetry.prometheus();
    let mut out = Exposition::new();
    let families: [Family; 4] = [
        (
            "chat_lambda_invocations_total",
            "Invocations sent to the function through the Invoke API.",
            |s| s.invocations as f64,
        ),
        (
            "chat_lambda_errors_total",
            "Invocations that failed (function error, timeout, bad answer).",
            |s| s.errors as f64,
        ),
        (
            "chat_lambda_throttles_total",
            "Invocations refused over the reserved concurrency.",
            |s| s.throttles as f64,
        ),
        (
            "chat_lambda_duration_seconds_total",
            "Time spent in invocations, sent to answered.",
            |s| s.duration_us as f64 / 1e6,
        ),
    ];
    for (name, help, value) in families {
        out.family(name, help, Kind::Counter);
        for function in state.functions.iter() {
            out.sample(
                name,
                &[("function", function.name())],
                value(&function.stats()),
            );
        }
    }
    text.push_str(&out.finish());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text)
}
