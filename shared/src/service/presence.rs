//! Connections and who is online: `$connect`, the lease every frame renews,
//! `authenticate`, `$disconnect`, the sweep of expired leases, the REST
//! caller's admission, and the controls that ask the relay to close a
//! socket.

use std::time::Duration;

use serde_json::json;

use crate::auth::{AuthUser, Session};
use crate::bus::{Control, Target, event_json};
use crate::domain::{RoomId, UserId};
use crate::error::{Error, Result};
use crate::model::{Member, rfc3339_millis};
use crate::presence::{Connection, SessionLimits, Touched};

use super::{Chat, require_member};

/// How a frame renews its connection's lease ([`Chat::touch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touch {
    /// The lease length.
    pub ttl: Duration,
    /// Whether the frame is charged to the connection's message rate.
    pub metered: bool,
    /// How long after its token's `exp` a connection may still be used.
    pub token_grace: Duration,
}

fn now() -> String {
    rfc3339_millis(&chrono::Utc::now())
}

impl Chat {
    /// The Redis connection and key schema the WebSocket session keeps its
    /// frame-ordering turns in (`realtime::ordering`): presence's own, so
    /// a connection's turns live beside its lease.
    pub(crate) fn ordering_redis(&self) -> (crate::redis_conn::RedisConn, crate::presence::Keys) {
        (self.presence.redis(), self.presence.keys().clone())
    }

    /// Makes the caller known and refreshes their profile (PROTOCOL §1).
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn authenticate(&self, user: &AuthUser) -> Result<()> {
        self.store.conn().await?.upsert_user(user).await
    }

    /// Admits a REST caller whose token verified as `session`: refuses a
    /// revoked token, charges the user's REST rate (and send rate when
    /// `send`), then records the user ([`Chat::authenticate`]). The limit
    /// comes before PostgreSQL, so a refused request costs one Redis call.
    ///
    /// # Errors
    /// `UNAUTHORIZED` for a revoked token, `RATE_LIMITED` over a rate, or a
    /// dependency failure.
    #[tracing::instrument(skip_all, fields(request_kind = "rest", user_id = %session.user.id))]
    pub async fn admit_rest_caller(&self, session: Session, send: bool) -> Result<AuthUser> {
        self.refuse_revoked(&session).await?;
        let user = session.user;
        self.limiter.charge_rest(&user.id, send).await?;
        self.authenticate(&user).await?;
        Ok(user)
    }

    /// `UNAUTHORIZED` "invalid token" for a revoked token.
    ///
    /// # Errors
    /// That, or `UNAVAILABLE` when Redis does not answer.
    pub async fn refuse_revoked(&self, session: &Session) -> Result<()> {
        let revoked = self
            .presence
            .is_revoked(&session.user.id, session.jti.as_deref(), session.issued_at)
            .await?;
        if revoked {
            tracing::debug!(user_id = %session.user.id, "revoked token refused");
            return Err(Error::unauthorized(crate::auth::INVALID_TOKEN));
        }
        Ok(())
    }

