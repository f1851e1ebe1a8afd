//! `chat-bench`: the load generator and benchmark harness of the chat &
//! presence backend.
//!
//! It speaks PROTOCOL.md over real WebSockets and REST, so the same
//! generator drives this project's local stack and the Node.js original
//! side by side. See `docs/BENCHMARKS.md` for the scenarios, the targets
//! and the latest results, and `scripts/bench.sh` for a whole session.
//!
//! # Layout
//! - [`target`]: the system under test, how fast its clients connect, and
//!   the server processes watched.
//! - [`load`]: one run — connect, build rooms, send open-loop, measure;
//!   and the rule that says whether a sweep step held.
//! - [`storm`]: S6, a reconnect storm — every client connects and joins
//!   at once.
//! - [`accounting`]: loss, duplicate and order detection at receivers.
//! - [`summary`]: latency histograms and medians.
//! - [`procstat`]: RSS and CPU of server processes from `/proc`.
//! - [`rest`]: the small HTTP client of the set-up phase and `/metrics`.
//! - [`lambda`]: a Lambda Runtime API emulator for cold starts.
//! - [`pgbench`]: the pgbench script of the ceiling, from the store's SQL.
//! - [`report`]: the results table of a session, with targets and ratios.

pub mod accounting;
pub mod lambda;
pub mod load;
pub mod pgbench;
pub mod procstat;
pub mod report;
pub mod rest;
pub mod storm;
pub mod summary;
pub mod target;
