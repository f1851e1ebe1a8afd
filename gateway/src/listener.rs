//! The client port's listener: timeouts and caps before HTTP.
//!
//! [`EdgeListener`] wraps a `TcpListener` for `axum::serve` and applies, to
//! every client socket, what API Gateway's own edge applies:
//!
//! * **Handshake deadline**: a socket must send a complete request head
//!   (`\r\n\r\n`) within `handshake_timeout`, or it is closed (slowloris:
//!   sockets that trickle a partial request forever).
//! * **Concurrent handshakes**: at most `max_handshakes` sockets may be
//!   between accept and a complete request head; more are closed at once.
//! * **Per-IP connection rate**: `connect_rate_per_ip` new sockets a second
//!   per source address (twice that at once); more get a bare `429` and are
//!   closed.
//! * **File-descriptor reserve**: while `max_sockets` client sockets are
//!   open the listener stops accepting (new sockets wait in the kernel's
//!   backlog), so the process keeps descriptors for the management
//!   listener, `/health` there, Redis and PostgreSQL, instead of failing
//!   `accept` with "Too many open files" for everyone.
//!
//! Serve it through `.tap_io(|_| ())` (axum's `ListenerExt`) so that
//! `ConnectInfo<SocketAddr>` keeps working.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// The limits of [`EdgeListener`].
#[derive(Debug, Clone)]
pub struct EdgeLimits {
    /// Most time from accept to a complete request head.
    pub handshake_timeout: Duration,
    /// Most sockets without a complete request head at once.
    pub max_handshakes: usize,
    /// New sockets a second per source IP (burst twice that); 0: no limit.
    pub connect_rate_per_ip: u32,
    /// Most open client sockets; `None`: no limit.
    pub max_sockets: Option<usize>,
}

impl Default for EdgeLimits {
    /// 10 s, 1,024 handshakes, 2,000 connections a second per IP, no
    /// socket cap: generous enough for 10,000 connections from one address
    /// at 1,000 a second (the benchmark).
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            connect_rate_per_ip: 2000,
            max_sockets: None,
        }
    }
}

/// Counters shared by the listener and its sockets.
#[derive(Debug, Default)]
struct State {
    /// Open client sockets.
    sockets: AtomicUsize,
    /// Sockets without a complete request head.
    handshakes: AtomicUsize,
    /// Signalled when a socket closes (the listener may accept again).
    released: Notify,
    /// Token buckets by source address: (tokens, last refill).
    rates: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// A `TcpListener` with the limits of [`EdgeLimits`] (see the module docs).
#[derive(Debug)]
pub struct EdgeListener {
    inner: TcpListener,
    limits: EdgeLimits,
    state: Arc<State>,
}

impl EdgeListener {
    /// Wraps `inner`.
    pub fn new(inner: TcpListener, limits: EdgeLimits) -> Self {
        Self {
            inner,
            limits,
            state: Arc::new(State::default()),
        }
    }

    /// Open client sockets now.
    pub fn open_sockets(&self) -> usize {
        self.state.sockets.load(Ordering::Relaxed)
    }

    /// Takes a connection token for `ip`; `false` when it has none left.
    fn rate_ok(&self, ip: IpAddr) -> bool {
        if self.limits.connect_rate_per_ip == 0 {
            return true;
        }
        let rate = f64::from(self.limits.connect_rate_per_ip);
        let burst = rate * 2.0;
        let now = Instant::now();
        let mut rates = self
            .state
            .rates
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if rates.len() > 100_000 {
            // Forget full buckets (they would be full again anyway).
            rates.retain(|_, (tokens, last)| {
                *tokens + now.duration_since(*last).as_secs_f64() * rate < burst
            });
        }
        let (tokens, last) = rates.entry(ip).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl axum::serve::Listener for EdgeListener {
    type Io = EdgeStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if let Some(max) = self.limits.max_sockets {
                loop {
                    let released = self.state.released.notified();
                    if self.state.sockets.load(Ordering::Acquire) < max {
                        break;
                    }
                    // Also wake now and then: a missed notification must
                    // not stop the port for good.
                    let _ = tokio::time::timeout(Duration::from_millis(100), released).await;
                }
            }
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if self.state.handshakes.load(Ordering::Acquire) >= self.limits.max_handshakes {
                tracing::debug!("too many handshakes in progress; socket closed");
                refuse(&stream, "503 Service Unavailable");
                continue;
            }
            if !self.rate_ok(addr.ip()) {
                tracing::debug!(ip = %addr.ip(), "connection rate exceeded; socket closed");
                refuse(&stream, "429 Too Many Requests");
                continue;
            }
            self.state.sockets.fetch_add(1, Ordering::AcqRel);
            self.state.handshakes.fetch_add(1, Ordering::AcqRel);
            let deadline = Instant::now() + self.limits.handshake_timeout;
            return (
                EdgeStream {
                    inner: stream,
                    deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
                    matched: 0,
                    state: Arc::clone(&self.state),
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Best effort: a bare status line, then the socket is dropped.
fn refuse(stream: &TcpStream, status: &str) {
    let response = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = stream.try_write(response.as_bytes());
}

/// A client socket: fails its reads once the handshake deadline passes
/// without a complete request head, and gives its places back on drop.
#[derive(Debug)]
pub struct EdgeStream {
    inner: TcpStream,
    /// Until the request head is complete.
    deadline: Option<Pin<Box<Sleep>>>,
    /// How much of `\r\n\r\n` the bytes read so far end with.
    matched: usize,
    state: Arc<State>,
}

impl EdgeStream {
    /// The head is complete: no more deadline, one handshake fewer.
    fn head_done(&mut self) {
        if self.deadline.take().is_some() {
            self.state.handshakes.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        const END: &[u8] = b"\r\n\r\n";
        for &byte in bytes {
            self.matched = if byte == END[self.matched] {
                self.matched + 1
            } else if byte == b'\r' {
                1
            } else {
                0
            };
            if self.matched == END.len() {
                self.head_done();
                return;
            }
        }
    }
}

impl Drop for EdgeStream {
    fn drop(&mut self) {
        self.head_done();
        self.state.sockets.fetch_sub(1, Ordering::AcqRel);
        self.state.released.notify_one();
    }
}

impl AsyncRead for EdgeStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete request head before the handshake deadline",
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.deadline.is_some() && matches!(polled, Poll::Ready(Ok(()))) {
            let new = buf.filled()[before..].to_vec();
            this.scan(&new);
        }
        polled
    }
}

impl AsyncWrite for EdgeStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// How many client sockets a process may keep open, leaving `reserve`
/// descriptors: the soft `RLIMIT_NOFILE` (from `/proc/self/limits`) minus
/// the descriptors open now minus `reserve`. `None` when the limit cannot
/// be read or is unlimited.
pub fn sockets_within_fd_limit(reserve: u64) -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let soft: u64 = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    usize::try_from(soft.saturating_sub(open).saturating_sub(reserve)).ok()
}
