//! The WebSocket session (PROTOCOL.md §2): what `$connect`, `$default`
//! and `$disconnect` do, independent of how the event arrived.
//!
//! A frame is parsed (module `frame`), renews its connection's lease, is
//! admitted (module `admission`, for the requests that need PostgreSQL), and
//! then makes one use-case call on [`Chat`]; the session itself touches no
//! store, presence or bus.
//!
//! Replies to the caller (`roomLeft`, `pong`, `authenticated`, `error`)
//! are return values, which API Gateway sends back as the `$default` route
//! response. Everything for other connections, the caller's own `message`
//! acknowledgement and its `roomJoined` go out on the bus for the relay:
//! a `roomJoined` must reach the connection before any event of its room,
//! and only the relay, which posts those, can order it with them.

use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use crate::auth::Session;
use crate::bus::event_json;
use crate::error::{Error, ErrorDetail, Result};
use crate::metrics::{self, ShedReason};
use crate::model::rfc3339_millis;
use crate::presence::{Connection, Touched};
use crate::service::{Chat, Touch};
use crate::store::RoomKey;

mod admission;
mod frame;
mod ordering; // issue 16: frames with `seq` are handled in `seq` order

pub use ordering::{MAX_SEQ, OrderingLimits};

use admission::Admission;
pub use admission::AdmissionLimits;

pub use crate::domain::RequestKind;
pub use frame::{
    ClientEvent, ClientFrame, JoinTarget, MAX_TOKEN_BYTES, RequestIds, parse_client_event,
};

/// What an `error` says to a connection whose token ran out (its `exp`
/// plus the grace has passed); the connection is then closed.
pub const TOKEN_EXPIRED: &str = "token expired";

/// What an `error` says to a connection whose token was revoked; the
/// connection is then closed.
pub const TOKEN_REVOKED: &str = "token revoked";

/// How long after a connection's `connectedAt` it may still be in
/// `$connect`: API Gateway's integration timeout (29 s, the most a
/// `$connect` handler may take) and a second for the handshake. Until
/// then API Gateway may refuse posts to it with `410 Gone` although the
/// connection is about to open (the relay retries them), and its first
/// replies wait for its `connected` event. A window of 5 s removed
/// connections whose `$connect` took longer, in a reconnect storm on a
/// loaded Redis Cluster: their `connected` was refused, they were taken
/// for stale, and their first frame was answered `UNAUTHORIZED`.
pub const CONNECTING_WINDOW: Duration = Duration::from_secs(30);

/// The rules of a WebSocket session beyond its handshake (issue 15,
/// "Tokens on open sockets" and the per-user cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// Most live connections per user; a new one over it closes the user's
    /// least recently active connection. `None`: no cap.
    pub max_connections_per_user: Option<usize>,
    /// How long after the token's `exp` a connection may still be used.
    pub token_expiry_grace: Duration,
}

impl SessionPolicy {
    /// No cap, and the default grace (what [`Realtime::new`] starts with).
    pub const UNLIMITED: Self = Self {
        max_connections_per_user: None,
        token_expiry_grace: Duration::from_secs(30),
    };
}

/// The verifier of `authenticate` frames (a newtype only to be `Debug`).
#[derive(Clone)]
struct Verifier(std::sync::Arc<dyn crate::auth::TokenVerifier>);

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier")
    }
}

/// The WebSocket side of the service.
#[derive(Debug, Clone)]
pub struct Realtime {
    chat: Chat,
    presence_ttl: Duration,
    /// Load shedding for the requests that need PostgreSQL.
    admission: Admission,
    /// The per-user cap and the token grace.
    sessions: SessionPolicy,
    /// Checks the tokens of `authenticate` frames; without one they are
    /// refused.
    verifier: Option<Verifier>,
    /// Issue 16: keeps each connection's frames that carry `seq` in order,
    /// across processes (realtime/ordering.rs).
    ordering: ordering::Sequencer,
}

fn now() -> String {
    rfc3339_millis(&chrono::Utc::now())
}

/// What `$default` made of one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameOutcome {
    /// The reply to send back on the same connection, if any.
    pub reply: Option<String>,
    /// The connection is not registered (any more): Redis lost it, or the
    /// sweeper removed it. The reply, if it is an error, tells the client
    /// to reconnect; the socket should be closed too, because clients of
    /// the original service ignore `error` events but reconnect after a
    /// close.
    pub unregistered: bool,
}

