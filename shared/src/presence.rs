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
//! | `conn:{connectionId}` | hash | `userId`, `username`, `displayName`, `avatar`, `admin`, `endpoint` (Management API callback URL), `connectedAt` (ms), `greeted` (set once `connected` was delivered), `exp` (the token's expiry, s; absent: none), `jti` and `iat` (the token's, when it has them: revocation) |
//! | `conn:{connectionId}:rooms` | set | rooms the connection has joined |
//! | `conn:{connectionId}:order` | hash | `turn`, `until`, `since`, `min`: the turn of the connection's frames that carry `seq` ([`crate::realtime`]'s `ordering` module); expires 2 h 10 min after its last change |
//! | `room:{roomId}:conns` | hash | connection id → `watermark\|userId\|connectedAt\|endpoint`: what the relay fans out to in one read |
//! | `relay:lease:{n}` | string, with a TTL | the relay id that owns cluster shard `n` (`SET NX PX`, renewed by compare-and-`PEXPIRE`; the relay crate's `cluster` module) |
//! | `relay:members` | sorted set | live relay ids, scored by their last heartbeat (ms, Redis clock): what a relay's fair share is computed from |
//! | `relay:lags` | hash | relay instance → `lagMs\|atMs`: each relay's delivery lag, reported every 100 ms; read by every frame's lease renewal for load shedding |
//! | `rl:conn:{connectionId}` | string | the connection's message-rate bucket (GCRA arrival time, µs); expires when full ([`crate::limits`]) |
//! | `rl:user:{userId}:send` | string | the user's REST send-rate bucket, likewise |
//! | `rl:user:{userId}:rest` | string | the user's REST request-rate bucket, likewise |
//! | `typing:{roomId}:{userId}` | string | `1` / `0`: the last `isTyping` fanned out, for 2 s (coalescing) |
//! | `revoked:user:{userId}` | string | a time (s since the epoch): every token of the user issued at or before it (`iat`; a token without `iat` whatever its age) is refused, and their connections are closed at their next frame. Written by the operator, with a TTL of the longest token lifetime |
//! | `revoked:jti:{jti}` | string | present: the token with that `jti` is refused, likewise. Written by the operator, expiring with the token |
//!
//! A room subscription carries its *watermark*: the highest sequence id the
//! connection already has from its `roomJoined` snapshot. The relay never
//! pushes a `message` at or below it, and fills any gap above it, so a
//! connection gets every message once, in order, however the join raced with
//! concurrent sends.
//!
//! The scripts build a few keys from prefixes (a user's lease set from the
//! user id they read), so they assume a single Redis shard: ElastiCache with
//! cluster mode disabled, as `template.yaml` creates.
//!
//! `GET /rooms/:roomId/online` and `roomJoined.onlineUsers` both read
//! `presence:online`. The WebSocket handlers write these keys; the online
//! transitions run in Lua scripts so that "first connection" and "last
//! connection" are decided atomically.

use std::sync::LazyLock;

use redis::aio::ConnectionManager;

