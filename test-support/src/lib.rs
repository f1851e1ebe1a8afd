//! Test support shared by the integration tests of every crate, so that no
//! helper is copied between them.
//!
//! # Layout
//! - [`env`]: a fresh PostgreSQL database and a random Redis key prefix and
//!   channel per test ([`TestEnv`]), and tokens signed with the suite's secret.
//! - [`private_redis`]: a private `redis-server` a test may kill, restart
//!   or start with other settings ([`PrivateRedis`]).
//! - [`reply`]: one HTTP answer type ([`Reply`]), for in-process and
//!   over-the-socket calls alike.
//! - `rest` (feature `rest`): the REST app over a fresh database, driven
//!   with `oneshot`, and assertions on the shapes of PROTOCOL.md §4.
//! - `stack` (feature `stack`): the whole stack (`chat-local`) bound to
//!   `127.0.0.1:0`, real WebSocket clients, a raw HTTP/1.1 client, signed
//!   Management API requests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

pub mod env;
pub mod private_redis;
pub mod reply;
#[cfg(feature = "rest")]
pub mod rest;
#[cfg(feature = "stack")]
pub mod stack;

pub use env::{
    SECRET, TestEnv, admin_db_url, base64url, fresh_database, random_suffix, redis_url, token_with,
};
pub use private_redis::PrivateRedis;
pub use reply::{Reply, assert_timestamp};
