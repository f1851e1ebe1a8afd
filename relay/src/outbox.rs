//! Per-connection outboxes: posts to one connection leave one after another,
//! in the order they were queued; different connections are posted to in
//! parallel, at most `concurrency` at a time overall.
//!
//! A connection has an outbox only while something is queued for it: the
//! first event spawns a drain task, and the task removes the outbox and
//! exits when it finds it empty. Queueing and that check happen under one
//! lock, so no event is ever left behind in an outbox without a task.
//!
//! A *barrier* ([`Outboxes::barrier`]) resolves once everything queued
//! before it has been posted (or given up on): a relay handing a cluster
//! shard over, or shutting down, waits for it before it writes its
//! delivered watermarks back, so the next owner never posts to a
//! connection before this relay's last post to it.
//!
//! The drain task also applies the `410 Gone` policy (ARCHITECTURE.md,
//! "Presence"): a connection younger than `young_connection` may still be
//! in `$connect` (API Gateway refuses posts until `$connect` returns), so
//! the post is retried with backoff until the connection is that old; an
//! older one is stale, and is removed with `Realtime::disconnect`, which
//! takes its subscriptions and presence with it and announces `offline`
//! when it was the user's last.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chat_shared::presence::Subscriber;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::task::TaskTracker;

use crate::Stores;
use crate::management::{Management, PostOutcome};
use crate::metrics::RelayMetrics;

/// Most events queued for one connection; beyond it new events for that
/// connection are dropped (and counted): a connection that cannot take
/// what its rooms send must not hold the relay's memory hostage.
const MAX_QUEUED: usize = 4096;
/// First wait before re-posting to a young connection.
/// Short, because the `connected` event of every new connection waits
/// here until the handshake completes, and its first replies wait for it.
const FIRST_RETRY: Duration = Duration::from_millis(3);
/// Longest wait between re-posts to a young connection.
const MAX_RETRY: Duration = Duration::from_millis(500);

/// Where a connection is reached: immutable for a connection id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// API Gateway's connection id.
    pub connection_id: String,
    /// Its Management API endpoint.
    pub endpoint: String,
    /// When it connected (ms since the epoch): decides young or stale on 410.
    pub connected_at_ms: i64,
}

impl From<&Subscriber> for Route {
    fn from(s: &Subscriber) -> Self {
        Self {
            connection_id: s.connection_id.clone(),
            endpoint: s.endpoint.clone(),
            connected_at_ms: s.connected_at_ms,
        }
    }
}

/// What happened to one event for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pushed {
    /// Accepted, or failed and given up on: go on with the next event.
    Done,
    /// The connection is gone for good: drop the rest of its outbox.
    Stale,
}

/// One entry of a connection's outbox.
enum Item {
    /// An event to post.
    Event(Arc<str>),
    /// Told once everything before it is posted ([`Outboxes::barrier`]).
    Barrier(oneshot::Sender<()>),
}

/// One connection's queued events.
struct Queue {
    /// Told apart from a later outbox for the same id (after a stale
    /// connection's outbox was dropped), so an old drain task never drains
    /// a new outbox alongside its own task.
    generation: u64,
    /// Where the connection is reached (immutable for its id).
    route: Route,
    /// Events not posted yet (and barriers), oldest first.
    events: VecDeque<Item>,
}

#[derive(Default)]
struct Queues {
    /// Outboxes with a live drain task, by connection id.
    by_connection: HashMap<String, Queue>,
    /// The next outbox's generation.
    next_generation: u64,
}

struct Inner {
    /// The outboxes; a plain mutex, never held across an `.await`.
    queues: Mutex<Queues>,
    /// Bounds posts in flight across all connections (`RELAY_CONCURRENCY`).
    permits: Semaphore,
    /// The drain tasks, so shutdown can wait for queued posts.
    tasks: TaskTracker,
    /// Posts the events.
    management: Arc<Management>,
    /// Removes stale connections (410 Gone), marks greetings.
    stores: Stores,
    /// Counts posts, 410s, failures and latency.
    metrics: Arc<RelayMetrics>,
    /// How long after connecting a 410 means "not yet" rather than "gone".
    young: Duration,
}

/// The outboxes of every connection (cheap to clone).
#[derive(Clone)]
pub(crate) struct Outboxes {
    inner: Arc<Inner>,
}

