//! Connections leaving: a `$disconnect`, a `410 Gone` the relay got for a
//! stale connection, a presence lease that ran out; and sweep-and-close,
//! the presence sweep that the relay runs every few seconds and the
//! maintenance job runs every few minutes, in one implementation.
//!
//! `$disconnect` is best effort in AWS, so a connection's lease in Redis is
//! the truth: every frame renews it, and a connection whose lease ran out
//! is removed ([`Departures::sweep_expired`]: its subscriptions go, and its
//! user is announced `offline` when it was their last) and closed at API
//! Gateway with `DeleteConnection` ([`Departures::sweep_and_close`], through
//! a [`CloseConnection`] the caller supplies: the relay's Management API
//! client). Removal is one atomic script and idempotent, so several
//! sweepers may run at once.
//!
//! # Layout
//! - [`disconnect`]: the one use case, over borrowed adapters (the
//!   WebSocket handlers call it too).
//! - [`Departures`]: the adapters it needs, for the relay and the job.
//! - [`SweepLimits`], [`SweepReport`]: how much one sweep does, and what
//!   it did.

use std::future::Future;

use futures::StreamExt as _;

use crate::bus::Bus;
use crate::error::Result;
use crate::presence::Presence;
use crate::store::Store;

/// Removes a connection and announces its user `offline` to the members of
/// their rooms when it was their last live connection. Idempotent: a
/// connection already gone is no error.
///
/// # Errors
/// When Redis or PostgreSQL does not answer.
pub async fn disconnect(
    store: &Store,
    presence: &Presence,
    bus: &Bus,
    connection_id: &str,
) -> Result<()> {
    let Some(user) = presence.connection_user(connection_id).await? else {
        return Ok(());
    };
    let rooms = store.conn().await?.member_room_ids(&user).await?;
    let envelope = bus.presence_update(&user, "offline", rooms)?;
    presence
        .disconnect(
            connection_id,
            Some(&user),
            bus.channel(),
            envelope.as_deref(),
        )
        .await?;
    Ok(())
}

/// A connection the sweep removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swept {
    /// The connection id.
    pub connection_id: String,
    /// Its Management API endpoint, when its record still named one.
    pub endpoint: Option<String>,
}

/// Closes a connection at API Gateway (`DeleteConnection`), best effort:
/// the relay's and the maintenance job's Management API client.
pub trait CloseConnection: Sync {
    /// Closes `connection_id` at `endpoint`; `Err` carries the cause for
    /// the log.
    fn close(
        &self,
        endpoint: &str,
        connection_id: &str,
    ) -> impl Future<Output = std::result::Result<(), String>> + Send;

    /// Called for every swept connection, closed or not (the relay drops
    /// whatever it still had queued for it).
    fn removed(&self, connection_id: &str) {
        let _ = connection_id;
    }
}

/// How much one [`Departures::sweep_and_close`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepLimits {
    /// Connections removed per step (one Redis round of reads and writes).
    pub batch: usize,
    /// Most steps; a full batch is followed by another step at once.
    pub max_batches: usize,
    /// `DeleteConnection` calls in flight at once.
    pub close_concurrency: usize,
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Connections whose lease had run out, now removed.
    pub swept: usize,
    /// Of those, closed at API Gateway (or already gone there).
    pub closed: usize,
    /// `DeleteConnection` calls that failed; API Gateway's idle timeout
    /// closes those sockets eventually, and they can no longer receive
    /// anything meanwhile.
    pub close_failures: usize,
    /// Whether the last step was full, so expired connections may be left.
    pub more: bool,
}

/// Closes one connection, logging a failure; true when it closed.
async fn close(closer: &impl CloseConnection, endpoint: &str, connection_id: &str) -> bool {
    match closer.close(endpoint, connection_id).await {
        Ok(()) => true,
        Err(cause) => {
            // Connection ids stay out of WARN lines (they are capabilities
            // wherever the Management API is open).
            tracing::warn!(%cause, "DeleteConnection failed (best effort)");
            tracing::debug!(%connection_id, "the connection DeleteConnection failed for");
            false
        }
    }
}

/// The adapters departures need: presence (the connection and its
/// subscriptions), the store (the rooms to announce `offline` to) and the
/// bus (that announcement).
#[derive(Debug, Clone)]
pub struct Departures {
    /// The rooms a leaving user is announced `offline` to.
    store: Store,
    /// The connection records, subscriptions and leases.
    presence: Presence,
    /// The `offline` envelope's channel and origin.
    bus: Bus,
}

impl Departures {
    /// Departures over these adapters.
    pub fn new(store: Store, presence: Presence, bus: Bus) -> Self {
        Self {
            store,
            presence,
            bus,
        }
    }

    /// See [`disconnect`].
    ///
    /// # Errors
    /// When Redis or PostgreSQL does not answer.
    pub async fn disconnect(&self, connection_id: &str) -> Result<()> {
        disconnect(&self.store, &self.presence, &self.bus, connection_id).await
    }

    /// Removes up to `limit` connections whose lease ran out (each as
    /// [`disconnect`] does) and returns them with the endpoints their
    /// records named.
    ///
    /// # Errors
    /// When Redis or PostgreSQL does not answer.
    pub async fn sweep_expired(&self, limit: usize) -> Result<Vec<Swept>> {
        let now = chrono::Utc::now().timestamp_millis();
        let expired = self.presence.expired_connections(now, limit).await?;
        let routes = self.presence.connection_routes(&expired).await?;
        let mut removed = Vec::with_capacity(expired.len());
        for (connection_id, route) in expired.into_iter().zip(routes) {
            match self.presence.connection_user(&connection_id).await? {
                Some(_) => self.disconnect(&connection_id).await?,
                // A lease without a record: drop the lease alone.
                None => {
                    self.presence
                        .disconnect(&connection_id, None, self.bus.channel(), None)
                        .await?;
                }
            }
            removed.push(Swept {
                connection_id,
                endpoint: route.map(|r| r.endpoint),
            });
        }
        Ok(removed)
    }

    /// Sweep-and-close: removes expired connections step by step (at most
    /// `limits.max_batches` steps; a step that is not full ends the sweep)
    /// and closes each at API Gateway through `closer`, best effort: a
    /// failed close is counted and logged.
    ///
    /// # Errors
    /// When Redis or PostgreSQL does not answer; what was removed before
    /// stays removed.
    pub async fn sweep_and_close(
        &self,
        closer: &impl CloseConnection,
        limits: SweepLimits,
    ) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        for _ in 0..limits.max_batches.max(1) {
            let removed = self.sweep_expired(limits.batch).await?;
            report.swept += removed.len();
            report.more = removed.len() >= limits.batch;
            for swept in &removed {
                closer.removed(&swept.connection_id);
            }
            // The futures are built first, then run: a `map` closure over
            // borrowed items would make the sweep's future not `Send` for
            // every lifetime (rust-lang/rust#102211).
            let closes: Vec<_> = removed
                .iter()
                .filter_map(|s| Some(close(closer, s.endpoint.as_deref()?, &s.connection_id)))
                .collect();
            let outcomes: Vec<bool> = futures::stream::iter(closes)
                .buffer_unordered(limits.close_concurrency.max(1))
                .collect()
                .await;
            let closed = outcomes.iter().filter(|ok| **ok).count();
            report.closed += closed;
            report.close_failures += outcomes.len() - closed;
            if !report.more {
                break;
            }
        }
        if report.swept > 0 {
            tracing::info!(
                swept = report.swept,
                closed = report.closed,
                close_failures = report.close_failures,
                "swept expired connections"
            );
        }
        Ok(report)
    }
}
