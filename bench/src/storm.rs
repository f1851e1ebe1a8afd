//! S6, a reconnect storm: every client comes back at once and rejoins.
//!
//! A network blip, a deploy or 9 a.m. brings every mobile client back
//! together, and each rejoins its rooms. Here `users` clients connect as
//! fast as the generator lets them (at most `connect.concurrency`
//! handshakes in flight, optionally also paced at `connect.rate`), and
//! each sends one `joinRoom` the moment its own handshake completes,
//! without waiting for anyone else:
//!
//! - users `4k` and `4k + 1` (a *direct* pair) join by `targetUserId`, each
//!   naming the other, for a DIRECT room that does not exist yet: the two
//!   joins race to create it, on different instances when there are two
//!   URLs (user `i` connects to URL `i % urls.len()`);
//! - users `4k + 2` and `4k + 3` (a *recovery* pair) share a DIRECT room
//!   prepared beforehand with `seen + missed` messages, and both join by
//!   `roomId` with `afterSequenceId = seen`: each must get exactly the
//!   `missed` messages after it, in order, with `recovered: true`.
//!
//! Against a server on loopback each client connects from a loopback
//! address of its own ([`source_address`]): a storm comes from many
//! addresses, and a server that limits new connections per address must
//! see it so, not as one address opening thousands.
//!
//! # Phases
//! 0. **Warm up** (untimed, not counted): a small storm of other users
//!    ([`WARM_UP_USERS`], prepared and made known as below), so the
//!    servers' connection pools are open and their statements prepared
//!    before anything is counted: a prepare that misses a pooled
//!    connection's cache is a round trip too, and would land in whichever
//!    phase came first.
//! 1. **Prepare** (untimed, [`prepare`]): each recovery pair connects,
//!    its first member opens the DIRECT room with `joinRoom
//!    {targetUserId}` and sends the `seen + missed` messages (with
//!    `clientMessageId`s, so a retry stores nothing twice), and both close.
//!    Over WebSockets, the service's ordinary path: the original's REST
//!    sends were too slow to prepare 62,500 messages in a run.
//! 2. **Calibrate** (untimed): every client connects once, exactly as in
//!    the storm but without joining, and waits for `connected`. The
//!    servers' round-trip counters over this phase give the cost of one
//!    connect. It also makes every user known, as reconnecting users are.
//!    Then every client closes and the counters are left to settle.
//! 3. **Storm** (timed from the first connect): as above. A refused join
//!    (`RATE_LIMITED`, `SERVICE_UNAVAILABLE`) or a refused handshake (HTTP
//!    429 or 503) is retried as PROTOCOL.md's "Retrying" asks (after the
//!    `retryAfterMs` or `Retry-After` it carries, then exponential backoff
//!    with jitter); every refusal is counted. Any other error ends that
//!    client. A client that has no `roomJoined` `deadline` after it
//!    started connecting has failed (`no_answer` when its last join was
//!    never answered). Every socket stays open until all clients are done,
//!    so no disconnect work lands in the measured phase.
//!
//! Round trips per join: the counters' increase over the storm, minus the
//! connects' share (the connects made times the cost of one connect from
//! the calibration), divided by the `joinRoom` requests the servers
//! counted (refused ones included, as S2 divides by every `sendMessage`).
//!
//! Everything runs on the generator's one thread, like [`crate::load`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::spawn_local;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::load::{Surprises, bump, counter_deltas, error_kind, mint, scrape, ws_url};
use crate::procstat::{ProcessReport, Watched};
use crate::summary::{Latency, Summary, round3};
use crate::target::{Pace, Servers, Target};

/// What one storm does.
#[derive(Debug, Clone)]
pub struct StormConfig {
    /// The system under test.
    pub target: Target,
    /// Clients (one user each); a multiple of 4, so both halves are pairs.
    pub users: usize,
    /// How fast they connect.
    pub connect: Pace,
    /// Longest time from a client's first connect to its `roomJoined`.
    pub deadline: Duration,
    /// `afterSequenceId` of the recovery joins: the messages the client
    /// had already seen.
    pub seen: u64,
    /// Messages after `seen` that each recovery join must get back.
    pub missed: u64,
    /// The server processes watched and the counters read.
    pub servers: Servers,
    /// Prefix of this run's user ids: fresh users and rooms every run.
    pub run_id: String,
    /// REST calls in flight while preparing.
    pub setup_concurrency: usize,
    /// Print a progress line to stderr every second.
    pub progress: bool,
}

/// Clients of the warm-up storm (fewer when the storm itself is smaller):
/// enough at once to open every pooled connection of both gateways.
pub const WARM_UP_USERS: usize = 400;

/// How a user takes part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Joins by `targetUserId` (its pair partner) for a new DIRECT room.
    Direct,
    /// Joins a prepared room by `roomId` with `afterSequenceId`.
    Recovery,
}

/// The role of user `user`: pairs `(2p, 2p + 1)`, even pairs direct, odd
/// pairs recovery, so the two kinds interleave through the storm.
pub fn role(user: usize) -> Role {
    if (user / 2) % 2 == 0 {
        Role::Direct
    } else {
        Role::Recovery
    }
}

/// The other member of `user`'s pair.
pub fn partner(user: usize) -> usize {
    user ^ 1
}

/// How long to wait before retry `attempt` (1-based) of a refused request
/// that asked for at least `least` (its `retryAfterMs`, or a handshake's
/// `Retry-After`): 100 ms doubling up to 30 s (PROTOCOL.md, "Retrying"),
/// never under `least`, plus up to half again of jitter drawn from `salt`
/// (deterministic, so runs repeat; different clients spread out).
pub fn backoff(attempt: u32, least: Duration, salt: u64) -> Duration {
    let doubling = (100u64 << attempt.saturating_sub(1).min(9)).min(30_000);
    let base = doubling.max(u64::try_from(least.as_millis()).unwrap_or(u64::MAX));
    let mut x = salt
        .wrapping_add(u64::from(attempt))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    Duration::from_millis(base + x % (base / 2 + 1))
}

/// Whether a client retries a request refused with this error code: the
/// codes that say "busy, try again" (PROTOCOL.md's overload answer, and
/// the retryable dependency error in both spellings).
pub fn retryable(code: &str) -> bool {
    matches!(code, "RATE_LIMITED" | "SERVICE_UNAVAILABLE" | "UNAVAILABLE")
}