    /// The ids of the rooms `user_id` is a member of.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn member_room_ids(&self, user_id: &UserId) -> Result<Vec<String>> {
        self.store.conn().await?.member_room_ids(user_id).await
    }

    /// The members of a room with a live connection.
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN`, or a dependency failure.
    #[tracing::instrument(skip_all, fields(
        request_kind = "onlineInRoom", user_id = %user.id, room_id = %room_id))]
    pub async fn online_in_room(&self, user: &AuthUser, room_id: &RoomId) -> Result<Vec<UserId>> {
        let members = {
            let db = self.store.conn().await?;
            require_member(&db, user, room_id).await?;
            db.room_members(room_id.as_str()).await?
        };
        self.online_members(&members).await
    }

    /// Which of `members` are online.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn online_members(&self, members: &[Member]) -> Result<Vec<UserId>> {
        let ids: Vec<UserId> = members.iter().map(|m| m.profile.id.clone()).collect();
        self.presence.online_among(&ids).await
    }

    /// The `presenceUpdate` envelope of `user_id` for the members of
    /// `rooms`; `None` when they are in no room.
    fn presence_envelope(
        &self,
        user_id: &UserId,
        status: &str,
        rooms: Vec<String>,
    ) -> Result<Option<String>> {
        self.bus.presence_update(user_id, status, rooms)
    }

    /// `$connect` after the token was verified (as `session`, when there is
    /// one): refuses a revoked token, records the user and the connection
    /// (with a lease of `ttl` and the session's `limits`), announces
    /// `online` for their first connection, closes the connections over the
    /// per-user cap, and queues the `connected` event (the relay delivers it
    /// once the handshake has completed; API Gateway refuses posts before).
    ///
    /// # Errors
    /// `UNAUTHORIZED` for a revoked token; a dependency failure.
    #[tracing::instrument(skip_all, fields(
        request_kind = "connect", connection_id = %conn.connection_id, user_id = %conn.user.id))]
    pub async fn connect(
        &self,
        conn: &Connection,
        session: Option<&Session>,
        ttl: Duration,
        limits: SessionLimits,
    ) -> Result<()> {
        if let Some(session) = session {
            self.refuse_revoked(session).await?;
        }
        let rooms = {
            let db = self.store.conn().await?;
            let ((), rooms) = tokio::try_join!(
                db.upsert_user(&conn.user),
                db.member_room_ids(&conn.user.id)
            )?;
            rooms
        };
        let envelope = self.presence_envelope(&conn.user.id, "online", rooms)?;
        let (_, evicted) = self
            .presence
            .connect_session(
                conn,
                ttl,
                self.bus.channel(),
                envelope.as_deref(),
                limits,
                self.bus.origin(),
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
        self.bus
            .publish(
                Target::Connection {
                    connection_id: conn.connection_id.clone(),
                },
                connected,
            )
            .await
    }

    /// Renews a connection's lease (every frame does), charging the frame
    /// to its message rate when `touch.metered`; `None` when the connection
    /// is not registered.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn touch(&self, connection_id: &str, touch: Touch) -> Result<Option<Touched>> {
        let rate = self.limiter.limits().messages.filter(|_| touch.metered);
        self.presence
            .touch(connection_id, touch.ttl, rate, touch.token_grace)
            .await
    }

    /// Announces `online` again for a user whose leases had all run out and
    /// who was announced offline; a frame brought them back.
    ///
    /// # Errors
    /// A dependency failure.
    pub async fn back_online(&self, user_id: &UserId) -> Result<()> {
        let rooms = self.member_room_ids(user_id).await?;
        let envelope = self.presence_envelope(user_id, "online", rooms)?;
        self.presence
            .back_online(user_id, self.bus.channel(), envelope.as_deref())
            .await?;
        Ok(())
    }

    /// Whether the relay has delivered the connection's `connected` event.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn is_greeted(&self, connection_id: &str) -> Result<bool> {
        self.presence.is_greeted(connection_id).await
    }

    /// `authenticate`: records the fresh `session` of the live connection
    /// `conn` (same user), with a lease of `ttl` renewed up to its expiry
    /// plus the grace of `limits`.
    ///
    /// # Errors
    /// `UNAUTHORIZED` for a revoked token or a connection that is gone; a
    /// dependency failure.
    #[tracing::instrument(skip_all, fields(
        request_kind = "authenticate", connection_id = %conn.connection_id, user_id = %conn.user.id))]
    pub async fn renew_session(
        &self,
        conn: &Connection,
        session: Session,
        ttl: Duration,
        limits: SessionLimits,
    ) -> Result<()> {
        self.refuse_revoked(&session).await?;
        let renewed = Connection {
            user: session.user,
            ..conn.clone()
        };
        if !self.presence.renew_session(&renewed, ttl, limits).await? {
            return Err(Error::unauthorized(
                "this connection is no longer registered; reconnect",
            ));
        }
        Ok(())
    }

    /// `$disconnect` (and the sweeper, and a relay that got 410 Gone):
    /// removes the connection and its subscriptions, and announces
    /// `offline` when it was the user's last. Idempotent.
    ///
    /// # Errors
    /// A dependency failure.
    #[tracing::instrument(skip_all, fields(request_kind = "disconnect", connection_id = %connection_id))]
    pub async fn disconnect(&self, connection_id: &str) -> Result<()> {
        crate::departures::disconnect(&self.store, &self.presence, &self.bus, connection_id).await
    }

    /// Asks the relay to close the socket of a connection that is no longer
    /// registered (a `Close` control, delivered after the reply in flight),
    /// so that its client reconnects.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn close_connection(&self, connection_id: &str, endpoint: String) -> Result<()> {
        let close = self.bus.control(
            Target::Connection {
                connection_id: connection_id.to_owned(),
            },
            Control::Close {
                connection_id: connection_id.to_owned(),
                endpoint,
            },
        );
        self.bus.publish_envelope(&close).await
    }
}
