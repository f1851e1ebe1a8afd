//! The results table: medians of the JSON lines of a benchmark session,
//! side by side for the two systems, with the ratios and the targets.
//!
//! Input: the JSON lines `chat-bench` printed (`run`, `sweep`,
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
    /// `baseline / ours` for lower-is-better, `ours / baseline` otherwise.
    pub fn ratio(&self) -> Option<f64> {
        let (o, b) = (self.ours?, self.baseline?);
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
            Target::TimesBaseline(k) => ours >= k * self.baseline?,
        })
    }
}

fn get(v: &Value, pointer: &str) -> Option<f64> {
    let x = v.pointer(pointer)?;
    x.as_f64()
        .or_else(|| x.as_bool().map(|b| if b { 1.0 } else { 0.0 }))
}

fn lines<'a>(all: &'a [Value], kind: &str, label: &str, scenario: &str) -> Vec<&'a Value> {
    all.iter()
        .filter(|v| {
            v["kind"] == kind
                && v["label"] == label
                && (scenario.is_empty() || v["scenario"] == scenario)
        })
        .collect()
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

struct Builder<'a> {
    all: &'a [Value],
    rows: Vec<Row>,
}

impl Builder<'_> {
    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        kind: &str,
        scenario: &str,
        title: &str,
        metric: &str,
        f: &dyn Fn(&Value) -> Option<f64>,
        better: Better,
        target: Option<Target>,
    ) {
        let (ours, n_ours) = med(&lines(self.all, kind, OURS, scenario), f);
        let (baseline, n_base) = med(&lines(self.all, kind, BASELINE, scenario), f);
        self.rows.push(Row {
            scenario: title.to_owned(),
            metric: metric.to_owned(),
            ours,
            baseline,
            better,
            target,
            runs: (n_ours, n_base),
        });
    }
}

