//! The shared crate: domain, use cases and adapters of the chat & presence
//! backend. Every Lambda (`functions/*`), the relay and the local stack are
//! thin binaries over it.
//!
//! # Layout
//! - [`config`]: typed configuration, read once from the environment.
//! - [`telemetry`]: tracing set-up.
//! - [`error`]: the error type and the protocol's error codes.
//! - [`domain`]: newtypes and validation of everything clients send.
//! - [`auth`]: JWT verification behind [`auth::TokenVerifier`].
//! - [`model`]: the JSON shapes clients see.
//! - [`store`]: PostgreSQL (every SQL statement, one module a part) and migrations.
//! - [`pg_tls`]: PostgreSQL over TLS (`sslmode`, `sslrootcert` in `DATABASE_URL`).
//! - [`redis_conn`]: one Redis connection type over a single Redis and a
//!   Redis Cluster (`REDIS_CLUSTER`).
//! - [`presence`]: the Redis key schema ([`presence::keys`]), connections,
//!   subscriptions, watermarks, the online set, operator scans.
//! - [`limits`]: rate limits and `typing` coalescing, in Redis (the GCRA
//!   script they share with `presence` is in `gcra`).
//! - [`bus`]: envelopes on the Redis pub/sub channel the relay consumes.
//! - [`service`]: the use cases, one module each: the only request-path code
//!   that calls [`store`], [`presence`], [`limits`] and [`bus`].
//! - [`realtime`]: the WebSocket session: parse a frame, admit it, call one use case.
//! - `ws` (feature `ws`): the `$connect` / `$default` / `$disconnect` handlers over API Gateway events.
//! - `http` (feature `http`): the REST API as an axum router.
//! - [`departures`]: connections leaving (disconnect, the presence sweep,
//!   sweep-and-close), for the handlers, the relay and the maintenance job.
//! - [`bootstrap`]: builds the adapters once per process, and over them
//!   what each process needs.
//! - [`metrics`]: error counters by code, and the Prometheus text format.
//! - `debug`: [`debug_fields!`], `Debug` that shows chosen fields of a struct holding clients or secrets.
//! - `lambda` (feature `lambda`): the `lambda_runtime` shim of the WebSocket functions.

pub mod auth;
pub mod bootstrap;
pub mod bus;
pub mod config;
mod debug;
pub mod departures;
pub mod domain;
pub mod error;
mod gcra;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod pg_tls;
pub mod presence;
pub mod realtime;
pub mod redis_conn;
pub mod service;
pub mod store;
pub mod telemetry;
#[cfg(feature = "ws")]
pub mod ws;

pub use config::Config;
pub use error::{Error, ErrorCode, Result};