/// Serializes an `error` event.
pub fn error_event(
    err: &Error,
    request_type: Option<&str>,
    client_message_id: Option<&str>,
) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Payload<'a> {
        #[serde(flatten)]
        error: ErrorDetail,
        request_type: Option<&'a str>,
        client_message_id: Option<&'a str>,
        /// For the codes a client should retry: how long to wait first.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    }
    let payload = Payload {
        error: ErrorDetail::on_websocket(err),
        request_type,
        client_message_id,
        retry_after_ms: err.retry_after_secs().map(|s| s.saturating_mul(1000)),
    };
    event_json("error", &payload).unwrap_or_else(|_| {
        r#"{"type":"error","payload":{"code":"INTERNAL","message":"internal error","requestType":null,"clientMessageId":null}}"#
            .to_owned()
    })
}

impl Realtime {
    /// The WebSocket use cases over `chat`, with presence leases of
    /// `presence_ttl`.
    pub fn new(chat: Chat, presence_ttl: Duration) -> Self {
        // Issue 16 (realtime/ordering.rs).
        let (redis, keys) = chat.ordering_redis();
        let ordering = ordering::Sequencer::new(redis, keys, OrderingLimits::DEFAULT);
        Self {
            ordering,
            chat,
            presence_ttl,
            admission: Admission::new(AdmissionLimits::UNLIMITED),
            sessions: SessionPolicy::UNLIMITED,
            verifier: None,
        }
    }

    /// Enforces `policy` on connections registered with
    /// [`Realtime::connect_session`], and checks `authenticate` frames with
    /// `verifier`.
    #[must_use]
    pub fn with_sessions(
        mut self,
        policy: SessionPolicy,
        verifier: std::sync::Arc<dyn crate::auth::TokenVerifier>,
    ) -> Self {
        self.sessions = policy;
        self.verifier = Some(Verifier(verifier));
        self
    }

    /// The session rules in force.
    pub fn session_policy(&self) -> SessionPolicy {
        self.sessions
    }

    fn session_limits(&self, session: Option<&Session>) -> crate::presence::SessionLimits {
        crate::presence::SessionLimits {
            expires_at: session.map(|s| s.expires_at),
            jti: session.and_then(|s| s.jti.clone()),
            issued_at: session.and_then(|s| s.issued_at),
            grace: self.sessions.token_expiry_grace,
            max_per_user: self.sessions.max_connections_per_user,
        }
    }

    /// Queues the requests that need PostgreSQL beyond `limits.max_in_flight`
    /// in progress in this process, and refuses them only when the wait
    /// would be too long or the queue is full; refuses sends while the relays
    /// deliver far behind (see [`AdmissionLimits`] and the `admission`
    /// module).
    #[must_use]
    pub fn with_admission(mut self, limits: AdmissionLimits) -> Self {
        self.admission = Admission::new(limits);
        self
    }

    /// Bounds the wait of frames that carry `seq` for their turn (issue 16;
    /// tests shorten them).
    #[must_use]
    pub fn with_ordering(mut self, limits: OrderingLimits) -> Self {
        let (redis, keys) = self.chat.ordering_redis();
        self.ordering = ordering::Sequencer::new(redis, keys, limits);
        self
    }

    /// The ordering bounds in force.
    pub fn ordering_limits(&self) -> OrderingLimits {
        self.ordering.limits()
    }

    /// The admission limits in force.
    pub fn admission_limits(&self) -> AdmissionLimits {
        self.admission.limits()
    }

    /// Requests waiting for admission in this process now.
    pub fn admission_queued(&self) -> usize {
        self.admission.queued()
    }

    /// The REST-level service.
    pub fn chat(&self) -> &Chat {
        &self.chat
    }

    /// The presence lease length.
    pub fn presence_ttl(&self) -> Duration {
        self.presence_ttl
    }

    /// `$connect` after the token was verified: records the user and the
    /// connection, announces `online` for their first connection, and
    /// queues the `connected` event (the relay delivers it once the
    /// handshake has completed; API Gateway refuses posts before).
    ///
    /// # Errors
    /// A dependency failure (the handshake is then refused).
    pub async fn connect(&self, conn: &Connection) -> Result<()> {
        self.connect_session(conn, None).await
    }