impl Outboxes {
    pub(crate) fn new(
        management: Arc<Management>,
        stores: Stores,
        metrics: Arc<RelayMetrics>,
        concurrency: usize,
        young: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                queues: Mutex::new(Queues::default()),
                permits: Semaphore::new(concurrency.max(1)),
                tasks: TaskTracker::new(),
                management,
                stores,
                metrics,
                young,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.inner
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `event` for the connection at `route`, after everything
    /// queued for it before.
    pub(crate) fn enqueue(&self, route: &Route, event: Arc<str>) {
        let mut queues = self.lock();
        if let Some(queue) = queues.by_connection.get_mut(&route.connection_id) {
            if queue.events.len() >= MAX_QUEUED {
                RelayMetrics::bump(&self.inner.metrics.outbox_overflows);
                tracing::warn!(
                    connection_id = %route.connection_id,
                    "outbox full; dropping an event for this connection"
                );
            } else {
                queue.events.push_back(Item::Event(event));
            }
            return;
        }
        queues.next_generation += 1;
        let generation = queues.next_generation;
        queues.by_connection.insert(
            route.connection_id.clone(),
            Queue {
                generation,
                route: route.clone(),
                events: VecDeque::from([Item::Event(event)]),
            },
        );
        drop(queues);
        let this = self.clone();
        let connection_id = route.connection_id.clone();
        self.inner
            .tasks
            .spawn(async move { this.drain(connection_id, generation).await });
    }

    /// Drops whatever is queued for a connection that is gone.
    pub(crate) fn forget(&self, connection_id: &str) {
        self.lock().by_connection.remove(connection_id);
    }

    /// Connections with something queued or in flight.
    pub(crate) fn active(&self) -> usize {
        self.lock().by_connection.len()
    }

    /// Whether the connection has events queued or a post in flight.
    pub(crate) fn is_pending(&self, connection_id: &str) -> bool {
        self.lock().by_connection.contains_key(connection_id)
    }

    /// Resolves once every event queued before this call has been posted,
    /// given up on, or dropped with a stale connection's outbox.
    pub(crate) fn barrier(&self) -> impl Future<Output = ()> + use<> {
        let waits: Vec<oneshot::Receiver<()>> = {
            let mut queues = self.lock();
            queues
                .by_connection
                .values_mut()
                .map(|queue| {
                    let (tx, rx) = oneshot::channel();
                    queue.events.push_back(Item::Barrier(tx));
                    rx
                })
                .collect()
        };
        async move {
            // An error means the outbox was dropped: nothing left to post.
            futures::future::join_all(waits).await;
        }
    }

    /// Stops accepting new drain tasks once the current ones finish, and
    /// waits for them (the caller bounds the wait).
    pub(crate) async fn drained(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// Posts a connection's events in order until its outbox is empty.
    async fn drain(&self, connection_id: String, generation: u64) {
        loop {
            let (route, event) = {
                let mut queues = self.lock();
                let Some(queue) = queues.by_connection.get_mut(&connection_id) else {
                    return;
                };
                if queue.generation != generation {
                    return;
                }
                match queue.events.pop_front() {
                    Some(Item::Event(event)) => (queue.route.clone(), event),
                    Some(Item::Barrier(reached)) => {
                        let _ = reached.send(());
                        continue;
                    }
                    None => {
                        queues.by_connection.remove(&connection_id);
                        return;
                    }
                }
            };
            if self.push(&route, &event).await == Pushed::Stale {
                {
                    let mut queues = self.lock();
                    if queues
                        .by_connection
                        .get(&connection_id)
                        .is_some_and(|q| q.generation == generation)
                    {
                        queues.by_connection.remove(&connection_id);
                    }
                }
                tracing::info!(%connection_id, "connection is gone; removing it");
                if let Err(err) = self
                    .inner
                    .stores
                    .departures
                    .disconnect(&connection_id)
                    .await
                {
                    // Connection ids stay out of WARN lines (they are
                    // capabilities wherever the Management API is open).
                    tracing::warn!(error = %err, "removing a stale connection failed");
                    tracing::debug!(%connection_id, "the stale connection");
                }
                return;
            }
        }
    }

    /// Posts one event, retrying a `410` while the connection is young.
    async fn push(&self, route: &Route, event: &str) -> Pushed {
        let inner = &self.inner;
        let mut backoff = FIRST_RETRY;
        // The young window, measured once: a clock that puts the connection
        // in the future must not make us retry for longer than the window.
        let age = Duration::from_millis(
            u64::try_from(chrono::Utc::now().timestamp_millis() - route.connected_at_ms)
                .unwrap_or(0),
        );
        let young_until = Instant::now() + inner.young.saturating_sub(age);
        loop {
            let outcome = {
                let Ok(_permit) = inner.permits.acquire().await else {
                    return Pushed::Done;
                };
                let started = Instant::now();
                let outcome = inner
                    .management
                    .post(&route.endpoint, &route.connection_id, event.as_bytes())
                    .await;
                inner.metrics.record_push(started.elapsed());
                outcome
            };
            match outcome {
                PostOutcome::Delivered => {
                    RelayMetrics::bump(&inner.metrics.posts_ok);
                    if event.starts_with(r#"{"type":"connected""#) {
                        // The connection's first replies wait for this.
                        let presence = &inner.stores.presence;
                        if let Err(err) = presence.mark_greeted(&route.connection_id).await {
                            tracing::warn!(error = %err, "marking a connection greeted failed");
                            tracing::debug!(connection_id = %route.connection_id, "the connection");
                        }
                    }
                    return Pushed::Done;
                }
                PostOutcome::Gone => {
                    let now = Instant::now();
                    if now < young_until {
                        RelayMetrics::bump(&inner.metrics.gone_retries);
                        tokio::time::sleep(backoff.min(young_until - now)).await;
                        backoff = (backoff * 2).min(MAX_RETRY);
                        continue;
                    }
                    RelayMetrics::bump(&inner.metrics.posts_gone);
                    return Pushed::Stale;
                }
                // Logged where it was refused; never retried.
                PostOutcome::Refused => {
                    RelayMetrics::bump(&inner.metrics.posts_gone);
                    return Pushed::Stale;
                }
                PostOutcome::Failed(cause) => {
                    RelayMetrics::bump(&inner.metrics.post_errors);
                    tracing::warn!(
                        %cause,
                        "PostToConnection failed; event dropped for this connection"
                    );
                    tracing::debug!(
                        connection_id = %route.connection_id,
                        endpoint = %route.endpoint,
                        "the failed post's connection"
                    );
                    return Pushed::Done;
                }
            }
        }
    }
}
