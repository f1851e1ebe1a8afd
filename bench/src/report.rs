//! The results table: medians of the JSON lines of a benchmark session,
//! side by side for the two systems, with the ratios and the targets.
//!
//! Input: the JSON lines `chat-bench` printed (`run`, `sweep`, `storm`,
//! `cold_start`, `process_start`) plus `pgbench` lines the script writes.
//! Output: a Markdown table, put between the markers
//! `<!-- results:begin -->` and `<!-- results:end -->` of the docs page so
//! the hand-written analysis around it survives a new session.
//!
//! The targets live here, next to how they are evaluated (never in a timed
//! unit test): see [`rows`].

use std::fmt::Write as _;

use serde_json::Value;

use crate::summary::median;

/// The label of this project's stack in the JSON lines.
pub const OURS: &str = "ours";
/// The label of the Node.js original.
pub const BASELINE: &str = "baseline";
/// The label of an earlier build of this stack (`BENCH_BEFORE_DIR`), run
/// beside the current one to show what a change cost.
pub const BEFORE: &str = "before";
/// The label of our stack on a local 3-primary Redis Cluster (`--only
/// ...,cluster`), run beside the single Redis in the same session.
pub const CLUSTER: &str = "cluster";
/// The label of the deployed shape run locally (scripts/lambda-local.sh:
/// the emulators invoking the function binaries under `cargo lambda watch`).
pub const LAMBDA: &str = "lambda";

const BEGIN: &str = "<!-- results:begin -->";
const END: &str = "<!-- results:end -->";

/// Which way a metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Smaller is better (latency, memory, loss).
    Lower,
    /// Larger is better (throughput).
    Higher,
}

/// A target on our value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// At most this.
    AtMost(f64),
    /// At least this.
    AtLeast(f64),
    /// At least this many times the baseline.
    TimesBaseline(f64),
    /// Less than the baseline (a time): met when ours finished and the
    /// baseline took longer or never finished.
    UnderBaseline,
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Scenario column.
    pub scenario: String,
    /// Metric column.
    pub metric: String,
    /// Our median (None: not measured).
    pub ours: Option<f64>,
    /// The baseline's median (None: not measured or not applicable).
    pub baseline: Option<f64>,
    /// Which way is better.
    pub better: Better,
    /// The target, if any.
    pub target: Option<Target>,
    /// How many runs the medians are of (ours, baseline).
    pub runs: (usize, usize),
}

impl Row {
    /// `baseline / ours` for lower-is-better, `ours / baseline` otherwise;
    /// none when either is "never" (infinite).
    pub fn ratio(&self) -> Option<f64> {
        let (o, b) = (self.ours?, self.baseline?);
        if !o.is_finite() || !b.is_finite() {
            return None;
        }
        match self.better {
            Better::Lower if o > 0.0 => Some(b / o),
            Better::Higher if b > 0.0 => Some(o / b),
            _ => None,
        }
    }

    /// Whether the target holds; None without a target or a value.
    pub fn met(&self) -> Option<bool> {
        let ours = self.ours?;
        Some(match self.target? {
            Target::AtMost(v) => ours <= v,
            Target::AtLeast(v) => ours >= v,
            // Nothing held is not "5× nothing".
            Target::TimesBaseline(k) => ours > 0.0 && ours >= k * self.baseline?,
            Target::UnderBaseline => {
                let baseline = self.baseline?;
                ours.is_finite() && ours < baseline
            }
        })
    }
}

fn get(v: &Value, pointer: &str) -> Option<f64> {
    let x = v.pointer(pointer)?;
    x.as_f64()
        .or_else(|| x.as_bool().map(|b| if b { 1.0 } else { 0.0 }))
}

fn lines<'a>(all: &'a [Value], kind: &str, label: &str, scenario: &str) -> Vec<&'a Value> {
    lines_where(all, kind, label, scenario, &|_| true)
}

fn lines_where<'a>(
    all: &'a [Value],
    kind: &str,
    label: &str,
    scenario: &str,
    select: &dyn Fn(&Value) -> bool,
) -> Vec<&'a Value> {
    all.iter()
        .filter(|v| {
            v["kind"] == kind
                && v["label"] == label
                && (scenario.is_empty() || v["scenario"] == scenario)
                && select(v)
        })
        .collect()
}

/// Which codes of a `{code: count}` object are counted.
#[derive(Clone, Copy)]
enum Codes<'a> {
    /// Every code.
    All,
    /// These codes.
    Only(&'a [&'a str]),
    /// Every code but these.
    Except(&'a [&'a str]),
}

impl Codes<'_> {
    fn pick(self, code: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(codes) => codes.contains(&code),
            Self::Except(codes) => !codes.contains(&code),
        }
    }
}

/// Sum of the counts of a `{code: count}` object for the `codes` picked
/// (0 when the object is missing or empty: nothing was counted).
fn count_codes(v: &Value, pointer: &str, codes: Codes<'_>) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_object)
        .map_or(0.0, |m| {
            m.iter()
                .filter(|(code, _)| codes.pick(code))
                .filter_map(|(_, n)| n.as_f64())
                .sum()
        })
}

/// `count` as a share of the messages a run (or a sweep step) sent, %.
fn percent_of_sent(v: &Value, count: f64) -> Option<f64> {
    Some(count / get(v, "/sent")?.max(1.0) * 100.0)
}

/// The first step of a sweep that was not held.
fn first_failed_step(v: &Value) -> Option<&Value> {
    v["steps"].as_array()?.iter().find(|s| s["held"] == false)
}

/// Refused sends of a sweep step, % of those sent: from the counts when
/// the step has them, else from the rates.
fn step_refused_percent(step: &Value) -> Option<f64> {
    get(step, "/rejected")
        .and_then(|refused| percent_of_sent(step, refused))
        .or_else(|| {
            let (sent, accepted) = (get(step, "/send_rate")?, get(step, "/accepted_rate")?);
            (sent > 0.0).then(|| (sent - accepted).max(0.0) / sent * 100.0)
        })
}

fn med(values: &[&Value], f: &dyn Fn(&Value) -> Option<f64>) -> (Option<f64>, usize) {
    let xs: Vec<f64> = values.iter().filter_map(|v| f(v)).collect();
    (median(&xs), xs.len())
}

/// Sum of a per-process field over the processes of a run.
fn process_sum(v: &Value, field: &str) -> Option<f64> {
    let procs = v["processes"].as_array()?;
    let xs: Vec<f64> = procs.iter().filter_map(|p| p[field].as_f64()).collect();
    (!xs.is_empty()).then(|| xs.iter().sum())
}

/// The relay's CPU per `PostToConnection` (µs) over the send phase: its
/// CPU seconds divided by the deliveries measured (each delivery, the
/// sender's own copy included, is one post).
fn relay_cpu_per_post_us(v: &Value) -> Option<f64> {
    let relay = v["processes"]
        .as_array()?
        .iter()
        .find(|p| p["label"] == "relay")?;
    let cpu = relay["cpu_send_seconds"].as_f64()?;
    let posts = get(v, "/latency/count")?;
    (posts > 0.0).then(|| cpu / posts * 1e6)
}

