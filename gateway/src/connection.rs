//! The connection registry, and the task that runs each live socket.
//!
//! A live socket has three parts:
//!
//! * the **reader** (the connection's own task) reads frames, keeps the idle
//!   and lifetime clocks, and notices close requests (Management API DELETE,
//!   shutdown);
//! * the **writer** owns the sending half and is fed by a bounded queue:
//!   Management API posts and route responses, then at most one close frame;
//! * the **dispatcher** calls `$default` for each message, started in
//!   arrival order: one at a time ([`crate::Dispatch::Serial`]) or up to a
//!   bound at once ([`crate::Dispatch::Concurrent`], API Gateway's
//!   behaviour), and queues each route response as its invocation ends.
//!
//! Whatever ends the connection, the reader then removes it from the registry
//! (later posts get 410), finishes the closing handshake, lets the dispatcher
//! finish the messages already received, and calls `$disconnect` once.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use chrono::{DateTime, Utc};
use futures::stream::{FuturesUnordered, SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;

use crate::event::{self, ConnectionMeta, MessageBody};
use crate::{ConnectionInfo, Shared, handler};

/// Room for posts and route responses waiting to be written to one socket,
/// in messages; `GatewayConfig::max_queued_bytes` bounds it in bytes too. A
/// post that finds either full is refused with 429 `LimitExceededException`
/// and the connection is closed with 1008: a client that does not read is
/// dropped, as API Gateway drops slow consumers, rather than holding up to
/// 1,024 × 128 KiB of this process's memory.
pub(crate) const OUTBOUND_QUEUE: usize = 1024;

/// Messages read from one socket and waiting for `$default`. When it is full
/// the reader stops reading, which pushes back on the client through TCP.
const INBOUND_QUEUE: usize = 64;

/// How long a closing handshake may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// After closing because of a bad frame the rest of the client's data can no
/// longer be read; the socket stays open this long so the close frame is not
/// lost to the TCP reset that unread data causes.
const CLOSE_LINGER: Duration = Duration::from_millis(250);

/// Every connection, from the start of its `$connect` until it closes.
#[derive(Default)]
pub(crate) struct Registry {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    by_id: HashMap<String, Slot>,
    /// How many slots are [`Slot::Live`], kept so counting is O(1).
    live: usize,
}

enum Slot {
    /// `$connect` is running, or the socket is not live yet: the Management
    /// API answers 410, as API Gateway does.
    Connecting,
    /// The socket is live.
    Live(Arc<LiveConnection>),
}

/// Why a post was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PostError {
    /// No live connection has this id.
    Gone,
    /// The connection's outbound queue is full.
    Full,
}

impl Registry {
    /// Reserves a new, unique connection id in the connecting state.
    pub(crate) fn reserve(&self) -> String {
        let mut slots = self.lock();
        loop {
            let id = event::new_id();
            if let Entry::Vacant(slot) = slots.by_id.entry(id.clone()) {
                slot.insert(Slot::Connecting);
                return id;
            }
        }
    }

    /// Marks a connection live.
    fn go_live(&self, id: &str, connection: Arc<LiveConnection>) {
        let mut slots = self.lock();
        let previous = slots.by_id.insert(id.to_owned(), Slot::Live(connection));
        if !matches!(previous, Some(Slot::Live(_))) {
            slots.live += 1;
        }
    }

    /// Forgets a connection, whatever its state.
    pub(crate) fn remove(&self, id: &str) {
        let mut slots = self.lock();
        if let Some(Slot::Live(_)) = slots.by_id.remove(id) {
            slots.live -= 1;
        }
    }

    /// Forgets a connection if it is live, and returns it.
    pub(crate) fn remove_live(&self, id: &str) -> Option<Arc<LiveConnection>> {
        let mut slots = self.lock();
        match slots.by_id.get(id) {
            Some(Slot::Live(_)) => {}
            _ => return None,
        }
        slots.live -= 1;
        match slots.by_id.remove(id) {
            Some(Slot::Live(connection)) => Some(connection),
            _ => None,
        }
    }

