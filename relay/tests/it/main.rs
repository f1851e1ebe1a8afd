//! Integration tests of the relay against real Redis and PostgreSQL, with a
//! fake Management API recording what the relay posts.
//!
//! - `delivery`: who receives what (PROTOCOL.md §2).
//! - `ordering`: per-room order, dedupe, gap fill, sync, restarts.
//! - `lifecycle`: 410 Gone, the sweeper, pub/sub reconnects, shutdown.
//! - `scale_out`: several relays: fair shares, each event once, takeover
//!   of a killed relay, handover to a joining one.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;
mod delivery;
mod health;
mod lifecycle;
mod ordering;
mod scale_out;
