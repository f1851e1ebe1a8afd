//! `chat-local`: the whole stack in one process for development, plus the
//! operational commands.
//!
//! - `serve`: migrations, then REST, `/health`, the WebSocket gateway at
//!   `/ws` and the console at `/console` on `PORT`; the Management API at
//!   `/{stage}/@connections/{id}` (SigV4) and `/metrics` on the internal
//!   management listener (`GATEWAY_MANAGEMENT_LISTEN`, default
//!   127.0.0.1 on the client port + 100); plus the relay (unless
//!   `--no-relay`); `--dev-tokens` lets the console mint tokens.
//! - `lambdas`: the deployed shape's front half: the WebSocket and HTTP API
//!   emulators on `PORT`, invoking the function binaries through a Lambda
//!   Invoke API (`cargo lambda watch`; `scripts/lambda-local.sh` runs it
//!   all), with the Management API and `/metrics` on the internal listener.
//! - `relay`: the relay alone (for side-by-side runs), with `/metrics` on
//!   `--metrics-listen` when given.
//! - `migrate`: applies `migrations/` to `DATABASE_URL` (deployments).
//! - `token`: mints a development token for a user id.
//! - `chat`: an interactive WebSocket client.

use std::net::SocketAddr;

use anyhow::Context as _;
use chat_local::lambdas::{self, Emulators, FunctionNames, LambdaOptions};
use chat_local::{LocalSettings, Options, Parts, Stack};
use chat_shared::auth::{DevClaims, mint_hs256};
use chat_shared::{Config, store, telemetry};
use clap::{Parser, Subcommand};
use secrecy::SecretString;