/// A number of each JSON line, and its name in the tables.
#[derive(Clone, Copy)]
enum Metric<'a> {
    /// The number (a boolean counts as 0 or 1) at a JSON pointer.
    At(&'a str, &'static str),
    /// The sum of a per-process field over the processes of a run.
    Processes(&'a str, &'static str),
    /// The sum of the counts of the codes picked in the `{code: count}`
    /// object at a JSON pointer.
    Codes(&'a str, &'static str, Codes<'a>),
    /// Computed from the line.
    With(&'a str, &'a dyn Fn(&Value) -> Option<f64>),
}

impl Metric<'_> {
    fn name(&self) -> &str {
        match self {
            Self::At(name, _)
            | Self::Processes(name, _)
            | Self::Codes(name, _, _)
            | Self::With(name, _) => name,
        }
    }

    fn read(&self, v: &Value) -> Option<f64> {
        match self {
            Self::At(_, pointer) => get(v, pointer),
            Self::Processes(_, field) => process_sum(v, field),
            Self::Codes(_, pointer, codes) => Some(count_codes(v, pointer, *codes)),
            Self::With(_, f) => f(v),
        }
    }

    /// The median of this metric over `lines`, and how many of them have it.
    fn median(&self, lines: &[&Value]) -> (Option<f64>, usize) {
        med(lines, &|v| self.read(v))
    }
}

// The metrics that more than one table or block shows, each defined once
// (and the latency percentiles together).
const DELIVERED: Metric<'static> = Metric::At("deliveries/s", "/delivered_per_s");
const LOST: Metric<'static> = Metric::At("lost deliveries", "/lost");
const REFUSED: Metric<'static> = Metric::At("sends refused (any code)", "/rejected");
const LOST_OR_REFUSED: Metric<'static> = Metric::With("lost + refused", &|v| {
    Some(LOST.read(v)? + REFUSED.read(v)?)
});
const DUPLICATES: Metric<'static> = Metric::At("duplicate deliveries", "/tally/duplicates");
const OUT_OF_ORDER: Metric<'static> = Metric::At("out-of-order deliveries", "/tally/out_of_order");
const DUPLICATES_OR_OUT_OF_ORDER: Metric<'static> =
    Metric::With("duplicate + out-of-order deliveries", &|v| {
        Some(DUPLICATES.read(v)? + OUT_OF_ORDER.read(v)?)
    });
const LATENCY_P50: Metric<'static> = Metric::At("latency p50 (ms)", "/latency/p50_ms");
const LATENCY_P99: Metric<'static> = Metric::At("latency p99 (ms)", "/latency/p99_ms");
const LATENCY_P999: Metric<'static> = Metric::At("latency p99.9 (ms)", "/latency/p999_ms");
const LATENCY_MAX: Metric<'static> = Metric::At("latency max (ms)", "/latency/max_ms");
const SERVER_CPU: Metric<'static> = Metric::Processes(
    "server CPU (% of one core, all processes)",
    "cpu_send_percent",
);
const SERVER_RSS_PEAK: Metric<'static> =
    Metric::Processes("server peak RSS (MiB, all processes)", "rss_peak_mib");
const RELAY_CPU: Metric<'static> = Metric::With(
    "relay CPU per PostToConnection (µs)",
    &relay_cpu_per_post_us,
);
const REDIS_CPU: Metric<'static> = Metric::With("Redis CPU (% of one core, all nodes)", &redis_cpu);
const PG_PER_SEND: Metric<'static> = Metric::At(
    "PostgreSQL round trips per sendMessage",
    "/counters/pg_round_trips_per_send",
);
const REDIS_PER_SEND: Metric<'static> = Metric::At(
    "Redis round trips per sendMessage",
    "/counters/redis_round_trips_per_send",
);
const JOINED: Metric<'static> = Metric::At("clients with their roomJoined", "/joined");
const REDIS_PER_JOIN: Metric<'static> = Metric::At(
    "Redis round trips per joinRoom",
    "/counters/redis_round_trips_per_join",
);

struct Builder<'a> {
    all: &'a [Value],
    rows: Vec<Row>,
}

impl<'a> Builder<'a> {
    /// The rows of one block of the table, titled `title`: the medians of
    /// the lines of `kind` and `scenario` (any scenario when empty) that
    /// `select` accepts.
    fn section<'s>(
        &'s mut self,
        kind: &'s str,
        scenario: &'s str,
        select: &'s dyn Fn(&Value) -> bool,
        title: &'s str,
    ) -> Section<'s, 'a> {
        Section {
            b: self,
            kind,
            scenario,
            select,
            title,
        }
    }
}

/// One block of rows: what [`Builder::section`] chose, so that each row
/// names only its metric.
struct Section<'s, 'a> {
    b: &'s mut Builder<'a>,
    kind: &'s str,
    scenario: &'s str,
    select: &'s dyn Fn(&Value) -> bool,
    title: &'s str,
}

impl Section<'_, '_> {
    fn row(&mut self, metric: Metric<'_>, better: Better, target: Option<Target>) {
        let of = |label| {
            let lines = lines_where(self.b.all, self.kind, label, self.scenario, self.select);
            metric.median(&lines)
        };
        let ((ours, n_ours), (baseline, n_base)) = (of(OURS), of(BASELINE));
        self.b.rows.push(Row {
            scenario: self.title.to_owned(),
            metric: metric.name().to_owned(),
            ours,
            baseline,
            better,
            target,
            runs: (n_ours, n_base),
        });
    }

