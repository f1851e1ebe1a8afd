//! A local emulator of an AWS API Gateway WebSocket API.
//!
//! The local stack serves [`Gateway::router`] next to the REST router on one
//! port. A WebSocket client connects to `ws://HOST:PORT{ws_path}` and the
//! gateway drives the three route integrations exactly as API Gateway drives
//! the `$connect` / `$default` / `$disconnect` Lambdas: same event JSON, same
//! refusal of the handshake when `$connect` answers non-2xx, same two-way
//! route responses, same close codes and limits. Back ends push to clients
//! through the Management API (`POST|GET|DELETE
//! /{stage}/@connections/{connectionId}`), which is a separate router
//! ([`Gateway::management_router`]) for a separate, internal listener: it is
//! never served on the client port, and it requires SigV4 signatures made
//! with [`GatewayConfig::management_credentials`], as API Gateway requires
//! IAM-signed calls. The AWS SDK reaches it with
//! `endpoint_url("http://MGMT_HOST:MGMT_PORT/{stage}")`; `$connect` events
//! carry that address ([`GatewayConfig::domain_name`]) as
//! `requestContext.domainName`, never the client's `Host`.
//!
//! ```no_run
//! # async fn run(handlers: chat_gateway::Handlers) -> std::io::Result<()> {
//! use std::net::SocketAddr;
//! use chat_gateway::{Gateway, GatewayConfig};
//!
//! let gateway = Gateway::new(GatewayConfig::default(), handlers);
//! let management = tokio::net::TcpListener::bind("127.0.0.1:3100").await?;
//! tokio::spawn(axum::serve(management, gateway.management_router()).into_future());
//! let app = gateway.router(); // .merge(rest_router)
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! // Connect info is what fills `identity.sourceIp`.
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # Ok(()) }
//! ```
//!
//! Serve the router with
//! [`into_make_service_with_connect_info::<SocketAddr>()`](axum::Router::into_make_service_with_connect_info):
//! without it `identity.sourceIp` falls back to `127.0.0.1`.
//!
//! # Behaviour worth knowing
//!
//! * Connection ids are 16-character padded base64 (URL-safe alphabet) of 11
//!   random bytes, like `L0SM9cOFvHcCIhw=`.
//! * A connection is "connecting" while `$connect` runs and until the socket
//!   is live; the Management API answers `410 GoneException` for it, as AWS
//!   does for posts made from inside `$connect`.
//! * Messages of one connection reach `$default` as API Gateway sends them:
//!   several at once ([`Dispatch::Concurrent`], the default), started in
//!   arrival order, so their handling may finish, and their route responses
//!   arrive, in another order; [`Dispatch::Serial`] (one at a time, in
//!   arrival order) is an explicit deviation. A panicking handler, or one
//!   whose [`RouteHandler::try_call`] fails (a [`LambdaFunction`] whose
//!   invocation failed), is a failed integration (the client gets
//!   `{"message": "Internal server error", ...}`, as from API Gateway).
//! * Limits: a message over `max_message_bytes` or a frame over
//!   `max_frame_bytes` closes with 1009; no frame from the client for
//!   `idle_timeout`, or `max_lifetime` after connecting, closes with 1001;
//!   an outbound queue over `max_queued_bytes` (or 1,024 messages) closes
//!   with 1008: the client does not read what it is sent.
//! * `$disconnect` runs exactly once for every connection whose `$connect`
//!   succeeded, after it left the registry, whatever closed it.
//!
//! # Layout
//!
//! * `handler` — [`RouteHandler`], [`Handlers`], and how an integration is
//!   invoked (event JSON → struct, panics contained).
//! * `event` — the CONNECT / MESSAGE / DISCONNECT event JSON and ids.
//! * `handshake` — `GET {ws_path}`: `$connect`, refusal or upgrade.
//! * `connection` — the connection registry and the task that runs each live
//!   socket (reader, writer, `$default` dispatcher, limits, close, `$disconnect`).
//! * `management` — the `@connections` routes.
//! * [`lambda`] — [`LambdaFunction`]: a route integration that invokes a
//!   function binary through the Lambda Invoke API (`cargo lambda watch`,
//!   the Runtime Interface Emulator), with API Gateway's error mapping and
//!   a reserved-concurrency limit.
//! * [`http_api`] — an HTTP API (payload format 2.0) in front of one
//!   [`LambdaFunction`]: the REST side of the deployed shape.
//! * `listener` — [`EdgeListener`]: handshake deadline, handshake cap,
//!   per-IP connection rate and file-descriptor reserve of the client port.
//! * `sigv4` — the signature check of those routes, and [`sign`] for
//!   callers without the SDK.
//! * this file — [`GatewayConfig`], [`Gateway`] and its counters.

#![forbid(unsafe_code)]