    /// The live connection with this id.
    pub(crate) fn live(&self, id: &str) -> Option<Arc<LiveConnection>> {
        match self.lock().by_id.get(id) {
            Some(Slot::Live(connection)) => Some(Arc::clone(connection)),
            _ => None,
        }
    }

    /// Queues `message` for a live connection.
    ///
    /// Looking up and queueing happen under the registry lock, and a closing
    /// connection leaves the registry (under the same lock) before it queues
    /// its close frame; so every post that was accepted is written before
    /// the close frame, and none is silently lost.
    pub(crate) fn post(&self, id: &str, message: Message) -> Result<(), PostError> {
        let slots = self.lock();
        let Some(Slot::Live(connection)) = slots.by_id.get(id) else {
            return Err(PostError::Gone);
        };
        let size = message_bytes(&message);
        let queued = connection.queued_bytes.load(Ordering::Relaxed);
        if queued.saturating_add(size) > connection.max_queued_bytes && queued > 0 {
            connection.request_close(Cause::SlowConsumer);
            return Err(PostError::Full);
        }
        connection.queued_bytes.fetch_add(size, Ordering::Relaxed);
        connection
            .outbound
            .try_send(Box::new(Outbound::Message(message)))
            .map_err(|error| {
                connection.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                match error {
                    TrySendError::Full(_) => {
                        connection.request_close(Cause::SlowConsumer);
                        PostError::Full
                    }
                    TrySendError::Closed(_) => PostError::Gone,
                }
            })
    }

