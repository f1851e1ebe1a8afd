//! The Redis side: connections, room subscriptions and presence.
//!
//! # Layout
//! - [`keys`]: the whole Redis key schema (every key name is built there,
//!   including the prefixes the Lua scripts build keys from), with its
//!   table.
//! - `connections`: registering, renewing and removing connections, their
//!   leases, greetings and routes.
//! - `subscriptions`: joining and leaving rooms, the subscribers of a room,
//!   and the watermarks the relay writes back.
//! - `online`: the online set and the relays' delivery lag.
//! - `ops`: bounded scans for the operator console.
//! - this file: [`Presence`], the types the others share, and
//!   [`connect_redis`].
//!
//! Each operation is one script or command per hash slot (see [`keys`]);
//! where an operation changes two slots (a connection's record and its
//! user's leases, a room's subscribers), the steps are ordered so that
//! every interleaving and every partial failure leaves a state the next
//! step, the sweeper or the relay repairs (`docs/ARCHITECTURE.md`,
//! "Redis Cluster").
//!
//! A room subscription carries its *watermark*: the highest sequence id the
//! connection already has from its `roomJoined` snapshot. The relay never
//! pushes a `message` at or below it, and fills any gap above it, so a
//! connection gets every message once, in order, however the join raced with
//! concurrent sends.
//!
//! `GET /rooms/:roomId/online` and `roomJoined.onlineUsers` both read
//! the online sets (one per partition). The WebSocket handlers write these keys; the online
//! transitions run in Lua scripts so that "first connection" and "last
//! connection" are decided atomically.

use crate::error::Result;
use crate::metrics::CountedRedis;

mod connections;
pub mod keys;
mod online;
mod ops;
mod subscriptions;

pub use keys::Keys;
pub use subscriptions::RoomMarks;

pub use crate::redis_conn::RedisConn;

/// Reads and writes the presence and subscription keys.
#[derive(Clone)]
pub struct Presence {
    redis: RedisConn,
    keys: Keys,
    lag_seen: std::sync::Arc<online::LagSeen>,
}

crate::debug_fields!(Presence { keys });

impl Presence {
    /// Presence over `redis`, with `keys`.
    pub fn new(redis: RedisConn, keys: Keys) -> Self {
        Self {
            redis,
            keys,
            lag_seen: std::sync::Arc::default(),
        }
    }

    /// The key builder.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A handle on the Redis connection.
    pub fn redis(&self) -> RedisConn {
        self.redis.clone()
    }

    /// Answers when Redis answers.
    ///
    /// # Errors
    /// `UNAVAILABLE` when it does not.
    pub async fn ping(&self) -> Result<()> {
        let mut redis = CountedRedis(self.redis.clone());
        let _: String = redis::cmd("PING").query_async(&mut redis).await?;
        Ok(())
    }
}

/// Opens the Redis connection of `target` (single or cluster; it
/// reconnects by itself after failures).
///
/// # Errors
/// When the URL is invalid or Redis does not answer at start-up.
pub async fn connect_redis(target: &crate::redis_conn::RedisTarget) -> anyhow::Result<RedisConn> {
    RedisConn::connect(target).await
}

/// A live WebSocket connection, as `$connect` registered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// API Gateway's connection id.
    pub connection_id: String,
    /// Who connected (profile and role as of the handshake).
    pub user: crate::auth::AuthUser,
    /// The Management API endpoint that reaches this connection
    /// (`https://{domainName}/{stage}`).
    pub endpoint: String,
    /// When the handshake happened (ms since the epoch).
    pub connected_at_ms: i64,
}

/// One connection joined to a room, as the relay reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    /// The connection id.
    pub connection_id: String,
    /// Highest sequence id the connection had in its `roomJoined`.
    pub watermark: i64,
    /// The connection's user.
    pub user_id: String,
    /// When it connected (ms since the epoch).
    pub connected_at_ms: i64,
    /// Its Management API endpoint.
    pub endpoint: String,
    /// A subscription whose `roomJoined` the relay has not posted yet: it
    /// gets none of the room's events until then (`Presence::join`).
    pub pending: bool,
}

impl Subscriber {
    fn encode(watermark: i64, conn: &Connection) -> String {
        format!(
            "{watermark}|{}|{}|{}",
            conn.user.id, conn.connected_at_ms, conn.endpoint
        )
    }

    /// A subscription's value: `watermark|user|connectedAt|endpoint`, with
    /// a `~` in front while it is pending.
    fn decode(connection_id: String, value: &str) -> Option<Self> {
        let (pending, value) = match value.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        let mut parts = value.splitn(4, '|');
        Some(Self {
            connection_id,
            watermark: parts.next()?.parse().ok()?,
            user_id: parts.next()?.to_owned(),
            connected_at_ms: parts.next()?.parse().ok()?,
            endpoint: parts.next()?.to_owned(),
            pending,
        })
    }
}

