//! Admission control for the WebSocket requests that need PostgreSQL:
//! queue what can be served within a bound, refuse only beyond it.
//!
//! At most `max_in_flight` such requests run at once in a process
//! (`WS_MAX_IN_FLIGHT`); more wait, first come first served, for a place.
//! Nothing is refused while the service can finish it within a
//! user-visible bound: a request is refused (`RATE_LIMITED`, "server busy",
//! with the expected wait as its retry hint) only when
//!
//! * the wait it would have, estimated from the queue ahead of it and how
//!   long requests have recently held their place, is over `max_wait`
//!   (`WS_MAX_QUEUE_WAIT_MS`, 10 s), or it has waited that long already;
//! * or the queue is full: `max_queued` requests (`WS_MAX_QUEUED`, 20,000)
//!   or `max_queued_bytes` of frames (`WS_MAX_QUEUED_BYTES`, 64 MiB): the
//!   memory a process may spend on waiting work.
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
//! refusing, one that arrives 200 ms late is not.
//!
//! In Lambda a process handles one event at a time and none of this bites
//! (Lambda concurrency and RDS Proxy bound the load); it is for processes
//! that serve many sockets (the local gateway, a container).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    /// Delivery lag (ms) at which every send is refused; 0 turns the
    /// lag-based refusal off.
    pub max_delivery_lag_ms: u64,
}

impl AdmissionLimits {
    /// No limit at all (Lambda, and tests that do not test admission).
    pub const UNLIMITED: Self = Self {
        max_in_flight: usize::MAX >> 4,
        max_wait: Duration::MAX,
        max_queued: usize::MAX,
        max_queued_bytes: usize::MAX,
        max_delivery_lag_ms: 0,
    };
}

/// The shared state of one process's admission.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    limits: AdmissionLimits,
    places: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
    queued_bytes: Arc<AtomicUsize>,
    /// How long a request held its place, on average (µs, moving average
    /// over about the last 64 requests).
    held_us: Arc<AtomicU64>,
}

/// A place held by an admitted request; dropping it frees the place and
/// records how long it was held.
#[derive(Debug)]
pub(crate) struct Admitted {
    _permit: OwnedSemaphorePermit,
    since: Instant,
    held_us: Arc<AtomicU64>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let took = self.since.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        // A lost update under contention only skews the average slightly.
        let old = self.held_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            took
        } else {
            old - old / 64 + took / 64
        };
        self.held_us.store(new.max(1), Ordering::Relaxed);
    }
}

/// Undoes a queue entry however the wait ends (admitted, refused or
/// cancelled because the connection went away).
struct QueueEntry<'a> {
    admission: &'a Admission,
    bytes: usize,
}

