//! The real `chat-local serve` binary as a child process of a test, for
//! what only a process of its own shows: its log output (its own telemetry
//! set-up), its resident memory, its file-descriptor limit. Included with
//! `#[path = "support/serve.rs"] mod serve;` (cargo builds no test target
//! from this subdirectory).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chat_test_support::TestEnv;

/// A port free right now on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How the child is started.
pub struct Options<'a> {
    /// `RUST_LOG`.
    pub log_filter: &'a str,
    /// `LOG_FORMAT`: `json` or `pretty`.
    pub log_format: &'a str,
    /// The soft and hard `RLIMIT_NOFILE` of the child (set by `sh -c
    /// 'ulimit -n N; exec ...'` before the binary starts), or the test's.
    pub open_files: Option<u64>,
    /// More environment, after the test environment's.
    pub env: Vec<(&'a str, String)>,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            log_filter: "info",
            log_format: "json",
            open_files: None,
            env: Vec::new(),
        }
    }
}

/// A running `chat-local serve` (gateway and relay in one process).
pub struct Serve {
    pub child: Child,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// The client port.
    pub addr: SocketAddr,
    /// The management listener (Management API, /metrics, /health).
    pub management: SocketAddr,
}

impl Serve {
    /// Starts it over `env`'s database and Redis prefix, logging to a file
    /// in `dir`, and waits until `/health` answers on the client port.
    pub async fn start(env: &TestEnv, dir: &Path, name: &str, options: Options<'_>) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let management: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let binary = env!("CARGO_BIN_EXE_chat-local");
        let mut command = match options.open_files {
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.args([
                    "-c",
                    &format!("ulimit -n {n} && exec \"$0\" \"$@\""),
                    binary,
                ]);
                sh
            }
            None => Command::new(binary),
        };
        command
            .args(["serve", "--no-migrate", "--listen", &addr.to_string()])
            .args(["--management-listen", &management.to_string()])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.vars.iter())
            .env("RUST_LOG", options.log_filter)
            .env("LOG_FORMAT", options.log_format)
            .env("INSTANCE_ID", name)
            .envs(options.env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
        let child = command.spawn().expect("chat-local starts");
        let mut serve = Self {
            child,
            log,
            addr,
            management,
        };
        serve.wait_healthy().await;
        serve
    }

    async fn wait_healthy(&mut self) {
        for _ in 0..400 {
            let up = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(self.addr),
            )
            .await;
            if matches!(up, Ok(Ok(_)))
                && crate::common::http(self.addr, "GET", "/health", None, None)
                    .await
                    .status
                    == 200
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "chat-local exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("chat-local never became healthy");
    }

    /// The DIRECT room of two users, both made known first (as their
    /// first REST call would).
    pub async fn direct(&self, user: &str, target: &str) -> String {
        use crate::common::{http, token};
        for who in [user, target] {
            let reply = http(
                self.addr,
                "GET",
                "/api/v1/chat/rooms",
                Some(&token(who)),
                None,
            )
            .await;
            assert_eq!(reply.status, 200, "{:?}", reply.body);
        }
        let body = serde_json::json!({"targetUserId": target});
        let reply = http(
            self.addr,
            "POST",
            "/api/v1/chat/direct",
            Some(&token(user)),
            Some(&body),
        )
        .await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        reply.body["room"]["id"]
            .as_str()
            .expect("room id")
            .to_owned()
    }

    /// The WebSocket URL of `user` (a token minted for it).
    pub fn ws_url(&self, user: &str) -> String {
        format!("ws://{}/ws?token={}", self.addr, crate::common::token(user))
    }

    /// Connects `user` and waits for `connected`.
    pub async fn connect(&self, user: &str) -> crate::common::Client {
        crate::common::Client::connect_url(&self.ws_url(user), user).await
    }

    /// The DIRECT room of `a` and `b`, and both connected and joined to it.
    pub async fn pair(
        &self,
        a: &str,
        b: &str,
    ) -> (String, crate::common::Client, crate::common::Client) {
        let room = self.direct(a, b).await;
        let (mut first, mut second) = (self.connect(a).await, self.connect(b).await);
        first.join(&room).await;
        second.join(&room).await;
        (room, first, second)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident set size now (kB).
    pub fn rss_kb(&self) -> u64 {
        status_field(self.pid(), "VmRSS:")
    }

    /// Its open file descriptors now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("/proc/PID/fd")
            .count()
    }

    /// Its soft `RLIMIT_NOFILE`.
    pub fn open_files_limit(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/limits", self.pid()))
            .expect("/proc/PID/limits")
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .and_then(|line| line.split_whitespace().nth(3))
            .and_then(|soft| soft.parse().ok())
            .expect("Max open files")
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it with SIGTERM (a graceful shutdown logs too; SIGKILL after
    /// 15 s) and returns its whole log.
    pub fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

/// A `kB` field of `/proc/PID/status`.
fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status")
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a kB field")
}

/// A directory of its own under the system's temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chat-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
