//! A private, throw-away `redis-server` (no persistence), for tests that
//! stop and start Redis (the shared one must never be restarted) or need
//! one configured differently (a cluster-enabled node).

use std::time::Duration;

/// How long the server has to answer after a start.
const WAIT: Duration = Duration::from_secs(10);

/// A `redis-server` child process on its own port, killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    /// Added to every start's command line.
    args: Vec<String>,
    child: Option<tokio::process::Child>,
}

impl PrivateRedis {
    /// Starts one on a free port and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// [`PrivateRedis::start`] with `args` added to the command line (of
    /// every restart too), e.g. `--cluster-enabled yes`.
    pub async fn start_with(args: &[&str]) -> Self {
        let mut redis = Self {
            port: free_port(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: no shutdown, nothing saved).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis-server");
        }
    }

    /// Starts the server again on the same port, empty, and waits until it
    /// answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server could not be started ({e}): install Redis (apt-get install redis-server)")
            });
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("URL");
        tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("redis-server answers");
    }
}

/// A free port (Redis takes no port 0: borrow one from the OS) under
/// 55536, so that a cluster node's bus port (+10000) fits too.
fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if port < 55_536 {
            return port;
        }
    }
}
