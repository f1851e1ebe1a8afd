//! Connections: registration (with the per-user cap), lease renewal on
//! every frame, token renewal and revocation, greetings, removal, and the
//! routes the relay posts to.

use std::sync::LazyLock;

use super::{
    CONNECTION_RECORD_TTL_SECS, Connection, Presence, SessionLimits, Subscriber, Touched,
    non_empty, now_ms,
};
use crate::domain::UserId;
use crate::error::Result;
use crate::metrics::CountedRedis;

// Built once: `Script::new` hashes the source.
static CONNECT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CONNECT));
static TOUCH_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TOUCH));
static RENEW_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RENEW));
static REVOKED_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REVOKED));
static MARK_GREETED_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(MARK_GREETED));
static BACK_ONLINE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(BACK_ONLINE));
static DISCONNECT_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(DISCONNECT));

/// Registers a connection and its lease; the user's first live connection
/// adds them to the online set and publishes the `online` envelope in the
/// same step, so presence transitions reach the bus in the order they
/// happened. ARGV[14], ARGV[19] and ARGV[20] are the token's `exp` (s),
/// `jti` and `iat` (s), each possibly empty.
///
/// When the user then holds more than ARGV[15] live connections (0: no
/// cap), their least recently active ones (lowest lease) go, in the same
/// step, so the cap holds however many handshakes race: each is removed
/// with its subscriptions (its record `ARGV[16] .. id`, its room set
/// `ARGV[21] .. id .. ARGV[22]`, each room's subscriptions
/// `ARGV[17] .. room .. ARGV[23]`: patterns of [`super::keys`]) and a
/// `Control::Close` envelope from origin ARGV[18] asks the relay to close
/// it at the gateway. Returns {added, evicted ids}.
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
      local rooms = ARGV[21] .. c .. ARGV[22]
      local endpoint = redis.call('HGET', ck, 'endpoint')
      for _, room in ipairs(redis.call('SMEMBERS', rooms)) do
        redis.call('HDEL', ARGV[17] .. room .. ARGV[23], c)
      end
      redis.call('DEL', ck, rooms)
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
/// out, as a frame would. f[13] is '1' when the token was revoked (the
/// user's `ARGV[7] .. userId`, the token's `ARGV[8] .. jti`). The user's
/// lease set is `ARGV[3] .. userId`. Patterns of [`super::keys`].
const TOUCH: &str = concat!(
    crate::gcra::gcra_lua!(),
    r"
local f = redis.call('HMGET', KEYS[1], 'userId', 'username', 'displayName', 'avatar', 'admin',
  'endpoint', 'connectedAt', 'greeted', 'exp', 'jti', 'iat')
if not f[1] then return false end
local exp, jti, iat = f[9], f[10], f[11]
local revoked = '0'
if jti and redis.call('EXISTS', ARGV[8] .. jti) == 1 then revoked = '1' end
local since = redis.call('GET', ARGV[7] .. f[1])
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

/// Whether a token is revoked: its user's revocation KEYS[1], its `jti`'s
/// KEYS[2] (absent when it has none), its `iat` ARGV[1] (possibly empty).
/// The same rule as in TOUCH.
const REVOKED: &str = r"
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
local since = redis.call('GET', KEYS[1])
if since and (ARGV[1] == '' or not tonumber(since) or tonumber(ARGV[1]) <= tonumber(since)) then
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
        let (conn_rooms, room_conns) = (
            self.keys.conn_rooms_pattern(),
            self.keys.room_conns_pattern(),
        );
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
            .arg(self.keys.conn_pattern().head)
            .arg(&room_conns.head)
            .arg(origin)
            .arg(limits.jti.as_deref().unwrap_or(""))
            .arg(limits.issued_at.map(|i| i.to_string()).unwrap_or_default())
            .arg(&conn_rooms.head)
            .arg(conn_rooms.tail)
            .arg(room_conns.tail)
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
        let mut invocation = REVOKED_SCRIPT.key(self.keys.revoked_user(user_id.as_str()));
        if let Some(jti) = jti.filter(|j| !j.is_empty()) {
            invocation.key(self.keys.revoked_jti(jti));
        }
        let revoked: i64 = invocation
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
        let (interval, burst) = match rate.map(crate::gcra::bucket_args) {
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
            .arg(self.keys.user_conns_pattern().head)
            .arg(interval)
            .arg(burst)
            .arg(token_grace.as_millis() as i64)
            .arg(self.keys.revoked_user_pattern().head)
            .arg(self.keys.revoked_jti_pattern().head)
            .invoke_async(&mut redis)
            .await?;
        let Some(mut f) = fields else {
            return Ok(None);
        };
        f.resize(13, None);
        let expires_at = f[11].as_deref().and_then(|v| v.parse().ok());
        let revoked = f[12].as_deref() == Some("1");
        let rate_limited = crate::gcra::parse_wait(f[9].as_deref());
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
        let room_conns = self.keys.room_conns_pattern();
        let mut redis = CountedRedis(self.redis.clone());
        let (user, went_offline): (String, i64) = DISCONNECT_SCRIPT
            .key(self.keys.conn(connection_id))
            .key(self.keys.conn_rooms(connection_id))
            .key(self.keys.leases())
            .key(self.keys.online())
            .arg(connection_id)
            .arg(now_ms())
            .arg(self.keys.user_conns_pattern().head)
            .arg(&room_conns.head)
            .arg(room_conns.tail)
            .arg(channel)
            .arg(offline_envelope.unwrap_or(""))
            .arg(expected_user.map(UserId::as_str).unwrap_or(""))
            .invoke_async(&mut redis)
            .await?;
        Ok((!user.is_empty()).then(|| (UserId::from_trusted(user), went_offline == 1)))
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
                    pending: false,
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
}
