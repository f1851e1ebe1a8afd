//! Admission control for the WebSocket requests that need PostgreSQL:
//! queue what can be served within a bound, refuse only beyond it, and
//! share the queue fairly between users.
//!
//! At most `max_in_flight` such requests run at once in a process
//! (`WS_MAX_IN_FLIGHT`); more wait for a place. Nothing is refused while
//! the service can finish it within a user-visible bound: a request is
//! refused (`RATE_LIMITED`, "server busy", with the expected wait as its
//! retry hint) only when
//!
//! * the wait it would have, estimated from the queue ahead of it and how
//!   long requests have recently held their place, is over `max_wait`
//!   (`WS_MAX_QUEUE_WAIT_MS`, 10 s), or it has waited that long already;
//! * or the queue is full: `max_queued` requests (`WS_MAX_QUEUED`, 20,000)
//!   or `max_queued_bytes` of frames (`WS_MAX_QUEUED_BYTES`, 64 MiB): the
//!   memory a process may spend on waiting work;
//! * or its **user's share** of the queue is full: `max_queued_per_user`
//!   requests (`WS_MAX_QUEUED_PER_USER`, 256) or
//!   `max_queued_bytes_per_user` (`WS_MAX_QUEUED_BYTES_PER_USER`, 4 MiB),
//!   or its connection's, `max_queued_per_connection`
//!   (`WS_MAX_QUEUED_PER_CONNECTION`, 64).
//!
//! # Fairness (issue 15)
//!
//! One user's greedy or slow connections must not cause refusals for
//! anyone else, so backpressure is per user, not per process:
//!
//! * **Service order is round-robin by user**: each user has a line of
//!   their own (first come first served within it), and a freed place goes
//!   to the next user in turn, not to the oldest request. A user with 200
//!   requests waiting delays another user's request by at most one of
//!   theirs per place, however long their line.
//! * **Shares**: no user may hold more than their share of the queue
//!   (above), so 78 greedy users at least are needed to fill it by count,
//!   16 by bytes; a connection, at most 64 entries (the gateway runs at most
//!   8 invocations of one connection at once anyway).
//! * **Refusal hits the greedy user first**: when the queue is full all the
//!   same, a request of a user with fewer waiting requests than the user
//!   with the most pushes that user's newest request out (it is refused)
//!   and takes its place.
//! * The expected wait of a request counts the places it will actually
//!   wait for under round-robin (its own line, times the users waiting),
//!   not the whole queue, so a light user is not refused for a heavy
//!   user's backlog.
//!
//! Why 10 s: a mobile client's request timeout is commonly 15-30 s, and
//! API Gateway's integration timeout is 29 s, so an answer within 10 s still
//! reaches a client that is waiting for it, while a request that would wait
//! longer is better refused at once, with a hint, than answered after the
//! client gave up. A reconnect storm (every client of a deploy or a network
//! blip rejoining its rooms at once) is the burst this queue is for: 10,000
//! joins on this repository's 2-core benchmark machine finish well within
//! it (docs/BENCHMARKS.md, S6).
//!
//! Sends are also refused while the fan-out after them is far behind: the
//! relays report their delivery lag to Redis every 100 ms and every frame's
//! lease renewal reads the largest (no extra round trip). Above half of
//! `max_delivery_lag_ms` (`WS_MAX_DELIVERY_LAG_MS`, 5 s) sends are refused
//! with a probability that grows linearly, all of them at
//! `max_delivery_lag_ms`: a message that would arrive seconds late is worth
//! refusing, one that arrives 200 ms late is not. The lag is one number for
//! everyone, so it is **only held against users who send at least their
//! fair share**: this process keeps each user's recent send rate (a moving
//! average over about 2 s), and a user sending less than the average of
//! the users sending here is never refused for lag. A flood from one user
//! is refused; the users it slows down are not. (When every user sends
//! alike, about half are above the average at any moment, so shedding at
//! the hard limit halves the accepted rate rather than stopping it.)
//!
//! In Lambda a process handles one event at a time and none of the queue
//! bites (Lambda concurrency and RDS Proxy bound the load); per-user
//! limits there are the rate buckets in Redis and `MAX_CONNECTIONS_PER_USER`.
//! It is for processes that serve many sockets (the local gateway, a
//! container).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::metrics::{self, ShedReason};

