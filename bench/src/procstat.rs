//! Resident memory and CPU time of server processes, from `/proc`.
//!
//! `VmRSS` from `/proc/<pid>/status` (kB) and `utime + stime` from
//! `/proc/<pid>/stat` (clock ticks; 100 per second on every Linux this runs
//! on). Reading both costs a few microseconds, so sampling every few
//! hundred milliseconds is free.

use std::time::Instant;

use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` (`sysconf(_SC_CLK_TCK)`,
/// 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// User + system CPU time, seconds.
    pub cpu_seconds: f64,
}

/// Reads a process and all its descendants (a PostgreSQL postmaster and
/// its backends), summed; `None` when the process is gone.
pub fn read_tree(pid: u32) -> Option<Reading> {
    let mut total = read(pid)?;
    let mut parents = vec![pid];
    let mut children: Vec<(u32, u32)> = Vec::new(); // (pid, ppid)
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = std::fs::read_to_string(format!("/proc/{child}/stat"))
            .ok()
            .and_then(|stat| parse_ppid(&stat))
        {
            children.push((child, ppid));
        }
    }
    while let Some(parent) = parents.pop() {
        for &(child, ppid) in &children {
            if ppid == parent {
                if let Some(r) = read(child) {
                    total.rss_bytes += r.rss_bytes;
                    total.cpu_seconds += r.cpu_seconds;
                }
                parents.push(child);
            }
        }
    }
    Some(total)
}

/// The parent pid (field 4) from the text of `/proc/<pid>/stat`.
pub fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Reads a process; `None` when it is gone (or not readable).
pub fn read(pid: u32) -> Option<Reading> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(Reading {
        rss_bytes: parse_rss_kb(&status)? * 1024,
        cpu_seconds: parse_cpu_ticks(&stat)? as f64 / TICKS_PER_SECOND,
    })
}

/// `VmRSS` in kB from the text of `/proc/<pid>/status`.
pub fn parse_rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `utime + stime` (fields 14 and 15) from the text of `/proc/<pid>/stat`.
/// The command name (field 2) may hold spaces and parentheses, so fields
/// are counted from the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name come field 3 (state) onwards: utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A process watched over a run.
#[derive(Debug, Clone)]
pub struct Watched {
    /// A name for the report (`gw1`, `relay`, `peer-a`, …).
    pub label: String,
    /// The process id.
    pub pid: u32,
    /// Whether its descendants count too.
    pub tree: bool,
    /// The first reading.
    pub start: Option<Reading>,
    /// The largest RSS seen.
    pub peak_rss_bytes: u64,
    /// The latest reading.
    pub last: Option<Reading>,
    /// Readings at marked moments (`connected`, `send_start`, `send_end`).
    pub marks: Vec<(String, Reading, Instant)>,
}

impl Watched {
    /// Starts watching `pid`.
    pub fn new(label: impl Into<String>, pid: u32) -> Self {
        Self::with_tree(label, pid, false)
    }

    /// Starts watching `pid`, with its descendants when `tree`.
    pub fn with_tree(label: impl Into<String>, pid: u32, tree: bool) -> Self {
        let start = if tree { read_tree(pid) } else { read(pid) };
        Self {
            label: label.into(),
            pid,
            tree,
            start,
            peak_rss_bytes: start.map_or(0, |r| r.rss_bytes),
            last: start,
            marks: Vec::new(),
        }
    }

    /// Takes a reading, keeping the peak.
    pub fn sample(&mut self) -> Option<Reading> {
        let reading = if self.tree {
            read_tree(self.pid)?
        } else {
            read(self.pid)?
        };
        self.peak_rss_bytes = self.peak_rss_bytes.max(reading.rss_bytes);
        self.last = Some(reading);
        Some(reading)
    }

    /// Takes a reading and remembers it under `name`.
    pub fn mark(&mut self, name: &str) {
        if let Some(reading) = self.sample() {
            self.marks.push((name.to_owned(), reading, Instant::now()));
        }
    }

    /// The reading marked `name`.
    pub fn at(&self, name: &str) -> Option<(Reading, Instant)> {
        self.marks
            .iter()
            .rev()
            .find(|(n, _, _)| n == name)
            .map(|(_, r, t)| (*r, *t))
    }

    /// Mean CPU use between two marks, in percent of one core.
    pub fn cpu_percent_between(&self, from: &str, to: &str) -> Option<f64> {
        let (a, ta) = self.at(from)?;
        let (b, tb) = self.at(to)?;
        let wall = tb.duration_since(ta).as_secs_f64();
        (wall > 0.0).then(|| (b.cpu_seconds - a.cpu_seconds) / wall * 100.0)
    }

    /// Mean CPU use over the sending window (the marks `send_start` and
    /// `send_end`), in percent of one core, to a tenth.
    pub fn cpu_send_percent(&self) -> Option<f64> {
        self.cpu_percent_between("send_start", "send_end")
            .map(|p| (p * 10.0).round() / 10.0)
    }
}

/// The latest RSS of each process, `label=123M` separated by spaces: the
/// end of the progress lines the scenarios print every second.
pub fn rss_now(watched: &[Watched]) -> String {
    let rss: Vec<String> = watched
        .iter()
        .filter_map(|w| {
            w.last
                .map(|r| format!("{}={:.0}M", w.label, r.rss_bytes as f64 / 1048576.0))
        })
        .collect();
    rss.join(" ")
}

/// What the JSON line reports per process.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessReport {
    /// The label given on the command line.
    pub label: String,
    /// The process id.
    pub pid: u32,
    /// RSS when the run started, MiB.
    pub rss_start_mib: f64,
    /// RSS once every connection was up (and idle), MiB.
    pub rss_connected_mib: Option<f64>,
    /// Largest RSS seen, MiB.
    pub rss_peak_mib: f64,
    /// CPU time over the sending window, seconds.
    pub cpu_send_seconds: Option<f64>,
    /// Mean CPU over the sending window, percent of one core.
    pub cpu_send_percent: Option<f64>,
    /// Whether the process was still running when the report was made.
    pub alive: bool,
}

fn mib(bytes: u64) -> f64 {
    crate::summary::round3(bytes as f64 / (1024.0 * 1024.0))
}

impl Watched {
    /// The report of this process.
    pub fn report(&self) -> ProcessReport {
        let cpu_send_seconds = match (self.at("send_start"), self.at("send_end")) {
            (Some((a, _)), Some((b, _))) => {
                Some(crate::summary::round3(b.cpu_seconds - a.cpu_seconds))
            }
            _ => None,
        };
        ProcessReport {
            label: self.label.clone(),
            pid: self.pid,
            rss_start_mib: mib(self.start.map_or(0, |r| r.rss_bytes)),
            rss_connected_mib: self.at("connected").map(|(r, _)| mib(r.rss_bytes)),
            rss_peak_mib: mib(self.peak_rss_bytes),
            cpu_send_seconds,
            cpu_send_percent: self.cpu_send_percent(),
            alive: read(self.pid).is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rss_from_status() {
        let status = "Name:\tchat-local\nVmPeak:\t  99 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kb(status), Some(12345));
        assert_eq!(parse_rss_kb("Name: x\n"), None);
    }

    #[test]
    fn parses_cpu_ticks_even_with_odd_process_names() {
        let stat = "4242 (node (peer) x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_ppid(stat), Some(1));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let r = read(me).expect("our own /proc entry");
        assert!(r.rss_bytes > 0);
        let mut w = Watched::new("self", me);
        w.mark("send_start");
        w.mark("send_end");
        assert!(w.report().cpu_send_seconds.is_some());
        assert!(w.peak_rss_bytes > 0);
        let tree = read_tree(me).expect("our own tree");
        assert!(tree.rss_bytes >= r.rss_bytes);
    }
}