    /// How many connections are live.
    pub(crate) fn live_count(&self) -> usize {
        self.lock().live
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        // Nothing panics while holding the lock; if something did, the map
        // is still consistent enough to keep serving.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A live socket, as the Management API sees it.
pub(crate) struct LiveConnection {
    /// Id, connect time, address: what the events and GetConnection report.
    pub(crate) meta: Arc<ConnectionMeta>,
    /// The writer's queue.
    outbound: mpsc::Sender<Box<Outbound>>,
    /// Bytes of messages in `outbound` (added when queued, taken off when
    /// the writer takes them), and the most it may hold.
    queued_bytes: Arc<AtomicUsize>,
    max_queued_bytes: usize,
    /// Epoch milliseconds of the client's last frame (`lastActiveAt`).
    last_active_ms: AtomicI64,
    /// Cancelled to ask the reader to close the socket.
    close_requested: CancellationToken,
    /// Why the close was requested; the first request wins.
    close_cause: Mutex<Option<Cause>>,
}

impl LiveConnection {
    fn new(
        meta: Arc<ConnectionMeta>,
        outbound: mpsc::Sender<Box<Outbound>>,
        max_queued_bytes: usize,
    ) -> Self {
        let connected_ms = meta.connected_at.timestamp_millis();
        Self {
            meta,
            outbound,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            max_queued_bytes,
            last_active_ms: AtomicI64::new(connected_ms),
            close_requested: CancellationToken::new(),
            close_cause: Mutex::new(None),
        }
    }

    /// GetConnection's view of the connection.
    pub(crate) fn info(&self) -> ConnectionInfo {
        let last_active_at =
            DateTime::from_timestamp_millis(self.last_active_ms.load(Ordering::Relaxed))
                .unwrap_or(self.meta.connected_at);
        ConnectionInfo {
            connected_at: self.meta.connected_at,
            last_active_at,
            source_ip: self.meta.source_ip.to_string(),
            user_agent: self.meta.user_agent.clone(),
        }
    }

    /// Asks the connection to close; the reader does the closing.
    pub(crate) fn request_close(&self, cause: Cause) {
        self.close_cause
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(cause);
        self.close_requested.cancel();
    }

    fn requested_cause(&self) -> Cause {
        self.close_cause
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or(Cause::Deleted)
    }

    fn touch(&self) {
        self.last_active_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }
}

/// What the writer is asked to send. Queued boxed: a tokio channel
/// allocates its first block of 32 slots when it is created, so 48-byte
/// items would cost every idle connection 1.5 kB; boxed, a slot is 8 bytes
/// and each message costs one small allocation while it waits.
#[derive(Debug)]
enum Outbound {
    /// A post or a route response.
    Message(Message),
    /// The last thing written: a close frame.
    Close(CloseFrame),
}

/// A client message waiting for `$default` (queued boxed, as [`Outbound`]).
enum Inbound {
    Text(Utf8Bytes),
    Binary(Bytes),
}

/// Why a connection ended: decides the close frame the gateway sends and the
/// `disconnectStatusCode` / `disconnectReason` of `$disconnect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The client sent a close frame (tungstenite answers it).
    ClientClose(Option<CloseFrame>),
    /// The TCP connection ended, or failed, without a closing handshake.
    Dropped,
    /// Management API DeleteConnection.
    Deleted,
    /// No frame from the client for `idle_timeout`.
    Idle,
    /// `max_lifetime` has passed since connecting.
    Lifetime,
    /// [`crate::Gateway::shutdown`].
    Shutdown,
    /// A message or frame over the configured size.
    TooBig,
    /// The outbound queue filled up: the client does not read.
    SlowConsumer,
    /// A text message that is not UTF-8.
    InvalidPayload,
    /// A binary message, which API Gateway does not accept.
    Binary,
    /// Any other WebSocket protocol violation by the client.
    Protocol,
}

impl Cause {
    /// The close frame the gateway sends, when the gateway is the one closing.
    fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            Self::ClientClose(_) | Self::Dropped => return None,
            // What a DeleteConnection is reported as by API Gateway.
            Self::Deleted => (1000, "Connection Closed Normally"),
            Self::Idle | Self::Lifetime | Self::Shutdown => (1001, "Going away"),
            Self::TooBig => (1009, "Message too big"),
            // Policy: a client must read what it is sent.
            Self::SlowConsumer => (1008, "Slow consumer"),
            Self::InvalidPayload => (1007, "Invalid frame payload data"),
            // API Gateway refuses binary frames and disconnects with 1003.
            Self::Binary => (1003, "Unsupported data"),
            Self::Protocol => (1002, "Protocol error"),
        };
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    }

    /// `disconnectStatusCode` and `disconnectReason`.
    fn disconnect_status(&self) -> (u16, String) {
        match self {
            Self::ClientClose(Some(frame)) => (frame.code, frame.reason.as_str().to_owned()),
            // The wording API Gateway uses for a close frame without a code.
            Self::ClientClose(None) => (1005, "Client-side close frame status not set".into()),
            Self::Dropped => (1006, "Connection closed abnormally".into()),
            other => other
                .close_frame()
                .map(|frame| (frame.code, frame.reason.as_str().to_owned()))
                .unwrap_or((1006, String::new())),
        }
    }

    /// Whether frames can still be read, to complete a closing handshake.
    fn can_read(&self) -> bool {
        !matches!(
            self,
            Self::Dropped | Self::TooBig | Self::InvalidPayload | Self::Protocol
        )
    }

    fn from_error(error: axum::Error) -> Self {
        use tungstenite::Error as E;
        use tungstenite::error::ProtocolError as P;
        match error.into_inner().downcast::<tungstenite::Error>() {
            Ok(error) => match *error {
                E::Capacity(_) => Self::TooBig,
                E::Utf8(_) => Self::InvalidPayload,
                E::Protocol(P::ResetWithoutClosingHandshake) => Self::Dropped,
                E::Protocol(_) => Self::Protocol,
                _ => Self::Dropped,
            },
            Err(_) => Self::Dropped,
        }
    }
}

