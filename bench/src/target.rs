//! What every scenario is pointed at and what it watches: the system under
//! test (its URLs and token secret), how fast its clients connect, and the
//! server processes and counters read around a run. [`crate::load`] and
//! [`crate::storm`] share all three.

use std::time::Duration;

use secrecy::SecretString;
use tokio::sync::Semaphore;

use crate::procstat::Watched;

/// The system under test.
#[derive(Debug, Clone)]
pub struct Target {
    /// Which system this is (`ours`, `baseline`): copied to the report.
    pub label: String,
    /// Which scenario (`S2`, `S6`, …): copied to the report.
    pub scenario: String,
    /// Base URLs of the instances (`http://host:port`).
    pub urls: Vec<String>,
    /// The WebSocket path on each instance.
    pub ws_path: String,
    /// HS256 secret to mint tokens with.
    pub secret: SecretString,
}

/// How fast the clients connect.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    /// New connections per second (0: no pacing beyond the cap).
    pub rate: f64,
    /// Most handshakes in flight at once (0: no limit beyond the rate). A
    /// shape that runs `$connect` in a function with a concurrency limit
    /// refuses the excess with 500, as API Gateway does for a throttled
    /// Lambda.
    pub concurrency: usize,
}

impl Pace {
    /// `rate` connections per second, at most `concurrency` handshakes in
    /// flight.
    pub fn new(rate: f64, concurrency: usize) -> Self {
        Self { rate, concurrency }
    }

    /// The permits of the semaphore that caps the handshakes in flight.
    pub fn permits(&self) -> usize {
        if self.concurrency == 0 {
            Semaphore::MAX_PERMITS
        } else {
            self.concurrency
        }
    }

    /// The time from one connect's start to the next one's; none without
    /// pacing.
    pub fn gap(&self) -> Option<Duration> {
        (self.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / self.rate))
    }
}

/// The server processes a run watches, and the `/metrics` it reads.
#[derive(Debug, Clone, Default)]
pub struct Servers {
    /// Server processes serving the target's `urls`, in the same order:
    /// their RSS per connection is reported.
    pub gateway_pids: Vec<u32>,
    /// Other server processes to watch (`label`, pid).
    pub pids: Vec<(String, u32)>,
    /// Processes watched with all their descendants (`label`, pid): a
    /// PostgreSQL postmaster and its backends.
    pub pid_trees: Vec<(String, u32)>,
    /// `/metrics` URLs whose counters are read around each phase.
    pub metrics_urls: Vec<String>,
}

impl Servers {
    /// Starts watching them all: the gateways (`gateway1`, …) first, in
    /// the order of the target's URLs, then the others, then the trees.
    pub fn watch(&self) -> Vec<Watched> {
        self.gateway_pids
            .iter()
            .enumerate()
            .map(|(i, pid)| Watched::new(format!("gateway{}", i + 1), *pid))
            .chain(self.pids.iter().map(|(l, p)| Watched::new(l.clone(), *p)))
            .chain(
                self.pid_trees
                    .iter()
                    .map(|(l, p)| Watched::with_tree(l.clone(), *p, true)),
            )
            .collect()
    }
}