/// mimalloc rather than glibc's malloc: a profile of the local stack at
/// 4,000 msg/s (perf, S4) showed glibc's malloc, free and consolidation
/// taking about a fifth of the gateway and relay processes' CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "chat-local",
    version,
    about = "Chat & presence backend: local stack and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the local stack (reads DATABASE_URL, REDIS_URL, JWT_SECRET, PORT, ...).
    Serve {
        /// Address to bind (overrides PORT).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Address of the internal listener for the Management API and
        /// /metrics (overrides GATEWAY_MANAGEMENT_LISTEN; default
        /// 127.0.0.1 on the client port + 100). Never expose it.
        #[arg(long)]
        management_listen: Option<SocketAddr>,
        /// Do not apply migrations at start-up.
        #[arg(long)]
        no_migrate: bool,
        /// Do not run the relay in this process (run `chat-local relay`
        /// separately, once for several gateways).
        #[arg(long)]
        no_relay: bool,
        /// Let the console mint tokens for any user id (POST
        /// /console/dev-token). For a developer's own machine only.
        #[arg(long)]
        dev_tokens: bool,
    },
    /// Runs the WebSocket and HTTP API emulators in front of the function
    /// binaries, invoked through a Lambda Invoke API (scripts/lambda-local.sh).
    Lambdas {
        /// The Lambda Invoke API (`cargo lambda watch --invoke-port P`).
        #[arg(
            long,
            env = "LAMBDA_INVOKE_URL",
            default_value = "http://127.0.0.1:9000"
        )]
        invoke_url: String,
        /// Address to bind (overrides PORT).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// The Management API and /metrics (overrides
        /// GATEWAY_MANAGEMENT_LISTEN; default 127.0.0.1 on the client
        /// port + 100). Never expose it.
        #[arg(long)]
        management_listen: Option<SocketAddr>,
        /// Invocations of one function in flight at once (reserved
        /// concurrency); more are throttled. 0: unlimited.
        #[arg(long, env = "LAMBDA_RESERVED_CONCURRENCY", default_value_t = 10)]
        reserved_concurrency: usize,
        /// A function's timeout, seconds (template.yaml: 10).
        #[arg(long, env = "LAMBDA_FUNCTION_TIMEOUT_SECS", default_value_t = 10)]
        function_timeout: u64,
        /// Let the console mint tokens for any user id (as `serve --dev-tokens`).
        #[arg(long)]
        dev_tokens: bool,
    },
    /// Runs only the relay and the presence sweeper.
    Relay {
        /// Serve the relay's counters at GET /metrics (Prometheus text) on
        /// this address, e.g. 127.0.0.1:9100. Off by default.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Applies pending migrations to DATABASE_URL and exits.
    Migrate,
    /// An interactive WebSocket client: chat from a terminal.
    Chat {
        /// Connect as this user (a token is minted with JWT_SECRET).
        user: String,
        /// The stack's WebSocket URL.
        #[arg(long, default_value = "ws://127.0.0.1:3000/ws")]
        url: String,
        /// HS256 secret (defaults to JWT_SECRET).
        #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
        secret: String,
        /// `displayName` claim.
        #[arg(long)]
        display_name: Option<String>,
    },
    /// Prints a signed development token (HS256 with JWT_SECRET).
    Token {
        /// The user id (`sub`).
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: i64,
        /// `username` claim.
        #[arg(long)]
        username: Option<String>,
        /// `displayName` claim.
        #[arg(long)]
        display_name: Option<String>,
        /// `avatar` claim.
        #[arg(long)]
        avatar: Option<String>,
        /// Adds `role: "admin"`.
        #[arg(long)]
        admin: bool,
        /// HS256 secret (defaults to JWT_SECRET).
        #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
        secret: String,
        /// `iss` claim (defaults to JWT_ISSUER).
        #[arg(long, env = "JWT_ISSUER")]
        issuer: Option<String>,
        /// `aud` claim (defaults to JWT_AUDIENCE).
        #[arg(long, env = "JWT_AUDIENCE")]
        audience: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    chat_shared::bootstrap::runtime()
        .context("building the runtime")?
        .block_on(run())
}

/// The configuration from the environment, and tracing as it asks: how
/// every command that runs part of the stack starts.
fn config_and_telemetry() -> anyhow::Result<Config> {
    let config = Config::from_env()?;
    telemetry::init(config.common.log_format, &config.common.log_filter);
    Ok(config)
}

/// As [`config_and_telemetry`], plus the local stack's own settings
/// (`PORT`, `GATEWAY_*`): how every command that runs a gateway starts.
fn config_settings_and_telemetry() -> anyhow::Result<(Config, LocalSettings)> {
    let config = config_and_telemetry()?;
    Ok((config, LocalSettings::from_env()?))
}

/// Binds the client port (`--listen`, else `PORT` on loopback) and the
/// management listener (`--management-listen`, else
/// `GATEWAY_MANAGEMENT_LISTEN`, else the client port + 100 on loopback).
async fn bind_listeners(
    settings: &LocalSettings,
    listen: Option<SocketAddr>,
    management_listen: Option<SocketAddr>,
) -> anyhow::Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
    let addr = listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], settings.port)));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let management_addr = management_listen
        .or(settings.management_listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], addr.port().saturating_add(100))));
    let management_listener = tokio::net::TcpListener::bind(management_addr)
        .await
        .with_context(|| format!("binding {management_addr} (the management listener)"))?;
    Ok((listener, management_listener))
}

async fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            listen,
            management_listen,
            no_migrate,
            no_relay,
            dev_tokens,
        } => {
            let (config, settings) = config_settings_and_telemetry()?;
            if !no_migrate {
                let applied = store::migrate(&config.common.database_url).await?;
                tracing::info!(applied, "migrations up to date");
            }
            let (listener, management_listener) =
                bind_listeners(&settings, listen, management_listen).await?;
            let (addr, management_addr) =
                (listener.local_addr()?, management_listener.local_addr()?);
            let parts = Parts {
                gateway: true,
                relay: !no_relay,
            };
            let options = Options {
                dev_tokens,
                management_listener: Some(management_listener),
                ..Options::default()
            };
            let stack =
                Stack::start_with(&config, &settings, Some(listener), parts, options).await?;
            tokio::spawn({
                let config = config.clone();
                async move {
                    match chat_local::apply_retention(&config).await {
                        Ok(deleted) => tracing::info!(deleted, "retention applied to every room"),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not apply retention at start-up")
                        }
                    }
                }
            });
            tracing::info!(
                %addr,
                %management_addr,
                instance = %config.common.instance_id,
                relay = parts.relay,
                "chat-local listening: REST /api/v1/chat, WebSocket /ws, health /health, \
                 console http://{addr}/console; Management API (SigV4) and metrics at \
                 http://{management_addr}"
            );
            if dev_tokens {
                tracing::warn!(
                    "dev tokens are ON: POST /console/dev-token mints a token for any user \
                     id, admin included; use this only on your own machine"
                );
            }
            run_until_signal(stack).await
        }
        Command::Lambdas {
            invoke_url,
            listen,
            management_listen,
            reserved_concurrency,
            function_timeout,
            dev_tokens,
        } => {
            let (config, settings) = config_settings_and_telemetry()?;
            let (listener, management_listener) =
                bind_listeners(&settings, listen, management_listen).await?;
            let (addr, management_addr) =
                (listener.local_addr()?, management_listener.local_addr()?);
            let options = LambdaOptions {
                invoke_url: invoke_url.clone(),
                functions: FunctionNames::default(),
                function: lambdas::function_options(reserved_concurrency, function_timeout),
                dev_tokens,
            };
            let emulators =
                Emulators::start(&config, &settings, listener, management_listener, options)
                    .await?;
            tracing::info!(
                %addr,
                %management_addr,
                %invoke_url,
                reserved_concurrency,
                "chat-local lambdas listening: HTTP API (rest) /health and /api/v1, WebSocket \
                 API (ws-connect, ws-message, ws-disconnect) /ws, console \
                 http://{addr}/console; Management API (SigV4) and metrics at \
                 http://{management_addr}"
            );
            let stop = emulators.shutdown_token();
            tokio::spawn(async move {
                shutdown_signal().await;
                stop.cancel();
            });
            emulators.wait().await
        }
        Command::Relay { metrics_listen } => {
            let config = config_and_telemetry()?;
            let parts = Parts {
                gateway: false,
                relay: true,
            };
            let metrics_listener = match metrics_listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding {addr} (--metrics-listen)"))?,
                ),
                None => None,
            };
            let options = Options {
                metrics_listener,
                ..Options::default()
            };
            // No gateway: `PORT` and `GATEWAY_*` are not read.
            let settings = LocalSettings::default();
            let stack = Stack::start_with(&config, &settings, None, parts, options).await?;
            match stack.metrics_addr {
                Some(metrics) => tracing::info!(
                    instance = %config.common.instance_id,
                    "relay running; metrics at http://{metrics}/metrics"
                ),
                None => tracing::info!(instance = %config.common.instance_id, "relay running"),
            }
            run_until_signal(stack).await
        }
        Command::Chat {
            user,
            url,
            secret,
            display_name,
        } => {
            let mut claims = DevClaims::new(user, 86_400);
            claims.display_name = display_name;
            let token = mint_hs256(&SecretString::from(secret), &claims)?;
            chat_local::client::run(&format!("{url}?token={token}")).await
        }
        Command::Migrate => {
            let config = config_and_telemetry()?;
            let applied = store::migrate(&config.common.database_url).await?;
            println!("applied {applied} migration(s); the schema is up to date");
            Ok(())
        }
        Command::Token {
            user,
            ttl,
            username,
            display_name,
            avatar,
            admin,
            secret,
            issuer,
            audience,
        } => {
            chat_shared::domain::UserId::parse(&user, "user")
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut claims = DevClaims::new(user, ttl);
            claims.username = username;
            claims.display_name = display_name;
            claims.avatar = avatar;
            claims.role = admin.then(|| "admin".to_owned());
            claims.iss = issuer;
            claims.aud = audience;
            println!("{}", mint_hs256(&SecretString::from(secret), &claims)?);
            Ok(())
        }
    }
}

/// Runs until SIGTERM or ctrl-c, then stops the stack gracefully.
async fn run_until_signal(stack: Stack) -> anyhow::Result<()> {
    let stop = stack.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    stack.wait().await
}

/// Resolves on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