mod connection;
mod event;
mod handler;
mod handshake;
pub mod http_api;
pub mod lambda;
pub mod listener;
mod management;
pub mod sigv4;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use handler::{Handlers, IntegrationError, RouteHandler, integration_response};
pub use lambda::{FunctionOptions, InvokeError, LambdaClient, LambdaFunction};
pub use listener::{EdgeLimits, EdgeListener};
pub use sigv4::{ManagementCredentials, sign};

use connection::Registry;

/// How the emulated API is set up. Every limit is here so tests can make
/// them small.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The stage name: `requestContext.stage` and the Management API's path
    /// prefix (`/{stage}/@connections/...`).
    pub stage: String,
    /// `requestContext.apiId`.
    pub api_id: String,
    /// Where clients connect (`GET`, WebSocket upgrade), e.g. `/ws`.
    pub ws_path: String,
    /// Largest message, after reassembling fragments, and largest
    /// Management API post; beyond it the socket closes with 1009 (a post
    /// gets 413). API Gateway: 128 KiB.
    pub max_message_bytes: usize,
    /// Largest single frame; beyond it the socket closes with 1009.
    /// API Gateway: 32 KiB.
    pub max_frame_bytes: usize,
    /// Binary frames are passed to `$default` base64-encoded when true;
    /// API Gateway refuses them and closes the socket with 1003 (false).
    pub accept_binary_frames: bool,
    /// An integration that has not answered after this long fails: the
    /// client gets API Gateway's "Internal server error" message (the
    /// invocation itself may go on, as a Lambda does). API Gateway: 29 s.
    pub integration_timeout: Duration,
    /// No frame from the client for this long closes the socket with 1001.
    /// API Gateway: 10 minutes.
    pub idle_timeout: Duration,
    /// A connection is closed with 1001 this long after it connected.
    /// API Gateway: 2 hours.
    pub max_lifetime: Duration,
    /// Most bytes of messages waiting to be written to one client (the
    /// queue also holds at most 1,024 messages). A post that would go over
    /// is refused with 429 and the client, which is not reading, is closed
    /// with 1008 "Slow consumer". 1 MiB.
    pub max_queued_bytes: usize,
    /// Most application `ping` frames a second per connection (ten times
    /// that at once); more are answered `RATE_LIMITED` by the gateway without
    /// reaching `$default`. 0: unlimited. 10.
    pub max_pings_per_sec: u32,
    /// Names this gateway in logs when several run side by side.
    pub instance_id: String,
    /// `requestContext.domainName` of every event: the `host:port` of the
    /// management listener, from which the handlers build the callback
    /// endpoint (`http://{domain_name}/{stage}`). It is configuration, never
    /// the client's `Host`, so a client cannot point the relay anywhere.
    pub domain_name: String,
    /// The key pair the Management API accepts (SigV4).
    pub management_credentials: ManagementCredentials,
    /// How one connection's messages are handed to `$default`.
    /// API Gateway: concurrently ([`Dispatch::DEFAULT`]).
    pub dispatch: Dispatch,
}

/// How the messages of one connection are handed to `$default`.
///
/// API Gateway does not promise to invoke `$default` one message at a
/// time per connection: it invokes the integration for each message as it
/// arrives, so a client that sends several without waiting may have them
/// handled at once, and finished in any order. [`Dispatch::Concurrent`]
/// does the same (bounded, so one connection cannot start unbounded work),
/// and is the default, so the local stack runs what AWS runs;
/// [`Dispatch::Serial`] is the emulator's older, gentler behaviour, kept
/// as an explicit option (`GATEWAY_DISPATCH=serial`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// One message at a time, in arrival order: the next invocation starts
    /// when the previous one has answered.
    Serial,
    /// Up to this many invocations of one connection at once (at least 1),
    /// started in arrival order; more messages wait, unread, so TCP pushes
    /// back on the client.
    Concurrent(usize),
}

impl Dispatch {
    /// Concurrent, up to 8 invocations per connection: enough that a
    /// client sending a burst without waiting sees its messages handled
    /// at once, as on API Gateway, while one connection can hold only a
    /// few handler tasks.
    pub const DEFAULT: Self = Self::Concurrent(8);

    /// How many invocations of one connection may run at once.
    pub fn max_in_flight(self) -> usize {
        match self {
            Self::Serial => 1,
            Self::Concurrent(n) => n.max(1),
        }
    }
}