/// The rows of the table, from every JSON line of a session.
pub fn rows(all: &[Value]) -> Vec<Row> {
    use Better::{Higher, Lower};
    let mut b = Builder {
        all,
        rows: Vec::new(),
    };
    let s1 = "S1 idle: 10,000 connections";
    b.row(
        "run",
        "S1",
        s1,
        "connections up",
        &|v| get(v, "/connected"),
        Higher,
        None,
    );
    b.row(
        "run",
        "S1",
        s1,
        "gateway RSS per idle connection (bytes)",
        &|v| get(v, "/rss_per_connection_bytes"),
        Lower,
        Some(Target::AtMost(8000.0)),
    );
    b.row(
        "run",
        "S1",
        s1,
        "server RSS with every connection up (MiB, all processes)",
        &|v| process_sum(v, "rss_connected_mib"),
        Lower,
        None,
    );
    b.row(
        "run",
        "S1",
        s1,
        "connect: handshake p99 (ms)",
        &|v| get(v, "/connect_handshake/p99_ms"),
        Lower,
        None,
    );

    let s2 = "S2 direct: 2,000 users, 1,000 DIRECT rooms across 2 instances, 2,000 msg/s, 60 s";
    b.row(
        "run",
        "S2",
        s2,
        "deliveries/s",
        &|v| get(v, "/delivered_per_s"),
        Higher,
        None,
    );
    b.row(
        "run",
        "S2",
        s2,
        "lost deliveries",
        &|v| get(v, "/lost"),
        Lower,
        Some(Target::AtMost(0.0)),
    );
    b.row(
        "run",
        "S2",
        s2,
        "duplicate deliveries",
        &|v| get(v, "/tally/duplicates"),
        Lower,
        Some(Target::AtMost(0.0)),
    );
    b.row(
        "run",
        "S2",
        s2,
        "out-of-order deliveries",
        &|v| get(v, "/tally/out_of_order"),
        Lower,
        Some(Target::AtMost(0.0)),
    );
    b.row(
        "run",
        "S2",
        s2,
        "latency p50 (ms)",
        &|v| get(v, "/latency/p50_ms"),
        Lower,
        Some(Target::AtMost(5.0)),
    );
    b.row(
        "run",
        "S2",
        s2,
        "latency p99 (ms)",
        &|v| get(v, "/latency/p99_ms"),
        Lower,
        Some(Target::AtMost(25.0)),
    );
    b.row(
        "run",
        "S2",
        s2,
        "latency p99.9 (ms)",
        &|v| get(v, "/latency/p999_ms"),
        Lower,
        None,
    );
    b.row(
        "run",
        "S2",
        s2,
        "latency max (ms)",
        &|v| get(v, "/latency/max_ms"),
        Lower,
        None,
    );
    b.row(
        "run",
        "S2",
        s2,
        "server CPU (% of one core, all processes)",
        &|v| process_sum(v, "cpu_send_percent"),
        Lower,
        None,
    );
    b.row(
        "run",
        "S2",
        s2,
        "server peak RSS (MiB, all processes)",
        &|v| process_sum(v, "rss_peak_mib"),
        Lower,
        None,
    );
    b.row(
        "run",
        "S2",
        s2,
        "PostgreSQL round trips per sendMessage",
        &|v| get(v, "/counters/pg_round_trips_per_send"),
        Lower,
        Some(Target::AtMost(1.0)),
    );
    b.row(
        "run",
        "S2",
        s2,
        "Redis round trips per sendMessage",
        &|v| get(v, "/counters/redis_round_trips_per_send"),
        Lower,
        Some(Target::AtMost(2.0)),
    );

    let s3 = "S3 fan-out: 1,000 users in GROUP rooms of 100, 100 msg/s (10,000 deliveries/s)";
    b.row(
        "run",
        "S3",
        s3,
        "deliveries/s",
        &|v| get(v, "/delivered_per_s"),
        Higher,
        None,
    );
    b.row(
        "run",
        "S3",
        s3,
        "lost deliveries",
        &|v| get(v, "/lost"),
        Lower,
        Some(Target::AtMost(0.0)),
    );
    b.row(
        "run",
        "S3",
        s3,
        "duplicate + out-of-order deliveries",
        &|v| Some(get(v, "/tally/duplicates")? + get(v, "/tally/out_of_order")?),
        Lower,
        None,
    );
    b.row(
        "run",
        "S3",
        s3,
        "latency p50 (ms)",
        &|v| get(v, "/latency/p50_ms"),
        Lower,
        None,
    );
    b.row(
        "run",
        "S3",
        s3,
        "latency p99 (ms)",
        &|v| get(v, "/latency/p99_ms"),
        Lower,
        Some(Target::AtMost(50.0)),
    );
    b.row(
        "run",
        "S3",
        s3,
        "server CPU (% of one core, all processes)",
        &|v| process_sum(v, "cpu_send_percent"),
        Lower,
        None,
    );

    let s4 = "S4 saturation: DIRECT rate raised until p99 > 100 ms";
    b.row(
        "sweep",
        "S4",
        s4,
        "highest rate held (msg/s)",
        &|v| get(v, "/highest_held"),
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

    let s5 = "S5 cold start (Lambda Runtime API emulator) and binary size";
    for f in ["rest", "ws-connect", "ws-message", "ws-disconnect"] {
        let pick = |field: &'static str| {
            move |v: &Value| (v["function"] == f).then(|| get(v, field)).flatten()
        };
        b.row(
            "cold_start",
            "",
            s5,
            &format!("{f}: spawn to first event handled, median (ms)"),
            &pick("/first_response/p50_ms"),
            Lower,
            Some(Target::AtMost(20.0)),
        );
        b.row(
            "cold_start",
            "",
            s5,
            &format!("{f}: spawn to ready for events, median (ms)"),
            &pick("/init/p50_ms"),
            Lower,
            None,
        );
        b.row(
            "cold_start",
            "",
            s5,
            &format!("{f}: stripped binary (MB)"),
            &|v: &Value| {
                (v["function"] == f)
                    .then(|| get(v, "/size_bytes").map(|b| b / 1e6))
                    .flatten()
            },
            Lower,
            Some(Target::AtMost(10.0)),
        );
    }
    b.row(
        "process_start",
        "",
        s5,
        "whole server process: spawn to first /health answered (ms)",
        &|v| get(v, "/ms"),
        Lower,
        None,
    );

    let ov = "Overload: DIRECT at 3× the S4 rate";
    b.row(
        "run",
        "overload",
        ov,
        "offered rate (msg/s)",
        &|v| get(v, "/send_rate"),
        Higher,
        None,
    );
    b.row(
        "run",
        "overload",
        ov,
        "accepted rate (msg/s)",
        &|v| get(v, "/accepted_rate"),
        Higher,
        None,
    );
    b.row(
        "run",
        "overload",
        ov,
        "refused with RATE_LIMITED (% of sent)",
        &|v| {
            Some(get(v, "/errors/RATE_LIMITED").unwrap_or(0.0) / get(v, "/sent")?.max(1.0) * 100.0)
        },
        Higher,
        None,
    );
    b.row(
        "run",
        "overload",
        ov,
        "accepted messages: latency p99 (ms)",
        &|v| get(v, "/latency/p99_ms"),
        Lower,
        Some(Target::AtMost(200.0)),
    );
    b.row(
        "run",
        "overload",
        ov,
        "accepted messages lost",
        &|v| get(v, "/lost"),
        Lower,
        Some(Target::AtMost(0.0)),
    );
    b.row(
        "run",
        "overload",
        ov,
        "server processes alive afterwards",
        &|v| {
            let procs = v["processes"].as_array()?;
            Some(procs.iter().filter(|p| p["alive"] == true).count() as f64)
        },
        Higher,
        None,
    );
    b.row(
        "run",
        "overload",
        ov,
        "server peak RSS (MiB, all processes)",
        &|v| process_sum(v, "rss_peak_mib"),
        Lower,
        None,
    );
    b.rows
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
        let all = vec![
            s2(OURS, 10.0, 0),
            s2(OURS, 30.0, 0),
            s2(OURS, 20.0, 0),
            s2(BASELINE, 200.0, 5),
            s2(BASELINE, 100.0, 5),
            s2(BASELINE, 150.0, 5),
        ];
        let rows = rows(&all);
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
        let all = vec![
            sweep(OURS, 1, 6000.0),
            sweep(OURS, 2, 8000.0),
            sweep(OURS, 3, 7500.0),
            sweep(BASELINE, 1, 1500.0),
            sweep(BASELINE, 2, 1500.0),
            sweep(BASELINE, 3, 2000.0),
            pgbench(1, 16, 10000.0),
            pgbench(2, 16, 8000.0),
            pgbench(3, 16, 11000.0),
        ];
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

    #[test]
    fn the_table_is_spliced_between_markers() {
        let page = format!("# B\nintro\n{BEGIN}\nold\n{END}\nanalysis\n");
        let out = splice(&page, "new\n");
        assert_eq!(out, format!("# B\nintro\n{BEGIN}\nnew\n{END}\nanalysis\n"));
        let fresh = splice("# B\n", "t\n");
        assert!(fresh.ends_with(&format!("{BEGIN}\nt\n{END}\n")));
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