/// The admission limits (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct AdmissionLimits {
    /// Requests that need PostgreSQL running at once.
    pub max_in_flight: usize,
    /// Longest expected (and actual) wait for a place.
    pub max_wait: Duration,
    /// Most requests waiting for a place.
    pub max_queued: usize,
    /// Most frame bytes waiting for a place.
    pub max_queued_bytes: usize,
    /// Most requests of one user waiting for a place.
    pub max_queued_per_user: usize,
    /// Most frame bytes of one user waiting for a place.
    pub max_queued_bytes_per_user: usize,
    /// Most requests of one connection waiting for a place.
    pub max_queued_per_connection: usize,
    /// Delivery lag (ms) at which every send (of a user at or above their
    /// fair share) is refused; 0 turns the lag-based refusal off.
    pub max_delivery_lag_ms: u64,
}

impl AdmissionLimits {
    /// No limit at all (Lambda, and tests that do not test admission).
    pub const UNLIMITED: Self = Self {
        max_in_flight: usize::MAX >> 4,
        max_wait: Duration::MAX,
        max_queued: usize::MAX,
        max_queued_bytes: usize::MAX,
        max_queued_per_user: usize::MAX,
        max_queued_bytes_per_user: usize::MAX,
        max_queued_per_connection: usize::MAX,
        max_delivery_lag_ms: 0,
    };
}

/// Who a request belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Owner<'a> {
    /// The user: the unit of fairness.
    pub(crate) user: &'a str,
    /// The connection it came on.
    pub(crate) connection: &'a str,
}

/// The shared state of one process's admission.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    limits: AdmissionLimits,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limits: AdmissionLimits,
    queue: Mutex<Queue>,
    /// How long a request held its place, on average (µs, moving average
    /// over about the last 64 requests).
    held_us: AtomicU64,
    /// Recent send rates per user, for the lag refusal.
    senders: Mutex<SendRates>,
}

/// The places and the lines waiting for them.
#[derive(Debug, Default)]
struct Queue {
    /// Places free now.
    free: usize,
    /// Each user's line, for users with requests waiting.
    lines: HashMap<String, Line>,
    /// Users with requests waiting, in the order they are served.
    ring: VecDeque<String>,
    /// Requests waiting per connection (only connections with some).
    per_connection: HashMap<String, usize>,
    /// Requests and frame bytes waiting, in all.
    queued: usize,
    queued_bytes: usize,
    next_ticket: u64,
}

/// One user's waiting requests, oldest first.
#[derive(Debug, Default)]
struct Line {
    waiters: VecDeque<Waiter>,
    bytes: usize,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    bytes: usize,
    connection: String,
    /// `true`: a place is given; `false`: pushed out by a lighter user.
    answer: oneshot::Sender<bool>,
}

impl Queue {
    /// Takes a waiter out of the line of `user` (front or back, or the one
    /// with `ticket`), keeping every count right.
    fn take(&mut self, user: &str, pick: Pick) -> Option<Waiter> {
        let line = self.lines.get_mut(user)?;
        let waiter = match pick {
            Pick::Oldest => line.waiters.pop_front(),
            Pick::Newest => line.waiters.pop_back(),
            Pick::Ticket(ticket) => {
                let at = line.waiters.iter().position(|w| w.ticket == ticket)?;
                line.waiters.remove(at)
            }
        }?;
        line.bytes -= waiter.bytes;
        if line.waiters.is_empty() {
            self.lines.remove(user);
            self.ring.retain(|u| u != user);
        }
        self.queued -= 1;
        self.queued_bytes -= waiter.bytes;
        if let Some(n) = self.per_connection.get_mut(&waiter.connection) {
            *n -= 1;
            if *n == 0 {
                self.per_connection.remove(&waiter.connection);
            }
        }
        Some(waiter)
    }

    /// Gives a freed place to the next user in turn, or keeps it free.
    fn hand_on(&mut self) {
        while let Some(user) = self.ring.pop_front() {
            if !self.lines.contains_key(&user) {
                continue;
            }
            // Served: to the back of the ring (`take` drops an emptied line).
            self.ring.push_back(user.clone());
            if let Some(waiter) = self.take(&user, Pick::Oldest)
                && waiter.answer.send(true).is_ok()
            {
                return;
            }
        }
        self.free += 1;
    }

    /// The user with the most requests waiting, and how many.
    fn heaviest(&self) -> Option<(&str, usize)> {
        self.lines
            .iter()
            .map(|(user, line)| (user.as_str(), line.waiters.len()))
            .max_by_key(|(_, n)| *n)
    }
}