/// The loopback address client `user` connects from: 127.1.0.1,
/// 127.1.0.2, … (no `.0` or `.255`), distinct for the first 15 million.
pub fn source_address(user: usize) -> Ipv4Addr {
    let i = user as u64;
    let octet = |v: u64| u8::try_from(v).unwrap_or(u8::MAX);
    Ipv4Addr::new(
        127,
        octet(1 + i / 62_500 % 254),
        octet(1 + i / 250 % 250),
        octet(1 + i % 250),
    )
}

/// Where one client connects: the WebSocket URL, the server's address
/// and, on loopback, the client's own source address.
#[derive(Debug, Clone)]
struct Dial {
    url: String,
    server: Option<SocketAddr>,
    source: Option<Ipv4Addr>,
}

/// The first address of each base URL's host, resolved once.
async fn resolve(urls: &[String]) -> Vec<Option<SocketAddr>> {
    let mut out = Vec::with_capacity(urls.len());
    for base in urls {
        let host = base
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let addr = tokio::net::lookup_host(host)
            .await
            .ok()
            .and_then(|mut a| a.next());
        out.push(addr);
    }
    out
}

fn dial(
    urls: &[String],
    servers: &[Option<SocketAddr>],
    ws_path: &str,
    token: &str,
    user: usize,
) -> Dial {
    let i = user % urls.len();
    let server = servers.get(i).copied().flatten();
    Dial {
        url: ws_url(&urls[i], ws_path, token),
        server,
        source: server
            .filter(|a| a.ip().is_loopback() && a.is_ipv4())
            .map(|_| source_address(user)),
    }
}

/// The `Max open files` soft limit from the text of `/proc/self/limits`.
pub fn parse_open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    soft.parse().ok()
}

/// The result of the calibration phase.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// Clients that connected and got `connected`.
    pub connected: usize,
    /// Clients that did not, by cause.
    pub failed: BTreeMap<String, u64>,
    /// Handshake attempts that failed, by cause (retried ones included).
    pub handshake_errors: BTreeMap<String, u64>,
    /// Wall time of the phase, seconds.
    pub seconds: f64,
    /// Handshake (HTTP 101) times.
    pub handshake: Summary,
    /// Counter increases over the phase, summed over the URLs.
    pub counters: BTreeMap<String, f64>,
}

/// What the warm-up storm did (not measured; shown so a broken warm-up
/// is seen).
#[derive(Debug, Clone, Serialize)]
pub struct WarmUp {
    /// Clients.
    pub users: usize,
    /// Clients that got their `roomJoined`.
    pub joined: usize,
    /// `error` events answering `joinRoom`, by code.
    pub join_errors: BTreeMap<String, u64>,
    /// Clients that never joined, by final cause.
    pub failed: BTreeMap<String, u64>,
}

/// The JSON line a storm prints.
#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    /// Always `"storm"`.
    pub kind: &'static str,
    /// System under test.
    pub label: String,
    /// Scenario name.
    pub scenario: String,
    /// Clients.
    pub users: usize,
    /// Instances (URLs).
    pub instances: usize,
    /// Clients joining by `targetUserId`.
    pub direct_clients: usize,
    /// Clients joining by `roomId` with `afterSequenceId`.
    pub recovery_clients: usize,
    /// The `afterSequenceId` of the recovery joins.
    pub after_sequence_id: u64,
    /// Messages each recovery join must get back.
    pub missed_messages: u64,
    /// Most handshakes in flight.
    pub connect_concurrency: usize,
    /// Connect pacing, connections/s (0: none beyond the cap).
    pub connect_rate: f64,
    /// Per-client deadline, seconds.
    pub deadline_s: f64,
    /// Wall time of the preparation, seconds.
    pub prepare_seconds: f64,
    /// The warm-up storm: its clients, how many joined, its join errors.
    pub warm_up: WarmUp,
    /// The calibration phase.
    pub calibration: Calibration,
    /// Clients that got their `roomJoined`.
    pub joined: usize,
    /// Seconds from the first connect until every client had its
    /// `roomJoined`; `None` when some never did.
    pub all_joined_s: Option<f64>,
    /// Seconds from the first connect until every client was done, joined
    /// or failed.
    pub all_done_s: f64,
    /// Seconds from the first connect until the last successful handshake.
    pub handshakes_done_s: f64,
    /// Handshake (HTTP 101) times of the successful handshakes.
    pub handshake: Summary,
    /// Per joined client: from its first connect attempt to its
    /// `roomJoined`.
    pub join_time: Summary,
    /// `joinRoom` frames sent (retries included).
    pub join_attempts: u64,
    /// `error` events answering `joinRoom`, by code (every attempt).
    pub join_errors: BTreeMap<String, u64>,
    /// Failed handshake attempts by cause (`http_429`, `reset`, …; every
    /// attempt).
    pub handshake_errors: BTreeMap<String, u64>,
    /// Clients that never got their `roomJoined`, by final cause
    /// (`connect:…`, `join:CODE`, `no_answer`, `closed`).
    pub failed: BTreeMap<String, u64>,
    /// `roomJoined` answers that were wrong, by what was wrong
    /// (`direct_pair_split`: the two members of a pair got different
    /// rooms; `recovery_*`: not the prepared room, not the missed messages,
    /// or not `recovered: true`).
    pub wrong_answers: BTreeMap<String, u64>,
    /// `error` events answering anything else, by code.
    pub other_errors: BTreeMap<String, u64>,
    /// Other events received, and connections that closed before the end.
    #[serde(flatten)]
    pub surprises: Surprises,
    /// Watched processes over the storm (`rss_connected_mib`: with every
    /// client done; `cpu_send_*`: over the storm).
    pub processes: Vec<ProcessReport>,
    /// The generator's own CPU over the storm, percent of a core.
    pub generator_cpu_percent: Option<f64>,
    /// Counter increases over the storm, summed over the URLs, plus the
    /// round trips per connect (calibration) and per join.
    pub counters: BTreeMap<String, f64>,
}

/// Adds the cost of one connect (from the calibration) and of one join to
/// the storm's counter increases.
///
/// Per join: (storm increase − connects in the storm × cost of a connect)
/// ÷ `joinRoom` requests. The requests are the servers' own count when they
/// expose one, else `joins_sent`.
pub fn round_trips_per_join(
    storm: &BTreeMap<String, f64>,
    calibration: &BTreeMap<String, f64>,
    calibration_connects: usize,
    storm_connects: usize,
    joins_sent: u64,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let joins = storm
        .get("chat_ws_requests_total{type=\"joinRoom\"}")
        .copied()
        .filter(|n| *n > 0.0)
        .unwrap_or(joins_sent as f64);
    if joins <= 0.0 || calibration_connects == 0 {
        return out;
    }
    for (series, name) in [
        ("chat_pg_round_trips_total", "pg_round_trips"),
        ("chat_redis_round_trips_total", "redis_round_trips"),
    ] {
        let (Some(during), Some(connecting)) = (storm.get(series), calibration.get(series)) else {
            continue;
        };
        let per_connect = connecting / calibration_connects as f64;
        let per_join = (during - per_connect * storm_connects as f64) / joins;
        out.insert(format!("{name}_per_connect"), round3(per_connect));
        out.insert(format!("{name}_per_join"), round3(per_join.max(0.0)));
    }
    if !out.is_empty() {
        out.insert("join_requests".to_owned(), joins);
    }
    out
}

