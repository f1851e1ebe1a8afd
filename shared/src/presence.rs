//! The Redis side: connections, room subscriptions and presence.
//!
//! # Keys
//!
//! Every key starts with the configured prefix (`REDIS_KEY_PREFIX`), so a
//! deployment or a test can share a Redis database with others.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `presence:online` | set | users with at least one live connection |
//! | `presence:user:{userId}` | sorted set | the user's connection ids, scored by lease expiry (ms) |
//! | `presence:leases` | sorted set | every connection id, scored by lease expiry: what the sweeper scans |
//! | `conn:{connectionId}` | hash | `userId`, `endpoint` (Management API callback URL), `connectedAt` (ms), `username` |
//! | `conn:{connectionId}:rooms` | set | rooms the connection has joined |
//! | `room:{roomId}:conns` | set | connections joined to the room: what the relay fans out to |
//!
//! `GET /rooms/:roomId/online` and `roomJoined.onlineUsers` both read
//! `presence:online`. The WebSocket handlers write these keys; the online
//! transitions run in Lua scripts so that "first connection" and "last
//! connection" are decided atomically.

use redis::aio::ConnectionManager;

use crate::domain::{RoomId, UserId};
use crate::error::Result;

/// Builds the key names (see the module docs).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The set of online users.
    pub fn online(&self) -> String {
        format!("{}presence:online", self.prefix)
    }

    /// A user's connections, scored by lease expiry.
    pub fn user_conns(&self, user_id: &str) -> String {
        format!("{}presence:user:{user_id}", self.prefix)
    }

    /// Every connection, scored by lease expiry.
    pub fn leases(&self) -> String {
        format!("{}presence:leases", self.prefix)
    }

    /// The prefix of per-user connection sets (for scripts that build keys).
    pub fn user_conns_prefix(&self) -> String {
        format!("{}presence:user:", self.prefix)
    }

    /// A connection's record.
    pub fn conn(&self, connection_id: &str) -> String {
        format!("{}conn:{connection_id}", self.prefix)
    }

    /// The rooms a connection has joined.
    pub fn conn_rooms(&self, connection_id: &str) -> String {
        format!("{}conn:{connection_id}:rooms", self.prefix)
    }

    /// The connections joined to a room.
    pub fn room_conns(&self, room_id: &str) -> String {
        format!("{}room:{room_id}:conns", self.prefix)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// Unsubscribes every connection of a user from a room, atomically, and
/// returns the connections that were joined.
const UNSUBSCRIBE_USER: &str = r"
local conns = redis.call('ZRANGE', KEYS[1], 0, -1)
local left = {}
for _, c in ipairs(conns) do
  if redis.call('SREM', KEYS[2], c) == 1 then
    redis.call('SREM', ARGV[1] .. c .. ':rooms', ARGV[2])
    table.insert(left, c)
  end
end
return left
";

/// Reads and writes the presence and subscription keys.
#[derive(Clone)]
pub struct Presence {
    redis: ConnectionManager,
    keys: Keys,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Presence {
    /// Presence over `redis`, with `keys`.
    pub fn new(redis: ConnectionManager, keys: Keys) -> Self {
        Self { redis, keys }
    }

    /// The key builder.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A handle on the Redis connection.
    pub fn redis(&self) -> ConnectionManager {
        self.redis.clone()
    }

    /// Answers when Redis answers.
    ///
    /// # Errors
    /// `UNAVAILABLE` when it does not.
    pub async fn ping(&self) -> Result<()> {
        let mut redis = self.redis.clone();
        let _: String = redis::cmd("PING").query_async(&mut redis).await?;
        Ok(())
    }

    /// Which of `users` are online, in the given order. One round trip.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn online_among(&self, users: &[UserId]) -> Result<Vec<UserId>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut redis = self.redis.clone();
        let flags: Vec<bool> = redis::cmd("SMISMEMBER")
            .arg(self.keys.online())
            .arg(users.iter().map(UserId::as_str).collect::<Vec<_>>())
            .query_async(&mut redis)
            .await?;
        Ok(users
            .iter()
            .zip(flags)
            .filter(|(_, online)| *online)
            .map(|(u, _)| u.clone())
            .collect())
    }

    /// Unsubscribes all of a user's connections from a room (they were
    /// removed from it); returns the connection ids that had joined it.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn unsubscribe_user(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Vec<String>> {
        let mut redis = self.redis.clone();
        let left: Vec<String> = redis::Script::new(UNSUBSCRIBE_USER)
            .key(self.keys.user_conns(user_id.as_str()))
            .key(self.keys.room_conns(room_id.as_str()))
            .arg(format!("{}conn:", self.keys.prefix()))
            .arg(room_id.as_str())
            .invoke_async(&mut redis)
            .await?;
        Ok(left)
    }
}

/// Opens a Redis connection manager (reconnects by itself after failures).
///
/// # Errors
/// When the URL is invalid or Redis does not answer at start-up.
pub async fn connect_redis(url: &secrecy::SecretString) -> anyhow::Result<ConnectionManager> {
    use anyhow::Context as _;
    use secrecy::ExposeSecret as _;
    let client =
        redis::Client::open(url.expose_secret()).context("REDIS_URL is not a valid Redis URL")?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(3)))
        .set_response_timeout(Some(std::time::Duration::from_secs(3)));
    client
        .get_connection_manager_with_config(config)
        .await
        .context("connecting to Redis")
}