use crate::domain::{RoomId, UserId};
use crate::error::Result;
use crate::metrics::CountedRedis;

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

    /// The turn of a connection's sequenced frames (issue 16; the
    /// `ordering` module of [`crate::realtime`]).
    pub fn conn_order(&self, connection_id: &str) -> String {
        format!("{}conn:{connection_id}:order", self.prefix)
    }

    /// The connections joined to a room.
    pub fn room_conns(&self, room_id: &str) -> String {
        format!("{}room:{room_id}:conns", self.prefix)
    }

    /// The highest sequence id published for a room (see
    /// [`Presence::join`]); expires an hour after the last publish.
    pub fn room_seq(&self, room_id: &str) -> String {
        format!("{}room:{room_id}:seq", self.prefix)
    }

    /// Each relay's recent delivery lag (load shedding).
    pub fn relay_lags(&self) -> String {
        format!("{}relay:lags", self.prefix)
    }

    /// A connection's message-rate bucket ([`crate::limits`]).
    pub fn rate_conn(&self, connection_id: &str) -> String {
        format!("{}rl:conn:{connection_id}", self.prefix)
    }

    /// A user's REST send-rate bucket ([`crate::limits`]).
    pub fn rate_user_send(&self, user_id: &str) -> String {
        format!("{}rl:user:{user_id}:send", self.prefix)
    }

    /// A user's REST request-rate bucket ([`crate::limits`]).
    pub fn rate_user_rest(&self, user_id: &str) -> String {
        format!("{}rl:user:{user_id}:rest", self.prefix)
    }

    /// The last `typing` state of a user in a room that went out
    /// ([`crate::limits`]).
    pub fn typing(&self, room_id: &str, user_id: &str) -> String {
        format!("{}typing:{room_id}:{user_id}", self.prefix)
    }

    /// The lease of relay cluster shard `shard`: the owning relay's id.
    pub fn relay_lease(&self, shard: usize) -> String {
        format!("{}relay:lease:{shard}", self.prefix)
    }

    /// The live relays, scored by heartbeat.
    pub fn relay_members(&self) -> String {
        format!("{}relay:members", self.prefix)
    }

    /// The prefix of the revocation keys (`revoked:user:{id}`,
    /// `revoked:jti:{jti}`).
    pub fn revoked_prefix(&self) -> String {
        format!("{}revoked:", self.prefix)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

// Built once: `Script::new` hashes the source (TOUCH runs for every client
// frame).
static UNSUBSCRIBE_USER_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(UNSUBSCRIBE_USER));
static CONNECT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CONNECT));
static TOUCH_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TOUCH));
static REPORT_LAG_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(REPORT_LAG));
static MARK_GREETED_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(MARK_GREETED));
static BACK_ONLINE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(BACK_ONLINE));
static DISCONNECT_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(DISCONNECT));
static JOIN_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(JOIN));
static RENEW_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RENEW));
static REVOKED_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REVOKED));

/// Unsubscribes every connection of a user from a room, atomically, and
/// returns the connections that were joined.
const UNSUBSCRIBE_USER: &str = r"
local conns = redis.call('ZRANGE', KEYS[1], 0, -1)
local left = {}
for _, c in ipairs(conns) do
  if redis.call('HDEL', KEYS[2], c) == 1 then
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
        let mut redis = CountedRedis(self.redis.clone());
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
        let mut redis = CountedRedis(self.redis.clone());
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
        let mut redis = CountedRedis(self.redis.clone());
        let left: Vec<String> = UNSUBSCRIBE_USER_SCRIPT
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
    // One quick retry when a reconnect fails: the manager's default (six,
    // backing off to 3.2 s) kept every request waiting about 9 s while
    // Redis was down. Failing fast is what callers can act on (503 with
    // Retry-After, INTERNAL "retry later"); the next command starts a new
    // reconnect anyway, so recovery is not slower.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(3)))
        .set_response_timeout(Some(std::time::Duration::from_secs(3)))
        .set_number_of_retries(1);
    client
        .get_connection_manager_with_config(config)
        .await
        .context("connecting to Redis")
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
}

impl Subscriber {
    fn encode(watermark: i64, conn: &Connection) -> String {
        format!(
            "{watermark}|{}|{}|{}",
            conn.user.id, conn.connected_at_ms, conn.endpoint
        )
    }

