//! The scheduled maintenance job: an EventBridge rule invokes it every few
//! minutes (`template.yaml`), for the two things no request does by itself.
//!
//! - **Presence sweep.** `$disconnect` is best effort in AWS, so a
//!   connection whose presence lease ran out is removed (its subscriptions
//!   go, and its user is announced `offline` when it was their last) and
//!   closed at API Gateway with `DeleteConnection`: sweep-and-close
//!   ([`Departures::sweep_and_close`]), the same code the relay sweeps
//!   with every few seconds; this job keeps presence right while the
//!   relay is down or being replaced. Removal is idempotent, so both may
//!   sweep at once.
//! - **Retention.** A send deletes what it pushes out of its room's newest
//!   `MESSAGE_RETENTION`;
//!   [`Store::cleanup_all`](chat_shared::store::Store::cleanup_all) applies
//!   the setting to every room, for the surplus left after it was lowered.
//!
//! # Layout
//! - [`Maintenance`]: the clients, built once per cold start;
//!   [`Maintenance::run`] does one pass and returns a [`Report`].
//! - `main.rs`: the Lambda shim.

use chat_relay::{EndpointPolicy, Management};
use chat_shared::bootstrap;
use chat_shared::config::MaintenanceConfig;
use chat_shared::departures::{Departures, SweepLimits};
use chat_shared::store::Store;
use serde::Serialize;

/// One run's sweep: batches of 500 connections (one Redis round of reads
/// and writes each), at most 40 of them (a backlog beyond 20,000 expired
/// connections is left to the next run rather than risking the Lambda
/// timeout), 32 `DeleteConnection` calls in flight.
const SWEEP: SweepLimits = SweepLimits {
    batch: 500,
    max_batches: 40,
    close_concurrency: 32,
};

/// What one run did; also the Lambda's response (visible in test invokes
/// and in the function's logs).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Connections whose lease had run out, now removed.
    pub swept_connections: usize,
    /// Of those, closed at API Gateway (or already gone there).
    pub closed_connections: usize,
    /// `DeleteConnection` calls that failed; API Gateway's idle timeout
    /// closes those sockets eventually, and they can no longer receive
    /// anything meanwhile.
    pub close_failures: usize,
    /// Messages deleted by retention.
    pub deleted_messages: u64,
    /// The retention applied (`MESSAGE_RETENTION`; 0 keeps all).
    pub retention: i64,
}

/// The job and the clients it needs.
pub struct Maintenance {
    /// The sweep (sweep-and-close, shared with the relay).
    departures: Departures,
    /// Retention over every room.
    store: Store,
    /// Closes swept connections at their own API Gateway endpoint.
    management: Management,
    /// Messages kept per room (`MESSAGE_RETENTION`).
    retention: i64,
}

chat_shared::debug_fields!(Maintenance { retention });

impl Maintenance {
    /// A job over existing clients.
    pub fn new(adapters: bootstrap::Adapters, management: Management, retention: i64) -> Self {
        Self {
            departures: Departures::new(adapters.store.clone(), adapters.presence, adapters.bus),
            store: adapters.store,
            management,
            retention,
        }
    }

    /// Builds the clients from `config`, once per cold start.
    ///
    /// # Errors
    /// When a URL is invalid or Redis does not answer.
    pub async fn from_config(config: &MaintenanceConfig) -> anyhow::Result<Self> {
        Ok(Self::new(
            bootstrap::adapters(&config.common).await?,
            // The same endpoint policy as the relay: MANAGEMENT_ENDPOINT, or
            // only allowed endpoints from the connections' records.
            Management::new(
                config.common.aws_region.clone(),
                EndpointPolicy::new(&config.management, &config.common.aws_region),
            ),
            config.common.message_retention,
        ))
    }

    /// One pass: the sweep and retention, side by side.
    ///
    /// # Errors
    /// When Redis or PostgreSQL fails; the other half still ran, and both
    /// failures are logged. The Lambda invocation then fails, so the
    /// function's `Errors` metric shows it and EventBridge retries.
    pub async fn run(&self) -> chat_shared::Result<Report> {
        let (swept, deleted) = tokio::join!(
            self.departures.sweep_and_close(&self.management, SWEEP),
            self.store.cleanup_all(self.retention)
        );
        if let Err(err) = &swept {
            err.log_if_server_error("maintenance: presence sweep failed");
        }
        if let Err(err) = &deleted {
            err.log_if_server_error("maintenance: retention failed");
        }
        let swept = swept?;
        let report = Report {
            swept_connections: swept.swept,
            closed_connections: swept.closed,
            close_failures: swept.close_failures,
            deleted_messages: deleted?,
            retention: self.retention,
        };
        tracing::info!(
            swept = report.swept_connections,
            closed = report.closed_connections,
            close_failures = report.close_failures,
            deleted = report.deleted_messages,
            "maintenance run done"
        );
        Ok(report)
    }
}
