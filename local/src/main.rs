//! `chat-local`: the whole stack in one process for development, plus the
//! operational commands.
//!
//! - `serve`: migrations, then REST and `/health` on `PORT`.
//! - `migrate`: applies `migrations/` to `DATABASE_URL` (deployments).
//! - `token`: mints a development token for a user id.

use std::net::SocketAddr;

use anyhow::Context as _;
use chat_shared::auth::{DevClaims, mint_hs256};
use chat_shared::{Config, bootstrap, http, store, telemetry};
use clap::{Parser, Subcommand};
use secrecy::SecretString;

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
        /// Do not apply migrations at start-up.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Applies pending migrations to DATABASE_URL and exits.
    Migrate,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve { listen, no_migrate } => {
            let config = Config::from_env()?;
            telemetry::init(config.log_format, &config.log_filter);
            if !no_migrate {
                let applied = store::migrate(&config.database_url).await?;
                tracing::info!(applied, "migrations up to date");
            }
            let addr = listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], config.port)));
            serve(config, addr).await
        }
        Command::Migrate => {
            let config = Config::from_env()?;
            telemetry::init(config.log_format, &config.log_filter);
            let applied = store::migrate(&config.database_url).await?;
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

async fn serve(config: Config, addr: SocketAddr) -> anyhow::Result<()> {
    let state = bootstrap::app_state(&config).await?;
    let app = http::app(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, instance = %config.instance_id, "chat-local listening");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    .context("serving")
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
