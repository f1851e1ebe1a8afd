//! Fault survival with real processes (docs/ARCHITECTURE.md, "Failure
//! behaviour"): a private PostgreSQL cluster and a private Redis on free
//! ports (so restarting them disturbs nobody), two gateways
//! (`chat-local serve --no-relay`) and two relays (`chat-local relay`),
//! driven by WebSocket clients that behave like a mobile app: they ping,
//! reconnect when their socket closes (or `connected` does not come), and
//! rejoin with `afterSequenceId`.
//!
//! Each test injects one fault while messages flow, then checks that no
//! acknowledged message (the sender got its own `message` event) is
//! missing from PostgreSQL, that delivery resumes by itself, that every
//! member ends up with every stored message (live or recovered), and what
//! else the fault promises (exactly once, presence, takeover time).
//!
//! The tests run one at a time (they start six processes each) and clean
//! up after themselves, also when they fail; a run that was killed leaves
//! its temporary directory behind, and the next run stops what it started.
//! Each prints a `fault:` line with what it measured.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chat_test_support::stack::try_http;
use chat_test_support::{SECRET, token_with};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The binary under test, built by cargo for this test.
const BIN: &str = env!("CARGO_BIN_EXE_chat-local");
/// Cluster shards of the relays (the default).
const SHARDS: usize = 64;
/// Presence lease: short, so a dead gateway's users go offline quickly.
const PRESENCE_TTL_SECONDS: &str = "2";
/// How often the sending member sends.
const SEND_EVERY: Duration = Duration::from_millis(100);
/// How often every member pings (keeps its 2 s presence lease).
const PING_EVERY: Duration = Duration::from_millis(500);
/// Bound on any one wait of these tests.
const WAIT: Duration = Duration::from_secs(20);
/// Bound on a whole test.
const TEST_LIMIT: Duration = Duration::from_secs(100);

/// One test at a time: each runs six processes on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The directory holding `initdb` and `pg_ctl`.
fn pg_bindir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.retain(|d| d.join("pg_ctl").exists() && d.join("initdb").exists());
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(dir) = dirs.pop() {
        return dir;
    }
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("PostgreSQL server binaries (initdb, pg_ctl) are installed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A PostgreSQL tool, as the `postgres` user when we are root (initdb
/// and pg_ctl refuse root).
fn pg_command(tool: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(tool);
        c
    } else {
        Command::new(tool)
    }
}