    fn decode(connection_id: String, value: &str) -> Option<Self> {
        let mut parts = value.splitn(4, '|');
        Some(Self {
            connection_id,
            watermark: parts.next()?.parse().ok()?,
            user_id: parts.next()?.to_owned(),
            connected_at_ms: parts.next()?.parse().ok()?,
            endpoint: parts.next()?.to_owned(),
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
    /// how far behind the fan-out is.
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

/// Registers a connection and its lease; the user's first live connection
/// adds them to the online set and publishes the `online` envelope in the
/// same step, so presence transitions reach the bus in the order they
/// happened. ARGV[14], ARGV[19] and ARGV[20] are the token's `exp` (s),
/// `jti` and `iat` (s), each possibly empty.
///
/// When the user then holds more than ARGV[15] live connections (0: no
/// cap), their least recently active ones (lowest lease) go, in the same
/// step, so the cap holds however many handshakes race: each is removed
/// with its subscriptions (keys under ARGV[16] `conn:` and ARGV[17]
/// `room:`) and a `Control::Close` envelope from origin ARGV[18] asks the
/// relay to close it at the gateway. Returns {added, evicted ids}.
const CONNECT: &str = r"
redis.call('HSET', KEYS[1], 'userId', ARGV[4], 'username', ARGV[5], 'displayName', ARGV[6],
  'avatar', ARGV[7], 'admin', ARGV[8], 'endpoint', ARGV[9], 'connectedAt', ARGV[10])
if ARGV[14] ~= '' then redis.call('HSET', KEYS[1], 'exp', ARGV[14]) end
if ARGV[19] ~= '' then redis.call('HSET', KEYS[1], 'jti', ARGV[19]) end
if ARGV[20] ~= '' then redis.call('HSET', KEYS[1], 'iat', ARGV[20]) end
redis.call('EXPIRE', KEYS[1], ARGV[11])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[11])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
local evicted = {}
local cap = tonumber(ARGV[15]) or 0
local over = redis.call('ZCARD', KEYS[2]) - cap
if cap > 0 and over > 0 then
  for _, c in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if over <= 0 then break end
    if c ~= ARGV[1] then
      local ck = ARGV[16] .. c
      local endpoint = redis.call('HGET', ck, 'endpoint')
      for _, room in ipairs(redis.call('SMEMBERS', ck .. ':rooms')) do
        redis.call('HDEL', ARGV[17] .. room .. ':conns', c)
      end
      redis.call('DEL', ck, ck .. ':rooms')
      redis.call('ZREM', KEYS[3], c)
      redis.call('ZREM', KEYS[2], c)
      if endpoint then
        redis.call('PUBLISH', ARGV[12], cjson.encode({origin = ARGV[18],
          target = {type = 'connection', connectionId = c},
          control = {type = 'close', connectionId = c, endpoint = endpoint}}))
      end
      evicted[#evicted + 1] = c
      over = over - 1
    end
  end
end
local added = redis.call('SADD', KEYS[4], ARGV[4])
if added == 1 and ARGV[13] ~= '' then redis.call('PUBLISH', ARGV[12], ARGV[13]) end
return {added, evicted}
";

/// Renews a connection's lease, reads who it is and, when ARGV[4] (the
/// GCRA interval, µs) is not empty, charges the frame to the connection's
/// rate bucket KEYS[4] (burst ARGV[5]): one round trip per frame. f[10] is
/// 0, or the µs to wait when the frame is over the rate. f[12] is the
/// token's `exp` (s), if any: the lease never runs past `exp` + ARGV[6]
/// (the grace, ms), so the sweeper closes an idle socket whose token ran
/// out, as a frame would. f[13] is '1' when the token was revoked (keys
/// under ARGV[7], see the module docs).
const TOUCH: &str = concat!(
    crate::limits::gcra_lua!(),
    r"
local f = redis.call('HMGET', KEYS[1], 'userId', 'username', 'displayName', 'avatar', 'admin',
  'endpoint', 'connectedAt', 'greeted', 'exp', 'jti', 'iat')
if not f[1] then return false end
local exp, jti, iat = f[9], f[10], f[11]
local revoked = '0'
if jti and redis.call('EXISTS', ARGV[7] .. 'jti:' .. jti) == 1 then revoked = '1' end
local since = redis.call('GET', ARGV[7] .. 'user:' .. f[1])
if since and (not iat or not tonumber(since) or tonumber(iat) <= tonumber(since)) then
  revoked = '1'
end
local lease = tonumber(ARGV[2])
local expn = exp and tonumber(exp)
if expn then lease = math.min(lease, expn * 1000 + tonumber(ARGV[6])) end
lease = string.format('%.0f', lease)
redis.call('ZADD', ARGV[3] .. f[1], lease, ARGV[1])
redis.call('ZADD', KEYS[2], lease, ARGV[1])
f[9] = tostring(redis.call('SISMEMBER', KEYS[3], f[1]))
f[10] = '0'
if ARGV[4] ~= '' then f[10] = string.format('%.0f', gcra({{KEYS[4], ARGV[4], ARGV[5]}})) end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lag = 0
local lags = redis.call('HGETALL', KEYS[5])
for i = 1, #lags, 2 do
  local v = lags[i + 1]
  local sep = string.find(v, '|', 1, true)
  if sep then
    local l = tonumber(string.sub(v, 1, sep - 1))
    local at = tonumber(string.sub(v, sep + 1))
    if l and at and now - at < 1000 and l > lag then lag = l end
  end
end
f[11] = tostring(lag)
f[12] = exp
f[13] = revoked
return f
"
);

/// Stores a relay's delivery lag with the time (Redis's clock, the one the
/// lease renewal compares with).
const REPORT_LAG: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. now)
redis.call('PEXPIRE', KEYS[1], 5000)
return 0
";

/// A fresh token for a live connection: its expiry ARGV[3], profile
/// (ARGV[4..7]), `jti` ARGV[8] and `iat` ARGV[9], and its lease ARGV[2] in the lease set and the user's set
/// (KEYS[3]). Returns 0 for a connection that is gone.
const RENEW: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'exp', ARGV[3], 'username', ARGV[4], 'displayName', ARGV[5],
  'avatar', ARGV[6], 'admin', ARGV[7])
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'jti', ARGV[8]) else redis.call('HDEL', KEYS[1], 'jti') end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'iat', ARGV[9]) else redis.call('HDEL', KEYS[1], 'iat') end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
";