/// Users, tokens and prepared rooms: what every client task reads.
struct Plan {
    urls: Vec<String>,
    /// The address of each URL's server.
    servers: Vec<Option<SocketAddr>>,
    ws_path: String,
    user_ids: Vec<String>,
    tokens: Vec<String>,
    /// Per pair: the prepared room of a recovery pair.
    rooms: Vec<Option<String>>,
    seen: u64,
    missed: u64,
}

impl Plan {
    fn dial(&self, user: usize) -> Dial {
        dial(
            &self.urls,
            &self.servers,
            &self.ws_path,
            &self.tokens[user],
            user,
        )
    }

    fn join_frame(&self, user: usize) -> String {
        let payload = match role(user) {
            Role::Direct => json!({"targetUserId": self.user_ids[partner(user)]}),
            Role::Recovery => json!({
                "roomId": self.rooms[user / 2].as_deref().unwrap_or_default(),
                "afterSequenceId": self.seen,
            }),
        };
        json!({"type": "joinRoom", "payload": payload}).to_string()
    }
}

/// What a phase's clients do after their handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Wait for `connected`.
    Calibrate,
    /// Send `joinRoom` at once and wait for `roomJoined`.
    Storm,
}

/// Counters of one phase, shared by its client tasks; nobody holds the
/// borrow across an `.await`.
#[derive(Default)]
struct Tally {
    /// Per user: the room its `roomJoined` named (direct pairs' check).
    rooms: Vec<Option<String>>,
    done: usize,
    succeeded: usize,
    /// Microseconds from the phase start of the last success and the last
    /// handshake.
    last_success_us: u64,
    last_handshake_us: u64,
    handshake: Latency,
    join_time: Latency,
    join_attempts: u64,
    handshake_errors: BTreeMap<String, u64>,
    join_errors: BTreeMap<String, u64>,
    failed: BTreeMap<String, u64>,
    wrong: BTreeMap<String, u64>,
    other_errors: BTreeMap<String, u64>,
    surprises: Surprises,
    /// True once the phase is over: closes are expected then.
    closing: bool,
}

/// One phase: the plan, the handshake cap and the tally.
struct Phase {
    plan: Rc<Plan>,
    mode: Mode,
    handshakes: Semaphore,
    deadline: Duration,
    zero: Instant,
    tally: RefCell<Tally>,
}

impl Phase {
    fn since_zero_us(&self) -> u64 {
        self.zero.elapsed().as_micros() as u64
    }

    /// Records a client's end: `Ok` with the time it started connecting,
    /// or the cause it failed with.
    fn finish(&self, result: Result<Instant, String>) {
        let at = self.since_zero_us();
        let mut t = self.tally.borrow_mut();
        t.done += 1;
        match result {
            Ok(started) => {
                t.succeeded += 1;
                t.last_success_us = t.last_success_us.max(at);
                t.join_time.record(started.elapsed().as_micros() as u64);
            }
            Err(cause) => bump(&mut t.failed, &cause),
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The fields of a server event a storm client looks at.
#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: HeadPayload,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct HeadPayload {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    request_type: Option<String>,
    /// The least wait before a retry, on the codes a client retries.
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// What a `roomJoined` is checked for.
#[derive(Deserialize, Debug)]
pub struct Joined {
    /// The room.
    pub room: JoinedRoom,
    /// The messages it came with.
    #[serde(default)]
    pub messages: Vec<JoinedMessage>,
    /// Present on joins with `afterSequenceId`.
    #[serde(default)]
    pub recovered: Option<bool>,
}

/// The room of a `roomJoined`.
#[derive(Deserialize, Debug)]
pub struct JoinedRoom {
    /// Its id.
    pub id: String,
}

/// A message of a `roomJoined`.
#[derive(Deserialize, Debug)]
pub struct JoinedMessage {
    /// Its sequence id.
    #[serde(rename = "sequenceId")]
    pub sequence_id: u64,
}

#[derive(Deserialize)]
struct JoinedFrame {
    payload: Joined,
}

/// What is wrong with a recovery join's `roomJoined`, if anything: it
/// must name the prepared room and bring exactly the messages
/// `seen + 1 ..= seen + missed`, in order, with `recovered: true`.
pub fn check_recovery(
    joined: &Joined,
    room: &str,
    seen: u64,
    missed: u64,
) -> Result<(), &'static str> {
    if joined.room.id != room {
        return Err("recovery_wrong_room");
    }
    let expected = (seen + 1..=seen + missed).collect::<Vec<_>>();
    let got = joined
        .messages
        .iter()
        .map(|m| m.sequence_id)
        .collect::<Vec<_>>();
    if got != expected {
        return Err("recovery_wrong_messages");
    }
    if joined.recovered != Some(true) {
        return Err("recovery_not_recovered");
    }
    Ok(())
}

/// The `Retry-After` of an answer, in seconds as this service and the
/// original send it; zero when absent.
fn retry_after(headers: &http::HeaderMap) -> Duration {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs)
}

/// What went wrong with a socket, in a word.
fn io_kind(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused",
        std::io::ErrorKind::ConnectionReset => "reset",
        std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::AddrInUse => "no_local_port",
        std::io::ErrorKind::TimedOut => "timeout",
        _ => "io",
    }
}

/// Opens the TCP connection of a [`Dial`], from its source address when
/// it has one.
async fn open(d: &Dial) -> std::io::Result<tokio::net::TcpStream> {
    let (Some(server), Some(source)) = (d.server, d.source) else {
        let host = d
            .url
            .trim_start_matches("ws://")
            .split(['/', '?'])
            .next()
            .unwrap_or_default();
        return tokio::net::TcpStream::connect(host).await;
    };
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.into(), 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One WebSocket handshake; the error is a cause (`http_429`, `reset`, …)
/// and the `Retry-After` of a refusal.
async fn handshake(d: &Dial) -> Result<Ws, (String, Duration)> {
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20);
    let stream = open(d)
        .await
        .map_err(|e| (io_kind(&e).to_owned(), Duration::ZERO))?;
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    match tokio_tungstenite::client_async_with_config(d.url.as_str(), stream, Some(config)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err((
            format!("http_{}", response.status().as_u16()),
            retry_after(response.headers()),
        )),
        Err(e) => Err((error_kind(&e).to_owned(), Duration::ZERO)),
    }
}

