//! The scheduled maintenance job: an EventBridge rule invokes it every few
//! minutes (`template.yaml`), for the two things no request does by itself.
//!
//! - **Presence sweep.** `$disconnect` is best effort in AWS, so a
//!   connection whose presence lease ran out is removed
//!   ([`Realtime::sweep_expired`]: its subscriptions go, and its user is
//!   announced `offline` when it was their last) and closed at API Gateway
//!   with `DeleteConnection`. The relay sweeps too, every few seconds; this
//!   job keeps presence right while the relay is down or being replaced.
//!   Removal is idempotent, so both may sweep at once.
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
use chat_shared::realtime::Realtime;
use chat_shared::{Config, bootstrap};
use futures::StreamExt as _;
use serde::Serialize;

/// Connections removed per sweep step (one Redis round of reads and writes).
const BATCH: usize = 500;
/// Most sweep steps per run: a backlog beyond 20,000 expired connections is
/// left to the next run rather than risking the Lambda timeout.
const MAX_BATCHES: usize = 40;
/// `DeleteConnection` calls in flight at once.
const CLOSE_CONCURRENCY: usize = 32;

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
    /// The sweep use case; its service also holds the store.
    realtime: Realtime,
    /// Closes swept connections at their own API Gateway endpoint.
    management: Management,
    /// Messages kept per room (`MESSAGE_RETENTION`).
    retention: i64,
}

impl std::fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maintenance")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl Maintenance {
    /// A job over existing clients.
    pub fn new(realtime: Realtime, management: Management, retention: i64) -> Self {
        Self {
            realtime,
            management,
            retention,
        }
    }

    /// Builds the clients from `config`, once per cold start.
    ///
    /// # Errors
    /// When a URL is invalid or Redis does not answer.
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        let state = bootstrap::ws_state(config).await?;
        Ok(Self::new(
            state.realtime,
            // The same endpoint policy as the relay: MANAGEMENT_ENDPOINT, or
            // only allowed endpoints from the connections' records.
            Management::new(
                config.aws_region.clone(),
                EndpointPolicy::from_config(config),
            ),
            config.message_retention,
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
            self.sweep(),
            self.realtime.chat().store().cleanup_all(self.retention)
        );
        if let Err(err) = &swept {
            err.log_if_server_error("maintenance: presence sweep failed");
        }
        if let Err(err) = &deleted {
            err.log_if_server_error("maintenance: retention failed");
        }
        let report = Report {
            deleted_messages: deleted?,
            retention: self.retention,
            ..swept?
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

    /// Removes expired connections batch by batch and closes them at API
    /// Gateway (best effort: a failed close is counted and logged).
    async fn sweep(&self) -> chat_shared::Result<Report> {
        let mut report = Report::default();
        for _ in 0..MAX_BATCHES {
            let removed = self.realtime.sweep_expired(BATCH).await?;
            report.swept_connections += removed.len();
            let outcomes: Vec<Result<(), String>> = futures::stream::iter(
                removed
                    .iter()
                    .filter_map(|(id, endpoint)| Some((id.as_str(), endpoint.as_deref()?))),
            )
            .map(|(id, endpoint)| async move {
                self.management.delete(endpoint, id).await.map_err(|cause| {
                    tracing::warn!(connection_id = %id, %cause, "DeleteConnection failed");
                    cause
                })
            })
            .buffer_unordered(CLOSE_CONCURRENCY)
            .collect()
            .await;
            let closed = outcomes.iter().filter(|o| o.is_ok()).count();
            report.closed_connections += closed;
            report.close_failures += outcomes.len() - closed;
            if removed.len() < BATCH {
                break;
            }
        }
        Ok(report)
    }
}
