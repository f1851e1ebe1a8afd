//! The WebSocket use cases (PROTOCOL.md §2): what `$connect`, `$default`
//! and `$disconnect` do, independent of how the event arrived.
//!
//! Replies to the caller (`roomJoined`, `roomLeft`, `pong`, `error`) are
//! return values, which API Gateway sends back as the `$default` route
//! response. Everything for other connections, and the caller's own
//! `message` acknowledgement, goes out on the bus for the relay.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use crate::auth::{AuthUser, Session};
use crate::bus::{Control, Target, event_json};
use crate::domain::{RoomId, SequenceId, UserId};
use crate::error::{Error, Result};
use crate::metrics::{self, ShedReason};
use crate::model::rfc3339_millis;
use crate::presence::{Connection, Touched};
use crate::service::{Chat, RECOVERY_MESSAGES, SNAPSHOT_MESSAGES};
use crate::store::{RoomKey, Stored};

mod admission;
mod frame;

use admission::Admission;
pub use admission::AdmissionLimits;

pub use frame::{
    CLIENT_EVENTS, ClientEvent, ClientFrame, JoinTarget, MAX_TOKEN_BYTES, RequestIds,
    parse_client_event,
};

/// What an `error` says to a connection whose token ran out (its `exp`
/// plus the grace has passed); the connection is then closed.
pub const TOKEN_EXPIRED: &str = "token expired";

/// What an `error` says to a connection whose token was revoked; the
/// connection is then closed.
pub const TOKEN_REVOKED: &str = "token revoked";

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
}

