//! The relay's health check: a loopback HTTP endpoint, and the client the
//! container health check runs (`relay health`).
//!
//! `GET /health` answers `200 {"status":"ok"}` while this relay can reach
//! Redis (the bus and every delivery need it) within 2 s, else `503
//! {"status":"down"}`. It listens on `RELAY_HEALTH_LISTEN` (default
//! `127.0.0.1:8081`): only processes in the task (ECS's health check
//! command, the Dockerfile's `HEALTHCHECK`) reach it. Any other path is
//! 404. The server reads at most 4 KiB of a request and gives each
//! connection 2 s, so a stuck client costs nothing.

use std::net::SocketAddr;
use std::time::Duration;

use chat_shared::presence::Presence;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Where the endpoint listens unless `RELAY_HEALTH_LISTEN` says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";

const DEADLINE: Duration = Duration::from_secs(2);

/// The configured listen address.
///
/// # Errors
/// When `RELAY_HEALTH_LISTEN` is not `host:port`.
pub fn listen_addr() -> anyhow::Result<SocketAddr> {
    let raw = std::env::var("RELAY_HEALTH_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.to_owned());
    raw.parse()
        .map_err(|e| anyhow::anyhow!("RELAY_HEALTH_LISTEN={raw:?} is not host:port: {e}"))
}

/// Serves `GET /health` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, presence: Presence, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "health endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let presence = presence.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(DEADLINE * 2, answer(stream, &presence)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, presence: &Presence) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(256);
    let mut buf = [0_u8; 512];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 4096 {
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let (status, body) = if request.starts_with(b"GET /health ") {
        let redis = tokio::time::timeout(DEADLINE, presence.ping()).await;
        match redis {
            Ok(Ok(())) => ("200 OK", r#"{"status":"ok","redis":"ok"}"#),
            _ => (
                "503 Service Unavailable",
                r#"{"status":"down","redis":"down"}"#,
            ),
        }
    } else {
        ("404 Not Found", r#"{"status":"not found"}"#)
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The container health check: `GET /health` on `addr`; true for a 200
/// within the deadline.
pub async fn check(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response.starts_with(b"HTTP/1.1 200 "))
    };
    matches!(
        tokio::time::timeout(DEADLINE * 2, attempt).await,
        Ok(Ok(true))
    )
}
