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
//! - [`store`]: PostgreSQL (every SQL statement) and migrations.
//! - [`presence`]: Redis keys for connections, subscriptions, presence.
//! - [`bus`]: envelopes on the Redis pub/sub channel the relay consumes.
//! - [`service`]: the use cases.
//! - [`http`]: the REST API as an axum router.
//! - [`bootstrap`]: builds all of the above once per process.

pub mod auth;
pub mod bootstrap;
pub mod bus;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod model;
pub mod presence;
pub mod service;
pub mod store;
pub mod telemetry;

pub use config::Config;
pub use error::{Error, ErrorCode, Result};