#[derive(Debug, Clone, Copy)]
enum Pick {
    Oldest,
    Newest,
    Ticket(u64),
}

/// A place held by an admitted request; dropping it hands the place on
/// (round-robin by user) and records how long it was held.
#[derive(Debug)]
pub(crate) struct Admitted {
    inner: Arc<Inner>,
    since: Instant,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let took = self.since.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        // A lost update under contention only skews the average slightly.
        let old = self.inner.held_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            took
        } else {
            old - old / 64 + took / 64
        };
        self.inner.held_us.store(new.max(1), Ordering::Relaxed);
        self.inner.lock().hand_on();
    }
}

/// A request waiting in line. Dropped before its answer came (the
/// connection went away), it leaves the line; dropped after a place was
/// given, it hands the place on.
struct Waiting {
    inner: Arc<Inner>,
    user: String,
    ticket: u64,
    answer: oneshot::Receiver<bool>,
    done: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut queue = self.inner.lock();
        if queue.take(&self.user, Pick::Ticket(self.ticket)).is_none()
            && self.answer.try_recv() == Ok(true)
        {
            queue.hand_on();
        }
    }
}

fn busy(reason: ShedReason, wait: Duration) -> Error {
    metrics::record_shed(reason);
    let secs = wait.as_secs_f64().ceil().clamp(1.0, 60.0) as u64;
    Error::rate_limited("server busy, retry later", secs)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding it; the counts stay consistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long a request waits behind `ahead` others, by the recent
    /// average.
    fn expected_wait(&self, ahead: usize) -> Duration {
        let held = self.held_us.load(Ordering::Relaxed);
        let per_place = (ahead as u64 + 1).saturating_mul(held) / self.limits.max_in_flight as u64;
        Duration::from_micros(per_place)
    }
}

impl Admission {
    pub(crate) fn new(limits: AdmissionLimits) -> Self {
        let max_in_flight = limits.max_in_flight.max(1);
        let limits = AdmissionLimits {
            max_in_flight,
            ..limits
        };
        Self {
            limits,
            inner: Arc::new(Inner {
                limits,
                queue: Mutex::new(Queue {
                    free: max_in_flight,
                    ..Queue::default()
                }),
                held_us: AtomicU64::new(0),
                senders: Mutex::new(SendRates::default()),
            }),
        }
    }

    pub(crate) fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    /// Requests waiting for a place now.
    pub(crate) fn queued(&self) -> usize {
        self.inner.lock().queued
    }