/// Whether a token (user ARGV[2], `jti` ARGV[3], `iat` ARGV[4], each of
/// the last two possibly empty) is revoked under prefix ARGV[1]: the same
/// rule as in TOUCH. Its keys are built from the token, so they are not
/// declared (single shard, as the module docs say).
const REVOKED: &str = r"
if ARGV[3] ~= '' and redis.call('EXISTS', ARGV[1] .. 'jti:' .. ARGV[3]) == 1 then return 1 end
local since = redis.call('GET', ARGV[1] .. 'user:' .. ARGV[2])
if since and (ARGV[4] == '' or not tonumber(since) or tonumber(ARGV[4]) <= tonumber(since)) then
  return 1
end
return 0
";

/// Records that a connection's `connected` event was delivered.
const MARK_GREETED: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'greeted', '1') end
return 0
";

/// Marks a user online again (a frame after their leases ran out).
const BACK_ONLINE: &str = r"
local added = redis.call('SADD', KEYS[1], ARGV[1])
if added == 1 and ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return added
";

/// Removes a connection, its subscriptions and its lease; when it was the
/// user's last live connection, takes them offline and publishes the
/// `offline` envelope in the same step. Returns {userId, wentOffline}.
const DISCONNECT: &str = r"
local user = redis.call('HGET', KEYS[1], 'userId')
for _, room in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  redis.call('HDEL', ARGV[4] .. room .. ARGV[5], ARGV[1])
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
if not user then return {'', 0} end
local uc = ARGV[3] .. user
redis.call('ZREM', uc, ARGV[1])
redis.call('ZREMRANGEBYSCORE', uc, '-inf', ARGV[2])
if redis.call('ZCARD', uc) > 0 then return {user, 0} end
if user ~= ARGV[8] then return {user, 0} end
local removed = redis.call('SREM', KEYS[4], user)
if removed == 1 and ARGV[7] ~= '' then redis.call('PUBLISH', ARGV[6], ARGV[7]) end
return {user, removed}
";

/// Subscribes a live connection to a room with its watermark (ARGV[4]);
/// when a message above the watermark was published before the
/// subscription existed (KEYS[4], see [`Presence::join`]), publishes the
/// `Sync` control ARGV[6] (if not empty) on channel ARGV[5]; and answers which of the
/// users ARGV[7..] are online (KEYS[5]). Returns {'0'} for a connection
/// that is gone, else {'1', online users...}.
const JOIN: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'0'} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
local published = tonumber(redis.call('GET', KEYS[4]) or '0')
if published > tonumber(ARGV[4]) and ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
local out = {'1'}
for i = 7, #ARGV do
  if redis.call('SISMEMBER', KEYS[5], ARGV[i]) == 1 then out[#out + 1] = ARGV[i] end
end
return out
";

/// How long a connection record outlives its last renewal at most: a guard
/// against leaks if the sweeper never ran (API Gateway closes every
/// connection after 2 h anyway).
const CONNECTION_RECORD_TTL_SECS: i64 = 24 * 3600;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|v| !v.is_empty())
}