/// Runs a socket whose upgrade has completed, from going live to the end of
/// its `$disconnect`. `started` is when the upgrade request arrived (the
/// lifetime limit counts from there).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    meta: Arc<ConnectionMeta>,
    socket: WebSocket,
    started: Instant,
) {
    let (outbound_tx, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
    let live = Arc::new(LiveConnection::new(
        Arc::clone(&meta),
        outbound_tx,
        shared.config.max_queued_bytes,
    ));
    shared
        .registry
        .go_live(&meta.connection_id, Arc::clone(&live));
    tracing::info!(source_ip = %meta.source_ip, "connected");

    let (sink, mut stream) = socket.split();
    let writer = tokio::spawn(write_loop(
        sink,
        outbound_rx,
        Arc::clone(&live.queued_bytes),
    ));
    let mut dispatcher = None;

    let cause = read_loop(&shared, &live, &mut stream, &mut dispatcher, started).await;

    // Leave the registry first: later posts get 410, and every accepted post
    // is already queued ahead of the close frame.
    shared.registry.remove(&meta.connection_id);
    // Closing the queue lets the dispatcher finish what was read, and stop.
    let dispatcher = dispatcher.map(|Dispatcher { task, .. }| task);
    // The closing and `$disconnect` futures are boxed: they run once, at the
    // end, and inline they would make every idle connection's task ~1.5 kB
    // larger.
    Box::pin(close(&live, &cause, writer, stream)).await;
    // Messages read before the close still reach `$default`, then
    // `$disconnect` is the connection's last event.
    if let Some(task) = dispatcher
        && let Err(error) = task.await
    {
        tracing::error!(connection_id = %meta.connection_id, %error, "dispatcher failed");
    }
    Box::pin(disconnect(&shared, &meta, &cause)).await;
}

/// A connection's `$default` dispatcher and its queue, started by the
/// connection's first message: a connection that never sends (most of them,
/// most of the time) costs neither a task nor a queue.
struct Dispatcher {
    /// Messages for `$default`; dropping it ends the dispatcher.
    queue: mpsc::Sender<Box<Inbound>>,
    /// The dispatcher task.
    task: JoinHandle<()>,
}

impl Dispatcher {
    fn start(shared: &Arc<Shared>, live: &Arc<LiveConnection>) -> Self {
        let (queue, inbound) = mpsc::channel(INBOUND_QUEUE);
        let task = tokio::spawn(dispatch_loop(Arc::clone(shared), Arc::clone(live), inbound));
        Self { queue, task }
    }
}

/// Reads frames until something ends the connection, and says what.
async fn read_loop(
    shared: &Arc<Shared>,
    live: &Arc<LiveConnection>,
    stream: &mut SplitStream<WebSocket>,
    dispatcher: &mut Option<Dispatcher>,
    started: Instant,
) -> Cause {
    let config = &shared.config;
    let lifetime_end = started + config.max_lifetime;
    let mut last_active = Instant::now();
    let mut pings = PingBucket::new(config.max_pings_per_sec);
    loop {
        let idle_end = last_active + config.idle_timeout;
        let frame = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => return Cause::Shutdown,
            () = live.close_requested.cancelled() => return live.requested_cause(),
            () = sleep_until(lifetime_end) => return Cause::Lifetime,
            () = sleep_until(idle_end) => return Cause::Idle,
            frame = stream.next() => frame,
        };
        let message = match frame {
            Some(Ok(message)) => message,
            Some(Err(error)) => return Cause::from_error(error),
            None => return Cause::Dropped,
        };
        // Any frame, control frames included, is activity.
        last_active = Instant::now();
        live.touch();
        let message = match message {
            Message::Text(text) if is_ping(&text) && !pings.take(Instant::now()) => {
                // Answered here: extra pings never reach `$default`.
                let refusal = Message::Text(PING_REFUSAL.into());
                live.queued_bytes
                    .fetch_add(PING_REFUSAL.len(), Ordering::Relaxed);
                if live
                    .outbound
                    .try_send(Box::new(Outbound::Message(refusal)))
                    .is_err()
                {
                    live.queued_bytes
                        .fetch_sub(PING_REFUSAL.len(), Ordering::Relaxed);
                }
                continue;
            }
            Message::Text(text) => Inbound::Text(text),
            Message::Binary(_) if !shared.config.accept_binary_frames => return Cause::Binary,
            Message::Binary(bytes) => Inbound::Binary(bytes),
            // tungstenite has already queued the pong.
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(frame) => return Cause::ClientClose(frame),
        };
        shared.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        // While the queue is full nothing is read, so TCP pushes back on the
        // client; close requests and timers wait until there is room.
        let queue = &dispatcher
            .get_or_insert_with(|| Dispatcher::start(shared, live))
            .queue;
        if queue.send(Box::new(message)).await.is_err() {
            // The dispatcher only stops when this sender is dropped.
            return Cause::Dropped;
        }
    }
}