    /// A place for one request of `bytes` bytes from `owner`: at once when
    /// one is free and nobody waits, else after waiting in its user's line,
    /// or `RATE_LIMITED` when the wait would be over the bound, or the
    /// queue or the user's or connection's share of it is full.
    pub(crate) async fn admit(&self, owner: Owner<'_>, bytes: usize) -> Result<Admitted> {
        let admitted = || Admitted {
            inner: Arc::clone(&self.inner),
            since: Instant::now(),
        };
        let limits = &self.limits;
        let (ticket, answer) = {
            let mut queue = self.inner.lock();
            // A free place means nobody waits: places go to waiters first.
            if queue.free > 0 {
                queue.free -= 1;
                return Ok(admitted());
            }
            let (own, own_bytes) = queue
                .lines
                .get(owner.user)
                .map_or((0, 0), |line| (line.waiters.len(), line.bytes));
            let users = queue.ring.len() + usize::from(own == 0);
            // Round-robin: one request of each waiting user per turn.
            let ahead = queue.queued.min((own + 1).saturating_mul(users));
            let expected = self.inner.expected_wait(ahead);
            if own >= limits.max_queued_per_user
                || own_bytes.saturating_add(bytes) > limits.max_queued_bytes_per_user
                || queue
                    .per_connection
                    .get(owner.connection)
                    .is_some_and(|n| *n >= limits.max_queued_per_connection)
            {
                return Err(busy(ShedReason::UserShare, expected));
            }
            if queue.queued >= limits.max_queued
                || queue.queued_bytes.saturating_add(bytes) > limits.max_queued_bytes
            {
                // Full: push out the newest request of the heaviest user,
                // if that is someone with more waiting than this user.
                let heaviest = queue
                    .heaviest()
                    .filter(|(user, n)| *user != owner.user && *n > own + 1)
                    .map(|(user, _)| user.to_owned());
                let Some(heavy) = heaviest else {
                    return Err(busy(ShedReason::QueueFull, expected));
                };
                if let Some(pushed) = queue.take(&heavy, Pick::Newest) {
                    let _ = pushed.answer.send(false);
                }
                if queue.queued >= limits.max_queued
                    || queue.queued_bytes.saturating_add(bytes) > limits.max_queued_bytes
                {
                    return Err(busy(ShedReason::QueueFull, expected));
                }
            }
            if expected > limits.max_wait {
                return Err(busy(ShedReason::QueueWait, expected));
            }
            let ticket = queue.next_ticket;
            queue.next_ticket += 1;
            let (tx, rx) = oneshot::channel();
            let line = queue.lines.entry(owner.user.to_owned()).or_default();
            let first = line.waiters.is_empty();
            line.waiters.push_back(Waiter {
                ticket,
                bytes,
                connection: owner.connection.to_owned(),
                answer: tx,
            });
            line.bytes += bytes;
            if first {
                queue.ring.push_back(owner.user.to_owned());
            }
            *queue
                .per_connection
                .entry(owner.connection.to_owned())
                .or_default() += 1;
            queue.queued += 1;
            queue.queued_bytes += bytes;
            (ticket, rx)
        };
        let mut waiting = Waiting {
            inner: Arc::clone(&self.inner),
            user: owner.user.to_owned(),
            ticket,
            answer,
            done: false,
        };
        let answered = tokio::time::timeout(limits.max_wait, &mut waiting.answer).await;
        let granted = match answered {
            Ok(Ok(granted)) => granted,
            Ok(Err(_)) => {
                waiting.done = true;
                return Err(Error::internal(anyhow::anyhow!(
                    "an admission waiter was dropped unanswered"
                )));
            }
            Err(_elapsed) => {
                // Out of line, unless a place (or a push-out) came just now.
                let mut queue = self.inner.lock();
                if queue.take(owner.user, Pick::Ticket(ticket)).is_some() {
                    waiting.done = true;
                    return Err(busy(ShedReason::QueueWait, limits.max_wait));
                }
                drop(queue);
                waiting.answer.try_recv() == Ok(true)
            }
        };
        waiting.done = true;
        if granted {
            Ok(admitted())
        } else {
            Err(busy(ShedReason::QueueFull, limits.max_wait))
        }
    }

    /// Whether to refuse a send of `user` while the fan-out is `lag_ms`
    /// behind; also counts the send towards the user's recent rate.
    pub(crate) fn sheds_for_lag(&self, user: &str, lag_ms: u64) -> bool {
        let hard = self.limits.max_delivery_lag_ms;
        let share = self
            .inner
            .senders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(user, Instant::now());
        let soft = hard / 2;
        if hard == 0 || lag_ms <= soft {
            return false;
        }
        // Below the average of the users sending here: not the cause.
        if share < 0.999 {
            return false;
        }
        lag_ms >= hard || rand::random::<f64>() < (lag_ms - soft) as f64 / (hard - soft) as f64
    }
}

/// Recent send rates per user: exponentially decaying counts (time
/// constant [`SendRates::TAU`]), so a user's rate is about their sends in
/// the last two seconds, per second.
#[derive(Debug, Default)]
struct SendRates {
    users: HashMap<String, (f64, Instant)>,
    /// The sum of every user's rate, decayed the same way.
    total: f64,
    total_at: Option<Instant>,
    swept: Option<Instant>,
}

impl SendRates {
    const TAU: f64 = 2.0;
    /// Below this (sends a second) a user no longer counts as sending.
    const IDLE: f64 = 0.05;

    fn decay(rate: f64, since: Instant, now: Instant) -> f64 {
        rate * (-(now.saturating_duration_since(since).as_secs_f64()) / Self::TAU).exp()
    }