    /// A row for each of `metrics`, counts of what must not happen at all
    /// (lower is better, and the target is none).
    fn must_be_zero(&mut self, metrics: &[Metric<'_>]) {
        for metric in metrics {
            self.row(*metric, Better::Lower, Some(Target::AtMost(0.0)));
        }
    }
}

/// The rows of the table, from every JSON line of a session.
pub fn rows(all: &[Value]) -> Vec<Row> {
    use Better::{Higher, Lower};
    let mut b = Builder {
        all,
        rows: Vec::new(),
    };
    let all_lines: &dyn Fn(&Value) -> bool = &|_| true;
    let mut s1 = b.section("run", "S1", all_lines, "S1 idle: 10,000 connections");
    s1.row(Metric::At("connections up", "/connected"), Higher, None);
    s1.row(
        Metric::At(
            "gateway RSS per idle connection (bytes)",
            "/rss_per_connection_bytes",
        ),
        Lower,
        Some(Target::AtMost(8000.0)),
    );
    s1.row(
        Metric::Processes(
            "server RSS with every connection up (MiB, all processes)",
            "rss_connected_mib",
        ),
        Lower,
        None,
    );
    s1.row(
        Metric::At("connect: handshake p99 (ms)", "/connect_handshake/p99_ms"),
        Lower,
        None,
    );

    let mut s2 = b.section("run", "S2", all_lines, "S2 direct: 2,000 users, 1,000 DIRECT rooms across 2 instances, 2,000 msg/s, 60 s (ours: relay posts through the AWS SDK, SigV4-signed)");
    s2.row(DELIVERED, Higher, None);
    s2.must_be_zero(&[LOST, DUPLICATES, OUT_OF_ORDER, REFUSED]);
    s2.row(LATENCY_P50, Lower, Some(Target::AtMost(5.0)));
    s2.row(LATENCY_P99, Lower, Some(Target::AtMost(25.0)));
    s2.row(LATENCY_P999, Lower, None);
    s2.row(LATENCY_MAX, Lower, None);
    s2.row(SERVER_CPU, Lower, None);
    s2.row(SERVER_RSS_PEAK, Lower, None);
    s2.row(PG_PER_SEND, Lower, Some(Target::AtMost(1.0)));
    s2.row(REDIS_PER_SEND, Lower, Some(Target::AtMost(2.0)));
    s2.row(RELAY_CPU, Lower, None);

    let mut s3 = b.section("run", "S3", all_lines, "S3 fan-out: 1,000 users in GROUP rooms of 100, 100 msg/s (10,000 deliveries/s; ours: relay posts through the AWS SDK)");
    s3.row(DELIVERED, Higher, None);
    s3.must_be_zero(&[LOST]);
    s3.row(DUPLICATES_OR_OUT_OF_ORDER, Lower, None);
    s3.must_be_zero(&[REFUSED]);
    s3.row(LATENCY_P50, Lower, None);
    s3.row(LATENCY_P99, Lower, Some(Target::AtMost(50.0)));
    s3.row(SERVER_CPU, Lower, None);
    s3.row(RELAY_CPU, Lower, None);

    let s4 = "S4 saturation: DIRECT rate raised until a step is not held (any send refused, any loss, or p99 > 100 ms)";
    b.section("sweep", "S4", all_lines, s4).row(
        Metric::At("highest rate held (msg/s)", "/highest_held"),
        Higher,
        Some(Target::TimesBaseline(5.0)),
    );
    // The ceiling of one run is its best pgbench client count; the table
    // shows the median over the runs of that best.
    let ceilings = best_per_run(all);
    let best: Vec<f64> = ceilings.values().copied().collect();
    let ceiling = median(&best);
    let (held, n) = med(&lines(all, "sweep", OURS, "S4"), &|v| {
        get(v, "/highest_held")
    });
    b.rows.push(Row {
        scenario: s4.to_owned(),
        metric: "highest rate held, % of the pgbench ceiling of the same session".to_owned(),
        ours: held.zip(ceiling).map(|(h, c)| h / c * 100.0),
        baseline: lines(all, "sweep", BASELINE, "S4").first().and_then(|_| {
            let (h, _) = med(&lines(all, "sweep", BASELINE, "S4"), &|v| {
                get(v, "/highest_held")
            });
            h.zip(ceiling).map(|(h, c)| h / c * 100.0)
        }),
        better: Higher,
        target: Some(Target::AtLeast(70.0)),
        runs: (n, lines(all, "sweep", BASELINE, "S4").len()),
    });
    // The same two targets paired run by run: each run's rate against that
    // run's baseline and pgbench ceiling, then the median of those ratios.
    // Runs vary by a third, so the two statistics can fall on either side
    // of a target; the table shows both.
    let held_per_run = |label| {
        lines(all, "sweep", label, "S4")
            .into_iter()
            .filter_map(|v| Some((run_key(v), get(v, "/highest_held")?)))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (ours_held, base_held) = (held_per_run(OURS), held_per_run(BASELINE));
    let paired = |against: &std::collections::BTreeMap<String, f64>| {
        let ratios: Vec<f64> = ours_held
            .iter()
            .filter_map(|(run, h)| against.get(run).filter(|d| **d > 0.0).map(|d| h / d))
            .collect();
        (median(&ratios), ratios.len())
    };
    let (times, n_times) = paired(&base_held);
    b.rows.push(Row {
        scenario: s4.to_owned(),
        metric: "highest rate held ÷ the same run's baseline, median of runs (×)".to_owned(),
        ours: times,
        baseline: None,
        better: Higher,
        target: Some(Target::AtLeast(5.0)),
        runs: (n_times, 0),
    });
    let (share, n_share) = paired(&ceilings);
    b.rows.push(Row {
        scenario: s4.to_owned(),
        metric: "highest rate held, % of the same run's pgbench ceiling, median of runs".to_owned(),
        ours: share.map(|r| r * 100.0),
        baseline: None,
        better: Higher,
        target: Some(Target::AtLeast(70.0)),
        runs: (n_share, 0),
    });
    b.rows.push(Row {
        scenario: s4.to_owned(),
        metric:
            "pgbench ceiling: the same insert statement, prepared, best of 8/16/32 clients (tx/s)"
                .to_owned(),
        ours: ceiling,
        baseline: None,
        better: Higher,
        target: None,
        runs: (best.len(), 0),
    });
    // What ended each sweep: refusals (which the rule no longer allows in
    // any share) or latency. None when the top of the list still held.
    let mut s4 = b.section("sweep", "S4", all_lines, s4);
    s4.row(
        Metric::With("first rate not held: sends refused (% of sent)", &|v| {
            first_failed_step(v).and_then(step_refused_percent)
        }),
        Lower,
        None,
    );
    s4.row(
        Metric::With("first rate not held: latency p99 (ms)", &|v| {
            first_failed_step(v).and_then(|s| get(s, "/p99_ms"))
        }),
        Lower,
        None,
    );

    let s5 = "S5 cold start (Lambda Runtime API emulator) and binary size";
    let mut cold = b.section("cold_start", "", all_lines, s5);
    for f in ["rest", "ws-connect", "ws-message", "ws-disconnect"] {
        let pick = |field: &'static str| {
            move |v: &Value| (v["function"] == f).then(|| get(v, field)).flatten()
        };
        cold.row(
            Metric::With(
                &format!("{f}: spawn to first event handled, median (ms)"),
                &pick("/first_response/p50_ms"),
            ),
            Lower,
            Some(Target::AtMost(20.0)),
        );
        cold.row(
            Metric::With(
                &format!("{f}: spawn to ready for events, median (ms)"),
                &pick("/init/p50_ms"),
            ),
            Lower,
            None,
        );
        cold.row(
            Metric::With(&format!("{f}: stripped binary (MB)"), &|v: &Value| {
                (v["function"] == f)
                    .then(|| get(v, "/size_bytes").map(|b| b / 1e6))
                    .flatten()
            }),
            Lower,
            Some(Target::AtMost(10.0)),
        );
    }
    b.section("process_start", "", all_lines, s5).row(
        Metric::At(
            "whole server process: spawn to first /health answered (ms)",
            "/ms",
        ),
        Lower,
        None,
    );

    storm_rows(&mut b, all);

    let mut ov = b.section(
        "run",
        "overload",
        all_lines,
        "Overload: DIRECT at 3× the S4 rate held (strict rule)",
    );
    ov.row(
        Metric::At("offered rate (msg/s)", "/send_rate"),
        Higher,
        None,
    );
    ov.row(
        Metric::At("accepted rate (msg/s)", "/accepted_rate"),
        Higher,
        None,
    );
    let percent = |codes: Codes<'static>| {
        move |v: &Value| percent_of_sent(v, count_codes(v, "/errors", codes))
    };
    ov.row(
        Metric::With("sends refused, any code (% of sent)", &|v| {
            percent_of_sent(v, REFUSED.read(v)?)
        }),
        Higher,
        None,
    );
    ov.row(
        Metric::With(
            "refused with RATE_LIMITED (% of sent)",
            &percent(Codes::Only(&["RATE_LIMITED"])),
        ),
        Higher,
        None,
    );
    ov.row(
        Metric::With(
            "refused with another code (% of sent)",
            &percent(Codes::Except(&["RATE_LIMITED"])),
        ),
        Lower,
        None,
    );
    ov.row(
        Metric::At("accepted messages: latency p99 (ms)", "/latency/p99_ms"),
        Lower,
        Some(Target::AtMost(200.0)),
    );
    ov.must_be_zero(&[Metric::At("accepted messages lost", "/lost")]);
    ov.row(
        Metric::With("server processes alive afterwards", &|v| {
            let procs = v["processes"].as_array()?;
            Some(procs.iter().filter(|p| p["alive"] == true).count() as f64)
        }),
        Higher,
        None,
    );
    ov.row(SERVER_RSS_PEAK, Lower, None);
    b.rows
}

