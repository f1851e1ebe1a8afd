//! The end-to-end tests of the local stack in one binary: REST, the API
//! Gateway emulator with the real handlers and the relay, bound to
//! `127.0.0.1:0` over a fresh database and a private Redis prefix each,
//! driven by real WebSocket clients (`chat_test_support::stack`).
//!
//! Eight suites keep binaries of their own, because they measure or strain
//! the whole process, and tests of other modules running beside them (as
//! threads of this one) would falsify what they measure:
//! - `edge_memory`, `edge_slowloris`, `edge_under_attack`, `fairness`:
//!   bounds on this process's resident set size (`rss_kb`).
//! - `edge_attack_logs`, `edge_memory_returned`, `edge_fd_limit`: the
//!   real `chat-local serve` as a child process (its own logs, memory and
//!   open-files limit), started by `local/tests/support/serve.rs`.
//! - `fault_survival`: six child processes a test, restarts of private
//!   PostgreSQL and Redis servers, and takeover times measured on a machine
//!   that runs nothing else.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use chat_test_support::stack as common;

mod asyncapi;
mod authz_ws;
mod bad_frames;
mod chat_flow;
mod console;
mod edge;
mod faults;
mod greeting;
mod handshake;
mod hostile_http;
mod join_race;
mod multi_instance;
mod ordering;
mod presence;
mod protocol;
mod rate_limits;
mod recovery;
mod relay_paths;
mod secrets_in_logs;
mod sessions;
mod storm;