/// Whether a request type needs PostgreSQL (and so can be shed); `ping`
/// and `leaveRoom` only touch Redis and always go through.
fn needs_postgres(kind: Option<&str>) -> bool {
    matches!(
        kind,
        Some("sendMessage" | "joinRoom" | "markRead" | "typing")
    )
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
        code: &'static str,
        message: String,
        request_type: Option<&'a str>,
        client_message_id: Option<&'a str>,
        /// For the codes a client should retry: how long to wait first.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    }
    let payload = Payload {
        code: err.code().on_websocket().as_str(),
        message: err.client_message(),
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
        Self {
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

    /// The `presenceUpdate` envelope of `user_id` for the members of
    /// `rooms`; `None` when they are in no room.
    fn presence_envelope(
        &self,
        user_id: &UserId,
        status: &str,
        rooms: Vec<String>,
    ) -> Result<Option<String>> {
        self.chat.bus().presence_update(user_id, status, rooms)
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
        if let Some(session) = session {
            self.refuse_revoked(session).await?;
        }
        let rooms = self.chat.authenticate_with_rooms(&conn.user).await?;
        let envelope = self.presence_envelope(&conn.user.id, "online", rooms)?;
        let presence = self.chat.presence();
        let (_, evicted) = presence
            .connect_session(
                conn,
                self.presence_ttl,
                self.chat.bus().channel(),
                envelope.as_deref(),
                self.session_limits(session),
                self.chat.bus().origin(),
            )
            .await?;
        if !evicted.is_empty() {
            tracing::info!(
                user_id = %conn.user.id,
                closed = evicted.len(),
                "over the per-user connection cap: closing the least recently active"
            );
        }
        let connected = event_json(
            "connected",
            &json!({"userId": conn.user.id, "connectionId": conn.connection_id, "timestamp": now()}),
        )?;
        self.chat
            .bus()
            .publish(
                Target::Connection {
                    connection_id: conn.connection_id.clone(),
                },
                connected,
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
        crate::departures::disconnect(
            self.chat.store(),
            self.chat.presence(),
            self.chat.bus(),
            connection_id,
        )
        .await
    }

    /// `$default`: one client message. Returns the reply to send back on the
    /// same connection, if any. `binary` frames are refused.
    pub async fn message(&self, connection_id: &str, body: &str, binary: bool) -> Option<String> {
        self.frame(connection_id, body, binary).await.reply
    }

    /// Like [`Realtime::message`], also saying whether the connection is
    /// still registered.
    pub async fn frame(&self, connection_id: &str, body: &str, binary: bool) -> FrameOutcome {
        let (ids, result, unregistered) = self.dispatch(connection_id, body, binary).await;
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

    async fn dispatch(
        &self,
        connection_id: &str,
        body: &str,
        binary: bool,
    ) -> (RequestIds, Result<Option<String>>, bool) {
        let frame = (!binary).then(|| ClientFrame::parse(body));
        let kind = match &frame {
            Some(Ok(frame)) => frame.ids().request_type.as_deref(),
            _ => None,
        };
        metrics::record_ws_request(kind);
        // Every frame renews the presence lease, good or bad, and every
        // frame but `ping` is charged to the connection's message rate.
        // A connection whose token ran out is closed at its next frame,
        // except an `authenticate` bringing a fresh one.
        let touched = self
            .touch(
                connection_id,
                kind != Some("ping"),
                kind == Some("sendMessage"),
                kind != Some("authenticate"),
            )
            .await;
        let unregistered = matches!(touched, Err(Error::Unauthorized(_)));
        // Admission guards PostgreSQL, so it comes after the lease renewal
        // (Redis) and the wait for a new connection's `connected` greeting:
        // in a reconnect storm thousands of new connections wait for their
        // greeting at once, and none of them may hold a place that a ready
        // request could use.
        let _admitted = if needs_postgres(kind) && touched.is_ok() {
            match self.admission.admit(body.len()).await {
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

    /// Renews the connection's lease and, when `metered`, charges the frame
    /// to its message rate (one Redis round trip for both). A `sheddable`
    /// frame (`sendMessage`, what drives the fan-out) is refused while the
    /// fan-out is behind ([`Admission`]).
    ///
    /// # Errors
    /// `UNAUTHORIZED` for a connection that is no longer registered, or
    /// (when `check_expiry`) whose token was revoked ([`TOKEN_REVOKED`]) or
    /// ran out ([`TOKEN_EXPIRED`]);
    /// `RATE_LIMITED` for a frame over the rate, or refused to shed load (its
    /// lease is renewed all the same, and nothing else is done for it).
    async fn touch(
        &self,
        connection_id: &str,
        metered: bool,
        sheddable: bool,
        check_expiry: bool,
    ) -> Result<Connection> {
        let presence = self.chat.presence();
        let rate = self.chat.limiter().limits().messages.filter(|_| metered);
        let Some(Touched {
            connection,
            was_online,
            greeted,
            rate_limited,
            delivery_lag_ms,
            expires_at,
            revoked,
        }) = presence
            .touch(
                connection_id,
                self.presence_ttl,
                rate,
                self.sessions.token_expiry_grace,
            )
            .await?
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
            self.await_greeting(&connection).await?;
        }
        if !was_online {
            // The user's leases had all run out and they were announced
            // offline; this frame brings them back.
            let rooms = self.chat.member_room_ids(&connection.user.id).await?;
            let envelope = self.presence_envelope(&connection.user.id, "online", rooms)?;
            presence
                .back_online(
                    &connection.user.id,
                    self.chat.bus().channel(),
                    envelope.as_deref(),
                )
                .await?;
        }
        if let Some(wait) = rate_limited {
            return Err(crate::limits::refused(wait));
        }
        if sheddable && self.admission.sheds_for_lag(delivery_lag_ms) {
            metrics::record_shed(ShedReason::DeliveryLag);
            let secs = delivery_lag_ms.div_ceil(1000).max(1);
            return Err(Error::rate_limited("server busy, retry later", secs));
        }
        Ok(connection)
    }

    /// `UNAUTHORIZED` "invalid token" for a revoked token.
    async fn refuse_revoked(&self, session: &Session) -> Result<()> {
        let revoked = self
            .chat
            .presence()
            .is_revoked(&session.user.id, session.jti.as_deref(), session.issued_at)
            .await?;
        if revoked {
            tracing::debug!(user_id = %session.user.id, "revoked token refused");
            return Err(Error::unauthorized(crate::auth::INVALID_TOKEN));
        }
        Ok(())
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
        self.refuse_revoked(&session).await?;
        let limits = self.session_limits(Some(&session));
        let renewed = Connection {
            user: session.user,
            ..conn.clone()
        };
        if !self
            .chat
            .presence()
            .renew_session(&renewed, self.presence_ttl, limits)
            .await?
        {
            return Err(Error::unauthorized(
                "this connection is no longer registered; reconnect",
            ));
        }
        event_json("authenticated", &json!({"exp": session.expires_at}))
    }

    /// `connected` is the first event a client sees. It is posted by the
    /// relay, which API Gateway refuses until the handshake has completed,
    /// so a client that sends at once could get its reply first; a new
    /// connection's first replies wait (briefly, bounded) until the relay
    /// has delivered `connected`.
    async fn await_greeting(&self, conn: &Connection) -> Result<()> {
        const WINDOW_MS: i64 = 5_000;
        const WAIT: Duration = Duration::from_millis(500);
        let age = chrono::Utc::now().timestamp_millis() - conn.connected_at_ms;
        if age > WINDOW_MS {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        // Polls back off (2, 4, 8 ... 64 ms): the greeting usually lands
        // within milliseconds, and during a reconnect storm thousands of
        // new connections wait at once; polling each every 2 ms would add
        // their polls to the very Redis the relay needs to greet them.
        let mut pause = Duration::from_millis(2);
        while tokio::time::Instant::now() < deadline {
            if self.chat.presence().is_greeted(&conn.connection_id).await? {
                return Ok(());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(64));
        }
        Ok(())
    }

    async fn handle(&self, conn: &Connection, event: ClientEvent) -> Result<Option<String>> {
        let user = &conn.user;
        match event {
            ClientEvent::JoinRoom {
                target,
                after_sequence_id,
            } => self
                .join_room(conn, target, after_sequence_id)
                .await
                .map(Some),
            ClientEvent::LeaveRoom { room_id } => {
                self.chat
                    .presence()
                    .leave(&room_id, &conn.connection_id)
                    .await?;
                event_json("roomLeft", &json!({"roomId": room_id})).map(Some)
            }
            ClientEvent::SendMessage { room_id, message } => {
                let stored = self
                    .chat
                    .send_message_from(user, &room_id, &message, Some(&conn.connection_id))
                    .await?;
                if let Stored::Duplicate(original) = stored {
                    // Only the sender sees the original again.
                    self.chat
                        .bus()
                        .publish(
                            Target::Connection {
                                connection_id: conn.connection_id.clone(),
                            },
                            event_json("message", &original)?,
                        )
                        .await?;
                }
                Ok(None)
            }
            ClientEvent::Typing { room_id, is_typing } => {
                self.chat.require_member(user, &room_id).await?;
                let event = event_json(
                    "typing",
                    &json!({"roomId": room_id, "userId": user.id, "username": user.username, "isTyping": is_typing}),
                )?;
                let bus = self.chat.bus();
                let envelope = bus.envelope(
                    Target::Room {
                        room_id: room_id.to_string(),
                    },
                    event,
                    Vec::new(),
                    vec![user.id.to_string()],
                    None,
                )?;
                // Coalesced: a repeat of the state that went out less than
                // 2 s ago is dropped; a change always goes out.
                self.chat
                    .limiter()
                    .publish_typing(&room_id, &user.id, is_typing, bus.channel(), &envelope)
                    .await?;
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

    /// `joinRoom`: one PostgreSQL round trip ([`Chat::enter_room`]) and one
    /// Redis round trip ([`crate::presence::Presence::join`]), besides the
    /// lease renewal every frame makes.
    async fn join_room(
        &self,
        conn: &Connection,
        target: JoinTarget,
        after: Option<SequenceId>,
    ) -> Result<String> {
        let user: &AuthUser = &conn.user;
        let limit = if after.is_some() {
            RECOVERY_MESSAGES
        } else {
            SNAPSHOT_MESSAGES
        };
        let key = match &target {
            JoinTarget::Room(room_id) => RoomKey::Id(room_id),
            JoinTarget::Direct(target) => RoomKey::DirectWith(target),
        };
        let snap = self.chat.enter_room(user, key, after, limit).await?;
        let room_id = RoomId::from_trusted(snap.room.id.clone());
        // The connection has every message up to here; the relay pushes
        // only newer ones.
        let newest_in_page = snap
            .messages
            .last()
            .map_or(SequenceId::ZERO, |m| m.sequence_id);
        let watermark = snap.room.last_sequence_id.max(newest_in_page);
        let bus = self.chat.bus();
        // Published by the join itself when a message went out while we
        // joined (see `Presence::join`): the relay then pushes what this
        // connection is missing.
        let sync = serde_json::to_string(&bus.control(
            Target::Connection {
                connection_id: conn.connection_id.clone(),
            },
            Control::Sync {
                room_id: room_id.to_string(),
                connection_id: conn.connection_id.clone(),
            },
        ))
        .map_err(Error::internal)?;
        let member_ids: Vec<UserId> = snap.members.iter().map(|m| m.profile.id.clone()).collect();
        let Some(online_users) = self
            .chat
            .presence()
            .join(
                &room_id,
                conn,
                watermark.get(),
                &member_ids,
                bus.channel(),
                &sync,
            )
            .await?
        else {
            return Err(Error::unauthorized(
                "this connection is no longer registered; reconnect",
            ));
        };
        let mut payload = json!({
            "room": snap.room_view(),
            "messages": snap.messages,
            "unreadCount": snap.unread_count,
            "onlineUsers": online_users,
            "hasMore": snap.has_more,
        });
        if let Some(after) = after {
            // Retention deletes a room's oldest messages, so everything after
            // `after` is still stored exactly when its first message is.
            let recovered = match snap.messages.first() {
                Some(first) => first.sequence_id.get() == after.get() + 1,
                None => after >= snap.room.last_sequence_id,
            };
            payload["recovered"] = Value::Bool(recovered);
        }
        event_json("roomJoined", &payload)
    }
}

#[cfg(test)]
mod admission_tests {
    use super::*;

    #[test]
    fn only_requests_that_need_postgres_are_shed() {
        for kind in ["sendMessage", "joinRoom", "markRead", "typing"] {
            assert!(needs_postgres(Some(kind)), "{kind}");
        }
        for kind in [Some("ping"), Some("leaveRoom"), Some("bogus"), None] {
            assert!(!needs_postgres(kind), "{kind:?}");
        }
    }
}
