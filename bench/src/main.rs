//! `chat-bench`: the load generator and benchmark harness (see the library
//! docs and `docs/BENCHMARKS.md`).
//!
//! - `run`: one load run (or a rate sweep) against a list of instances;
//!   prints one JSON line per rate, and a progress line per second on
//!   stderr.
//! - `storm`: S6, a reconnect storm (every client connects and joins at
//!   once); one JSON line.
//! - `cold-start`: the four function binaries under a Lambda Runtime API
//!   emulator; one JSON line per function.
//! - `process-start`: spawn a server command and time it to its first
//!   answered health check.
//! - `report`: the results table of a session's JSON lines.
//!
//! Everything runs on one thread: the generator shares the machine with
//! the servers it measures.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chat_bench::lambda::{self, events};
use chat_bench::load::{self, RoomKind, RunConfig, RunReport, Step};
use chat_bench::report;
use chat_bench::storm::{self, StormConfig};
use chat_bench::target::{Pace, Servers, Target};
use clap::{Parser, Subcommand, ValueEnum};
use secrecy::SecretString;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "chat-bench",
    version,
    about = "Load generator and benchmark harness"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Rooms {
    None,
    Direct,
    Group,
}

#[derive(Subcommand)]
enum Command {
    /// One load run, or a rate sweep with several --rate values.
    Run(Box<RunArgs>),
    /// S6: a reconnect storm, every client connecting and joining at once.
    Storm(Box<StormArgs>),
    /// Cold starts of the four function binaries.
    ColdStart {
        /// Directory with the release binaries rest, ws-connect, ws-message, ws-disconnect.
        #[arg(long)]
        dir: PathBuf,
        /// Cold starts per function.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// HS256 secret for the tokens in the events.
        #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
        secret: String,
        /// Label in the JSON lines.
        #[arg(long, default_value = "ours")]
        label: String,
    },
    /// Cold starts as seen through a Lambda Invoke API (`cargo lambda
    /// watch`, freshly started): the first invocation of each function, then
    /// a warm one, timed from the request to the answer.
    LambdaColdStart {
        /// The Invoke API, e.g. http://127.0.0.1:9000.
        #[arg(long)]
        invoke_url: String,
        /// HS256 secret for the tokens in the events.
        #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
        secret: String,
        /// Label in the JSON lines.
        #[arg(long, default_value = "lambda")]
        label: String,
        /// Where the JSON lines are appended too.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Extra `key=value` fields copied into the JSON lines.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Spawns a server command and times it to its first 2xx on --url.
    ProcessStart {
        /// The URL polled every millisecond.
        #[arg(long)]
        url: String,
        /// Label in the JSON line.
        #[arg(long)]
        label: String,
        /// Times to start it.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Prints the pgbench script of the ceiling: the service's send
    /// statement, from the store's own SQL.
    PgbenchScript,
    /// Writes the results table of a session into a docs page.
    Report {
        /// JSON-lines files of the session.
        #[arg(long, required = true)]
        input: Vec<PathBuf>,
        /// The page; the table goes between its result markers.
        #[arg(long)]
        output: PathBuf,
        /// A Markdown fragment put above the table (machine, date, commit).
        #[arg(long)]
        preamble: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Scenario name, copied to the report.
    #[arg(long, default_value = "adhoc")]
    scenario: String,
    #[command(flatten)]
    target: TargetArgs,
    /// Users (one connection each).
    #[arg(long, default_value_t = 2000)]
    users: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 1000.0)]
    connect_rate: f64,
    /// Most handshakes in flight at once (0: no limit beyond the rate); the
    /// Lambda shape needs at most its reserved concurrency here.
    #[arg(long, default_value_t = 0)]
    connect_concurrency: usize,
    /// Room layout.
    #[arg(long, value_enum, default_value = "direct")]
    rooms: Rooms,
    /// Members per GROUP room.
    #[arg(long, default_value_t = 100)]
    group_size: usize,
    /// Messages per second, all senders together; several values make a sweep.
    #[arg(long = "rate", value_delimiter = ',')]
    rates: Vec<f64>,
    /// A sweep stops after the first rate not held: any send refused, any
    /// loss, or a p99 above this (ms); see `load::step_failures`.
    #[arg(long)]
    stop_p99_ms: Option<f64>,
    /// Sending time per rate, seconds.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Leading seconds of each rate kept out of the histograms.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Longest wait for outstanding deliveries, seconds.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Without sending: seconds the connections stay idle before memory is read.
    #[arg(long, default_value_t = 5.0)]
    idle_hold: f64,
    #[command(flatten)]
    servers: ServerArgs,
    /// Message content size in bytes.
    #[arg(long, default_value_t = 64)]
    content_bytes: usize,
    /// REST calls in flight during set-up, then joins in flight: the
    /// Lambda shape needs at most its reserved concurrency here, or the
    /// excess is throttled ("Internal server error").
    #[arg(long, default_value_t = 16)]
    setup_concurrency: usize,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(clap::Args)]
struct StormArgs {
    /// Scenario name, copied to the report.
    #[arg(long, default_value = "S6")]
    scenario: String,
    #[command(flatten)]
    target: TargetArgs,
    /// Clients (a multiple of 4: half direct pairs, half recovery pairs).
    #[arg(long, default_value_t = 2000)]
    users: usize,
    /// Most WebSocket handshakes in flight at once (0: no limit).
    #[arg(long, default_value_t = 500)]
    connect_concurrency: usize,
    /// Also pace new connections at this rate (per second); 0: no pacing.
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// Seconds a client has, from its first connect attempt, to get its
    /// `roomJoined`.
    #[arg(long, default_value_t = 60.0)]
    deadline: f64,
    /// `afterSequenceId` of the recovery joins (messages already seen).
    #[arg(long, default_value_t = 5)]
    after_sequence_id: u64,
    /// Messages after it that each recovery join must get back.
    #[arg(long, default_value_t = 20)]
    missed: u64,
    #[command(flatten)]
    servers: ServerArgs,
    /// REST calls in flight while preparing the recovery rooms (each is a
    /// stored message, so the more in flight, the more share a commit).
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,
    #[command(flatten)]
    output: OutputArgs,
}

/// The system under test (`run`, `storm`).
#[derive(clap::Args)]
struct TargetArgs {
    /// System under test, copied to the report (`ours`, `baseline`).
    #[arg(long, default_value = "ours")]
    label: String,
    /// Base URL of an instance (`http://127.0.0.1:3000`); repeat, or comma-separate.
    #[arg(long = "url", required = true, value_delimiter = ',')]
    urls: Vec<String>,
    /// WebSocket path.
    #[arg(long, default_value = "/ws")]
    ws_path: String,
    /// HS256 secret to mint tokens.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    secret: String,
}

impl TargetArgs {
    fn target(&self, scenario: &str) -> Target {
        Target {
            label: self.label.clone(),
            scenario: scenario.to_owned(),
            urls: self.urls.clone(),
            ws_path: self.ws_path.clone(),
            secret: SecretString::from(self.secret.clone()),
        }
    }
}

/// The server processes watched and the counters read (`run`, `storm`).
#[derive(clap::Args)]
struct ServerArgs {
    /// Pid of the process behind each --url, same order (RSS per connection).
    #[arg(long = "gateway-pid", value_delimiter = ',')]
    gateway_pids: Vec<u32>,
    /// Another process to watch: LABEL=PID.
    #[arg(long = "pid")]
    pids: Vec<String>,
    /// A process watched with all its descendants: LABEL=PID (PostgreSQL).
    #[arg(long = "pid-tree")]
    pid_trees: Vec<String>,
    /// A `/metrics` URL read around each phase (repeatable).
    #[arg(long = "metrics-url")]
    metrics_urls: Vec<String>,
}

impl ServerArgs {
    fn servers(&self) -> anyhow::Result<Servers> {
        Ok(Servers {
            gateway_pids: self.gateway_pids.clone(),
            pids: labelled_pids(&self.pids)?,
            pid_trees: labelled_pids(&self.pid_trees)?,
            metrics_urls: self.metrics_urls.clone(),
        })
    }
}

/// Users, progress and where the JSON lines go (`run`, `storm`).
#[derive(clap::Args)]
struct OutputArgs {
    /// Prefix of the user ids (default: from the clock, so every run is fresh).
    #[arg(long)]
    run_id: Option<String>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
    /// Also append the JSON lines to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Extra `key=value` fields copied into every JSON line (session, run).
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
}

impl OutputArgs {
    /// `--run-id`, or one from the clock after `prefix`.
    fn run_id(&self, prefix: &str) -> String {
        self.run_id
            .clone()
            .unwrap_or_else(|| format!("{prefix}{}", load::now_us() / 1000 % 100_000_000))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        match cli.command {
            Command::Run(args) => run(*args).await,
            Command::Storm(args) => storm(*args).await,
            Command::ColdStart {
                dir,
                runs,
                secret,
                label,
            } => cold_start(dir, runs, secret, label).await,
            Command::LambdaColdStart {
                invoke_url,
                secret,
                label,
                out,
                tags,
            } => lambda_cold_start(invoke_url, secret, label, out, tags).await,
            Command::ProcessStart {
                url,
                label,
                runs,
                command,
            } => process_start(url, label, runs, command).await,
            Command::Report {
                input,
                output,
                preamble,
            } => write_report(input, output, preamble),
            Command::PgbenchScript => {
                print!("{}", chat_bench::pgbench::script());
                Ok(())
            }
        }
    })
}