/// What a frame's lease renewal found.
#[derive(Debug, Clone)]
pub struct Touched {
    /// The connection.
    pub connection: Connection,
    /// False when the user had been declared offline (their leases all ran
    /// out) and this frame brings them back.
    pub was_online: bool,
    /// Whether the relay has delivered the connection's `connected` event.
    pub greeted: bool,
    /// When the frame was over the connection's message rate: how long
    /// until one would be allowed. The lease was renewed all the same.
    pub rate_limited: Option<std::time::Duration>,
    /// The largest delivery lag a relay reported in the last second (ms):
    /// how far behind the fan-out is (read at most every
    /// [`online::LAG_READ_EVERY`] per process).
    pub delivery_lag_ms: u64,
    /// The expiry of the connection's token (s since the epoch), when one
    /// was recorded.
    pub expires_at: Option<i64>,
    /// The connection's token was revoked (by its `jti`, or by its user).
    pub revoked: bool,
}

/// What a new connection's registration enforces besides its lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionLimits {
    /// The token's `exp` (s since the epoch), recorded with the connection.
    pub expires_at: Option<i64>,
    /// The token's `jti`, recorded for revocation.
    pub jti: Option<String>,
    /// The token's `iat` (s), recorded for revocation.
    pub issued_at: Option<i64>,
    /// How long after `expires_at` the connection may still be used.
    pub grace: std::time::Duration,
    /// Most live connections of the user; over it, the least recently
    /// active ones are closed.
    pub max_per_user: Option<usize>,
}

impl SessionLimits {
    /// The lease expiry (ms) for a renewal at `now_ms` with `ttl`: never
    /// past the token's expiry plus the grace.
    fn lease(&self, now_ms: i64, ttl: std::time::Duration) -> i64 {
        let lease = now_ms + ttl.as_millis() as i64;
        match self.expires_at {
            Some(exp) => lease.min(exp.saturating_mul(1000) + self.grace.as_millis() as i64),
            None => lease,
        }
    }
}

/// How long a connection record outlives its last renewal at most: a guard
/// against leaks if the sweeper never ran (API Gateway closes every
/// connection after 2 h anyway).
const CONNECTION_RECORD_TTL_SECS: i64 = 24 * 3600;

/// `EVAL` of a script's source with `keys`, for a pipeline (the crate's
/// `Script` retries `NOSCRIPT` only for a call of its own). Redis caches
/// the compiled script by its hash, so only the bytes of the source cost.
fn eval_cmd(script: &str, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    cmd
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::UserId;

    #[test]
    fn a_lease_never_outlives_the_token_and_its_grace() {
        let ttl = std::time::Duration::from_secs(90);
        let grace = std::time::Duration::from_secs(30);
        let now = 1_000_000_000_000;
        let open = SessionLimits::default();
        assert_eq!(open.lease(now, ttl), now + 90_000, "no token, no cap");
        let far = SessionLimits {
            expires_at: Some(now / 1000 + 3600),
            grace,
            ..SessionLimits::default()
        };
        assert_eq!(far.lease(now, ttl), now + 90_000);
        let soon = SessionLimits {
            expires_at: Some(now / 1000 + 10),
            grace,
            ..SessionLimits::default()
        };
        assert_eq!(soon.lease(now, ttl), now + 40_000, "exp + grace");
    }

    #[test]
    fn subscriber_values_round_trip_with_pipes_in_the_endpoint() {
        let conn = Connection {
            connection_id: "L0SM9cOFvHcCIhw=".into(),
            user: crate::auth::AuthUser {
                id: UserId::from_trusted("u1".into()),
                username: "u1".into(),
                display_name: None,
                avatar: None,
                is_admin: false,
            },
            endpoint: "https://x|y/prod".into(),
            connected_at_ms: 42,
        };
        let value = Subscriber::encode(7, &conn);
        let back = Subscriber::decode(conn.connection_id.clone(), &value).expect("decodes");
        assert_eq!(back.watermark, 7);
        assert_eq!(back.user_id, "u1");
        assert_eq!(back.connected_at_ms, 42);
        assert_eq!(back.endpoint, "https://x|y/prod");
        assert!(!back.pending);
        let pending =
            Subscriber::decode(conn.connection_id.clone(), &format!("~{value}")).expect("decodes");
        assert!(pending.pending);
        assert_eq!(pending.watermark, 7);
        assert_eq!(pending.endpoint, back.endpoint);
    }
}