impl Default for Dispatch {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Default for GatewayConfig {
    /// API Gateway's own limits, stage `local`, path `/ws`.
    fn default() -> Self {
        Self {
            stage: "local".into(),
            api_id: "local".into(),
            ws_path: "/ws".into(),
            max_message_bytes: 128 * 1024,
            max_frame_bytes: 32 * 1024,
            accept_binary_frames: false,
            integration_timeout: Duration::from_secs(29),
            idle_timeout: Duration::from_secs(10 * 60),
            max_lifetime: Duration::from_secs(2 * 60 * 60),
            max_queued_bytes: 1 << 20,
            max_pings_per_sec: 10,
            instance_id: "local".into(),
            domain_name: "127.0.0.1:3100".into(),
            management_credentials: ManagementCredentials {
                access_key_id: "LOCALDEVMANAGEMENTKEY".into(),
                secret_access_key: "local-dev-management-secret-change-me".into(),
            },
            dispatch: Dispatch::DEFAULT,
        }
    }
}

/// The emulated WebSocket API: cheap to clone, every clone is the same API.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

/// State shared by the routes and the connection tasks.
pub(crate) struct Shared {
    /// Limits, stage and names, fixed at start.
    pub(crate) config: GatewayConfig,
    /// The three integrations.
    pub(crate) handlers: Handlers,
    /// Every connection from the start of its `$connect` until it closes;
    /// the Management API looks ids up here.
    pub(crate) registry: Registry,
    /// Counters for metrics.
    pub(crate) stats: Counters,
    /// Cancelled by [`Gateway::shutdown`]: refuses new handshakes and closes
    /// every live socket.
    pub(crate) shutdown: CancellationToken,
    /// Tracks every connection from its handshake to the end of its
    /// `$disconnect`, so `shutdown` can wait for all of them.
    pub(crate) tracker: TaskTracker,
}

/// Monotonic counters (see [`GatewayStats`]).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) messages_in: AtomicU64,
    pub(crate) posts_out: AtomicU64,
}

/// A snapshot of the gateway's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayStats {
    /// Live sockets now (not counting connections still in `$connect`).
    pub connections_open: usize,
    /// Data messages (text or binary) received from clients since start.
    pub messages_in: u64,
    /// Management API posts accepted (answered 200) since start.
    pub posts_out: u64,
}

/// What the gateway knows about one live connection (the Management API's
/// GetConnection, as a struct).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// When the upgrade request arrived.
    pub connected_at: DateTime<Utc>,
    /// When the client last sent a frame of any kind (ping included).
    pub last_active_at: DateTime<Utc>,
    /// The client's address.
    pub source_ip: String,
    /// The upgrade request's `User-Agent`, if any.
    pub user_agent: Option<String>,
}

impl Gateway {
    /// An API with these limits and integrations. Nothing runs until the
    /// router is served.
    pub fn new(config: GatewayConfig, handlers: Handlers) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                handlers,
                registry: Registry::default(),
                stats: Counters::default(),
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        }
    }

    /// The client side: the WebSocket endpoint (`GET {ws_path}`), ready to
    /// merge with other routers. Serve it with
    /// `into_make_service_with_connect_info::<SocketAddr>()`. It has no
    /// Management API: see [`Gateway::management_router`].
    ///
    /// # Panics
    ///
    /// If `ws_path` is not a valid route path (it must start with `/`);
    /// this is a start-up error.
    pub fn router(&self) -> Router {
        Router::new()
            .route(&self.shared.config.ws_path, get(handshake::upgrade))
            .with_state(Arc::clone(&self.shared))
    }

    /// The Management API (`/{stage}/@connections/{connectionId}`), SigV4
    /// required: for an internal listener only, never the client port.
    ///
    /// # Panics
    ///
    /// If `stage` does not make a valid route path; a start-up error.
    pub fn management_router(&self) -> Router {
        management::routes(&self.shared).with_state(Arc::clone(&self.shared))
    }

    /// Live sockets now (connections still in `$connect` are not counted).
    pub fn connection_count(&self) -> usize {
        self.shared.registry.live_count()
    }

    /// The counters, for metrics.
    pub fn stats(&self) -> GatewayStats {
        GatewayStats {
            connections_open: self.shared.registry.live_count(),
            messages_in: self.shared.stats.messages_in.load(Ordering::Relaxed),
            posts_out: self.shared.stats.posts_out.load(Ordering::Relaxed),
        }
    }

    /// What is known about a live connection (`None` if it is unknown,
    /// closed, or still in `$connect`).
    pub fn connection(&self, connection_id: &str) -> Option<ConnectionInfo> {
        self.shared
            .registry
            .live(connection_id)
            .map(|live| live.info())
    }

    /// Closes every socket with 1001 "Going away", refuses new handshakes
    /// (503), and returns once every `$disconnect` has completed. Calling it
    /// again just waits again.
    ///
    /// Call it from the server's graceful-shutdown signal: axum's graceful
    /// shutdown does not wait for upgraded (WebSocket) connections.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.shared.config)
            .field("connections", &self.shared.registry.live_count())
            .finish_non_exhaustive()
    }
}