/// Prints a JSON line (and appends it to `out`), with the tags merged in.
fn emit(value: &serde_json::Value, tags: &[(String, String)], out: Option<&PathBuf>) {
    let mut value = value.clone();
    if let Some(map) = value.as_object_mut() {
        for (k, v) in tags {
            let v = match (v.parse::<i64>(), v.parse::<f64>()) {
                (Ok(n), _) => json!(n),
                (_, Ok(x)) => json!(x),
                _ => json!(v),
            };
            map.insert(k.clone(), v);
        }
    }
    let line = value.to_string();
    println!("{line}");
    if let Some(path) = out {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// A `--tag key=value`.
fn parse_tag(tag: &str) -> Result<(String, String), String> {
    tag.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "expected key=value".to_owned())
}

/// `LABEL=PID` arguments.
fn labelled_pids(list: &[String]) -> anyhow::Result<Vec<(String, u32)>> {
    list.iter()
        .map(|p| {
            let (label, pid) = p.split_once('=').context("--pid LABEL=PID")?;
            Ok((
                label.to_owned(),
                pid.parse().context("--pid: not a number")?,
            ))
        })
        .collect()
}

/// Whether a sweep step held, by the strict rule of `load::step_failures`.
fn held(r: &RunReport, p99_limit: f64) -> bool {
    load::step_held(&Step::from(r), p99_limit)
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let cfg = RunConfig {
        target: a.target.target(&a.scenario),
        users: a.users,
        connect: Pace::new(a.connect_rate, a.connect_concurrency),
        rooms: match a.rooms {
            Rooms::None => RoomKind::None,
            Rooms::Direct => RoomKind::Direct,
            Rooms::Group => RoomKind::Group,
        },
        group_size: a.group_size,
        duration: Duration::from_secs_f64(a.duration),
        warmup: Duration::from_secs_f64(a.warmup),
        drain: Duration::from_secs_f64(a.drain),
        idle_hold: Duration::from_secs_f64(a.idle_hold),
        servers: a.servers.servers()?,
        content_bytes: a.content_bytes,
        run_id: a.output.run_id("b"),
        setup_concurrency: a.setup_concurrency,
        progress: !a.output.quiet,
    };
    let limit = a.stop_p99_ms;
    let stop = move |r: &RunReport| limit.is_some_and(|l| !held(r, l));
    let (tags, out) = (&a.output.tags, a.output.out.as_ref());
    let reports = load::run(
        cfg,
        &a.rates,
        if limit.is_some() { Some(&stop) } else { None },
        |r| emit(&serde_json::to_value(r).unwrap_or_default(), tags, out),
    )
    .await?;
    if let Some(limit) = limit {
        let highest = reports
            .iter()
            .filter(|r| held(r, limit))
            .map(|r| r.rate_target)
            .fold(0.0, f64::max);
        let steps: Vec<_> = reports
            .iter()
            .map(|r| {
                let step = Step::from(r);
                json!({"rate": r.rate_target, "p50_ms": r.latency.p50_ms, "p99_ms": r.latency.p99_ms,
                       "lost": r.lost, "send_rate": r.send_rate, "accepted_rate": r.accepted_rate,
                       "sent": r.sent, "rejected": r.rejected, "not_sent": r.not_sent,
                       "errors": r.errors, "held": load::step_held(&step, limit),
                       "failed_on": load::step_failures(&step, limit)})
            })
            .collect();
        // `rule`: which rule decided `held` (the 95 % allowance of earlier
        // sessions is gone; see `load::step_failures`).
        emit(
            &json!({"kind": "sweep", "label": a.target.label, "scenario": a.scenario, "p99_limit_ms": limit,
                    "rule": "strict", "highest_held": highest, "steps": steps}),
            tags,
            out,
        );
    }
    Ok(())
}

async fn storm(a: StormArgs) -> anyhow::Result<()> {
    let cfg = StormConfig {
        target: a.target.target(&a.scenario),
        users: a.users,
        connect: Pace::new(a.connect_rate, a.connect_concurrency),
        deadline: Duration::from_secs_f64(a.deadline),
        seen: a.after_sequence_id,
        missed: a.missed,
        servers: a.servers.servers()?,
        run_id: a.output.run_id("s"),
        setup_concurrency: a.setup_concurrency,
        progress: !a.output.quiet,
    };
    let report = storm::run(cfg).await?;
    emit(
        &serde_json::to_value(&report)?,
        &a.output.tags,
        a.output.out.as_ref(),
    );
    Ok(())
}

async fn cold_start(
    dir: PathBuf,
    runs: usize,
    secret: String,
    label: String,
) -> anyhow::Result<()> {
    let secret = SecretString::from(secret);
    let stamp = load::now_us();
    let ids: Vec<String> = (0..runs).map(|i| format!("coldstart{stamp}x{i}")).collect();
    let token = |user: &str| {
        chat_shared::auth::mint_hs256(&secret, &chat_shared::auth::DevClaims::new(user, 3600))
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let domain = "127.0.0.1:9";
    let connects = ids
        .iter()
        .map(|id| Ok(events::connect(id, &token(&format!("cold-{id}"))?, domain)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pings = ids.iter().map(|id| events::ping(id, domain)).collect();
    let disconnects = ids
        .iter()
        .map(|id| events::disconnect(id, domain))
        .collect();
    let rests = ids
        .iter()
        .map(|id| {
            Ok(events::http_get(
                "/api/v1/chat/rooms",
                &token(&format!("cold-{id}"))?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Connect first: the ping and disconnect events need registered connections.
    for (function, events) in [
        ("ws-connect", connects),
        ("ws-message", pings),
        ("ws-disconnect", disconnects),
        ("rest", rests),
    ] {
        let report = lambda::measure(&dir.join(function), function, events).await?;
        let mut value = serde_json::to_value(&report)?;
        value["label"] = json!(label);
        emit(&value, &[], None);
    }
    Ok(())
}

async fn lambda_cold_start(
    invoke_url: String,
    secret: String,
    label: String,
    out: Option<PathBuf>,
    tags: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let secret = SecretString::from(secret);
    let id = format!("lambdacold{}=", load::now_us() % 1_000_000_000);
    let user = format!("cold-{}", load::now_us() % 1_000_000_000);
    let token =
        chat_shared::auth::mint_hs256(&secret, &chat_shared::auth::DevClaims::new(&user, 3600))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    // The connection's callback endpoint goes nowhere: nothing is pushed.
    let domain = "127.0.0.1:9";
    let steps = [
        ("rest", events::http_get("/api/v1/chat/rooms", &token)),
        ("ws-connect", events::connect(&id, &token, domain)),
        ("ws-message", events::ping(&id, domain)),
        ("ws-disconnect", events::disconnect(&id, domain)),
        ("maintenance", json!({})),
    ];
    let mut client = chat_bench::rest::Rest::new(invoke_url.trim_end_matches('/'))?;
    for (function, event) in steps {
        let path = format!("/2015-03-31/functions/{function}/invocations");
        let mut times = Vec::new();
        let mut answer = String::new();
        for _ in 0..2 {
            let started = Instant::now();
            let (status, body) = client
                .call(http::Method::POST, &path, None, Some(&event))
                .await
                .with_context(|| format!("invoking {function}"))?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            answer = String::from_utf8_lossy(&body).chars().take(200).collect();
            if !status.is_success() {
                bail!("{function}: the Invoke API answered {status}: {answer}");
            }
        }
        emit(
            &json!({"kind": "lambda_cold_start", "label": label, "function": function,
                    "first_ms": times[0], "warm_ms": times[1], "answer": answer}),
            &tags,
            out.as_ref(),
        );
    }
    Ok(())
}

async fn process_start(
    url: String,
    label: String,
    runs: usize,
    command: Vec<String>,
) -> anyhow::Result<()> {
    let (program, args) = command.split_first().context("a command is needed")?;
    let base = url
        .strip_prefix("http://")
        .and_then(|r| r.split_once('/'))
        .map(|(h, p)| (format!("http://{h}"), format!("/{p}")))
        .context("--url must be http://host:port/path")?;
    for _ in 0..runs {
        let started = Instant::now();
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let mut answered = None;
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(mut client) = chat_bench::rest::Rest::new(&base.0) {
                if let Ok((status, _)) = client.call(http::Method::GET, &base.1, None, None).await {
                    if status.is_success() {
                        answered = Some(started.elapsed());
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // SIGTERM-like stop is not needed: nothing is connected yet.
        let _ = child.kill().await;
        let _ = child.wait().await;
        let Some(took) = answered else {
            bail!("{label}: {url} never answered 2xx");
        };
        emit(
            &json!({"kind": "process_start", "label": label, "ms": took.as_secs_f64() * 1000.0}),
            &[],
            None,
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

fn write_report(
    input: Vec<PathBuf>,
    output: PathBuf,
    preamble: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for path in &input {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        all.extend(report::parse_lines(&text));
    }
    let mut generated = String::new();
    if let Some(p) = preamble {
        generated.push_str(
            &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
        );
        generated.push('\n');
    }
    generated.push_str(&report::table(&report::rows(&all)));
    if let Some(before_after) = report::before_after_table(&all) {
        generated
            .push_str("\nThis build beside an earlier one (`BENCH_BEFORE_DIR`), same session:\n\n");
        generated.push_str(&before_after);
    }
    generated.push_str(&report::lambda_table(&all));
    if let Some(cluster) = report::cluster_table(&all) {
        generated.push_str(&cluster);
    }
    let page = std::fs::read_to_string(&output).unwrap_or_default();
    std::fs::write(&output, report::splice(&page, &generated))
        .with_context(|| format!("writing {}", output.display()))?;
    eprintln!("wrote {}", output.display());
    Ok(())
}