impl Presence {
    /// Registers a new connection with a lease of `ttl`. Returns true when
    /// it is the user's first live connection (they came online); the
    /// `online_envelope` is then published atomically with the transition.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn connect(
        &self,
        conn: &Connection,
        ttl: std::time::Duration,
        channel: &str,
        online_envelope: Option<&str>,
    ) -> Result<bool> {
        let (added, _) = self
            .connect_session(
                conn,
                ttl,
                channel,
                online_envelope,
                SessionLimits::default(),
                "",
            )
            .await?;
        Ok(added)
    }

    /// Like [`Presence::connect`], also recording the token's expiry and
    /// enforcing the per-user cap of `limits` in the same step. Returns
    /// whether the user came online, and the connections closed to make
    /// room (a `Control::Close` from `origin` was published for each).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn connect_session(
        &self,
        conn: &Connection,
        ttl: std::time::Duration,
        channel: &str,
        online_envelope: Option<&str>,
        limits: SessionLimits,
        origin: &str,
    ) -> Result<(bool, Vec<String>)> {
        let now = now_ms();
        let mut redis = CountedRedis(self.redis.clone());
        let (added, evicted): (i64, Vec<String>) = CONNECT_SCRIPT
            .key(self.keys.conn(&conn.connection_id))
            .key(self.keys.user_conns(conn.user.id.as_str()))
            .key(self.keys.leases())
            .key(self.keys.online())
            .arg(&conn.connection_id)
            .arg(limits.lease(now, ttl))
            .arg(now)
            .arg(conn.user.id.as_str())
            .arg(&conn.user.username)
            .arg(conn.user.display_name.as_deref().unwrap_or(""))
            .arg(conn.user.avatar.as_deref().unwrap_or(""))
            .arg(if conn.user.is_admin { "1" } else { "0" })
            .arg(&conn.endpoint)
            .arg(conn.connected_at_ms)
            .arg(CONNECTION_RECORD_TTL_SECS)
            .arg(channel)
            .arg(online_envelope.unwrap_or(""))
            .arg(limits.expires_at.map(|e| e.to_string()).unwrap_or_default())
            .arg(limits.max_per_user.unwrap_or(0))
            .arg(format!("{}conn:", self.keys.prefix()))
            .arg(format!("{}room:", self.keys.prefix()))
            .arg(origin)
            .arg(limits.jti.as_deref().unwrap_or(""))
            .arg(limits.issued_at.map(|i| i.to_string()).unwrap_or_default())
            .invoke_async(&mut redis)
            .await?;
        Ok((added == 1, evicted))
    }

    /// Records a fresh token for a live connection (`authenticate`): its
    /// expiry and profile, and a lease renewed up to the new expiry plus
    /// `limits.grace`. False when the connection is gone.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn renew_session(
        &self,
        conn: &Connection,
        ttl: std::time::Duration,
        limits: SessionLimits,
    ) -> Result<bool> {
        let mut redis = CountedRedis(self.redis.clone());
        let renewed: i64 = RENEW_SCRIPT
            .key(self.keys.conn(&conn.connection_id))
            .key(self.keys.leases())
            .key(self.keys.user_conns(conn.user.id.as_str()))
            .arg(&conn.connection_id)
            .arg(limits.lease(now_ms(), ttl))
            .arg(limits.expires_at.map(|e| e.to_string()).unwrap_or_default())
            .arg(&conn.user.username)
            .arg(conn.user.display_name.as_deref().unwrap_or(""))
            .arg(conn.user.avatar.as_deref().unwrap_or(""))
            .arg(if conn.user.is_admin { "1" } else { "0" })
            .arg(limits.jti.as_deref().unwrap_or(""))
            .arg(limits.issued_at.map(|i| i.to_string()).unwrap_or_default())
            .invoke_async(&mut redis)
            .await?;
        Ok(renewed == 1)
    }

    /// Whether a token of `user_id` with this `jti` and `iat` was revoked
    /// (see the module docs): one round trip, at a handshake or a REST
    /// call; open connections check in their lease renewal.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn is_revoked(
        &self,
        user_id: &UserId,
        jti: Option<&str>,
        issued_at: Option<i64>,
    ) -> Result<bool> {
        let mut redis = CountedRedis(self.redis.clone());
        let revoked: i64 = REVOKED_SCRIPT
            .arg(self.keys.revoked_prefix())
            .arg(user_id.as_str())
            .arg(jti.unwrap_or(""))
            .arg(issued_at.map(|i| i.to_string()).unwrap_or_default())
            .invoke_async(&mut redis)
            .await?;
        Ok(revoked == 1)
    }

    /// Renews a connection's lease (any frame does) and returns the
    /// connection; `None` when it is unknown (closed, or swept). With a
    /// `rate`, the frame is also charged to the connection's message-rate
    /// bucket in the same round trip ([`Touched::rate_limited`]).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn touch(
        &self,
        connection_id: &str,
        ttl: std::time::Duration,
        rate: Option<crate::config::Rate>,
        token_grace: std::time::Duration,
    ) -> Result<Option<Touched>> {
        let (interval, burst) = match rate.map(crate::limits::bucket_args) {
            Some((interval, burst)) => (interval.to_string(), burst.to_string()),
            None => (String::new(), String::new()),
        };
        let mut redis = CountedRedis(self.redis.clone());
        let fields: Option<Vec<Option<String>>> = TOUCH_SCRIPT
            .key(self.keys.conn(connection_id))
            .key(self.keys.leases())
            .key(self.keys.online())
            .key(self.keys.rate_conn(connection_id))
            .key(self.keys.relay_lags())
            .arg(connection_id)
            .arg(now_ms() + ttl.as_millis() as i64)
            .arg(self.keys.user_conns_prefix())
            .arg(interval)
            .arg(burst)
            .arg(token_grace.as_millis() as i64)
            .arg(self.keys.revoked_prefix())
            .invoke_async(&mut redis)
            .await?;
        let Some(mut f) = fields else {
            return Ok(None);
        };
        f.resize(13, None);
        let expires_at = f[11].as_deref().and_then(|v| v.parse().ok());
        let revoked = f[12].as_deref() == Some("1");
        let rate_limited = crate::limits::parse_wait(f[9].as_deref());
        let delivery_lag_ms = f[10].as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut take = |i: usize| f[i].take();
        let Some(user_id) = take(0) else {
            return Ok(None);
        };
        let user_id = UserId::from_trusted(user_id);
        let connection = Connection {
            connection_id: connection_id.to_owned(),
            user: crate::auth::AuthUser {
                username: non_empty(take(1)).unwrap_or_else(|| user_id.to_string()),
                display_name: non_empty(take(2)),
                avatar: non_empty(take(3)),
                is_admin: take(4).as_deref() == Some("1"),
                id: user_id,
            },
            endpoint: take(5).unwrap_or_default(),
            connected_at_ms: take(6).and_then(|v| v.parse().ok()).unwrap_or(0),
        };
        let greeted = take(7).is_some();
        Ok(Some(Touched {
            connection,
            greeted,
            was_online: take(8).as_deref() == Some("1"),
            rate_limited,
            delivery_lag_ms,
            expires_at,
            revoked,
        }))
    }

    /// Records a relay's current delivery lag (`instance` names the relay);
    /// entries older than a second are ignored, so a relay that stops is
    /// forgotten.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn report_delivery_lag(&self, instance: &str, lag_ms: u64) -> Result<()> {
        let mut redis = CountedRedis(self.redis.clone());
        let _: i64 = REPORT_LAG_SCRIPT
            .key(self.keys.relay_lags())
            .arg(instance)
            .arg(lag_ms)
            .invoke_async(&mut redis)
            .await?;
        Ok(())
    }

    /// Puts a user back in the online set; true (and the envelope is
    /// published) when they were not there.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn back_online(
        &self,
        user_id: &UserId,
        channel: &str,
        online_envelope: Option<&str>,
    ) -> Result<bool> {
        let mut redis = CountedRedis(self.redis.clone());
        let added: i64 = BACK_ONLINE_SCRIPT
            .key(self.keys.online())
            .arg(user_id.as_str())
            .arg(channel)
            .arg(online_envelope.unwrap_or(""))
            .invoke_async(&mut redis)
            .await?;
        Ok(added == 1)
    }

    /// Records that the connection's `connected` event was delivered (the
    /// relay calls this), so its first reply need not wait for it.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn mark_greeted(&self, connection_id: &str) -> Result<()> {
        let mut redis = CountedRedis(self.redis.clone());
        let _: i64 = MARK_GREETED_SCRIPT
            .key(self.keys.conn(connection_id))
            .invoke_async(&mut redis)
            .await?;
        Ok(())
    }

    /// Whether the relay has delivered the connection's `connected` event.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn is_greeted(&self, connection_id: &str) -> Result<bool> {
        let mut redis = CountedRedis(self.redis.clone());
        let greeted: bool = redis::cmd("HEXISTS")
            .arg(self.keys.conn(connection_id))
            .arg("greeted")
            .query_async(&mut redis)
            .await?;
        Ok(greeted)
    }

    /// The user of a connection, if it is still registered.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn connection_user(&self, connection_id: &str) -> Result<Option<UserId>> {
        let mut redis = CountedRedis(self.redis.clone());
        let user: Option<String> = redis::cmd("HGET")
            .arg(self.keys.conn(connection_id))
            .arg("userId")
            .query_async(&mut redis)
            .await?;
        Ok(user.map(UserId::from_trusted))
    }

    /// Removes a connection with its subscriptions and lease. When it was
    /// the last live connection of `expected_user`, they go offline and
    /// `offline_envelope` is published in the same step. Returns the user
    /// and whether they went offline; idempotent.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn disconnect(
        &self,
        connection_id: &str,
        expected_user: Option<&UserId>,
        channel: &str,
        offline_envelope: Option<&str>,
    ) -> Result<Option<(UserId, bool)>> {
        let mut redis = CountedRedis(self.redis.clone());
        let (user, went_offline): (String, i64) = DISCONNECT_SCRIPT
            .key(self.keys.conn(connection_id))
            .key(self.keys.conn_rooms(connection_id))
            .key(self.keys.leases())
            .key(self.keys.online())
            .arg(connection_id)
            .arg(now_ms())
            .arg(self.keys.user_conns_prefix())
            .arg(format!("{}room:", self.keys.prefix()))
            .arg(":conns")
            .arg(channel)
            .arg(offline_envelope.unwrap_or(""))
            .arg(expected_user.map(UserId::as_str).unwrap_or(""))
            .invoke_async(&mut redis)
            .await?;
        Ok((!user.is_empty()).then(|| (UserId::from_trusted(user), went_offline == 1)))
    }

    /// Subscribes a connection to a room with the watermark of its snapshot
    /// and answers which of `members` are online, in one round trip; `None`
    /// when the connection is gone.
    ///
    /// A message stored after the snapshot was read may have been fanned out
    /// before the subscription existed. Every `message` is published
    /// together with its room's highest published sequence id
    /// ([`crate::bus::Bus::publish_room_message`], one script), so the
    /// subscription and that check are one atomic step: a message published
    /// before it shows in the check, and `sync_envelope` (a `Sync` control)
    /// is published for the relay to push what the connection is missing;
    /// one published after it finds the subscription.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn join(
        &self,
        room_id: &RoomId,
        conn: &Connection,
        watermark: i64,
        members: &[UserId],
        channel: &str,
        sync_envelope: &str,
    ) -> Result<Option<Vec<UserId>>> {
        let mut redis = CountedRedis(self.redis.clone());
        let mut invocation = JOIN_SCRIPT.prepare_invoke();
        invocation
            .key(self.keys.conn(&conn.connection_id))
            .key(self.keys.room_conns(room_id.as_str()))
            .key(self.keys.conn_rooms(&conn.connection_id))
            .key(self.keys.room_seq(room_id.as_str()))
            .key(self.keys.online())
            .arg(&conn.connection_id)
            .arg(Subscriber::encode(watermark, conn))
            .arg(room_id.as_str())
            .arg(watermark)
            .arg(channel)
            .arg(sync_envelope);
        for member in members {
            invocation.arg(member.as_str());
        }
        let answer: Vec<String> = invocation.invoke_async(&mut redis).await?;
        let mut answer = answer.into_iter();
        if answer.next().as_deref() != Some("1") {
            return Ok(None);
        }
        Ok(Some(answer.map(UserId::from_trusted).collect()))
    }

    /// Unsubscribes a connection from a room (nothing if it had not joined).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn leave(&self, room_id: &RoomId, connection_id: &str) -> Result<()> {
        let mut redis = CountedRedis(self.redis.clone());
        let _: () = redis::pipe()
            .atomic()
            .hdel(self.keys.room_conns(room_id.as_str()), connection_id)
            .ignore()
            .srem(self.keys.conn_rooms(connection_id), room_id.as_str())
            .ignore()
            .query_async(&mut redis)
            .await?;
        Ok(())
    }

    /// The connections joined to each of `room_ids` (one round trip).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn subscribers(&self, room_ids: &[&str]) -> Result<Vec<Vec<Subscriber>>> {
        if room_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for room in room_ids {
            pipe.hgetall(self.keys.room_conns(room));
        }
        let mut redis = CountedRedis(self.redis.clone());
        let rooms: Vec<Vec<(String, String)>> = pipe.query_async(&mut redis).await?;
        Ok(rooms
            .into_iter()
            .map(|entries| {
                entries
                    .into_iter()
                    .filter_map(|(conn, value)| Subscriber::decode(conn, &value))
                    .collect()
            })
            .collect())
    }

    /// Each connection's user, endpoint and connect time, or `None` for a
    /// connection that is gone (one round trip).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn connection_routes(
        &self,
        connection_ids: &[String],
    ) -> Result<Vec<Option<Subscriber>>> {
        if connection_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for conn in connection_ids {
            pipe.cmd("HMGET")
                .arg(self.keys.conn(conn))
                .arg("userId")
                .arg("connectedAt")
                .arg("endpoint");
        }
        let mut redis = CountedRedis(self.redis.clone());
        let rows: Vec<(Option<String>, Option<String>, Option<String>)> =
            pipe.query_async(&mut redis).await?;
        Ok(connection_ids
            .iter()
            .zip(rows)
            .map(|(conn, row)| match row {
                (Some(user_id), connected_at, Some(endpoint)) => Some(Subscriber {
                    connection_id: conn.clone(),
                    watermark: 0,
                    user_id,
                    connected_at_ms: connected_at.and_then(|v| v.parse().ok()).unwrap_or(0),
                    endpoint,
                }),
                _ => None,
            })
            .collect())
    }

    /// A user's registered connection ids.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn user_connections(&self, user_id: &str) -> Result<Vec<String>> {
        let mut redis = CountedRedis(self.redis.clone());
        let conns: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.user_conns(user_id))
            .arg(0)
            .arg(-1)
            .query_async(&mut redis)
            .await?;
        Ok(conns)
    }

    /// Up to `limit` connections whose lease ran out before `now_ms`.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn expired_connections(&self, now_ms: i64, limit: usize) -> Result<Vec<String>> {
        let mut redis = CountedRedis(self.redis.clone());
        let conns: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.leases())
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut redis)
            .await?;
        Ok(conns)
    }
    /// Rooms with joined connections and how many each has, for the
    /// operator console: SCAN for `room:*:conns` under the prefix, then
    /// HLEN in one pipeline. Bounded: at most `max_rooms` rooms and a few
    /// hundred SCAN calls, so a big keyspace costs a bounded read. The flag
    /// is true when the scan stopped early (more rooms may exist). Sorted
    /// by subscriber count, most first.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn room_subscriber_counts(
        &self,
        max_rooms: usize,
    ) -> Result<(Vec<(RoomId, u64)>, bool)> {
        const MAX_SCANS: usize = 200;
        let head = format!("{}room:", self.keys.prefix());
        let pattern = format!("{}*:conns", glob_escape(&head));
        let mut redis = CountedRedis(self.redis.clone());
        let (mut cursor, mut keys, mut scans) = (0u64, Vec::new(), 0);
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut redis)
                .await?;
            keys.extend(batch);
            cursor = next;
            scans += 1;
            if cursor == 0 || keys.len() >= max_rooms || scans >= MAX_SCANS {
                break;
            }
        }
        let truncated = cursor != 0 || keys.len() > max_rooms;
        keys.sort();
        keys.dedup();
        keys.truncate(max_rooms);
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.hlen(key);
        }
        let counts: Vec<u64> = if keys.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut redis).await?
        };
        let mut rooms: Vec<(RoomId, u64)> = keys
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .filter_map(|(key, n)| {
                let id = key.strip_prefix(&head)?.strip_suffix(":conns")?;
                Some((RoomId::from_trusted(id.to_owned()), n))
            })
            .collect();
        rooms.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok((rooms, truncated))
    }

    /// Live connections (unexpired leases) grouped by their Management API
    /// endpoint, which names the gateway instance (or API stage) that holds
    /// them, for the operator console. Reads at most `max_connections`
    /// registrations; the flag is true when there were more.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn connections_by_endpoint(
        &self,
        max_connections: usize,
    ) -> Result<(Vec<(String, u64)>, bool)> {
        let mut redis = CountedRedis(self.redis.clone());
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.leases())
            .arg(now_ms())
            .arg("+inf")
            .arg("LIMIT")
            .arg(0)
            .arg(max_connections + 1)
            .query_async(&mut redis)
            .await?;
        let truncated = ids.len() > max_connections;
        let ids = &ids[..ids.len().min(max_connections)];
        if ids.is_empty() {
            return Ok((Vec::new(), false));
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hget(self.keys.conn(id), "endpoint");
        }
        let endpoints: Vec<Option<String>> = pipe.query_async(&mut redis).await?;
        let mut counts = std::collections::BTreeMap::<String, u64>::new();
        for endpoint in endpoints.into_iter().flatten() {
            *counts.entry(endpoint).or_default() += 1;
        }
        Ok((counts.into_iter().collect(), truncated))
    }
}

/// Escapes the glob characters of a SCAN MATCH pattern (`*?[]\`), so a key
/// prefix is matched literally.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
