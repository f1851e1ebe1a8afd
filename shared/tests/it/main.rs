//! The integration tests of the shared crate in one binary: the REST app
//! driven with `oneshot` (`chat_test_support::rest`), the WebSocket session
//! driven directly, and the stores, each test over a fresh database and a
//! private Redis prefix.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use chat_test_support::rest as common;

mod authz_matrix;
mod batching;
mod departures;
mod load_shedding;
mod maintenance;
mod openapi;
mod ordering;
mod panics;
mod pg_tls;
mod pool_nesting;
mod rate_limits;
mod redis_cluster_mode;
mod rest_auth;
mod rest_messages;
mod rest_rooms;
mod sequence;
mod smoke;