/// How many seconds' worth of pings may come at once.
const PING_BURST: f64 = 10.0;

/// The answer to a `ping` over the connection's ping rate.
const PING_REFUSAL: &str = r#"{"type":"error","payload":{"code":"RATE_LIMITED","message":"too many pings","requestType":"ping","clientMessageId":null,"retryAfterMs":1000}}"#;

/// Whether a client message is an application `ping` (`{"type":"ping",…}`).
/// Only short messages are looked at: a ping is a few dozen bytes.
fn is_ping(text: &str) -> bool {
    text.len() <= 512
        && text.contains("ping")
        && serde_json::from_str::<serde_json::Value>(text).is_ok_and(|value| {
            value.get("type").and_then(serde_json::Value::as_str) == Some("ping")
        })
}

/// A token bucket for one connection's `ping`s: `per_sec` a second, ten
/// times that at once (a client that pings after every request, as a
/// keep-alive or a latency probe, must not be refused). Pings were never rate limited (they renew presence and
/// answer `pong` without PostgreSQL), so a client could make the server
/// spend CPU on 100,000 of them; this keeps them generous but bounded.
struct PingBucket {
    /// `None`: unlimited.
    per_sec: Option<f64>,
    tokens: f64,
    last: Instant,
}

impl PingBucket {
    fn new(per_sec: u32) -> Self {
        let per_sec = (per_sec > 0).then_some(f64::from(per_sec));
        Self {
            per_sec,
            tokens: per_sec.map_or(0.0, |rate| rate * PING_BURST),
            last: Instant::now(),
        }
    }

    /// Takes a token; `false` when there is none.
    fn take(&mut self, now: Instant) -> bool {
        let Some(rate) = self.per_sec else {
            return true;
        };
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(rate * PING_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Writes queued messages in order; stops after a close frame or an error.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut outbound: mpsc::Receiver<Box<Outbound>>,
    queued_bytes: Arc<AtomicUsize>,
) {
    while let Some(item) = outbound.recv().await {
        match *item {
            Outbound::Message(message) => {
                queued_bytes.fetch_sub(message_bytes(&message), Ordering::Relaxed);
                if sink.feed(message).await.is_err() {
                    return;
                }
                // Flush once per burst rather than once per message.
                if outbound.is_empty() && sink.flush().await.is_err() {
                    return;
                }
            }
            Outbound::Close(frame) => {
                let _ = sink.send(Message::Close(Some(frame))).await;
                return;
            }
        }
    }
}

/// Calls `$default` for each message and queues non-empty route responses
/// for the client: one message at a time in [`crate::Dispatch::Serial`] mode;
/// in [`crate::Dispatch::Concurrent`] mode (API Gateway's behaviour) up to its bound
/// at once, started in arrival order, each response queued when its
/// invocation ends. While that many run, no more are taken from the
/// inbound queue, so the reader stops and TCP pushes back on the client.
/// Returns once the queue is closed and every invocation has ended.
async fn dispatch_loop(
    shared: Arc<Shared>,
    live: Arc<LiveConnection>,
    mut inbound: mpsc::Receiver<Box<Inbound>>,
) {
    let limit = shared.config.dispatch.max_in_flight();
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some(()) = running.next(), if !running.is_empty() => {}
            message = inbound.recv(), if running.len() < limit => match message {
                Some(message) => running.push(dispatch_one(&shared, &live, message)),
                None => break,
            },
        }
    }
    while running.next().await.is_some() {}
}