/// Runs a short command to completion, within `limit`.
async fn run(mut command: Command, what: &str, limit: Duration) {
    command.stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(limit, command.output())
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {limit:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Stops whatever an earlier, killed run left behind: its temporary
/// directories name their test process, and hold the pids it started.
fn clean_leftovers() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("chat-faults-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        stop_everything(&entry.path());
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

/// Kills the processes listed in `dir/pids` and stops the PostgreSQL
/// cluster in `dir/pg` (synchronous: used from `Drop`).
fn stop_everything(dir: &Path) {
    if let Ok(pids) = std::fs::read_to_string(dir.join("pids")) {
        for pid in pids.split_whitespace() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", pid])
                .stderr(Stdio::null())
                .status();
        }
    }
    let data = dir.join("pg");
    if data.join("postmaster.pid").exists() {
        let pg_ctl = pg_bindir().join("pg_ctl");
        let mut stop = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            std::process::Command::new(pg_ctl)
        };
        let _ = stop
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "-t", "10", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// What runs: the services, the gateways and the relays.
struct Deployment {
    dir: PathBuf,
    pg_bin: PathBuf,
    pg_port: u16,
    redis_port: u16,
    redis: Option<Child>,
    gateways: Vec<(String, SocketAddr, Option<Child>)>,
    relays: Vec<(String, Option<Child>)>,
}

impl Deployment {
    /// PostgreSQL (migrated), Redis, `gateways` gateways and `relays`
    /// relays, all ready: the gateways answer `/health` and the relays
    /// hold every shard between them.
    async fn start(gateways: usize, relays: usize) -> Self {
        clean_leftovers();
        let dir = std::env::temp_dir().join(format!(
            "chat-faults-{}-{:x}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut this = Self {
            dir,
            pg_bin: pg_bindir(),
            pg_port: free_port(),
            redis_port: free_port(),
            redis: None,
            gateways: Vec::new(),
            relays: Vec::new(),
        };
        this.start_postgres().await;
        this.start_redis().await;
        let mut migrate = this.chat_local("migrate");
        migrate.arg("migrate");
        run(migrate, "chat-local migrate", WAIT).await;
        for i in 1..=gateways {
            this.start_gateway(&format!("gw{i}")).await;
        }
        for i in 1..=relays {
            this.start_relay(&format!("relay{i}"));
        }
        this.wait_relays_ready(relays).await;
        this
    }

    async fn start_postgres(&mut self) {
        let data = self.dir.join("pg");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:"]).arg(&self.dir);
                    c
                },
                "chown",
                WAIT,
            )
            .await;
        }
        let mut initdb = pg_command(&self.pg_bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(initdb, "initdb", Duration::from_secs(60)).await;
        let mut start = pg_command(&self.pg_bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k /tmp -c listen_addresses=127.0.0.1",
                self.pg_port
            ))
            .args(["-w", "-t", "30", "start"]);
        run(start, "pg_ctl start", Duration::from_secs(40)).await;
    }

    /// `pg_ctl restart -m fast`: open connections are cut, then the server
    /// comes back on the same port.
    async fn restart_postgres(&self) {
        let mut restart = pg_command(&self.pg_bin.join("pg_ctl"));
        restart
            .arg("-D")
            .arg(self.dir.join("pg"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-m", "fast", "-w", "-t", "30", "restart"]);
        run(restart, "pg_ctl restart", Duration::from_secs(40)).await;
    }

    fn remember_pid(&self, child: &Child) {
        if let Some(pid) = child.id() {
            let mut pids = std::fs::read_to_string(self.dir.join("pids")).unwrap_or_default();
            pids.push_str(&format!("{pid}\n"));
            let _ = std::fs::write(self.dir.join("pids"), pids);
        }
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log file")
    }

    async fn start_redis(&mut self) {
        let mut redis = Command::new("redis-server");
        redis
            .args([
                "--port",
                &self.redis_port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(self.log_file("redis"))
            .stderr(self.log_file("redis"))
            .kill_on_drop(true);
        let child = redis.spawn().expect("redis-server is installed");
        self.remember_pid(&child);
        self.redis = Some(child);
        let url = self.redis_url();
        wait_until("Redis answers", WAIT, || {
            let url = url.clone();
            async move { ping_redis(&url).await.then_some(()) }
        })
        .await;
    }

    /// Redis dies (`SIGKILL`: nothing saved) and starts again, empty, on
    /// the same port.
    async fn restart_redis(&mut self) {
        if let Some(mut redis) = self.redis.take() {
            redis.start_kill().expect("kill redis-server");
            let _ = tokio::time::timeout(WAIT, redis.wait()).await;
        }
        // A second without Redis, while the clients keep sending.
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.start_redis().await;
    }

    fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    /// `chat-local` with this deployment's environment (and nothing
    /// inherited but `PATH`), logging to `{name}.log`.
    fn chat_local(&self, name: &str) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "DATABASE_URL",
                format!("postgres://postgres@127.0.0.1:{}/postgres", self.pg_port),
            )
            .env("REDIS_URL", self.redis_url())
            .env("JWT_SECRET", SECRET)
            .env("PRESENCE_TTL_SECONDS", PRESENCE_TTL_SECONDS)
            .env("MESSAGE_RETENTION", "0")
            .env("RATE_LIMIT_PER_SEC", "0")
            .env("REST_RATE_LIMIT_PER_SEC", "0")
            .env("INSTANCE_ID", name)
            // The relays post to the gateways' management listeners, on
            // free loopback ports.
            .env("RELAY_ALLOWED_ENDPOINTS", "http://127.0.0.1:*/local")
            .env("LOG_FORMAT", "pretty")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(self.log_file(name))
            .stderr(self.log_file(name))
            .kill_on_drop(true);
        c
    }

    async fn start_gateway(&mut self, name: &str) {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut serve = self.chat_local(name);
        serve
            .args(["serve", "--no-relay", "--no-migrate", "--listen"])
            .arg(addr.to_string())
            .arg("--management-listen")
            .arg(format!("127.0.0.1:{}", free_port()));
        let child = serve.spawn().expect("chat-local serve");
        self.remember_pid(&child);
        self.gateways.push((name.to_owned(), addr, Some(child)));
        wait_until(&format!("{name} healthy"), WAIT, || async move {
            rest(addr, "GET", "/health", None, None)
                .await
                .is_some_and(|(status, _)| status == 200)
                .then_some(())
        })
        .await;
    }

    fn start_relay(&mut self, name: &str) {
        let mut relay = self.chat_local(name);
        relay.arg("relay");
        let child = relay.spawn().expect("chat-local relay");
        self.remember_pid(&child);
        self.relays.push((name.to_owned(), Some(child)));
    }

    /// Waits until `n` relays are subscribed and hold every shard between
    /// them, each at least one; returns how long that took.
    async fn wait_relays_ready(&self, n: usize) -> Duration {
        let started = Instant::now();
        let url = self.redis_url();
        wait_until(&format!("{n} relays holding all shards"), WAIT, || {
            let url = url.clone();
            async move {
                let (subscribers, owners) = relay_view(&url).await?;
                let holders: BTreeSet<&str> =
                    owners.iter().flatten().map(|o| relay_name(o)).collect();
                (subscribers == n as i64
                    && owners.iter().all(Option::is_some)
                    && holders.len() == n)
                    .then_some(())
            }
        })
        .await;
        started.elapsed()
    }

    fn gateway_url(&self, i: usize) -> String {
        format!("ws://{}/ws", self.gateways[i].1)
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.gateways[i].1
    }

    /// `kill -9` of a gateway.
    async fn kill_gateway(&mut self, i: usize) {
        if let Some(mut child) = self.gateways[i].2.take() {
            child.start_kill().expect("kill -9");
            let _ = tokio::time::timeout(WAIT, child.wait()).await;
        }
    }

    /// `kill -9` of the relay named `name`.
    async fn kill_relay(&mut self, name: &str) {
        let slot = self
            .relays
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("a relay");
        if let Some(mut child) = slot.1.take() {
            child.start_kill().expect("kill -9");
            let _ = tokio::time::timeout(WAIT, child.wait()).await;
        }
    }

    /// `kill -TERM` of the relay named `name`; returns its exit status and
    /// how long it took to exit.
    async fn terminate_relay(&mut self, name: &str) -> (std::process::ExitStatus, Duration) {
        let slot = self
            .relays
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("a relay");
        let mut child = slot.1.take().expect("running");
        let pid = child.id().expect("a pid");
        let started = Instant::now();
        run(
            {
                let mut c = Command::new("kill");
                c.args(["-TERM", &pid.to_string()]);
                c
            },
            "kill -TERM",
            WAIT,
        )
        .await;
        let status = tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("the relay exits after SIGTERM")
            .expect("exit status");
        (status, started.elapsed())
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Every stored message of `room` (seq, clientMessageId), read over
    /// REST from gateway `i`: PostgreSQL's view.
    async fn stored(&self, i: usize, user: &str, room: &str) -> Vec<(i64, Option<String>)> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let path =
                format!("/api/v1/chat/rooms/{room}/messages?limit=100&afterSequenceId={after}");
            let (status, body) = rest(self.addr(i), "GET", &path, Some(&token(user)), None)
                .await
                .expect("REST answers");
            assert_eq!(status, 200, "{body}");
            let page = body["messages"].as_array().expect("messages").clone();
            for m in &page {
                let seq = m["sequenceId"].as_i64().expect("seq");
                all.push((seq, m["clientMessageId"].as_str().map(str::to_owned)));
                after = seq;
            }
            if !body["hasMore"].as_bool().unwrap_or(false) || page.is_empty() {
                return all;
            }
        }
    }

    /// A GROUP room of `owner` and `members`, made over REST.
    async fn room(&self, owner: &str, members: &[&str]) -> String {
        for user in members.iter().chain([&owner]) {
            let (status, body) = rest(
                self.addr(0),
                "GET",
                "/api/v1/chat/rooms",
                Some(&token(user)),
                None,
            )
            .await
            .expect("REST answers");
            assert_eq!(status, 200, "{body}");
        }
        let (status, body) = rest(
            self.addr(0),
            "POST",
            "/api/v1/chat/rooms",
            Some(&token(owner)),
            Some(&json!({"type": "GROUP", "name": "faults", "memberIds": members})),
        )
        .await
        .expect("REST answers");
        assert_eq!(status, 201, "{body}");
        body["room"]["id"].as_str().expect("room id").to_owned()
    }

    /// Who is online in `room`, over REST.
    async fn online(&self, i: usize, user: &str, room: &str) -> Vec<String> {
        let path = format!("/api/v1/chat/rooms/{room}/online");
        let Some((200, body)) = rest(self.addr(i), "GET", &path, Some(&token(user)), None).await
        else {
            return Vec::new();
        };
        let mut users: Vec<String> = body["onlineUsers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|u| u.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        users.sort();
        users
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for child in self
            .gateways
            .iter_mut()
            .filter_map(|g| g.2.as_mut())
            .chain(self.relays.iter_mut().filter_map(|r| r.1.as_mut()))
            .chain(self.redis.as_mut())
        {
            let _ = child.start_kill();
        }
        stop_everything(&self.dir);
        if failed {
            for name in ["gw1", "gw2", "relay1", "relay2", "postgres"] {
                let log = self.log(name);
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                eprintln!("--- last lines of {name}.log ---");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `PUBSUB NUMSUB` of the bus and the owner of every shard lease.
async fn relay_view(url: &str) -> Option<(i64, Vec<Option<String>>)> {
    let client = redis::Client::open(url).ok()?;
    let mut redis = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(chat_shared::presence::Keys::bus_channel(
            "chat:broadcast",
            chat_shared::presence::keys::PARTITIONS - 1,
        ))
        .query_async(&mut redis)
        .await
        .ok()?;
    let keys: Vec<String> = (0..SHARDS)
        .map(|n| chat_shared::presence::Keys::new("").relay_lease(n))
        .collect();
    let owners: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&keys)
        .query_async(&mut redis)
        .await
        .ok()?;
    Some((subscribers, owners))
}

/// The process name (`INSTANCE_ID`) in a relay id.
fn relay_name(id: &str) -> &str {
    id.split('-').next().unwrap_or(id)
}

async fn ping_redis(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(Ok(mut redis)) = tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut redis)
        .await
        .is_ok()
}

/// Polls `check` every 50 ms until it gives `Some`; panics naming `what`
/// after `limit`.
async fn wait_until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn token(user: &str) -> String {
    token_with(user, |_| {})
}

/// One HTTP/1.1 request; `None` when nothing answers (within 5 s).
async fn rest(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Option<(u16, Value)> {
    let reply = try_http(addr, method, path, token, body, Duration::from_secs(5)).await?;
    // A body that is not JSON reads as null here, as the checks expect.
    let body = if reply.body.is_string() {
        Value::Null
    } else {
        reply.body
    };
    Some((reply.status.as_u16(), body))
}

// ---------------------------------------------------------------------------
// Members: WebSocket clients that behave like a mobile app.

/// What a member saw, across all its connections.
#[derive(Debug, Default)]
struct Seen {
    /// `message` sequence ids of the room as they arrived, per connection
    /// (one list per connection, in connect order).
    live: Vec<Vec<i64>>,
    /// Sequence ids recovered by `joinRoom` with `afterSequenceId`.
    recovered: BTreeSet<i64>,
    /// `roomJoined` answers with `recovered: false` (retention deleted
    /// some of what it asked for; never expected here).
    not_recovered: u32,
    /// clientMessageId → sequence id of this member's acknowledged sends.
    acked: BTreeMap<String, i64>,
    /// Sends made.
    sent: u64,
    /// `(userId, status, when)` of every `presenceUpdate`.
    presence: Vec<(String, String, Instant)>,
    /// Codes of the `error` events.
    errors: Vec<String>,
    /// `connected` events, one per connection that got that far.
    greetings: u32,
}

impl Seen {
    /// Every sequence id it has, live or recovered.
    fn all(&self) -> BTreeSet<i64> {
        self.live
            .iter()
            .flatten()
            .copied()
            .chain(self.recovered.iter().copied())
            .collect()
    }

    /// The highest `n` such that it has every message `1..=n`.
    fn contiguous(&self) -> i64 {
        let all = self.all();
        let mut n = 0;
        while all.contains(&(n + 1)) {
            n += 1;
        }
        n
    }

    fn live_flat(&self) -> Vec<i64> {
        self.live.iter().flatten().copied().collect()
    }
}

/// How a member behaves.
#[derive(Clone)]
struct Spec {
    user: String,
    room: String,
    /// Gateway URLs, preferred first; it reconnects to the next that works.
    urls: Vec<String>,
    /// Sends a message every [`SEND_EVERY`].
    sender: bool,
    /// How long it stays away after losing its socket (a phone in a
    /// tunnel), before it reconnects.
    away: Duration,
}

/// A member running in its own task.
struct Member {
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    user: String,
}

impl Member {
    fn start(spec: Spec) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = CancellationToken::new();
        let user = spec.user.clone();
        let task = tokio::spawn(member(spec, seen.clone(), stop.clone()));
        Self {
            seen,
            stop,
            task,
            user,
        }
    }

    fn seen<T>(&self, read: impl FnOnce(&Seen) -> T) -> T {
        read(&self.seen.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Waits until `check` holds for what it saw.
    async fn wait(&self, what: &str, limit: Duration, check: impl Fn(&Seen) -> bool) {
        let what = format!("{}: {what}", self.user);
        wait_until(&what, limit, || async { self.seen(&check).then_some(()) }).await;
    }

    /// Stops it (its socket closes as the task ends).
    async fn stop(self) -> Arc<Mutex<Seen>> {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        self.seen
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Connects to the first URL that gives a socket and a `connected` event
/// within 3 s, retrying every 200 ms until `stop`.
async fn connect_any(spec: &Spec, stop: &CancellationToken) -> Option<Socket> {
    loop {
        for url in &spec.urls {
            let attempt = tokio::time::timeout(Duration::from_secs(3), async {
                let url = format!("{url}?token={}", token(&spec.user));
                let (mut socket, _) = tokio_tungstenite::connect_async(url).await.ok()?;
                while let Some(Ok(frame)) = socket.next().await {
                    if let Message::Text(text) = frame {
                        let event: Value = serde_json::from_str(&text).ok()?;
                        return (event["type"] == "connected").then_some(socket);
                    }
                }
                None
            })
            .await;
            if let Ok(Some(socket)) = attempt {
                return Some(socket);
            }
            if stop.is_cancelled() {
                return None;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Records one event; returns the `roomJoined` payload if it was one.
fn record(seen: &Mutex<Seen>, spec: &Spec, event: &Value) -> Option<Value> {
    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
    let payload = &event["payload"];
    match event["type"].as_str() {
        Some("message") if payload["roomId"] == spec.room.as_str() => {
            let seq = payload["sequenceId"].as_i64().expect("sequenceId");
            if let Some(list) = seen.live.last_mut() {
                list.push(seq);
            }
            if payload["senderId"] == spec.user.as_str() {
                if let Some(id) = payload["clientMessageId"].as_str() {
                    seen.acked.insert(id.to_owned(), seq);
                }
            }
        }
        Some("presenceUpdate") => {
            let user = payload["userId"].as_str().unwrap_or_default().to_owned();
            let status = payload["status"].as_str().unwrap_or_default().to_owned();
            seen.presence.push((user, status, Instant::now()));
        }
        Some("error") => {
            seen.errors
                .push(payload["code"].as_str().unwrap_or_default().to_owned());
        }
        Some("roomJoined") => return Some(payload.clone()),
        _ => {}
    }
    None
}

/// The member's life: connect, join (recovering what it missed), send and
/// ping, read; on a closed socket, start again.
async fn member(spec: Spec, seen: Arc<Mutex<Seen>>, stop: CancellationToken) {
    let mut next = 0u64;
    let mut first = true;
    'connection: while !stop.is_cancelled() {
        if !std::mem::take(&mut first) {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(spec.away) => {}
            }
        }
        let Some(socket) = connect_any(&spec, &stop).await else {
            return;
        };
        {
            let mut s = seen.lock().unwrap_or_else(PoisonError::into_inner);
            s.greetings += 1;
            s.live.push(Vec::new());
        }
        let (mut sink, mut stream) = socket.split();
        // Join, recovering everything after what it already has (several
        // rounds when more than a page was missed).
        loop {
            let after = seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contiguous();
            let join = json!({"type": "joinRoom", "payload": {"roomId": spec.room, "afterSequenceId": after}});
            if sink.send(Message::text(join.to_string())).await.is_err() {
                continue 'connection;
            }
            let joined = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(Ok(frame)) = stream.next().await {
                    let Message::Text(text) = frame else { continue };
                    let Ok(event) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    if let Some(joined) = record(&seen, &spec, &event) {
                        return Some(joined);
                    }
                    if event["type"] == "error" {
                        return None;
                    }
                }
                None
            })
            .await;
            let Ok(Some(joined)) = joined else {
                let _ = sink.close().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'connection;
            };
            let mut s = seen.lock().unwrap_or_else(PoisonError::into_inner);
            if joined["recovered"] == false {
                s.not_recovered += 1;
            }
            for m in joined["messages"].as_array().into_iter().flatten() {
                if let Some(seq) = m["sequenceId"].as_i64() {
                    s.recovered.insert(seq);
                }
            }
            if !joined["hasMore"].as_bool().unwrap_or(false) {
                break;
            }
        }
        let mut send = tokio::time::interval(SEND_EVERY);
        let mut ping = tokio::time::interval(PING_EVERY);
        loop {
            let frame = tokio::select! {
                () = stop.cancelled() => {
                    let _ = sink.close().await;
                    return;
                }
                _ = send.tick(), if spec.sender => {
                    let id = format!("{}-{next}", spec.user);
                    next += 1;
                    seen.lock().unwrap_or_else(PoisonError::into_inner).sent += 1;
                    Some(json!({"type": "sendMessage", "payload": {
                        "roomId": spec.room, "content": id, "clientMessageId": id}}))
                }
                _ = ping.tick() => Some(json!({"type": "ping", "payload": {}})),
                frame = stream.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        if let Ok(event) = serde_json::from_str::<Value>(&text) {
                            record(&seen, &spec, &event);
                        }
                        None
                    }
                    Some(Ok(Message::Close(_)) | Err(_)) | None => continue 'connection,
                    Some(Ok(_)) => None,
                },
            };
            if let Some(frame) = frame {
                if sink.send(Message::text(frame.to_string())).await.is_err() {
                    continue 'connection;
                }
            }
        }
    }
}

/// The checks every fault shares, once the members are stopped: every
/// acknowledged send is stored, and every member has every stored message
/// (live or recovered). Returns the stored sequence ids.
async fn assert_nothing_lost(
    deployment: &Deployment,
    room: &str,
    sender: &Seen,
    members: &[(&str, &Seen)],
) -> Vec<i64> {
    let stored = deployment.stored(0, "alice", room).await;
    let seqs: Vec<i64> = stored.iter().map(|(s, _)| *s).collect();
    let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
    assert_eq!(seqs, expected, "stored sequence ids are gap-free");
    let ids: BTreeSet<&str> = stored.iter().filter_map(|(_, c)| c.as_deref()).collect();
    let lost: Vec<&String> = sender
        .acked
        .keys()
        .filter(|c| !ids.contains(c.as_str()))
        .collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    for (user, seen) in members {
        assert_eq!(
            seen.not_recovered, 0,
            "{user}: a rejoin was not `recovered`"
        );
        let all = seen.all();
        let missing: Vec<i64> = seqs.iter().filter(|s| !all.contains(s)).copied().collect();
        assert!(missing.is_empty(), "{user} never got {missing:?}");
    }
    seqs
}

/// Asserts `live` is `1..=n` exactly: each message once, in order.
fn assert_exactly_once(user: &str, live: &[i64], n: usize) {
    let expected: Vec<i64> = (1..=n as i64).collect();
    assert_eq!(
        live,
        expected.as_slice(),
        "{user}: each message once, in order"
    );
}

/// Repeats in `live` and whether the first arrivals are in order.
fn repeats_and_order(live: &[i64]) -> (usize, bool) {
    let mut seen = BTreeSet::new();
    let mut firsts = Vec::new();
    for s in live {
        if seen.insert(*s) {
            firsts.push(*s);
        }
    }
    (
        live.len() - firsts.len(),
        firsts.windows(2).all(|w| w[0] < w[1]),
    )
}

/// Two gateways, two relays, a room of alice (sending on gateway 1) and
/// bob (reading on gateway 2, gateway 1 as fallback; back `bob_away`
/// after losing his socket).
async fn flowing(bob_away: Duration) -> (Deployment, String, Member, Member) {
    let deployment = Deployment::start(2, 2).await;
    let room = deployment.room("alice", &["bob", "carol"]).await;
    let bob = Member::start(Spec {
        user: "bob".into(),
        room: room.clone(),
        urls: vec![deployment.gateway_url(1), deployment.gateway_url(0)],
        sender: false,
        away: bob_away,
    });
    bob.wait("joined", WAIT, |s| s.greetings == 1 && s.live.len() == 1)
        .await;
    let alice = Member::start(Spec {
        user: "alice".into(),
        room: room.clone(),
        urls: vec![deployment.gateway_url(0), deployment.gateway_url(1)],
        sender: true,
        away: Duration::ZERO,
    });
    // Messages are flowing.
    bob.wait("live messages", WAIT, |s| s.live_flat().len() >= 10)
        .await;
    (deployment, room, alice, bob)
}

/// Waits until `member` gets, live, a message sent after now.
async fn wait_delivery_resumes(deployment: &Deployment, room: &str, member: &Member) -> Duration {
    let started = Instant::now();
    let stored_now = deployment.stored(0, "alice", room).await.len() as i64;
    member
        .wait("a message sent after the fault, live", WAIT, |s| {
            s.live
                .last()
                .is_some_and(|l| l.iter().any(|seq| *seq > stored_now + 2))
        })
        .await;
    started.elapsed()
}

/// Lets the last sends land, then stops both members.
async fn finish(deployment: &Deployment, room: &str, alice: Member, bob: Member) -> (Seen, Seen) {
    let alice = alice.stop().await;
    let stored = deployment.stored(0, "alice", room).await.len() as i64;
    bob.wait("every stored message", WAIT, |s| s.contiguous() >= stored)
        .await;
    let bob = bob.stop().await;
    let take = |m: Arc<Mutex<Seen>>| {
        std::mem::take(&mut *m.lock().unwrap_or_else(PoisonError::into_inner))
    };
    (take(alice), take(bob))
}

fn report(fault: &str, text: &str) {
    eprintln!("fault: {fault}: {text}");
}

async fn limited(test: impl std::future::Future<Output = ()>) {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .unwrap_or_else(|_| panic!("the test took longer than {TEST_LIMIT:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarting_while_messages_flow() {
    limited(async {
        let (deployment, room, alice, bob) = flowing(Duration::ZERO).await;
        let started = Instant::now();
        deployment.restart_postgres().await;
        let restart = started.elapsed();
        let resumed = wait_delivery_resumes(&deployment, &room, &bob).await;
        let (alice, bob) = finish(&deployment, &room, alice, bob).await;
        let seqs = assert_nothing_lost(&deployment, &room, &alice, &[("bob", &bob)]).await;
        // Nobody had to reconnect: bob got each stored message once, live.
        assert_eq!(bob.greetings, 1, "bob stayed connected");
        assert_exactly_once("bob", &bob.live_flat(), seqs.len());
        let failed = alice.sent as usize - alice.acked.len();
        report(
            "PostgreSQL restart (pg_ctl restart -m fast)",
            &format!(
                "restart {restart:?}; sends {} acked {} refused {failed} ({:?}); stored {}; \
                 live delivery resumed {resumed:?} after; bob: each stored message once, in order; lost 0",
                alice.sent,
                alice.acked.len(),
                alice.errors.iter().collect::<BTreeSet<_>>(),
                seqs.len()
            ),
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarting_while_messages_flow() {
    limited(async {
        let (mut deployment, room, alice, bob) = flowing(Duration::ZERO).await;
        let started = Instant::now();
        deployment.restart_redis().await;
        // The relays resubscribe and share the shards again by themselves.
        let relays = deployment.wait_relays_ready(2).await;
        let resumed = wait_delivery_resumes(&deployment, &room, &bob).await;
        let recovery = started.elapsed();
        // Presence converges: both are online again (new connections).
        let online = wait_until("both online again", WAIT, || async {
            let online = deployment.online(0, "alice", &room).await;
            (online == ["alice", "bob"]).then_some(online)
        })
        .await;
        let (alice, bob) = finish(&deployment, &room, alice, bob).await;
        let seqs = assert_nothing_lost(&deployment, &room, &alice, &[("bob", &bob)]).await;
        assert!(alice.greetings >= 2 && bob.greetings >= 2, "both reconnected");
        report(
            "Redis restart (SIGKILL, empty restart on the same port)",
            &format!(
                "relays shared the shards again {relays:?} after Redis came back; live delivery to bob \
                 {recovery:?} after the kill ({resumed:?} after the relays); reconnects alice {} bob {}; bob recovered {} by afterSequenceId; \
                 online {online:?}; sends {} acked {} stored {}; lost 0",
                alice.greetings - 1,
                bob.greetings - 1,
                bob.recovered.len(),
                alice.sent,
                alice.acked.len(),
                seqs.len()
            ),
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_with_sigkill_while_messages_flow() {
    limited(async {
        let (mut deployment, room, alice, bob) = flowing(Duration::ZERO).await;
        let shard = chat_relay::lease_shard(&room, SHARDS);
        let (_, owners) = relay_view(&deployment.redis_url()).await.expect("Redis");
        let victim = relay_name(owners[shard].as_deref().expect("an owner")).to_owned();
        let survivor = if victim == "relay1" { "relay2" } else { "relay1" };
        let started = Instant::now();
        deployment.kill_relay(&victim).await;
        let url = deployment.redis_url();
        let takeover = wait_until("the survivor holding every shard", WAIT, || {
            let url = url.clone();
            async move {
                let (_, owners) = relay_view(&url).await?;
                owners
                    .iter()
                    .all(|o| o.as_deref().map(relay_name) == Some(survivor))
                    .then(|| started.elapsed())
            }
        })
        .await;
        assert!(takeover < Duration::from_secs(10), "takeover took {takeover:?}");
        let resumed = wait_delivery_resumes(&deployment, &room, &bob).await;
        let (alice, bob) = finish(&deployment, &room, alice, bob).await;
        let seqs = assert_nothing_lost(&deployment, &room, &alice, &[("bob", &bob)]).await;
        // The messages of the takeover gap reached bob without a
        // reconnect: the survivor caught the room up when it took it.
        assert_eq!(bob.greetings, 1, "bob stayed connected");
        let live = bob.live_flat();
        let (repeats, ordered) = repeats_and_order(&live);
        assert!(ordered, "first arrivals in order: {live:?}");
        assert_eq!(live.iter().collect::<BTreeSet<_>>().len(), seqs.len());
        report(
            "relay kill -9 (the room's relay)",
            &format!(
                "takeover of all {SHARDS} shards by {survivor} {takeover:?} after the kill; live delivery \
                 resumed {resumed:?} later; sends {} acked {} stored {}; bob: all live without \
                 reconnecting, {repeats} repeated (posted in the victim's last 200 ms); lost 0",
                alice.sent,
                alice.acked.len(),
                seqs.len()
            ),
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_with_sigkill_while_messages_flow() {
    limited(async {
        // bob's phone needs 1.5 s to reconnect: he misses messages.
        let (mut deployment, room, alice, bob) = flowing(Duration::from_millis(1500)).await;
        // carol is on the gateway that dies, and does not come back.
        let carol = Member::start(Spec {
            user: "carol".into(),
            room: room.clone(),
            urls: vec![deployment.gateway_url(1)],
            sender: false,
            away: Duration::ZERO,
        });
        carol.wait("joined", WAIT, |s| s.live.len() == 1).await;
        alice
            .wait("carol online", WAIT, |s| {
                s.presence.iter().any(|(u, st, _)| u == "carol" && st == "online")
            })
            .await;
        let started = Instant::now();
        deployment.kill_gateway(1).await;
        let carol_seen = carol.stop().await;
        // Presence converges: the dead gateway's leases run out, the
        // sweeper announces carol offline; bob came back on gateway 1.
        alice
            .wait("carol offline", WAIT, |s| {
                s.presence.iter().any(|(u, st, at)| u == "carol" && st == "offline" && *at > started)
            })
            .await;
        let offline_after = started.elapsed();
        let online = wait_until("the online list without carol", WAIT, || async {
            let online = deployment.online(0, "alice", &room).await;
            (online == ["alice", "bob"]).then_some(online)
        })
        .await;
        let resumed = wait_delivery_resumes(&deployment, &room, &bob).await;
        let (alice, bob) = finish(&deployment, &room, alice, bob).await;
        let seqs = assert_nothing_lost(&deployment, &room, &alice, &[("bob", &bob)]).await;
        assert!(bob.greetings >= 2, "bob reconnected");
        assert!(bob.recovered.len() >= 5, "bob recovered what he missed: {:?}", bob.recovered);
        // bob's new connection: each message once, in order, after what
        // the rejoin recovered.
        let last = bob.live.last().expect("a connection");
        let (repeats, ordered) = repeats_and_order(last);
        assert!(repeats == 0 && ordered, "{last:?}");
        let carol_seen = carol_seen.lock().unwrap_or_else(PoisonError::into_inner);
        report(
            "gateway kill -9 (bob's and carol's)",
            &format!(
                "carol (gone) announced offline {offline_after:?} after the kill (lease 2 s); online \
                 {online:?}; bob reconnected to the other gateway and recovered {} by afterSequenceId, \
                 live again {resumed:?} later; carol had {} live; sends {} acked {} stored {}; lost 0",
                bob.recovered.len(),
                carol_seen.live_flat().len(),
                alice.sent,
                alice.acked.len(),
                seqs.len()
            ),
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stopped_with_sigterm_drains_and_hands_over() {
    limited(async {
        let (mut deployment, room, alice, bob) = flowing(Duration::ZERO).await;
        let shard = chat_relay::lease_shard(&room, SHARDS);
        let (_, owners) = relay_view(&deployment.redis_url()).await.expect("Redis");
        let victim = relay_name(owners[shard].as_deref().expect("an owner")).to_owned();
        let survivor = if victim == "relay1" { "relay2" } else { "relay1" };
        let (status, exit) = deployment.terminate_relay(&victim).await;
        assert!(status.success(), "{victim} exited with {status}");
        let log = deployment.log(&victim);
        assert!(log.contains("left the relay cluster"), "{victim} gave its leases back");
        assert!(!log.contains("gave up waiting"), "{victim} drained in time");
        let url = deployment.redis_url();
        let started = Instant::now();
        let handover = wait_until("the survivor holding every shard", WAIT, || {
            let url = url.clone();
            async move {
                let (_, owners) = relay_view(&url).await?;
                owners
                    .iter()
                    .all(|o| o.as_deref().map(relay_name) == Some(survivor))
                    .then(|| started.elapsed())
            }
        })
        .await;
        let resumed = wait_delivery_resumes(&deployment, &room, &bob).await;
        let (alice, bob) = finish(&deployment, &room, alice, bob).await;
        let seqs = assert_nothing_lost(&deployment, &room, &alice, &[("bob", &bob)]).await;
        // Drained, written back, then handed over: nothing repeated.
        assert_eq!(bob.greetings, 1, "bob stayed connected");
        assert_exactly_once("bob", &bob.live_flat(), seqs.len());
        report(
            "relay SIGTERM (the room's relay)",
            &format!(
                "exited 0 {exit:?} after SIGTERM, queued posts drained; {survivor} held all shards \
                 {handover:?} after the exit; live delivery resumed {resumed:?} later; sends {} acked {} \
                 stored {}; bob: each message once, in order; lost 0",
                alice.sent,
                alice.acked.len(),
                seqs.len()
            ),
        );
    })
    .await;
}