/// One client of a phase: connect (retrying refused handshakes), then
/// join or wait for `connected`, then keep the socket open until `close`.
async fn client(phase: Rc<Phase>, user: usize, mut close: watch::Receiver<bool>) {
    let plan = Rc::clone(&phase.plan);
    let target = plan.dial(user);
    let mut started: Option<Instant> = None;
    let mut attempt = 0u32;
    let mut ws = loop {
        attempt += 1;
        let Ok(permit) = phase.handshakes.acquire().await else {
            return;
        };
        let t = Instant::now();
        let first = *started.get_or_insert(t);
        let deadline = first + phase.deadline;
        let result = tokio::time::timeout_at(deadline.into(), handshake(&target)).await;
        drop(permit);
        match result {
            Ok(Ok(ws)) => {
                let at = phase.since_zero_us();
                let mut tally = phase.tally.borrow_mut();
                tally.handshake.record(t.elapsed().as_micros() as u64);
                tally.last_handshake_us = tally.last_handshake_us.max(at);
                break ws;
            }
            Ok(Err((cause, least))) => {
                bump(&mut phase.tally.borrow_mut().handshake_errors, &cause);
                let wait = backoff(attempt, least, user as u64);
                let refused = cause == "http_429" || cause == "http_503";
                if refused && Instant::now() + wait < deadline {
                    tokio::time::sleep(wait).await;
                    continue;
                }
                phase.finish(Err(format!("connect:{cause}")));
                return;
            }
            Err(_) => {
                bump(&mut phase.tally.borrow_mut().handshake_errors, "timeout");
                phase.finish(Err("connect:timeout".to_owned()));
                return;
            }
        }
    };
    let started = started.unwrap_or_else(Instant::now);
    let deadline = started + phase.deadline;
    let open = match phase.mode {
        Mode::Calibrate => await_connected(&phase, &mut ws, started, deadline).await,
        Mode::Storm => join(&phase, &plan, user, &mut ws, started, deadline).await,
    };
    if open {
        hold(&phase, ws, &mut close).await;
    }
}

/// Waits for `connected`; false when the socket is gone.
async fn await_connected(phase: &Phase, ws: &mut Ws, started: Instant, deadline: Instant) -> bool {
    loop {
        match tokio::time::timeout_at(deadline.into(), ws.next()).await {
            Err(_) => {
                phase.finish(Err("no_connected_event".to_owned()));
                return true;
            }
            Ok(Some(Ok(Message::Text(text)))) => {
                if text.as_str().contains("\"connected\"") {
                    phase.finish(Ok(started));
                    return true;
                }
            }
            Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => {
                phase.tally.borrow_mut().surprises.unexpected_closes += 1;
                phase.finish(Err("closed".to_owned()));
                return false;
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Sends `joinRoom` until it is answered with `roomJoined`, a final error,
/// or the deadline passes; false when the socket is gone.
async fn join(
    phase: &Phase,
    plan: &Plan,
    user: usize,
    ws: &mut Ws,
    started: Instant,
    deadline: Instant,
) -> bool {
    let frame = plan.join_frame(user);
    let mut attempt = 0u32;
    'attempts: loop {
        attempt += 1;
        phase.tally.borrow_mut().join_attempts += 1;
        if ws.send(Message::Text(frame.clone().into())).await.is_err() {
            phase.tally.borrow_mut().surprises.unexpected_closes += 1;
            phase.finish(Err("closed".to_owned()));
            return false;
        }
        loop {
            let text = match tokio::time::timeout_at(deadline.into(), ws.next()).await {
                Err(_) => {
                    phase.finish(Err("no_answer".to_owned()));
                    return true;
                }
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => {
                    phase.tally.borrow_mut().surprises.unexpected_closes += 1;
                    phase.finish(Err("closed".to_owned()));
                    return false;
                }
                Ok(Some(Ok(_))) => continue,
            };
            let Ok(head) = serde_json::from_str::<Head>(text.as_str()) else {
                phase.tally.borrow_mut().surprises.event("unparsable");
                continue;
            };
            match head.kind.as_str() {
                "roomJoined" => {
                    let checked = serde_json::from_str::<JoinedFrame>(text.as_str())
                        .map_err(|_| "unparsable_room_joined")
                        .and_then(|f| {
                            let room = f.payload.room.id.clone();
                            match role(user) {
                                Role::Direct => Ok(room),
                                Role::Recovery => check_recovery(
                                    &f.payload,
                                    plan.rooms[user / 2].as_deref().unwrap_or_default(),
                                    plan.seen,
                                    plan.missed,
                                )
                                .map(|()| room),
                            }
                        });
                    match checked {
                        Ok(room) => phase.tally.borrow_mut().rooms[user] = Some(room),
                        Err(wrong) => bump(&mut phase.tally.borrow_mut().wrong, wrong),
                    }
                    phase.finish(Ok(started));
                    return true;
                }
                "error" => {
                    let code = head.payload.code.unwrap_or_else(|| "?".to_owned());
                    if head.payload.request_type.as_deref() != Some("joinRoom") {
                        bump(&mut phase.tally.borrow_mut().other_errors, &code);
                        continue;
                    }
                    bump(&mut phase.tally.borrow_mut().join_errors, &code);
                    let least = Duration::from_millis(head.payload.retry_after_ms.unwrap_or(0));
                    let wait = backoff(attempt, least, user as u64);
                    if retryable(&code) && Instant::now() + wait < deadline {
                        tokio::time::sleep(wait).await;
                        continue 'attempts;
                    }
                    phase.finish(Err(format!("join:{code}")));
                    return true;
                }
                other => phase.tally.borrow_mut().surprises.event(other),
            }
        }
    }
}

/// Keeps the socket open (reading what comes) until the phase closes it.
async fn hold(phase: &Phase, mut ws: Ws, close: &mut watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = close.changed() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                return;
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let kind = serde_json::from_str::<Head>(text.as_str())
                        .map_or_else(|_| "unparsable".to_owned(), |h| h.kind);
                    phase.tally.borrow_mut().surprises.event(&kind);
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    let mut t = phase.tally.borrow_mut();
                    if !t.closing {
                        t.surprises.unexpected_closes += 1;
                    }
                    return;
                }
                Some(Ok(_)) => {}
            }
        }
    }
}