/// The `joinRoom` error codes S6 has a row each for, with the row's name;
/// one more row counts every other code.
const JOIN_ERROR_ROWS: [(&str, &[&str]); 3] = [
    (
        "joins refused with RATE_LIMITED (every attempt)",
        &["RATE_LIMITED"],
    ),
    (
        "joins refused with SERVICE_UNAVAILABLE (every attempt)",
        &["SERVICE_UNAVAILABLE", "UNAVAILABLE"],
    ),
    ("joins answered INTERNAL", &["INTERNAL"]),
];

/// The S6 rows, one block per storm size found in the lines (smallest
/// first), each median over the runs of that size.
fn storm_rows(b: &mut Builder<'_>, all: &[Value]) {
    use Better::{Higher, Lower};
    let mut sizes: Vec<u64> = all
        .iter()
        .filter(|v| v["kind"] == "storm" && v["scenario"] == "S6")
        .filter_map(|v| v["users"].as_u64())
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    for n in sizes {
        let of_size = move |v: &Value| v["users"].as_u64() == Some(n);
        let first = all
            .iter()
            .find(|v| v["kind"] == "storm" && of_size(v))
            .unwrap_or(&Value::Null);
        let missed = first["missed_messages"].as_u64().unwrap_or(20);
        let deadline = first["deadline_s"].as_f64().unwrap_or(60.0);
        let title = format!(
            "S6 reconnect storm: {} clients connect and join at once (half new DIRECT rooms, half recovering {missed} missed messages)",
            group_thousands(n as i64)
        );
        let mut s6 = b.section("storm", "S6", &of_size, &title);
        s6.row(JOINED, Higher, Some(Target::AtLeast(n as f64)));
        // A run in which some client never joined took forever: it counts
        // as "never", and a median of "never" is "never".
        s6.row(
            Metric::With(
                "time from the first connect until every client had its roomJoined (s)",
                &|v| {
                    if get(v, "/joined")? >= n as f64 {
                        get(v, "/all_joined_s")
                    } else {
                        Some(f64::INFINITY)
                    }
                },
            ),
            Lower,
            (n >= 10_000).then_some(Target::UnderBaseline),
        );
        s6.row(
            Metric::At(
                "each client, first connect to roomJoined: p99 (ms)",
                "/join_time/p99_ms",
            ),
            Lower,
            None,
        );
        // Every refusal, failure and wrong answer, by kind: none is allowed.
        let listed: Vec<&str> = JOIN_ERROR_ROWS
            .iter()
            .flat_map(|(_, codes)| *codes)
            .copied()
            .collect();
        let unanswered = format!("joins unanswered within the deadline ({deadline:.0} s)");
        s6.must_be_zero(
            &JOIN_ERROR_ROWS
                .map(|(name, codes)| Metric::Codes(name, "/join_errors", Codes::Only(codes))),
        );
        s6.must_be_zero(&[
            Metric::Codes(
                "joins answered with another error code",
                "/join_errors",
                Codes::Except(&listed),
            ),
            Metric::With(
                "connections refused, failed or dropped (every attempt)",
                &|v| {
                    Some(
                        count_codes(v, "/handshake_errors", Codes::All)
                            + get(v, "/unexpected_closes").unwrap_or(0.0),
                    )
                },
            ),
            Metric::Codes(&unanswered, "/failed", Codes::Only(&["no_answer"])),
            Metric::Codes(
                "wrong roomJoined (DIRECT pair split, recovery not exact)",
                "/wrong_answers",
                Codes::All,
            ),
        ]);
        s6.row(
            Metric::At(
                "PostgreSQL round trips per joinRoom",
                "/counters/pg_round_trips_per_join",
            ),
            Lower,
            Some(Target::AtMost(1.0)),
        );
        s6.row(REDIS_PER_JOIN, Lower, Some(Target::AtMost(1.0)));
        s6.row(SERVER_RSS_PEAK, Lower, None);
    }
}

/// The best pgbench figure (of its client counts) of each run, by
/// [`run_key`].
fn best_per_run(all: &[Value]) -> std::collections::BTreeMap<String, f64> {
    let mut best = std::collections::BTreeMap::new();
    for v in all.iter().filter(|v| v["kind"] == "pgbench") {
        if let Some(tps) = get(v, "/tps") {
            let e = best.entry(run_key(v)).or_insert(0.0_f64);
            *e = e.max(tps);
        }
    }
    best
}

/// Which run of which session a line belongs to.
fn run_key(v: &Value) -> String {
    format!("{}/{}", v["session"], v["run"])
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "–".to_owned(),
        Some(x) if x.is_infinite() => "never".to_owned(),
        Some(x) if x == x.trunc() || x.abs() >= 100.0 => group_thousands(x.round() as i64),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn group_thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn target_text(t: Option<Target>) -> String {
    match t {
        None => String::new(),
        Some(Target::AtMost(v)) => format!("≤ {}", fmt(Some(v))),
        Some(Target::AtLeast(v)) => format!("≥ {}", fmt(Some(v))),
        Some(Target::TimesBaseline(k)) => format!("≥ {k}× baseline"),
        Some(Target::UnderBaseline) => "< baseline".to_owned(),
    }
}

/// The Markdown table of `rows`.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | metric | ours | baseline | ratio | target | met? |\n|---|---|---:|---:|---:|---|---|\n",
    );
    let mut last = String::new();
    for r in rows {
        let scenario = if r.scenario == last {
            String::new()
        } else {
            r.scenario.clone()
        };
        last = r.scenario.clone();
        let ratio = r.ratio().map_or(String::new(), |x| format!("{x:.1}×"));
        let met = match r.met() {
            None if r.target.is_some() => "not measured".to_owned(),
            None => String::new(),
            Some(true) => "yes".to_owned(),
            Some(false) => "**no**".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {scenario} | {} | {} | {} | {ratio} | {} | {met} |",
            r.metric,
            fmt(r.ours),
            fmt(r.baseline),
            target_text(r.target)
        );
    }
    out
}