/// One `$default` invocation and its route response.
async fn dispatch_one(shared: &Shared, live: &LiveConnection, message: Box<Inbound>) {
    let body = match &*message {
        Inbound::Text(text) => MessageBody::Text(text.as_str()),
        Inbound::Binary(bytes) => MessageBody::Binary(bytes),
    };
    let (event, request_id) = event::message_event(&shared.config, &live.meta, body, Utc::now());
    let invoked = tokio::time::timeout(
        shared.config.integration_timeout,
        handler::invoke(&shared.handlers.default, "$default", event),
    )
    .await
    .unwrap_or_else(|_| {
        tracing::warn!(
            timeout = ?shared.config.integration_timeout,
            "$default integration timed out"
        );
        None
    });
    let reply = match invoked {
        Some(response) => handler::response_text(&response),
        // What API Gateway sends the client when the integration fails.
        None => Some(
            serde_json::json!({
                "message": "Internal server error",
                "connectionId": live.meta.connection_id,
                "requestId": request_id,
            })
            .to_string(),
        ),
    };
    if let Some(text) = reply {
        live.queued_bytes.fetch_add(text.len(), Ordering::Relaxed);
        // Wait for room rather than drop a route response; this fails
        // only once the socket is closed.
        let _ = live
            .outbound
            .send(Box::new(Outbound::Message(Message::Text(text.into()))))
            .await;
    }
}

/// The payload bytes a queued message holds.
fn message_bytes(message: &Message) -> usize {
    match message {
        Message::Text(text) => text.len(),
        Message::Binary(bytes) => bytes.len(),
        _ => 0,
    }
}

/// Closes the socket the way `cause` calls for.
async fn close(
    live: &LiveConnection,
    cause: &Cause,
    mut writer: JoinHandle<()>,
    mut stream: SplitStream<WebSocket>,
) {
    let writer_abort = writer.abort_handle();
    let close_frame = cause.close_frame();
    let handshake = async {
        match &close_frame {
            Some(frame) => {
                // Behind every accepted post, which are written first.
                let close = Box::new(Outbound::Close(frame.clone()));
                if live.outbound.send(close).await.is_ok() {
                    let _ = (&mut writer).await;
                }
            }
            // The client closed, or the socket is gone: nothing more to write
            // (tungstenite answers a client's close frame itself).
            None => writer_abort.abort(),
        }
        if cause.can_read() {
            // Until the client's close frame ends the stream (or, when the
            // client closed, until our answer to it has been flushed).
            while stream.next().await.is_some() {}
        }
    };
    if timeout(CLOSE_TIMEOUT, handshake).await.is_err() {
        tracing::debug!(connection_id = %live.meta.connection_id, "closing handshake timed out");
    }
    writer_abort.abort();
    if close_frame.is_some() && !cause.can_read() {
        tokio::spawn(async move {
            sleep(CLOSE_LINGER).await;
            drop(stream);
        });
    }
}

/// Calls `$disconnect` for a connection that passed `$connect`.
pub(crate) async fn disconnect(shared: &Shared, meta: &ConnectionMeta, cause: &Cause) {
    let (code, reason) = cause.disconnect_status();
    tracing::info!(
        instance_id = %shared.config.instance_id,
        connection_id = %meta.connection_id,
        code,
        reason = %reason,
        "disconnected"
    );
    let event = event::disconnect_event(&shared.config, meta, code, &reason, Utc::now());
    // API Gateway ignores the `$disconnect` response.
    let _ = handler::invoke(&shared.handlers.disconnect, "$disconnect", event).await;
}