/// Connects and waits for `connected` (the user is known from then on),
/// retrying refused handshakes.
async fn connect_ready(target: &Dial, deadline: Instant) -> anyhow::Result<Ws> {
    let mut attempt = 0;
    let mut ws = loop {
        attempt += 1;
        match tokio::time::timeout_at(deadline.into(), handshake(target)).await {
            Ok(Ok(ws)) => break ws,
            Ok(Err((cause, least))) if cause == "http_429" || cause == "http_503" => {
                tokio::time::sleep(backoff(attempt, least, attempt.into())).await;
            }
            Ok(Err((cause, _))) => bail!("connecting: {cause}"),
            Err(_) => bail!("connecting: timed out"),
        }
    };
    loop {
        match tokio::time::timeout_at(deadline.into(), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text.as_str().contains("\"connected\"") => {
                return Ok(ws);
            }
            Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => {
                bail!("closed before connected")
            }
            Ok(Some(Ok(_))) => {}
            Err(_) => bail!("no connected event"),
        }
    }
}

/// Reads events until one of `kind` arrives (returned), or an `error`:
/// `Ok(Err(code, retryAfterMs))` for a code a client retries; any other
/// error fails.
async fn next_answer(
    ws: &mut Ws,
    kind: &str,
    deadline: Instant,
) -> anyhow::Result<Result<String, (String, u64)>> {
    loop {
        let text = match tokio::time::timeout_at(deadline.into(), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => bail!("socket closed"),
            Ok(Some(Ok(_))) => continue,
            Err(_) => bail!("no {kind} in time"),
        };
        let Ok(head) = serde_json::from_str::<Head>(text.as_str()) else {
            continue;
        };
        if head.kind == kind {
            return Ok(Ok(text.as_str().to_owned()));
        }
        if head.kind == "error" {
            let code = head.payload.code.unwrap_or_default();
            if retryable(&code) {
                return Ok(Err((code, head.payload.retry_after_ms.unwrap_or(0))));
            }
            bail!(
                "{} answered {code}",
                head.payload.request_type.unwrap_or_default()
            );
        }
    }
}

/// Prepares one recovery pair over its WebSockets, the way any client
/// would: both connect (so both are known), the first opens the DIRECT
/// room with `joinRoom {targetUserId}` and sends `messages` messages in a
/// row (each with a `clientMessageId`, so a retry stores nothing twice),
/// and waits until each came back to it. Returns the room.
async fn prepare_pair(
    dial_a: &Dial,
    dial_b: &Dial,
    b_id: &str,
    messages: u64,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut b = connect_ready(dial_b, deadline).await?;
    let mut a = connect_ready(dial_a, deadline).await?;
    let join = json!({"type": "joinRoom", "payload": {"targetUserId": b_id}}).to_string();
    let mut attempt = 0;
    let room = loop {
        attempt += 1;
        a.send(Message::Text(join.clone().into())).await?;
        match next_answer(&mut a, "roomJoined", deadline).await? {
            Ok(text) => break serde_json::from_str::<JoinedFrame>(&text)?.payload.room.id,
            Err((_, least)) => {
                let least = Duration::from_millis(least);
                tokio::time::sleep(backoff(attempt, least, attempt.into())).await;
            }
        }
    };
    let frame = |k: u64| {
        json!({"type": "sendMessage", "payload": {"roomId": room,
            "content": format!("before the storm {k}"), "clientMessageId": format!("prep-{k}")}})
        .to_string()
    };
    for k in 0..messages {
        a.send(Message::Text(frame(k).into())).await?;
    }
    // Every message comes back to its sender once; a refused one is sent
    // again after the wait it asks for.
    let mut stored = std::collections::BTreeSet::new();
    let mut attempt = 0;
    while (stored.len() as u64) < messages {
        let text = match tokio::time::timeout_at(deadline.into(), a.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => bail!("socket closed"),
            Ok(Some(Ok(_))) => continue,
            Err(_) => bail!("{} of {messages} messages stored in time", stored.len()),
        };
        let v: Value = serde_json::from_str(text.as_str())?;
        let id = v["payload"]["clientMessageId"].as_str().unwrap_or_default();
        let k = id.strip_prefix("prep-").and_then(|k| k.parse::<u64>().ok());
        match (v["type"].as_str(), k) {
            (Some("message"), Some(k)) => {
                stored.insert(k);
            }
            (Some("error"), Some(k)) => {
                let code = v["payload"]["code"].as_str().unwrap_or_default();
                if !retryable(code) {
                    bail!("sendMessage answered {code}");
                }
                attempt += 1;
                let least =
                    Duration::from_millis(v["payload"]["retryAfterMs"].as_u64().unwrap_or(0));
                tokio::time::sleep(backoff(attempt, least, k)).await;
                a.send(Message::Text(frame(k).into())).await?;
            }
            _ => {}
        }
    }
    let _ = a.close(None).await;
    let _ = b.close(None).await;
    Ok(room)
}

/// Prepares every recovery pair's room ([`prepare_pair`], `concurrency`
/// pairs at a time). Returns the room per pair (`None` for direct pairs).
///
/// # Errors
/// A pair that cannot be prepared.
async fn prepare(
    urls: &[String],
    servers: &[Option<SocketAddr>],
    ws_path: &str,
    user_ids: &[String],
    tokens: &[String],
    messages: u64,
    concurrency: usize,
) -> anyhow::Result<Vec<Option<String>>> {
    let pairs = user_ids.len() / 2;
    let recovery: Vec<usize> = (0..pairs)
        .filter(|p| role(2 * p) == Role::Recovery)
        .collect();
    let limit = Rc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(recovery.len());
    for pair in recovery {
        let (a, b) = (2 * pair, 2 * pair + 1);
        let dial_a = dial(urls, servers, ws_path, &tokens[a], a);
        let dial_b = dial(urls, servers, ws_path, &tokens[b], b);
        let b_id = user_ids[b].clone();
        let limit = Rc::clone(&limit);
        tasks.push(spawn_local(async move {
            let _permit = limit.acquire().await?;
            let room = prepare_pair(&dial_a, &dial_b, &b_id, messages)
                .await
                .with_context(|| format!("preparing the room of {b_id}"))?;
            anyhow::Ok((pair, room))
        }));
    }
    let mut rooms = vec![None; pairs];
    for task in tasks {
        let (pair, room) = task.await.context("a preparation task panicked")??;
        rooms[pair] = Some(room);
    }
    Ok(rooms)
}