/// S2 and S3 of this build beside an earlier one (label [`BEFORE`]) run
/// in the same session: medians, and after ÷ before. `None` when the
/// session has no earlier build's lines.
pub fn before_after_table(all: &[Value]) -> Option<String> {
    if !all.iter().any(|v| v["label"] == BEFORE) {
        return None;
    }
    let metrics = [
        LATENCY_P50,
        LATENCY_P99,
        LOST_OR_REFUSED,
        SERVER_CPU,
        RELAY_CPU,
        PG_PER_SEND,
        REDIS_PER_SEND,
    ];
    let mut out = String::from(
        "| scenario | metric | this build | earlier build | this ÷ earlier | runs |\n|---|---|---:|---:|---:|---|\n",
    );
    for scenario in ["S2", "S3"] {
        let (this_build, earlier) = (
            lines(all, "run", OURS, scenario),
            lines(all, "run", BEFORE, scenario),
        );
        side_by_side(
            &mut out,
            scenario,
            &metrics,
            &[&this_build, &earlier],
            &|medians| {
                vec![match (medians[0], medians[1]) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                    _ => String::new(),
                }]
            },
        );
    }
    Some(out)
}

/// Writes one block of a side-by-side table: a row per metric with its
/// median over the lines of each of `columns`, then the cells `more` makes
/// of those medians, then how many runs the first two medians are of; the
/// title on the block's first row only.
fn side_by_side(
    out: &mut String,
    title: &str,
    metrics: &[Metric<'_>],
    columns: &[&[&Value]],
    more: &dyn Fn(&[Option<f64>]) -> Vec<String>,
) {
    for (i, metric) in metrics.iter().enumerate() {
        let (medians, runs): (Vec<_>, Vec<_>) = columns.iter().map(|c| metric.median(c)).unzip();
        let mut cells = vec![
            if i == 0 { title } else { "" }.to_owned(),
            metric.name().to_owned(),
        ];
        cells.extend(medians.iter().map(|m| fmt(*m)));
        cells.extend(more(&medians));
        cells.push(format!("{} / {}", runs[0], runs[1]));
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
}

/// The Redis CPU of a run (% of one core): the single Redis (process
/// `redis`) or every node of a cluster (`redis-<port>`).
fn redis_cpu(v: &Value) -> Option<f64> {
    let procs = v["processes"].as_array()?;
    let xs: Vec<f64> = procs
        .iter()
        .filter(|p| {
            p["label"]
                .as_str()
                .is_some_and(|l| l == "redis" || l.starts_with("redis-"))
        })
        .filter_map(|p| p["cpu_send_percent"].as_f64())
        .collect();
    (!xs.is_empty()).then(|| xs.iter().sum())
}

/// Each cluster node's share of the Redis CPU (median over `runs`), as
/// `port: share %` in port order.
fn node_shares(runs: &[&Value]) -> String {
    let mut nodes: Vec<String> = runs
        .iter()
        .filter_map(|v| v["processes"].as_array())
        .flatten()
        .filter_map(|p| p["label"].as_str())
        .filter_map(|l| l.strip_prefix("redis-"))
        .map(str::to_owned)
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
        .iter()
        .map(|node| {
            let label = format!("redis-{node}");
            let (share, _) = med(runs, &|v| {
                let total = redis_cpu(v)?;
                let mine = v["processes"]
                    .as_array()?
                    .iter()
                    .find(|p| p["label"] == label.as_str())?["cpu_send_percent"]
                    .as_f64()?;
                (total > 0.0).then(|| mine / total * 100.0)
            });
            format!("{node}: {} %", fmt(share))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Issue 18: our stack on a single Redis and on a local 3-primary Redis
/// Cluster (label [`CLUSTER`]) in the same session, beside the baseline:
/// S2, the S4 rate held and each S6 size, with the Redis CPU (and each
/// node's share of it) and the round trips per send and per join. `None`
/// when the session has no cluster lines.
pub fn cluster_table(all: &[Value]) -> Option<String> {
    if !all.iter().any(|v| v["label"] == CLUSTER) {
        return None;
    }
    let mut out = String::from(
        "\n#### Redis Cluster (3 primaries, 3 replicas) beside a single Redis\n\n\
         | scenario | metric | single Redis | Redis Cluster | baseline | runs |\n\
         |---|---|---:|---:|---:|---|\n",
    );
    let mut block = |scenario: &str,
                     kind: &str,
                     select: &dyn Fn(&Value) -> bool,
                     title: &str,
                     metrics: &[Metric<'_>]| {
        let of = |label: &str| lines_where(all, kind, label, scenario, select);
        let (single, cluster, baseline) = (of(OURS), of(CLUSTER), of("baseline"));
        side_by_side(
            &mut out,
            title,
            metrics,
            &[&single, &cluster, &baseline],
            &|_| Vec::new(),
        );
        let shares = node_shares(&cluster);
        if !shares.is_empty() {
            let _ = writeln!(
                out,
                "|  | each cluster node's share of the Redis CPU | | {shares} | | |"
            );
        }
    };
    let s2 = [
        LATENCY_P50,
        LATENCY_P99,
        LOST_OR_REFUSED,
        REDIS_CPU,
        REDIS_PER_SEND,
        PG_PER_SEND,
        SERVER_CPU,
    ];
    block("S2", "run", &|_| true, "S2 direct, 2,000 msg/s", &s2);
    let s4 = [Metric::At(
        "highest rate held (msg/s, strict rule)",
        "/highest_held",
    )];
    block("S4", "sweep", &|_| true, "S4 saturation", &s4);
    let mut sizes: Vec<u64> = all
        .iter()
        .filter(|v| v["kind"] == "storm" && v["label"] == CLUSTER)
        .filter_map(|v| v["users"].as_u64())
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    for n in sizes {
        let s6 = [
            JOINED,
            Metric::At(
                "time until every client had its roomJoined (s)",
                "/all_joined_s",
            ),
            Metric::Codes(
                "joins refused or failed (any code)",
                "/join_errors",
                Codes::All,
            ),
            REDIS_CPU,
            REDIS_PER_JOIN,
        ];
        let title = format!("S6 storm, {} clients", group_thousands(n as i64));
        block(
            "S6",
            "storm",
            &move |v: &Value| v["users"].as_u64() == Some(n),
            &title,
            &s6,
        );
    }
    Some(out)
}

/// The Lambda shape's table: S2 and S3 through the emulators and `cargo
/// lambda watch` (scenarios `LS2`, `LS3`) next to the in-process stack run
/// with the same parameters in the same session (label `ours`), the latency
/// the Lambda hop adds, invocations per second of each function over the
/// sending window, and each function's cold start through the Invoke API
/// (`lambda_cold_start` lines). Empty when the session has no Lambda lines.
pub fn lambda_table(all: &[Value]) -> String {
    if !all.iter().any(|v| v["label"] == LAMBDA) {
        return String::new();
    }
    let mut out = String::from(
        "\n#### The deployed shape, locally (scripts/lambda-local.sh)\n\n\
         | scenario | metric | Lambda shape | in-process stack | added by the Lambda hop |\n\
         |---|---|---:|---:|---:|\n",
    );
    let mut row =
        |scenario: &str, metric: &str, lambda: Option<f64>, ours: Option<f64>, hop: bool| {
            let added = match (hop, lambda, ours) {
                (true, Some(l), Some(o)) => fmt(Some(l - o)),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "| {scenario} | {metric} | {} | {} | {added} |",
                fmt(lambda),
                fmt(ours)
            );
        };
    for (scenario, title) in [
        ("LS2", "S2 direct, through the Lambda shape"),
        ("LS3", "S3 fan-out, through the Lambda shape"),
    ] {
        let both = |f: &dyn Fn(&Value) -> Option<f64>| {
            (
                med(&lines(all, "run", LAMBDA, scenario), f).0,
                med(&lines(all, "run", OURS, scenario), f).0,
            )
        };
        let mut first = true;
        let mut title_once = || {
            if std::mem::take(&mut first) {
                title.to_owned()
            } else {
                String::new()
            }
        };
        for (metric, hop) in [
            (DELIVERED, false),
            (REFUSED, false),
            (LOST, false),
            (LATENCY_P50, true),
            (LATENCY_P99, true),
        ] {
            let (lambda, ours) = both(&|v| metric.read(v));
            row(&title_once(), metric.name(), lambda, ours, hop);
        }
        // Only `$default` is invoked while sending (the counters are
        // deltas over the sending window; connects come before it).
        {
            let function = "ws-message";
            let per_s = |counter: &'static str| {
                move |v: &Value| {
                    let n = v["counters"]
                        .get(format!("{counter}{{function=\"{function}\"}}"))?
                        .as_f64()?;
                    let secs = get(v, "/duration_s")?;
                    (secs > 0.0).then(|| n / secs)
                }
            };
            let (lambda, _) = both(&per_s("chat_lambda_invocations_total"));
            row(
                &title_once(),
                &format!("{function}: invocations/s"),
                lambda,
                None,
                false,
            );
            let (errors, _) = both(&|v| {
                v["counters"]
                    .get(format!(
                        "chat_lambda_errors_total{{function=\"{function}\"}}"
                    ))?
                    .as_f64()
            });
            let (throttles, _) = both(&|v| {
                v["counters"]
                    .get(format!(
                        "chat_lambda_throttles_total{{function=\"{function}\"}}"
                    ))?
                    .as_f64()
            });
            row(
                &title_once(),
                &format!("{function}: failed invocations"),
                errors,
                None,
                false,
            );
            row(
                &title_once(),
                &format!("{function}: throttled invocations"),
                throttles,
                None,
                false,
            );
        }
    }
    let cold =
        "Cold start through the Invoke API (cargo lambda watch, first invocation of a fresh start)";
    let mut first = true;
    for function in [
        "rest",
        "ws-connect",
        "ws-message",
        "ws-disconnect",
        "maintenance",
    ] {
        let pick = |pointer: &'static str| {
            move |v: &Value| {
                (v["function"] == function)
                    .then(|| get(v, pointer))
                    .flatten()
            }
        };
        let cold_lines = lines(all, "lambda_cold_start", LAMBDA, "");
        let title = if std::mem::take(&mut first) { cold } else { "" };
        row(
            title,
            &format!("{function}: first invocation, request to answer (ms)"),
            med(&cold_lines, &pick("/first_ms")).0,
            None,
            false,
        );
        row(
            "",
            &format!("{function}: next invocation, warm (ms)"),
            med(&cold_lines, &pick("/warm_ms")).0,
            None,
            false,
        );
    }
    out
}

/// Puts `generated` between the markers of `page` (or appends the markers
/// and it when the page has none).
pub fn splice(page: &str, generated: &str) -> String {
    match (page.find(BEGIN), page.find(END)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{BEGIN}\n{generated}{END}{}",
            &page[..b],
            &page[e + END.len()..]
        ),
        _ => format!("{page}\n{BEGIN}\n{generated}{END}\n"),
    }
}

/// Reads JSON lines, skipping anything that is not a JSON object.
pub fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(Value::is_object)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s2(label: &str, p99: f64, lost: u64) -> Value {
        json!({"kind": "run", "label": label, "scenario": "S2", "lost": lost,
               "latency": {"p50_ms": 1.0, "p99_ms": p99}, "tally": {"duplicates": 0, "out_of_order": 0},
               "delivered_per_s": 4000.0, "processes": [{"cpu_send_percent": 10.0}, {"cpu_send_percent": 5.0}]})
    }

    /// An S4 sweep's result line of session `s`.
    fn sweep(label: &str, run: u64, held: f64) -> Value {
        json!({"kind": "sweep", "label": label, "scenario": "S4", "session": "s",
               "run": run, "highest_held": held})
    }

    /// A pgbench line of session `s`.
    fn pgbench(run: u64, clients: u64, tps: f64) -> Value {
        json!({"kind": "pgbench", "session": "s", "run": run, "clients": clients, "tps": tps})
    }

    #[test]
    fn medians_ratios_and_targets() {
        let ours = [10.0, 30.0, 20.0].map(|p99| s2(OURS, p99, 0));
        let baseline = [200.0, 100.0, 150.0].map(|p99| s2(BASELINE, p99, 5));
        let rows = rows(&[ours, baseline].concat());
        let p99 = rows
            .iter()
            .find(|r| r.scenario.starts_with("S2") && r.metric == "latency p99 (ms)")
            .expect("row");
        assert_eq!(p99.ours, Some(20.0));
        assert_eq!(p99.baseline, Some(150.0));
        assert_eq!(p99.ratio(), Some(7.5));
        assert_eq!(p99.met(), Some(true));
        assert_eq!(p99.runs, (3, 3));
        let cpu = rows
            .iter()
            .find(|r| r.scenario.starts_with("S2") && r.metric.starts_with("server CPU"))
            .expect("row");
        assert_eq!(cpu.ours, Some(15.0));
        let table = table(&rows);
        assert!(
            table.contains("| latency p99 (ms) | 20 | 150 | 7.5× | ≤ 25 | yes |"),
            "{table}"
        );
        assert!(table.contains("not measured"));
        assert!(table.contains("≤ 8,000"), "{table}");
    }

    #[test]
    fn times_baseline_targets_need_the_baseline() {
        let mut r = Row {
            scenario: "S4".into(),
            metric: "rate".into(),
            ours: Some(3000.0),
            baseline: Some(500.0),
            better: Better::Higher,
            target: Some(Target::TimesBaseline(5.0)),
            runs: (3, 3),
        };
        assert_eq!(r.met(), Some(true));
        r.baseline = Some(700.0);
        assert_eq!(r.met(), Some(false));
        r.baseline = None;
        assert_eq!(r.met(), None);
    }

    #[test]
    fn pgbench_ceiling_is_the_best_client_count_of_each_session() {
        let all = vec![
            pgbench(1, 8, 4000.0),
            pgbench(1, 16, 5000.0),
            pgbench(2, 16, 5200.0),
            sweep(OURS, 1, 4160.0),
        ];
        let rows = rows(&all);
        let pct = rows
            .iter()
            .find(|r| r.metric.contains("% of the pgbench"))
            .expect("row");
        assert_eq!(pct.ours, Some(4160.0 / 5100.0 * 100.0));
    }

    #[test]
    fn s4_targets_are_also_paired_run_by_run() {
        // Each run: our rate held, the baseline's, the pgbench ceiling.
        let runs = [
            (1, 6000.0, 1500.0, 10000.0),
            (2, 8000.0, 1500.0, 8000.0),
            (3, 7500.0, 2000.0, 11000.0),
        ];
        let all: Vec<Value> = runs
            .into_iter()
            .flat_map(|(run, ours, baseline, ceiling)| {
                [
                    sweep(OURS, run, ours),
                    sweep(BASELINE, run, baseline),
                    pgbench(run, 16, ceiling),
                ]
            })
            .collect();
        let rows = rows(&all);
        let find = |needle: &str| {
            rows.iter()
                .find(|r| r.metric.contains(needle))
                .unwrap_or_else(|| panic!("no row {needle}"))
        };
        // Medians first: 7,500 / 1,500 meets 5×.
        assert_eq!(find("highest rate held (msg/s)").met(), Some(true));
        // Run by run: 4.0×, 5.33×, 3.75×, median 4.0×, which does not.
        let times = find("÷ the same run's baseline");
        assert_eq!(times.ours, Some(4.0));
        assert_eq!(times.runs, (3, 0));
        assert_eq!(times.met(), Some(false));
        // 60 %, 100 %, 68.2 %: median 68.2 %.
        let share = find("% of the same run's pgbench");
        assert_eq!(share.ours, Some(7500.0 / 11000.0 * 100.0));
        assert_eq!(share.met(), Some(false));
    }

    /// A storm line of `n` clients: `joined` of them joined, the last at
    /// `secs`, with these join errors.
    fn storm(label: &str, n: u64, joined: u64, secs: f64, join_errors: Value) -> Value {
        json!({"kind": "storm", "label": label, "scenario": "S6", "users": n, "joined": joined,
        "all_joined_s": if joined == n { json!(secs) } else { Value::Null },
        "missed_messages": 20, "deadline_s": 60.0,
        "join_time": {"p99_ms": secs * 500.0}, "join_errors": join_errors,
        "handshake_errors": {}, "failed": {}, "wrong_answers": {}, "unexpected_closes": 0,
        "processes": [{"rss_peak_mib": 100.0}, {"rss_peak_mib": 50.0}],
        // Only our servers count their round trips.
        "counters": if label == OURS {
            json!({"pg_round_trips_per_join": 1.0, "redis_round_trips_per_join": 3.0})
        } else {
            json!({})
        }})
    }

    fn find<'a>(rows: &'a [Row], scenario: &str, metric: &str) -> &'a Row {
        rows.iter()
            .find(|r| r.scenario.starts_with(scenario) && r.metric.starts_with(metric))
            .unwrap_or_else(|| panic!("no row {scenario} / {metric}"))
    }

    #[test]
    fn s6_has_a_block_per_size() {
        let mut base_10k = storm(BASELINE, 10_000, 9_100, 0.0, json!({"INTERNAL": 900}));
        base_10k["failed"] = json!({"join:INTERNAL": 900});
        base_10k["handshake_errors"] = json!({"http_503": 40, "reset": 2});
        let all = vec![
            storm(OURS, 2_000, 2_000, 1.5, json!({})),
            storm(OURS, 10_000, 10_000, 6.0, json!({})),
            storm(OURS, 10_000, 10_000, 8.0, json!({"RATE_LIMITED": 3})),
            storm(OURS, 10_000, 9_999, 0.0, json!({"SERVICE_UNAVAILABLE": 1})),
            storm(BASELINE, 2_000, 2_000, 4.0, json!({})),
            base_10k,
        ];
        let rows = rows(&all);
        let small = "S6 reconnect storm: 2,000 clients";
        let big = "S6 reconnect storm: 10,000 clients";
        // Smallest size first, each size its own block.
        let first = rows
            .iter()
            .position(|r| r.scenario.starts_with(small))
            .expect("2,000 block");
        let second = rows
            .iter()
            .position(|r| r.scenario.starts_with(big))
            .expect("10,000 block");
        assert!(first < second);
        let time = find(&rows, small, "time from the first connect");
        assert_eq!((time.ours, time.baseline), (Some(1.5), Some(4.0)));
        assert_eq!(time.target, None);
        // 6 s, 8 s and a run that never finished: the median is 8 s. The
        // baseline never finished: "never", and ours is faster.
        let time = find(&rows, big, "time from the first connect");
        assert_eq!(time.ours, Some(8.0));
        assert_eq!(time.baseline, Some(f64::INFINITY));
        assert_eq!(time.ratio(), None);
        assert_eq!(time.met(), Some(true));
        let joined = find(&rows, big, "clients with their roomJoined");
        assert_eq!((joined.ours, joined.met()), (Some(10_000.0), Some(true)));
        let limited = find(&rows, big, "joins refused with RATE_LIMITED");
        assert_eq!((limited.ours, limited.met()), (Some(0.0), Some(true)));
        let internal = find(&rows, big, "joins answered INTERNAL");
        assert_eq!(internal.baseline, Some(900.0));
        let conns = find(&rows, big, "connections refused, failed or dropped");
        assert_eq!(conns.baseline, Some(42.0));
        let pg = find(&rows, big, "PostgreSQL round trips per joinRoom");
        assert_eq!(
            (pg.ours, pg.baseline, pg.met()),
            (Some(1.0), None, Some(true))
        );
        let redis = find(&rows, big, "Redis round trips per joinRoom");
        assert_eq!(redis.met(), Some(false));
        let rss = find(&rows, big, "server peak RSS");
        assert_eq!(rss.ours, Some(150.0));
        let table = table(&rows);
        assert!(
            table.contains("| time from the first connect until every client had its roomJoined (s) | 8 | never |  | < baseline | yes |"),
            "{table}"
        );
        assert!(
            table
                .contains("| joins unanswered within the deadline (60 s) | 0 | 0 |  | ≤ 0 | yes |"),
            "{table}"
        );
    }

    #[test]
    fn the_cluster_table_shows_each_nodes_share_of_the_redis_cpu() {
        assert_eq!(cluster_table(&[s2(OURS, 10.0, 0)]), None);
        let with_redis = |label: &str, redis: &[(&str, f64)]| {
            let mut line = s2(label, 10.0, 0);
            line["processes"] = redis
                .iter()
                .map(|(l, cpu)| json!({"label": l, "cpu_send_percent": cpu}))
                .chain([json!({"label": "relay", "cpu_send_percent": 40.0})])
                .collect();
            line
        };
        let all = vec![
            with_redis(OURS, &[("redis", 21.0)]),
            with_redis(
                CLUSTER,
                &[
                    ("redis-7101", 10.0),
                    ("redis-7102", 6.0),
                    ("redis-7103", 4.0),
                ],
            ),
            sweep(OURS, 1, 2000.0),
            sweep(CLUSTER, 1, 1500.0),
            sweep(BASELINE, 1, 800.0),
        ];
        let table = cluster_table(&all).expect("a cluster table");
        assert!(
            table.contains("| Redis CPU (% of one core, all nodes) | 21 | 20 | – | 1 / 1 |"),
            "{table}"
        );
        assert!(
            table.contains("7101: 50 %, 7102: 30 %, 7103: 20 %"),
            "{table}"
        );
        assert!(
            table.contains("| S4 saturation | highest rate held (msg/s, strict rule) | 2,000 | 1,500 | 800 | 1 / 1 |"),
            "{table}"
        );
    }

    #[test]
    fn a_storm_that_never_finishes_misses_the_time_target() {
        let all = vec![
            storm(OURS, 10_000, 9_000, 0.0, json!({"RATE_LIMITED": 5000})),
            storm(BASELINE, 10_000, 10_000, 5.0, json!({})),
        ];
        let rows = rows(&all);
        let big = "S6 reconnect storm: 10,000 clients";
        let time = find(&rows, big, "time from the first connect");
        assert_eq!(time.ours, Some(f64::INFINITY));
        assert_eq!(time.met(), Some(false));
        let limited = find(&rows, big, "joins refused with RATE_LIMITED");
        assert_eq!((limited.ours, limited.met()), (Some(5000.0), Some(false)));
        assert!(table(&rows).contains("| never | 5 |"));
    }

    #[test]
    fn s4_shows_what_ended_each_sweep_under_the_strict_rule() {
        let mut ours = sweep(OURS, 1, 7000.0);
        ours["steps"] = json!([
            {"rate": 7000.0, "held": true, "p99_ms": 40.0, "sent": 105000, "rejected": 0},
            {"rate": 7500.0, "held": false, "p99_ms": 55.0, "sent": 112500, "rejected": 1125},
        ]);
        // A line of an earlier session: rates only.
        let mut base = sweep(BASELINE, 1, 1500.0);
        base["steps"] = json!([
            {"rate": 1500.0, "held": true, "p99_ms": 20.0, "send_rate": 1500.0, "accepted_rate": 1500.0},
            {"rate": 2000.0, "held": false, "p99_ms": 900.0, "send_rate": 2000.0, "accepted_rate": 1900.0},
        ]);
        let rows = rows(&[ours, base]);
        let refused = find(&rows, "S4", "first rate not held: sends refused");
        assert_eq!(refused.ours, Some(1.0));
        assert_eq!(refused.baseline, Some(5.0));
        let p99 = find(&rows, "S4", "first rate not held: latency p99");
        assert_eq!((p99.ours, p99.baseline), (Some(55.0), Some(900.0)));
        // A sweep whose every step held has no failed step.
        let mut top = sweep(OURS, 1, 9000.0);
        top["steps"] = json!([{"rate": 9000.0, "held": true, "p99_ms": 40.0}]);
        let rows = super::rows(&[top]);
        assert_eq!(
            find(&rows, "S4", "first rate not held: sends refused").ours,
            None
        );
    }

    #[test]
    fn refusals_are_shown_where_they_happen() {
        let overload = |label: &str, errors: Value, rejected: u64| {
            json!({"kind": "run", "label": label, "scenario": "overload", "sent": 1000,
                   "rejected": rejected, "errors": errors})
        };
        let mut s2_line = s2(OURS, 10.0, 0);
        s2_line["rejected"] = json!(0);
        let all = vec![
            s2_line,
            overload(
                OURS,
                json!({"RATE_LIMITED": 600, "SERVICE_UNAVAILABLE": 100}),
                700,
            ),
            overload(BASELINE, json!({}), 0),
        ];
        let rows = rows(&all);
        let s2_refused = find(&rows, "S2", "sends refused");
        assert_eq!((s2_refused.ours, s2_refused.met()), (Some(0.0), Some(true)));
        assert_eq!(
            find(&rows, "Overload", "sends refused, any code").ours,
            Some(70.0)
        );
        assert_eq!(
            find(&rows, "Overload", "refused with RATE_LIMITED").ours,
            Some(60.0)
        );
        let other = find(&rows, "Overload", "refused with another code");
        assert_eq!((other.ours, other.baseline), (Some(10.0), Some(0.0)));
    }

    #[test]
    fn under_baseline_targets() {
        let mut r = Row {
            scenario: "S6".into(),
            metric: "time".into(),
            ours: Some(5.0),
            baseline: Some(6.0),
            better: Better::Lower,
            target: Some(Target::UnderBaseline),
            runs: (3, 3),
        };
        assert_eq!(r.met(), Some(true));
        assert_eq!(target_text(r.target), "< baseline");
        r.baseline = Some(5.0);
        assert_eq!(r.met(), Some(false));
        r.baseline = Some(f64::INFINITY);
        assert_eq!(r.met(), Some(true));
        r.ours = Some(f64::INFINITY);
        assert_eq!(r.met(), Some(false));
        r.baseline = None;
        assert_eq!(r.met(), None);
        assert_eq!(fmt(Some(f64::INFINITY)), "never");
    }

    #[test]
    fn the_lambda_table_compares_with_the_in_process_stack() {
        assert_eq!(lambda_table(&[s2(OURS, 10.0, 0)]), "");
        let run = |label: &str, p50: f64| {
            json!({"kind": "run", "label": label, "scenario": "LS2", "lost": 0, "rejected": 0,
                   "delivered_per_s": 100.0, "duration_s": 10.0,
                   "latency": {"p50_ms": p50, "p99_ms": p50 * 2.0},
                   "counters": {"chat_lambda_invocations_total{function=\"ws-message\"}": 500.0}})
        };
        let cold = json!({"kind": "lambda_cold_start", "label": LAMBDA, "function": "rest",
                          "first_ms": 900.0, "warm_ms": 3.0});
        let table = lambda_table(&[run(LAMBDA, 4.0), run(OURS, 1.5), cold]);
        assert!(
            table.contains("| latency p50 (ms) | 4 | 1.50 | 2.50 |"),
            "{table}"
        );
        assert!(
            table.contains("|  | ws-message: invocations/s | 50 | – |  |"),
            "{table}"
        );
        assert!(
            table.contains("| rest: first invocation, request to answer (ms) | 900 |"),
            "{table}"
        );
        assert!(
            table.contains("|  | rest: next invocation, warm (ms) | 3 |"),
            "{table}"
        );
    }

    #[test]
    fn the_table_is_spliced_between_markers() {
        let page = format!("# B\nintro\n{BEGIN}\nold\n{END}\nanalysis\n");
        let out = splice(&page, "new\n");
        assert_eq!(out, format!("# B\nintro\n{BEGIN}\nnew\n{END}\nanalysis\n"));
        let fresh = splice("# B\n", "t\n");
        assert!(fresh.ends_with(&format!("{BEGIN}\nt\n{END}\n")));
    }

    #[test]
    fn an_earlier_build_gets_its_own_table() {
        assert_eq!(before_after_table(&[s2(OURS, 10.0, 0)]), None);
        let table = before_after_table(&[s2(OURS, 10.0, 0), s2(BEFORE, 20.0, 0)])
            .expect("a table when an earlier build ran");
        assert!(table.contains("| S2 | latency p50 (ms) |"), "{table}");
        assert!(
            table.contains("| latency p99 (ms) | 10 | 20 | 0.50 | 1 / 1 |"),
            "{table}"
        );
    }

    #[test]
    fn numbers_are_readable() {
        assert_eq!(fmt(Some(12345.6)), "12,346");
        assert_eq!(fmt(Some(1.234)), "1.23");
        assert_eq!(fmt(Some(0.0)), "0");
        assert_eq!(fmt(Some(42.25)), "42.2");
        assert_eq!(fmt(None), "–");
    }
}