    /// Counts one send of `user` at `now`; returns the user's rate over the
    /// average rate of the users sending (1.0: exactly their fair share).
    fn record(&mut self, user: &str, now: Instant) -> f64 {
        let bump = 1.0 / Self::TAU;
        self.total = self
            .total_at
            .map_or(0.0, |at| Self::decay(self.total, at, now))
            + bump;
        self.total_at = Some(now);
        let rate = match self.users.get_mut(user) {
            Some((rate, at)) => {
                *rate = Self::decay(*rate, *at, now) + bump;
                *at = now;
                *rate
            }
            None => {
                self.users.insert(user.to_owned(), (bump, now));
                bump
            }
        };
        // Forget users who stopped sending, once a second (O(users)).
        if self
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1))
        {
            self.users
                .retain(|_, (rate, at)| Self::decay(*rate, *at, now) >= Self::IDLE);
            self.swept = Some(now);
        }
        let average = self.total / self.users.len().max(1) as f64;
        rate / average
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_in_flight: usize) -> AdmissionLimits {
        AdmissionLimits {
            max_in_flight,
            max_wait: Duration::from_secs(10),
            max_queued: 1_000,
            max_queued_bytes: 1 << 20,
            max_queued_per_user: 1_000,
            max_queued_bytes_per_user: 1 << 20,
            max_queued_per_connection: 1_000,
            max_delivery_lag_ms: 0,
        }
    }

    fn of(user: &str) -> Owner<'_> {
        Owner {
            user,
            connection: user,
        }
    }

    fn queued_bytes(admission: &Admission) -> usize {
        admission.inner.lock().queued_bytes
    }

    /// Starts a request of `user` that holds its place until `release`
    /// fires; returns when it has queued (or been admitted).
    fn spawn_request(
        admission: &Admission,
        user: &'static str,
        order: &Arc<Mutex<Vec<&'static str>>>,
    ) -> (tokio::task::JoinHandle<Result<()>>, oneshot::Sender<()>) {
        let (release, hold) = oneshot::channel::<()>();
        let admission = admission.clone();
        let order = Arc::clone(order);
        let task = tokio::spawn(async move {
            let place = admission.admit(of(user), 1).await?;
            order
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(user);
            let _ = hold.await;
            drop(place);
            Ok(())
        });
        (task, release)
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn a_burst_over_the_places_queues_instead_of_being_refused() {
        let admission = Admission::new(limits(2));
        let first = admission.admit(of("u"), 10).await.expect("first");
        let second = admission.admit(of("u"), 10).await.expect("second");
        // Three more than there are places: they wait, in order.
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let admission = admission.clone();
                tokio::spawn(async move { admission.admit(of("u"), 10).await.map(|_| ()) })
            })
            .collect();
        settle().await;
        assert_eq!(admission.queued(), 3);
        drop((first, second));
        for task in waiting {
            task.await.expect("join").expect("admitted after waiting");
        }
        assert_eq!(admission.queued(), 0);
        assert_eq!(queued_bytes(&admission), 0);
        assert_eq!(admission.inner.lock().free, 2, "every place given back");
    }

    #[tokio::test]
    async fn refuses_when_the_expected_wait_is_over_the_bound() {
        let admission = Admission::new(AdmissionLimits {
            max_wait: Duration::from_millis(100),
            ..limits(1)
        });
        // Requests have been holding their place for 60 ms each.
        admission.inner.held_us.store(60_000, Ordering::Relaxed);
        let _held = admission.admit(of("u"), 1).await.expect("a free place");
        let admission2 = admission.clone();
        let second = tokio::spawn(async move { admission2.admit(of("u"), 1).await.map(|_| ()) });
        settle().await;
        // One waits (60 ms expected); the next of the same user would wait
        // 120 ms.
        let refused = admission
            .admit(of("u"), 1)
            .await
            .expect_err("over the bound");
        assert_eq!(refused.code(), crate::ErrorCode::RateLimited);
        assert_eq!(refused.retry_after_secs(), Some(1));
        second.abort();
    }

    #[tokio::test]
    async fn refuses_when_the_queue_is_out_of_memory() {
        let admission = Admission::new(AdmissionLimits {
            max_queued_bytes: 100,
            ..limits(1)
        });
        let _held = admission.admit(of("u"), 1).await.expect("a free place");
        let refused = admission
            .admit(of("u"), 101)
            .await
            .expect_err("over the byte bound");
        assert_eq!(refused.code(), crate::ErrorCode::RateLimited);
        assert_eq!(admission.queued(), 0, "a refusal leaves the queue");
        assert_eq!(queued_bytes(&admission), 0);
    }

    #[tokio::test]
    async fn a_wait_that_runs_out_is_refused() {
        let admission = Admission::new(AdmissionLimits {
            max_wait: Duration::from_millis(50),
            ..limits(1)
        });
        let _held = admission.admit(of("u"), 1).await.expect("a free place");
        let started = Instant::now();
        let refused = admission
            .admit(of("u"), 1)
            .await
            .expect_err("nobody frees a place");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(refused.code(), crate::ErrorCode::RateLimited);
        assert_eq!(admission.queued(), 0);
    }

    #[tokio::test]
    async fn places_go_round_robin_by_user_not_first_come_first_served() {
        let admission = Admission::new(limits(1));
        let order = Arc::new(Mutex::new(Vec::new()));
        let (holder, release_holder) = spawn_request(&admission, "first", &order);
        settle().await;
        // A greedy user queues five, then a light user queues one.
        let mut greedy = Vec::new();
        for _ in 0..5 {
            greedy.push(spawn_request(&admission, "greedy", &order));
            settle().await;
        }
        let light = spawn_request(&admission, "light", &order);
        settle().await;
        assert_eq!(admission.queued(), 6);
        // Every other request gives its place back as soon as it has it.
        let mut others = greedy;
        others.push(light);
        let (tasks, releases): (Vec<_>, Vec<_>) = others.into_iter().unzip();
        for release in releases {
            let _ = release.send(());
        }
        let _ = release_holder.send(());
        holder.await.expect("join").expect("admitted");
        for task in tasks {
            task.await.expect("join").expect("admitted");
        }
        // The light user is served after one of the greedy user's, not
        // after all five.
        let order = order.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert_eq!(
            order,
            [
                "first", "greedy", "light", "greedy", "greedy", "greedy", "greedy"
            ]
        );
    }

    #[tokio::test]
    async fn a_user_over_their_share_is_refused_and_others_still_queue() {
        let admission = Admission::new(AdmissionLimits {
            max_queued_per_user: 2,
            ..limits(1)
        });
        let _held = admission.admit(of("x"), 1).await.expect("a free place");
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let admission = admission.clone();
                tokio::spawn(async move { admission.admit(of("greedy"), 1).await.map(|_| ()) })
            })
            .collect();
        settle().await;
        let refused = admission
            .admit(of("greedy"), 1)
            .await
            .expect_err("over the share");
        assert_eq!(refused.code(), crate::ErrorCode::RateLimited);
        let admission2 = admission.clone();
        let light = tokio::spawn(async move { admission2.admit(of("light"), 1).await.map(|_| ()) });
        settle().await;
        assert_eq!(admission.queued(), 3, "the light user queued");
        for task in waiting {
            task.abort();
        }
        light.abort();
        settle().await;
        assert_eq!(admission.queued(), 0, "cancelled waiters leave the line");
    }

    #[tokio::test]
    async fn a_full_queue_pushes_the_heaviest_users_newest_request_out() {
        let admission = Admission::new(AdmissionLimits {
            max_queued: 3,
            ..limits(1)
        });
        let held = admission.admit(of("x"), 1).await.expect("a free place");
        let mut greedy = Vec::new();
        for _ in 0..3 {
            let admission = admission.clone();
            greedy.push(tokio::spawn(async move {
                admission.admit(of("greedy"), 1).await.map(|_| ())
            }));
            settle().await;
        }
        assert_eq!(admission.queued(), 3);
        let admission2 = admission.clone();
        let light = tokio::spawn(async move { admission2.admit(of("light"), 1).await.map(|_| ()) });
        settle().await;
        // The greedy user's newest was refused; the light one waits.
        let newest = greedy.pop().expect("three").await.expect("join");
        assert_eq!(
            newest.expect_err("pushed out").code(),
            crate::ErrorCode::RateLimited
        );
        assert_eq!(admission.queued(), 3);
        drop(held);
        light
            .await
            .expect("join")
            .expect("the light user is served");
        for task in greedy {
            task.await.expect("join").expect("the others are served");
        }
    }

    #[test]
    fn only_users_at_or_over_their_fair_share_are_refused_for_lag() {
        let admission = Admission::new(AdmissionLimits {
            max_delivery_lag_ms: 5_000,
            ..limits(1)
        });
        assert!(!admission.sheds_for_lag("solo", 0));
        assert!(!admission.sheds_for_lag("solo", 2_500));
        // One user alone is the whole load: refused as before.
        assert!(admission.sheds_for_lag("solo", 5_000));
        let shed = (0..10_000)
            .filter(|_| admission.sheds_for_lag("solo", 3_750))
            .count();
        assert!(
            (4_000..6_000).contains(&shed),
            "{shed} of 10,000 at the midpoint"
        );
        // A light user beside the flood is not refused, even at the limit.
        for _ in 0..20 {
            assert!(!admission.sheds_for_lag("light", 60_000));
            assert!(admission.sheds_for_lag("solo", 60_000));
        }
        assert!(!Admission::new(AdmissionLimits::UNLIMITED).sheds_for_lag("u", u64::MAX));
    }
}
