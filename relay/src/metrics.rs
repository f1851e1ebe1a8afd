//! Counters the relay keeps about itself: cheap atomics that any task bumps
//! and that tests, logs and `GET /metrics` (Prometheus text, via
//! [`MetricsSnapshot::write_prometheus`]) read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chat_shared::metrics::{Exposition, Kind};

/// Monotonic counters (relaxed atomics: each is exact on its own; a
/// snapshot of several is not one instant).
#[derive(Debug, Default)]
pub struct RelayMetrics {
    /// Envelopes read from the bus (including ones that target nobody).
    pub envelopes: AtomicU64,
    /// Bus messages that were not a valid envelope.
    pub bad_envelopes: AtomicU64,
    /// Successful SUBSCRIBEs to the broadcast channel: 1 after start-up,
    /// one more per reconnect.
    pub subscriptions: AtomicU64,
    /// Posts API Gateway accepted.
    pub posts_ok: AtomicU64,
    /// Posts answered `410 Gone` for an established connection (which was
    /// then removed as stale).
    pub posts_gone: AtomicU64,
    /// `410 Gone` answers for a connection still in its young window, each
    /// retried.
    pub gone_retries: AtomicU64,
    /// Posts that failed otherwise (logged, not retried).
    pub post_errors: AtomicU64,
    /// Events dropped because a connection's outbox was full.
    pub outbox_overflows: AtomicU64,
    /// Connections whose `message` gap was filled before a newer message.
    pub gap_fills: AtomicU64,
    /// Gap fills and syncs that had to read PostgreSQL (the in-memory ring
    /// did not hold the whole gap).
    pub store_reads: AtomicU64,
    /// Sweeper runs.
    pub sweeps: AtomicU64,
    /// Connections the sweeper removed (expired presence leases).
    pub swept: AtomicU64,
    /// Sum of the latency of every `PostToConnection`, in microseconds.
    pub push_latency_us_sum: AtomicU64,
    /// Number of latencies in [`RelayMetrics::push_latency_us_sum`].
    pub push_latency_count: AtomicU64,
    /// The largest delivery lag (ms from publish to handling) of a
    /// room envelope since the last report to Redis; the reporter
    /// resets it (a gauge, not a counter). Gateways shed sends on it.
    pub delivery_lag_ms: AtomicU64,
    /// Envelopes of lease shards this relay does not hold (another relay
    /// handles them, or nobody during a takeover): read and dropped.
    pub envelopes_not_owned: AtomicU64,
    /// Lease shards this relay holds now (a gauge).
    pub shards_owned: AtomicU64,
    /// Lease shards this relay took (at start-up, from a relay that
    /// left or died, or back after its own lease lapsed).
    pub shards_acquired: AtomicU64,
    /// Lease shards this relay handed over to a relay that joined.
    pub shards_released: AtomicU64,
}

/// A plain copy of [`RelayMetrics`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // each field mirrors the counter of the same name
pub struct MetricsSnapshot {
    pub envelopes: u64,
    pub bad_envelopes: u64,
    pub subscriptions: u64,
    pub posts_ok: u64,
    pub posts_gone: u64,
    pub gone_retries: u64,
    pub post_errors: u64,
    pub outbox_overflows: u64,
    pub gap_fills: u64,
    pub store_reads: u64,
    pub sweeps: u64,
    pub swept: u64,
    pub push_latency_us_sum: u64,
    pub push_latency_count: u64,
    pub envelopes_not_owned: u64,
    pub shards_owned: u64,
    pub shards_acquired: u64,
    pub shards_released: u64,
}

impl MetricsSnapshot {
    /// Mean `PostToConnection` latency so far.
    pub fn mean_push_latency(&self) -> Option<Duration> {
        (self.push_latency_count > 0)
            .then(|| Duration::from_micros(self.push_latency_us_sum / self.push_latency_count))
    }

