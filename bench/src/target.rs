//! What every scenario is pointed at and what it watches: the system under
//! test (its URLs and token secret) and the server processes and counters
//! read around a run. [`crate::load`] and [`crate::storm`] share both.

use secrecy::SecretString;

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