/// Reads the counters until the PostgreSQL and Redis round trips stop
/// moving for half a second (and, with `closed`, no gateway holds a
/// connection), or `max` passed. Without `/metrics` URLs it just waits
/// (the baseline exposes none).
async fn settle(urls: &[String], max: Duration, closed: bool) -> BTreeMap<String, f64> {
    if urls.is_empty() {
        tokio::time::sleep(if closed {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(1)
        })
        .await;
        return BTreeMap::new();
    }
    let end = Instant::now() + max;
    let mut last = scrape(urls).await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = scrape(urls).await;
        let still = ["chat_pg_round_trips_total", "chat_redis_round_trips_total"]
            .iter()
            .all(|k| now.get(*k) == last.get(*k));
        let open: f64 = now
            .iter()
            .filter(|(k, _)| k.starts_with("chat_gateway_connections{"))
            .map(|(_, v)| v)
            .sum();
        if (still && (!closed || open == 0.0)) || Instant::now() >= end {
            return now;
        }
        last = now;
    }
}

/// Runs one phase's clients until every one is done, sampling `watched`
/// every 250 ms; returns the tally, the close switch and the tasks.
async fn run_phase(
    cfg: &StormConfig,
    plan: &Rc<Plan>,
    mode: Mode,
    name: &str,
    watched: &mut [Watched],
) -> (
    Rc<Phase>,
    watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let users = plan.user_ids.len();
    let phase = Rc::new(Phase {
        plan: Rc::clone(plan),
        mode,
        handshakes: Semaphore::new(cfg.connect.permits()),
        deadline: cfg.deadline,
        zero: Instant::now(),
        tally: RefCell::new(Tally {
            rooms: vec![None; users],
            ..Tally::default()
        }),
    });
    let (close, close_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(users);
    let gap = cfg.connect.gap();
    let mut next_sample = Instant::now();
    let mut next_report = phase.zero + Duration::from_secs(1);
    let mut spawned = 0;
    loop {
        // Spawn (all at once, the semaphore caps the handshakes; or paced).
        while spawned < users {
            if let Some(gap) = gap {
                if Instant::now() < phase.zero + gap.mul_f64(spawned as f64) {
                    break;
                }
            }
            tasks.push(spawn_local(client(
                Rc::clone(&phase),
                spawned,
                close_rx.clone(),
            )));
            spawned += 1;
        }
        let now = Instant::now();
        if now >= next_sample {
            for w in watched.iter_mut() {
                w.sample();
            }
            next_sample = now + Duration::from_millis(250);
        }
        let done = phase.tally.borrow().done;
        if cfg.progress && now >= next_report {
            let t = phase.tally.borrow();
            eprintln!(
                "[{} {} {} t={:>3.0}s] handshakes {:>6} done {:>6}/{users} ok {:>6} join errors {:?} handshake errors {:?} {}",
                cfg.target.label,
                cfg.target.scenario,
                name,
                phase.zero.elapsed().as_secs_f64(),
                t.handshake.count(),
                t.done,
                t.succeeded,
                t.join_errors,
                t.handshake_errors,
                crate::procstat::rss_now(watched)
            );
            next_report += Duration::from_secs(1);
        }
        if done >= users {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (phase, close, tasks)
}

/// Closes a phase's sockets and waits (briefly) for its tasks.
async fn close_phase(
    phase: &Phase,
    close: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    phase.tally.borrow_mut().closing = true;
    let _ = close.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(tasks)).await;
}

/// Mints `users` users named `{prefix}{i}` and prepares their recovery
/// rooms; returns the plan and the seconds the preparation took.
async fn build_plan(
    cfg: &StormConfig,
    prefix: &str,
    users: usize,
) -> anyhow::Result<(Rc<Plan>, f64)> {
    let user_ids: Vec<String> = (0..users).map(|i| format!("{prefix}{i}")).collect();
    let tokens: Vec<String> = user_ids
        .iter()
        .map(|u| mint(&cfg.target.secret, u))
        .collect::<anyhow::Result<_>>()?;
    let servers = resolve(&cfg.target.urls).await;
    let t = Instant::now();
    let rooms = prepare(
        &cfg.target.urls,
        &servers,
        &cfg.target.ws_path,
        &user_ids,
        &tokens,
        cfg.seen + cfg.missed,
        cfg.setup_concurrency,
    )
    .await?;
    let seconds = round3(t.elapsed().as_secs_f64());
    if cfg.progress {
        eprintln!(
            "[{} {}] {} recovery rooms of {prefix}* prepared with {} messages each in {seconds:.1}s",
            cfg.target.label,
            cfg.target.scenario,
            rooms.iter().flatten().count(),
            cfg.seen + cfg.missed
        );
    }
    let plan = Plan {
        urls: cfg.target.urls.clone(),
        servers,
        ws_path: cfg.target.ws_path.clone(),
        user_ids,
        tokens,
        rooms,
        seen: cfg.seen,
        missed: cfg.missed,
    };
    Ok((Rc::new(plan), seconds))
}

/// Runs the whole scenario: warm up, prepare, calibrate, storm; returns its JSON
/// line. Must run inside a `LocalSet`.
///
/// # Errors
/// Bad settings (users not a multiple of 4, too few file descriptors), or
/// a preparation that fails.
pub async fn run(cfg: StormConfig) -> anyhow::Result<StormReport> {
    if cfg.target.urls.is_empty() {
        bail!("at least one --url is needed");
    }
    if cfg.users < 4 || cfg.users % 4 != 0 {
        bail!(
            "--users must be a multiple of 4 (direct and recovery pairs), not {}",
            cfg.users
        );
    }
    if let Some(limit) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .as_deref()
        .and_then(parse_open_files_limit)
    {
        let need = cfg.users as u64 + 256;
        if limit < need {
            bail!(
                "{} clients need about {need} open files, the limit is {limit}: raise it (ulimit -n)",
                cfg.users
            );
        }
    }
    // 0. Warm up.
    let warm_users = cfg.users.min(WARM_UP_USERS);
    let (warm, _) = build_plan(&cfg, &format!("{}-w", cfg.run_id), warm_users).await?;
    // Its direct pairs must be known users before they name each other.
    let (phase, close, tasks) =
        run_phase(&cfg, &warm, Mode::Calibrate, "warm-up connects", &mut []).await;
    close_phase(&phase, close, tasks).await;
    drop(phase);
    settle(&cfg.servers.metrics_urls, Duration::from_secs(30), true).await;
    let (phase, close, tasks) = run_phase(&cfg, &warm, Mode::Storm, "warm-up", &mut []).await;
    let warm_up = {
        let t = phase.tally.borrow();
        WarmUp {
            users: warm_users,
            joined: t.succeeded,
            join_errors: t.join_errors.clone(),
            failed: t.failed.clone(),
        }
    };
    close_phase(&phase, close, tasks).await;
    drop(phase);
    if cfg.progress {
        eprintln!(
            "[{} {}] warm-up: {} of {warm_users} joined, join errors {:?}",
            cfg.target.label, cfg.target.scenario, warm_up.joined, warm_up.join_errors
        );
    }
    settle(&cfg.servers.metrics_urls, Duration::from_secs(30), true).await;

    // 1. Prepare.
    let (plan, prepare_seconds) = build_plan(&cfg, &format!("{}-u", cfg.run_id), cfg.users).await?;

    // 2. Calibrate: the cost of a connect.
    let before = settle(&cfg.servers.metrics_urls, Duration::from_secs(15), false).await;
    let t = Instant::now();
    let (phase, close, tasks) =
        run_phase(&cfg, &plan, Mode::Calibrate, "calibration", &mut []).await;
    let calibration_seconds = t.elapsed().as_secs_f64();
    let after = settle(&cfg.servers.metrics_urls, Duration::from_secs(15), false).await;
    let calibration = {
        let t = phase.tally.borrow();
        Calibration {
            connected: t.succeeded,
            failed: t.failed.clone(),
            handshake_errors: t.handshake_errors.clone(),
            seconds: round3(calibration_seconds),
            handshake: t.handshake.summary(),
            counters: counter_deltas(&before, &after),
        }
    };
    close_phase(&phase, close, tasks).await;
    drop(phase);
    if cfg.progress {
        eprintln!(
            "[{} {}] calibration: {} connected in {:.1}s, failures {:?}",
            cfg.target.label,
            cfg.target.scenario,
            calibration.connected,
            calibration.seconds,
            calibration.failed
        );
    }
    // Let the disconnects finish before the storm's counters are read.
    let before = settle(&cfg.servers.metrics_urls, Duration::from_secs(30), true).await;

    // 3. Storm.
    let mut watched: Vec<Watched> = cfg.servers.watch();
    let mut me = Watched::new("generator", std::process::id());
    for w in watched.iter_mut().chain(std::iter::once(&mut me)) {
        w.mark("send_start");
    }
    let (phase, close, tasks) = run_phase(&cfg, &plan, Mode::Storm, "storm", &mut watched).await;
    for w in watched.iter_mut().chain(std::iter::once(&mut me)) {
        w.mark("send_end");
        w.mark("connected");
    }
    let all_done_s = round3(phase.zero.elapsed().as_secs_f64());
    let after = settle(&cfg.servers.metrics_urls, Duration::from_secs(15), false).await;
    for w in &mut watched {
        w.sample();
    }
    let report = {
        let t = phase.tally.borrow();
        let mut wrong = t.wrong.clone();
        let split = (0..cfg.users)
            .step_by(2)
            .filter(|&a| role(a) == Role::Direct)
            .filter(|&a| match (&t.rooms[a], &t.rooms[partner(a)]) {
                (Some(x), Some(y)) => x != y,
                _ => false,
            })
            .count();
        if split > 0 {
            wrong.insert("direct_pair_split".to_owned(), split as u64);
        }
        let mut counters = counter_deltas(&before, &after);
        counters.extend(round_trips_per_join(
            &counters,
            &calibration.counters,
            calibration.connected,
            t.handshake.count() as usize,
            t.join_attempts,
        ));
        let direct_clients = (0..cfg.users).filter(|u| role(*u) == Role::Direct).count();
        StormReport {
            kind: "storm",
            label: cfg.target.label.clone(),
            scenario: cfg.target.scenario.clone(),
            users: cfg.users,
            instances: cfg.target.urls.len(),
            direct_clients,
            recovery_clients: cfg.users - direct_clients,
            after_sequence_id: cfg.seen,
            missed_messages: cfg.missed,
            connect_concurrency: cfg.connect.concurrency,
            connect_rate: cfg.connect.rate,
            deadline_s: cfg.deadline.as_secs_f64(),
            prepare_seconds,
            warm_up,
            calibration,
            joined: t.succeeded,
            all_joined_s: (t.succeeded == cfg.users)
                .then(|| round3(t.last_success_us as f64 / 1e6)),
            all_done_s,
            handshakes_done_s: round3(t.last_handshake_us as f64 / 1e6),
            handshake: t.handshake.summary(),
            join_time: t.join_time.summary(),
            join_attempts: t.join_attempts,
            join_errors: t.join_errors.clone(),
            handshake_errors: t.handshake_errors.clone(),
            failed: t.failed.clone(),
            wrong_answers: wrong,
            other_errors: t.other_errors.clone(),
            surprises: t.surprises.clone(),
            processes: watched.iter().map(Watched::report).collect(),
            generator_cpu_percent: me.cpu_send_percent(),
            counters,
        }
    };
    close_phase(&phase, close, tasks).await;
    if cfg.progress {
        eprintln!(
            "[{} {}] {} of {} joined, all by {:?} s; join errors {:?}; handshake errors {:?}; failed {:?}; wrong {:?}",
            cfg.target.label,
            cfg.target.scenario,
            report.joined,
            cfg.users,
            report.all_joined_s,
            report.join_errors,
            report.handshake_errors,
            report.failed,
            report.wrong_answers
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::counters_of;

    #[test]
    fn pairs_split_evenly_into_direct_and_recovery() {
        let roles: Vec<Role> = (0..8).map(role).collect();
        use Role::{Direct, Recovery};
        assert_eq!(
            roles,
            [
                Direct, Direct, Recovery, Recovery, Direct, Direct, Recovery, Recovery
            ]
        );
        assert_eq!(partner(4), 5);
        assert_eq!(partner(5), 4);
        let direct = (0..10_000).filter(|u| role(*u) == Direct).count();
        assert_eq!(direct, 5_000);
        // Partners always share a role.
        assert!((0..1000).all(|u| role(u) == role(partner(u))));
    }

    #[test]
    fn join_frames_name_the_partner_or_the_prepared_room() {
        let plan = Plan {
            urls: vec!["http://127.0.0.1:1".into()],
            servers: vec![None],
            ws_path: "/ws".into(),
            user_ids: (0..4).map(|i| format!("r-u{i}")).collect(),
            tokens: vec![String::new(); 4],
            rooms: vec![None, Some("room_7".into())],
            seen: 5,
            missed: 20,
        };
        let direct: Value = serde_json::from_str(&plan.join_frame(1)).expect("json");
        assert_eq!(
            direct,
            json!({"type": "joinRoom", "payload": {"targetUserId": "r-u0"}})
        );
        let recovery: Value = serde_json::from_str(&plan.join_frame(3)).expect("json");
        assert_eq!(
            recovery,
            json!({"type": "joinRoom", "payload": {"roomId": "room_7", "afterSequenceId": 5}})
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap_with_bounded_jitter() {
        let none = Duration::ZERO;
        let within = |d: Duration, lo: u64, hi: u64| {
            d >= Duration::from_millis(lo) && d <= Duration::from_millis(hi)
        };
        for salt in [0, 1, 42, u64::MAX] {
            assert!(within(backoff(1, none, salt), 100, 150));
            assert!(within(backoff(3, none, salt), 400, 600));
            assert!(within(backoff(30, none, salt), 30_000, 45_000));
            // The server's least wait comes first, then the doubling.
            assert!(within(
                backoff(1, Duration::from_secs(1), salt),
                1_000,
                1_500
            ));
            assert!(within(
                backoff(6, Duration::from_secs(1), salt),
                3_200,
                4_800
            ));
        }
        assert_eq!(backoff(2, none, 7), backoff(2, none, 7));
        let spread: std::collections::BTreeSet<_> = (0..50).map(|s| backoff(1, none, s)).collect();
        assert!(spread.len() > 10, "{spread:?}");
    }

    #[test]
    fn only_busy_codes_are_retried() {
        assert!(retryable("RATE_LIMITED"));
        assert!(retryable("SERVICE_UNAVAILABLE"));
        assert!(retryable("UNAVAILABLE"));
        assert!(!retryable("INTERNAL"));
        assert!(!retryable("NOT_FOUND"));
    }

    fn joined(text: &str) -> Joined {
        serde_json::from_str::<JoinedFrame>(text)
            .expect("roomJoined parses")
            .payload
    }

    #[test]
    fn recovery_answers_are_checked() {
        let messages: Vec<Value> = (6..=25)
            .map(|q| json!({"id": format!("m{q}"), "sequenceId": q, "content": "x"}))
            .collect();
        let good = json!({"type": "roomJoined", "payload": {"room": {"id": "r1", "type": "DIRECT"},
            "messages": messages, "unreadCount": 0, "onlineUsers": [], "hasMore": false, "recovered": true}})
        .to_string();
        assert_eq!(check_recovery(&joined(&good), "r1", 5, 20), Ok(()));
        assert_eq!(
            check_recovery(&joined(&good), "r2", 5, 20),
            Err("recovery_wrong_room")
        );
        assert_eq!(
            check_recovery(&joined(&good), "r1", 4, 20),
            Err("recovery_wrong_messages")
        );
        let short = json!({"type": "roomJoined", "payload": {"room": {"id": "r1"},
            "messages": [{"sequenceId": 6}], "recovered": true}})
        .to_string();
        assert_eq!(
            check_recovery(&joined(&short), "r1", 5, 20),
            Err("recovery_wrong_messages")
        );
        let lost = good.replace("\"recovered\":true", "\"recovered\":false");
        assert_eq!(
            check_recovery(&joined(&lost), "r1", 5, 20),
            Err("recovery_not_recovered")
        );
        let absent = good.replace(",\"recovered\":true", "");
        assert_ne!(absent, good);
        assert_eq!(
            check_recovery(&joined(&absent), "r1", 5, 20),
            Err("recovery_not_recovered")
        );
    }

    #[test]
    fn round_trips_per_join_subtract_the_connects() {
        let calibration = counters_of(
            "chat_pg_round_trips_total 2000
             chat_redis_round_trips_total 6000",
        );
        // 1,000 connects (2 PG, 6 Redis each) and 1,000 joins (1 and 1).
        let storm = counters_of(
            "chat_pg_round_trips_total 3000
             chat_redis_round_trips_total 7000
             chat_ws_requests_total{type=\"joinRoom\"} 1000",
        );
        let r = round_trips_per_join(&storm, &calibration, 1000, 1000, 1200);
        assert_eq!(r["pg_round_trips_per_connect"], 2.0);
        assert_eq!(r["redis_round_trips_per_connect"], 6.0);
        assert_eq!(r["pg_round_trips_per_join"], 1.0);
        assert_eq!(r["redis_round_trips_per_join"], 1.0);
        // The server's own count of joins wins over what was sent.
        assert_eq!(r["join_requests"], 1000.0);
        // Without counters (the baseline) there is nothing to report.
        assert!(round_trips_per_join(&BTreeMap::new(), &BTreeMap::new(), 10, 10, 10).is_empty());
        // Without the server's count, the joins sent are the divisor.
        let mut no_count = storm.clone();
        no_count.remove("chat_ws_requests_total{type=\"joinRoom\"}");
        let r = round_trips_per_join(&no_count, &calibration, 1000, 1000, 500);
        assert_eq!(r["pg_round_trips_per_join"], 2.0);
    }

    #[test]
    fn every_client_has_a_loopback_address_of_its_own() {
        assert_eq!(source_address(0), Ipv4Addr::new(127, 1, 1, 1));
        assert_eq!(source_address(249), Ipv4Addr::new(127, 1, 1, 250));
        assert_eq!(source_address(250), Ipv4Addr::new(127, 1, 2, 1));
        let all: std::collections::BTreeSet<_> = (0..100_000).map(source_address).collect();
        assert_eq!(all.len(), 100_000);
        assert!(
            all.iter()
                .all(|a| a.is_loopback() && a.octets()[1..].iter().all(|o| *o != 0 && *o != 255))
        );
        let urls = vec![
            "http://127.0.0.1:4101".to_owned(),
            "http://example.invalid:80".to_owned(),
        ];
        let servers = vec![Some(SocketAddr::from(([127, 0, 0, 1], 4101))), None];
        let local = dial(&urls, &servers, "/ws", "t", 6);
        assert_eq!(local.url, "ws://127.0.0.1:4101/ws?token=t");
        assert_eq!(local.source, Some(source_address(6)));
        // Elsewhere the system picks the source.
        assert_eq!(dial(&urls, &servers, "/ws", "t", 7).source, None);
    }

    #[test]
    fn the_open_files_limit_is_read() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             127317               127317               processes \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(parse_open_files_limit(limits), Some(20000));
        assert_eq!(parse_open_files_limit("nothing"), None);
        let me = std::fs::read_to_string("/proc/self/limits").expect("linux");
        assert!(parse_open_files_limit(&me).is_some());
    }
}