/// A fake live connection for unit tests: what the Management API queues
/// for it, without a socket.
#[cfg(test)]
pub(crate) struct TestConnection(mpsc::Receiver<Box<Outbound>>);

#[cfg(test)]
impl TestConnection {
    /// The next queued message, if any.
    pub(crate) fn try_recv(&mut self) -> Option<Message> {
        match self.0.try_recv().map(|item| *item) {
            Ok(Outbound::Message(message)) => Some(message),
            _ => None,
        }
    }
}

/// Registers a live connection `id` whose outbound queue holds `capacity`.
#[cfg(test)]
pub(crate) fn test_connection(registry: &Registry, id: &str, capacity: usize) -> TestConnection {
    let (tx, rx) = mpsc::channel(capacity);
    let meta = Arc::new(ConnectionMeta {
        connection_id: id.into(),
        connected_at: Utc::now(),
        domain_name: "localhost".into(),
        source_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        user_agent: None,
    });
    registry.go_live(id, Arc::new(LiveConnection::new(meta, tx, usize::MAX)));
    TestConnection(rx)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn meta(id: &str) -> Arc<ConnectionMeta> {
        Arc::new(ConnectionMeta {
            connection_id: id.into(),
            connected_at: Utc::now(),
            domain_name: "localhost".into(),
            source_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            user_agent: None,
        })
    }

    #[test]
    fn posts_reach_only_live_connections() {
        let registry = Registry::default();
        let id = registry.reserve();
        assert_eq!(
            registry.post(&id, Message::Text("x".into())),
            Err(PostError::Gone)
        );
        assert_eq!(registry.live_count(), 0);

        let (tx, mut rx) = mpsc::channel(1);
        registry.go_live(
            &id,
            Arc::new(LiveConnection::new(meta(&id), tx, usize::MAX)),
        );
        assert_eq!(registry.live_count(), 1);
        assert_eq!(registry.post(&id, Message::Text("a".into())), Ok(()));
        assert_eq!(
            registry.post(&id, Message::Text("b".into())),
            Err(PostError::Full)
        );
        assert!(
            matches!(rx.try_recv().map(|item| *item), Ok(Outbound::Message(Message::Text(text))) if text == "a")
        );

        assert!(registry.remove_live(&id).is_some());
        assert_eq!(registry.live_count(), 0);
        assert_eq!(
            registry.post(&id, Message::Text("c".into())),
            Err(PostError::Gone)
        );
        registry.remove(&id);
        assert_eq!(registry.live_count(), 0);
    }

    #[test]
    fn connecting_connections_are_not_live() {
        let registry = Registry::default();
        let id = registry.reserve();
        assert!(registry.live(&id).is_none());
        assert!(registry.remove_live(&id).is_none());
        registry.remove(&id);
        assert!(registry.live(&id).is_none());
    }

    #[test]
    fn causes_map_to_api_gateway_status() {
        assert_eq!(
            Cause::Deleted.disconnect_status(),
            (1000, "Connection Closed Normally".into())
        );
        assert_eq!(Cause::Idle.disconnect_status().0, 1001);
        assert_eq!(Cause::Lifetime.disconnect_status().0, 1001);
        assert_eq!(Cause::Shutdown.disconnect_status().0, 1001);
        assert_eq!(Cause::TooBig.disconnect_status().0, 1009);
        assert_eq!(Cause::Dropped.disconnect_status().0, 1006);
        assert_eq!(Cause::ClientClose(None).disconnect_status().0, 1005);
        let frame = CloseFrame {
            code: 4000,
            reason: "bye".into(),
        };
        assert_eq!(
            Cause::ClientClose(Some(frame)).disconnect_status(),
            (4000, "bye".into())
        );
        assert!(Cause::ClientClose(None).close_frame().is_none());
        assert!(Cause::Dropped.close_frame().is_none());
    }
}