impl Drop for QueueEntry<'_> {
    fn drop(&mut self) {
        self.admission.queued.fetch_sub(1, Ordering::AcqRel);
        self.admission
            .queued_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

fn busy(reason: ShedReason, wait: Duration) -> Error {
    metrics::record_shed(reason);
    let secs = wait.as_secs_f64().ceil().clamp(1.0, 60.0) as u64;
    Error::rate_limited("server busy, retry later", secs)
}

impl Admission {
    pub(crate) fn new(limits: AdmissionLimits) -> Self {
        let max_in_flight = limits.max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            limits: AdmissionLimits {
                max_in_flight,
                ..limits
            },
            places: Arc::new(Semaphore::new(max_in_flight)),
            queued: Arc::default(),
            queued_bytes: Arc::default(),
            held_us: Arc::default(),
        }
    }

    pub(crate) fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    /// Requests waiting for a place now.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// How long a request that queues now would wait, by the recent
    /// average.
    fn expected_wait(&self, ahead: usize) -> Duration {
        let held = self.held_us.load(Ordering::Relaxed);
        let per_place = (ahead as u64 + 1).saturating_mul(held) / self.limits.max_in_flight as u64;
        Duration::from_micros(per_place)
    }

    /// A place for one request of `bytes` bytes: at once when one is free,
    /// else after waiting in line, or `RATE_LIMITED` when the wait would
    /// be over the bound or the queue is full.
    pub(crate) async fn admit(&self, bytes: usize) -> Result<Admitted> {
        let permit = match Arc::clone(&self.places).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => self.wait_in_line(bytes).await?,
        };
        Ok(Admitted {
            _permit: permit,
            since: Instant::now(),
            held_us: Arc::clone(&self.held_us),
        })
    }

    async fn wait_in_line(&self, bytes: usize) -> Result<OwnedSemaphorePermit> {
        let ahead = self.queued.fetch_add(1, Ordering::AcqRel);
        let queued_bytes = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        let _entry = QueueEntry {
            admission: self,
            bytes,
        };
        let expected = self.expected_wait(ahead);
        if ahead >= self.limits.max_queued
            || queued_bytes.saturating_add(bytes) > self.limits.max_queued_bytes
        {
            return Err(busy(ShedReason::QueueFull, expected));
        }
        if expected > self.limits.max_wait {
            return Err(busy(ShedReason::QueueWait, expected));
        }
        let places = Arc::clone(&self.places);
        match tokio::time::timeout(self.limits.max_wait, places.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(Error::internal(anyhow::anyhow!(
                "the admission semaphore was closed"
            ))),
            Err(_elapsed) => Err(busy(ShedReason::QueueWait, self.limits.max_wait)),
        }
    }

    /// Whether to refuse a send while the fan-out is `lag_ms` behind.
    pub(crate) fn sheds_for_lag(&self, lag_ms: u64) -> bool {
        let hard = self.limits.max_delivery_lag_ms;
        let soft = hard / 2;
        if hard == 0 || lag_ms <= soft {
            return false;
        }
        lag_ms >= hard || rand::random::<f64>() < (lag_ms - soft) as f64 / (hard - soft) as f64
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
            max_delivery_lag_ms: 0,
        }
    }

    #[tokio::test]
    async fn a_burst_over_the_places_queues_instead_of_being_refused() {
        let admission = Admission::new(limits(2));
        let first = admission.admit(10).await.expect("first");
        let second = admission.admit(10).await.expect("second");
        // Three more than there are places: they wait, in order.
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let admission = admission.clone();
                tokio::spawn(async move { admission.admit(10).await.map(|_| ()) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(admission.queued(), 3);
        drop((first, second));
        for task in waiting {
            task.await.expect("join").expect("admitted after waiting");
        }
        assert_eq!(admission.queued(), 0);
        assert_eq!(admission.queued_bytes.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn refuses_when_the_expected_wait_is_over_the_bound() {
        let admission = Admission::new(AdmissionLimits {
            max_wait: Duration::from_millis(100),
            ..limits(1)
        });
        // Requests have been holding their place for 60 ms each.
        admission.held_us.store(60_000, Ordering::Relaxed);
        let _held = admission.admit(1).await.expect("a free place");
        let admission2 = admission.clone();
        let second = tokio::spawn(async move { admission2.admit(1).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // One waits (60 ms expected); the next would wait 120 ms.
        let refused = admission.admit(1).await.expect_err("over the bound");
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
        let _held = admission.admit(1).await.expect("a free place");
        let refused = admission.admit(101).await.expect_err("over the byte bound");
        assert_eq!(refused.code(), crate::ErrorCode::RateLimited);
        assert_eq!(admission.queued(), 0, "a refusal leaves the queue");
        assert_eq!(admission.queued_bytes.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_wait_that_runs_out_is_refused() {
        let admission = Admission::new(AdmissionLimits {
            max_wait: Duration::from_millis(50),
            ..limits(1)
        });
        let _held = admission.admit(1).await.expect("a free place");
        let started = Instant::now();
        let refused = admission.admit(1).await.expect_err("nobody frees a place");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(refused.code(), crate::ErrorCode::RateLimited);
    }

    #[test]
    fn sends_are_refused_in_proportion_to_a_lag_of_seconds() {
        let admission = Admission::new(AdmissionLimits {
            max_delivery_lag_ms: 5_000,
            ..limits(1)
        });
        assert!(!admission.sheds_for_lag(0));
        assert!(!admission.sheds_for_lag(200));
        assert!(!admission.sheds_for_lag(2_500));
        assert!(admission.sheds_for_lag(5_000));
        assert!(admission.sheds_for_lag(60_000));
        let shed = (0..10_000)
            .filter(|_| admission.sheds_for_lag(3_750))
            .count();
        assert!(
            (4_000..6_000).contains(&shed),
            "{shed} of 10,000 at the midpoint"
        );
        assert!(!Admission::new(AdmissionLimits::UNLIMITED).sheds_for_lag(u64::MAX));
    }
}