    /// [`Realtime::connect`] for the token `session` (verified, of
    /// `conn.user`): the connection is closed once its `exp` (plus the
    /// grace) has passed, unless an `authenticate` extends it, or once it
    /// is revoked. When the user then holds more connections than the cap,
    /// their least recently active ones are closed (see [`SessionPolicy`]).
    ///
    /// # Errors
    /// `UNAUTHORIZED` for a revoked token; a dependency failure (the
    /// handshake is then refused).
    pub async fn connect_session(
        &self,
        conn: &Connection,
        session: Option<&Session>,
    ) -> Result<()> {
        self.chat
            .connect(
                conn,
                session,
                self.presence_ttl,
                self.session_limits(session),
            )
            .await
    }

    /// `$disconnect` (and the sweeper, and a relay that got 410 Gone):
    /// removes the connection and its subscriptions, and announces
    /// `offline` when it was the user's last. Idempotent.
    ///
    /// # Errors
    /// A dependency failure.
    pub async fn disconnect(&self, connection_id: &str) -> Result<()> {
        self.chat.disconnect(connection_id).await
    }

    /// Has the relay close the socket of a connection that is no longer
    /// registered ([`FrameOutcome::unregistered`]), after the reply in
    /// flight, so that its client reconnects; `endpoint` is its Management
    /// API. Failures are logged: the client is told to reconnect anyway.
    pub async fn close_unregistered(&self, connection_id: &str, endpoint: String) {
        if let Err(err) = self.chat.close_connection(connection_id, endpoint).await {
            err.log_if_server_error("asking the relay to close an unregistered connection");
        }
    }

    /// `$default`: one client message. Returns the reply to send back on the
    /// same connection, if any. `binary` frames are refused.
    pub async fn message(&self, connection_id: &str, body: &str, binary: bool) -> Option<String> {
        self.frame(connection_id, body, binary).await.reply
    }

    /// Like [`Realtime::message`], also saying whether the connection is
    /// still registered.
    pub async fn frame(&self, connection_id: &str, body: &str, binary: bool) -> FrameOutcome {
        // Issue 16 (realtime/ordering.rs): a frame with `seq` waits for the
        // frames before it, and lets the next one go once it is handled.
        let (ids, result, unregistered) =
            match self.ordering.enter(connection_id, body, binary).await {
                Ok(turn) => {
                    let outcome = self.dispatch(connection_id, body, binary).await;
                    self.ordering.leave(turn).await;
                    outcome
                }
                Err((ids, err)) => (ids, Err(err), false),
            };
        let reply = match result {
            Ok(reply) => reply,
            Err(err) => {
                err.log_if_server_error("websocket message failed");
                metrics::record_error(metrics::ErrorSource::WebSocket, err.code());
                Some(error_event(
                    &err,
                    ids.request_type.as_deref(),
                    ids.client_message_id.as_deref(),
                ))
            }
        };
        FrameOutcome {
            reply,
            unregistered,
        }
    }