    /// Appends the counters in the Prometheus text format (`chat_relay_*`),
    /// for `GET /metrics` of the local stack and of a standalone relay.
    pub fn write_prometheus(&self, out: &mut Exposition) {
        let n = |v: u64| v as f64;
        out.single(
            "chat_relay_envelopes_total",
            "Envelopes read from the bus.",
            Kind::Counter,
            n(self.envelopes),
        )
        .single(
            "chat_relay_bad_envelopes_total",
            "Bus messages that were not a valid envelope.",
            Kind::Counter,
            n(self.bad_envelopes),
        )
        .single(
            "chat_relay_subscriptions_total",
            "SUBSCRIBEs to the broadcast channel (1 + reconnects).",
            Kind::Counter,
            n(self.subscriptions),
        )
        .family(
            "chat_relay_posts_total",
            "PostToConnection calls by result: ok, gone (stale, removed), error.",
            Kind::Counter,
        )
        .sample(
            "chat_relay_posts_total",
            &[("result", "ok")],
            n(self.posts_ok),
        )
        .sample(
            "chat_relay_posts_total",
            &[("result", "gone")],
            n(self.posts_gone),
        )
        .sample(
            "chat_relay_posts_total",
            &[("result", "error")],
            n(self.post_errors),
        )
        .single(
            "chat_relay_gone_retries_total",
            "410 answers for connections still in $connect, retried.",
            Kind::Counter,
            n(self.gone_retries),
        )
        .single(
            "chat_relay_outbox_overflows_total",
            "Events dropped because a connection's outbox was full.",
            Kind::Counter,
            n(self.outbox_overflows),
        )
        .single(
            "chat_relay_gap_fills_total",
            "Message gaps filled before a newer message.",
            Kind::Counter,
            n(self.gap_fills),
        )
        .single(
            "chat_relay_store_reads_total",
            "Gap fills and syncs that read PostgreSQL.",
            Kind::Counter,
            n(self.store_reads),
        )
        .single(
            "chat_relay_sweeps_total",
            "Presence sweeper runs.",
            Kind::Counter,
            n(self.sweeps),
        )
        .single(
            "chat_relay_swept_total",
            "Connections removed because their presence lease ran out.",
            Kind::Counter,
            n(self.swept),
        )
        .family(
            "chat_relay_push_latency_seconds",
            "Latency of PostToConnection calls.",
            Kind::Summary,
        )
        .sample(
            "chat_relay_push_latency_seconds_sum",
            &[],
            self.push_latency_us_sum as f64 / 1e6,
        )
        .sample(
            "chat_relay_push_latency_seconds_count",
            &[],
            n(self.push_latency_count),
        )
        .single(
            "chat_relay_envelopes_not_owned_total",
            "Envelopes of lease shards this relay does not hold, dropped.",
            Kind::Counter,
            n(self.envelopes_not_owned),
        )
        .single(
            "chat_relay_shards_owned",
            "Lease shards this relay holds.",
            Kind::Gauge,
            n(self.shards_owned),
        )
        .single(
            "chat_relay_shards_acquired_total",
            "Lease shards this relay took.",
            Kind::Counter,
            n(self.shards_acquired),
        )
        .single(
            "chat_relay_shards_released_total",
            "Lease shards this relay handed over.",
            Kind::Counter,
            n(self.shards_released),
        );
    }
}

impl RelayMetrics {
    /// Adds one to `counter`.
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one push latency.
    pub(crate) fn record_push(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.push_latency_us_sum.fetch_add(us, Ordering::Relaxed);
        self.push_latency_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            envelopes: get(&self.envelopes),
            bad_envelopes: get(&self.bad_envelopes),
            subscriptions: get(&self.subscriptions),
            posts_ok: get(&self.posts_ok),
            posts_gone: get(&self.posts_gone),
            gone_retries: get(&self.gone_retries),
            post_errors: get(&self.post_errors),
            outbox_overflows: get(&self.outbox_overflows),
            gap_fills: get(&self.gap_fills),
            store_reads: get(&self.store_reads),
            sweeps: get(&self.sweeps),
            swept: get(&self.swept),
            push_latency_us_sum: get(&self.push_latency_us_sum),
            push_latency_count: get(&self.push_latency_count),
            envelopes_not_owned: get(&self.envelopes_not_owned),
            shards_owned: get(&self.shards_owned),
            shards_acquired: get(&self.shards_acquired),
            shards_released: get(&self.shards_released),
        }
    }
}