    /// Parse, renew the lease, admit, then one use case.
    #[tracing::instrument(skip_all, fields(
        connection_id = %connection_id,
        request_kind = tracing::field::Empty))]
    async fn dispatch(
        &self,
        connection_id: &str,
        body: &str,
        binary: bool,
    ) -> (RequestIds, Result<Option<String>>, bool) {
        let frame = (!binary).then(|| ClientFrame::parse(body));
        let kind = match &frame {
            Some(Ok(frame)) => frame.kind(),
            _ => None,
        };
        if let Some(kind) = kind {
            tracing::Span::current().record("request_kind", kind.as_str());
        }
        metrics::record_ws_request(kind);
        // Every frame renews the presence lease, good or bad, and every
        // frame but `ping` is charged to the connection's message rate.
        // A connection whose token ran out is closed at its next frame,
        // except an `authenticate` bringing a fresh one.
        let touched = self.touch(connection_id, kind).await;
        let unregistered = matches!(touched, Err(Error::Unauthorized(_)));
        // Admission guards PostgreSQL, so it comes after the lease renewal
        // (Redis) and the wait for a new connection's `connected` greeting:
        // in a reconnect storm thousands of new connections wait for their
        // greeting at once, and none of them may hold a place that a ready
        // request could use.
        let needs_postgres = kind.is_some_and(RequestKind::needs_postgres);
        let _admitted = if needs_postgres && let Ok(conn) = &touched {
            // Issue 15: queued and served per user (realtime/admission.rs).
            let owner = admission::Owner {
                user: conn.user.id.as_str(),
                connection: connection_id,
            };
            match self.admission.admit(owner, body.len()).await {
                Ok(admitted) => Some(admitted),
                Err(err) => {
                    let ids = match &frame {
                        Some(Ok(frame)) => frame.ids().clone(),
                        _ => RequestIds::default(),
                    };
                    return (ids, Err(err), unregistered);
                }
            }
        } else {
            None
        };
        let frame = match frame {
            None => {
                return (
                    RequestIds::default(),
                    Err(Error::bad_request(
                        "binary frames are not supported; send JSON text",
                    )),
                    unregistered,
                );
            }
            Some(Ok(frame)) => frame,
            Some(Err(err)) => return (RequestIds::default(), Err(err), unregistered),
        };
        let result = async {
            // A connection that is gone, or over its rate, is told so
            // before its fields are looked at; the admin check needs the
            // connection's user.
            let conn = touched?;
            let event = frame.event(conn.user.is_admin)?;
            self.handle(&conn, event).await
        }
        .await;
        let unregistered = unregistered || matches!(result, Err(Error::Unauthorized(_)));
        (frame.ids().clone(), result, unregistered)
    }

    /// Renews the connection's lease and, unless the request is a `ping`,
    /// charges the frame to its message rate (two Redis steps for both:
    /// `Presence::touch`). A `sendMessage` (what drives the fan-out) is refused while the
    /// fan-out is behind ([`Admission`]). `kind` is `None` for a frame that
    /// names no request.
    ///
    /// # Errors
    /// `UNAUTHORIZED` for a connection that is no longer registered, or
    /// (but for `authenticate`) whose token was revoked ([`TOKEN_REVOKED`])
    /// or ran out ([`TOKEN_EXPIRED`]);
    /// `RATE_LIMITED` for a frame over the rate, or refused to shed load (its
    /// lease is renewed all the same, and nothing else is done for it).
    async fn touch(&self, connection_id: &str, kind: Option<RequestKind>) -> Result<Connection> {
        let metered = kind.is_none_or(RequestKind::metered);
        let sheddable = kind.is_some_and(RequestKind::sheddable);
        let check_expiry = kind.is_none_or(RequestKind::checks_expiry);
        let touch = Touch {
            ttl: self.presence_ttl,
            metered,
            token_grace: self.sessions.token_expiry_grace,
        };
        let Some(Touched {
            connection,
            was_online,
            greeted,
            rate_limited,
            delivery_lag_ms,
            expires_at,
            revoked,
        }) = self.chat.touch(connection_id, touch).await?
        else {
            return Err(Error::unauthorized(
                "this connection is no longer registered; reconnect",
            ));
        };
        if check_expiry && revoked {
            return Err(Error::unauthorized(TOKEN_REVOKED));
        }
        if check_expiry && self.lapsed(expires_at) {
            return Err(Error::unauthorized(TOKEN_EXPIRED));
        }
        if !greeted {
            self.await_greeting(&connection, delivery_lag_ms).await?;
        }
        if !was_online {
            // The user's leases had all run out and they were announced
            // offline; this frame brings them back.
            self.chat.back_online(&connection.user.id).await?;
        }
        if let Some(wait) = rate_limited {
            return Err(crate::limits::refused(wait));
        }
        // Issue 15: only users sending their fair share or more are refused.
        if sheddable
            && self
                .admission
                .sheds_for_lag(connection.user.id.as_str(), delivery_lag_ms)
        {
            metrics::record_shed(ShedReason::DeliveryLag);
            let secs = delivery_lag_ms.div_ceil(1000).max(1);
            return Err(Error::rate_limited("server busy, retry later", secs));
        }
        Ok(connection)
    }

    /// Whether a token expiring at `expires_at` (s) is past its grace.
    fn lapsed(&self, expires_at: Option<i64>) -> bool {
        let grace_ms =
            i64::try_from(self.sessions.token_expiry_grace.as_millis()).unwrap_or(i64::MAX);
        expires_at.is_some_and(|exp| {
            chrono::Utc::now().timestamp_millis()
                > exp.saturating_mul(1000).saturating_add(grace_ms)
        })
    }

    /// `authenticate`: a fresh token for the same user extends the
    /// connection's session (its expiry, and its profile and role as the
    /// new token says). Answers `authenticated {exp}`.
    ///
    /// # Errors
    /// `UNAUTHORIZED` "invalid token" for a token that fails verification,
    /// is revoked or belongs to another user: like every `UNAUTHORIZED`, the
    /// connection is then closed.
    async fn authenticate(&self, conn: &Connection, token: &str) -> Result<String> {
        let Some(Verifier(verifier)) = &self.verifier else {
            return Err(Error::bad_request("authenticate is not supported here"));
        };
        let session = verifier.verify_session(token)?;
        if session.user.id != conn.user.id {
            tracing::debug!(
                connection_id = %conn.connection_id,
                "authenticate with another user's token: closing"
            );
            return Err(Error::unauthorized(crate::auth::INVALID_TOKEN));
        }
        let limits = self.session_limits(Some(&session));
        let expires_at = session.expires_at;
        self.chat
            .renew_session(conn, session, self.presence_ttl, limits)
            .await?;
        event_json("authenticated", &json!({"exp": expires_at}))
    }

    /// `connected` is the first event a client sees. It is posted by the
    /// relay, which API Gateway refuses until the handshake has completed,
    /// so a client that sends at once could get its reply first; a new
    /// connection's first replies wait (briefly, bounded) until the relay
    /// has delivered `connected`.
    ///
    /// `lag_ms` is the fan-out's current delivery lag (the lease renewal
    /// reads it): the greeting was published at `$connect`, so it is due
    /// about `lag_ms` after the connection was made, and the first poll
    /// waits until then. In a reconnect storm, when the relay is seconds
    /// behind, that saves each new connection's first frame most of its
    /// polls, which would go to the very Redis the relay needs.
    async fn await_greeting(&self, conn: &Connection, lag_ms: u64) -> Result<()> {
        const WAIT: Duration = Duration::from_millis(500);
        let age = chrono::Utc::now().timestamp_millis() - conn.connected_at_ms;
        if age > CONNECTING_WINDOW.as_millis() as i64 {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        let due =
            Duration::from_millis(lag_ms.saturating_sub(u64::try_from(age.max(0)).unwrap_or(0)));
        // After the first, polls back off (2, 4, 8 ... 64 ms): the greeting
        // usually lands within milliseconds.
        let mut pause = due.clamp(Duration::from_millis(2), WAIT);
        let mut next = Duration::from_millis(2);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(
                pause.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
            )
            .await;
            if self.chat.is_greeted(&conn.connection_id).await? {
                return Ok(());
            }
            pause = next;
            next = (next * 2).min(Duration::from_millis(64));
        }
        Ok(())
    }

    /// One use case for one parsed event; the reply, if any.
    async fn handle(&self, conn: &Connection, event: ClientEvent) -> Result<Option<String>> {
        let user = &conn.user;
        match event {
            ClientEvent::JoinRoom {
                target,
                after_sequence_id,
            } => {
                let key = match &target {
                    JoinTarget::Room(room_id) => RoomKey::Id(room_id),
                    JoinTarget::Direct(target) => RoomKey::DirectWith(target),
                };
                // Its `roomJoined` goes out through the relay, ordered with
                // the room's events (`Chat::join_room`).
                self.chat.join_room(conn, key, after_sequence_id).await?;
                Ok(None)
            }
            ClientEvent::LeaveRoom { room_id } => {
                self.chat.leave_room(&room_id, &conn.connection_id).await?;
                event_json("roomLeft", &json!({"roomId": room_id})).map(Some)
            }
            ClientEvent::SendMessage { room_id, message } => {
                self.chat
                    .send_message_from(user, &room_id, &message, Some(&conn.connection_id))
                    .await?;
                Ok(None)
            }
            ClientEvent::Typing { room_id, is_typing } => {
                self.chat.typing(user, &room_id, is_typing).await?;
                Ok(None)
            }
            ClientEvent::MarkRead {
                room_id,
                sequence_id,
            } => {
                self.chat.mark_read(user, &room_id, sequence_id).await?;
                Ok(None)
            }
            ClientEvent::Ping => event_json("pong", &json!({"timestamp": now()})).map(Some),
            ClientEvent::Authenticate { token } => self.authenticate(conn, &token).await.map(Some),
        }
    }
}

#[cfg(test)]
mod admission_tests {
    use super::*;

    #[test]
    fn only_requests_that_need_postgres_are_shed() {
        use RequestKind::*;
        for kind in [SendMessage, JoinRoom, MarkRead, Typing] {
            assert!(kind.needs_postgres(), "{kind}");
        }
        for kind in [Ping, LeaveRoom, Authenticate] {
            assert!(!kind.needs_postgres(), "{kind}");
        }
        assert_eq!(RequestKind::from_wire("bogus"), None);
        for kind in RequestKind::ALL {
            assert_eq!(RequestKind::from_wire(kind.as_str()), Some(kind));
        }
    }
}
