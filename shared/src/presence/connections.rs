//! Connections: registration (with the per-user cap), lease renewal on
//! every frame, token renewal and revocation, greetings, removal, and the
//! routes the relay posts to.
//!
//! Each operation is a step in the connection's slot (`conn:{c}`) and a
//! step in its user's partition (`presence:{p}:…`), in that order; the
//! user's online transition and its envelope are decided and published in
//! the partition step, atomically, so presence transitions reach the bus
//! in the order they happened (see `docs/ARCHITECTURE.md`, "Redis
//! Cluster", for why each split is safe).

use std::sync::LazyLock;

use super::{
    CONNECTION_RECORD_TTL_SECS, Connection, Presence, SessionLimits, Subscriber, Touched, eval_cmd,
    non_empty, now_ms,
};
use crate::domain::UserId;
use crate::error::Result;
use crate::metrics::CountedRedis;
use crate::presence::keys::{Keys, PARTITIONS};

// Built once: `Script::new` hashes the source.
static REGISTER_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REGISTER));
static USER_CONNECT_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(USER_CONNECT));
static TOUCH_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TOUCH));
static RENEW_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RENEW));
static MARK_GREETED_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(MARK_GREETED));
static BACK_ONLINE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(BACK_ONLINE));
static DROP_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(DROP));
static USER_DISCONNECT_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(USER_DISCONNECT));

/// The connection's step of a registration: its record KEYS[1] (ARGV:
/// userId, username, displayName, avatar, admin, endpoint, connectedAt,
/// record TTL s, and the token's `exp`, `jti`, `iat`, each possibly
/// empty).
const REGISTER: &str = r"
redis.call('HSET', KEYS[1], 'userId', ARGV[1], 'username', ARGV[2], 'displayName', ARGV[3],
  'avatar', ARGV[4], 'admin', ARGV[5], 'endpoint', ARGV[6], 'connectedAt', ARGV[7])
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'exp', ARGV[9]) end
if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'jti', ARGV[10]) end
if ARGV[11] ~= '' then redis.call('HSET', KEYS[1], 'iat', ARGV[11]) end
redis.call('EXPIRE', KEYS[1], ARGV[8])
return 1
";

/// The user's step of a registration, in their partition: the lease of
/// connection ARGV[1] (ARGV[2], ms) in the user's set KEYS[1] (expired
/// entries before ARGV[3] dropped; TTL ARGV[4] s) and the partition's lease
/// index KEYS[2]. When the user then holds more than ARGV[5] live
/// connections (0: no cap), their least recently active ones (lowest
/// lease) leave both sets in the same step, so the cap holds however many
/// handshakes race; the caller removes their records and closes them.
/// Last, the user joins the online set KEYS[3] (ARGV[6]); when they were
/// not in it, the `online` envelope ARGV[9] (if not empty) is published
/// with command ARGV[7] on the partition's channel ARGV[8].
/// Returns {added, evicted ids}.
const USER_CONNECT: &str = r"
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
local evicted = {}
local cap = tonumber(ARGV[5]) or 0
local over = redis.call('ZCARD', KEYS[1]) - cap
if cap > 0 and over > 0 then
  for _, c in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if over <= 0 then break end
    if c ~= ARGV[1] then
      redis.call('ZREM', KEYS[1], c)
      redis.call('ZREM', KEYS[2], c)
      evicted[#evicted + 1] = c
      over = over - 1
    end
  end
end
local added = redis.call('SADD', KEYS[3], ARGV[6])
if added == 1 and ARGV[9] ~= '' then redis.call(ARGV[7], ARGV[8], ARGV[9]) end
return {added, evicted}
";

/// The connection's step of a frame: reads who it is and, when ARGV[1]
/// (the GCRA interval, µs) is not empty, charges the frame to the
/// connection's rate bucket KEYS[2] (burst ARGV[2]). f[12] is 0, or the µs
/// to wait when the frame is over the rate. Nil for an unknown connection.
const TOUCH: &str = concat!(
    crate::gcra::gcra_lua!(),
    r"
local f = redis.call('HMGET', KEYS[1], 'userId', 'username', 'displayName', 'avatar', 'admin',
  'endpoint', 'connectedAt', 'greeted', 'exp', 'jti', 'iat')
if not f[1] then return false end
f[12] = '0'
if ARGV[1] ~= '' then f[12] = string.format('%.0f', gcra({{KEYS[2], ARGV[1], ARGV[2]}})) end
return f
"
);

/// The user's step of a frame, in their partition: renews connection
/// ARGV[1]'s lease (ARGV[2] ms, never past the token's `exp` ARGV[3] s plus
/// the grace ARGV[4] ms) in the user's set KEYS[1] and the lease index
/// KEYS[2]; answers whether the user is in the online set KEYS[3]
/// (ARGV[5]).
pub(super) const TOUCH_USER: &str = r"
local lease = tonumber(ARGV[2])
local exp = tonumber(ARGV[3])
if exp then lease = math.min(lease, exp * 1000 + tonumber(ARGV[4])) end
lease = string.format('%.0f', lease)
redis.call('ZADD', KEYS[1], lease, ARGV[1])
redis.call('ZADD', KEYS[2], lease, ARGV[1])
return redis.call('SISMEMBER', KEYS[3], ARGV[5])
";

/// The largest delivery lag a relay reported in the last second (KEYS[1]:
/// the relays' lags, `lagMs|atMs` by Redis's clock, the one the reports
/// use: both are in the `{relay}` slot).
pub(super) const MAX_LAG: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lag = 0
local lags = redis.call('HGETALL', KEYS[1])
for i = 1, #lags, 2 do
  local v = lags[i + 1]
  local sep = string.find(v, '|', 1, true)
  if sep then
    local l = tonumber(string.sub(v, 1, sep - 1))
    local at = tonumber(string.sub(v, sep + 1))
    if l and at and now - at < 1000 and l > lag then lag = l end
  end
end
return lag
";

/// The connection's step of a token renewal: its expiry ARGV[1], profile
/// (ARGV[2..5]), `jti` ARGV[6] and `iat` ARGV[7]. Returns 0 for a
/// connection that is gone.
const RENEW: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'exp', ARGV[1], 'username', ARGV[2], 'displayName', ARGV[3],
  'avatar', ARGV[4], 'admin', ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'jti', ARGV[6]) else redis.call('HDEL', KEYS[1], 'jti') end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'iat', ARGV[7]) else redis.call('HDEL', KEYS[1], 'iat') end
return 1
";

/// Records that a connection's `connected` event was delivered.
const MARK_GREETED: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'greeted', '1') end
return 0
";

/// Marks a user (ARGV[1]) online again in their partition's set KEYS[1]
/// (a frame after their leases ran out), publishing ARGV[4] with command
/// ARGV[2] on the partition's channel ARGV[3] when they were not there.
const BACK_ONLINE: &str = r"
local added = redis.call('SADD', KEYS[1], ARGV[1])
if added == 1 and ARGV[4] ~= '' then redis.call(ARGV[2], ARGV[3], ARGV[4]) end
return added
";

/// The connection's step of a removal: deletes its record KEYS[1] and
/// room set KEYS[2] and returns {userId or '', endpoint or '', rooms...}.
const DROP: &str = r"
local f = redis.call('HMGET', KEYS[1], 'userId', 'endpoint')
local out = {f[1] or '', f[2] or ''}
for _, room in ipairs(redis.call('SMEMBERS', KEYS[2])) do out[#out + 1] = room end
redis.call('DEL', KEYS[1], KEYS[2])
return out
";

/// The user's step of a removal, in their partition: connection ARGV[1]
/// leaves the user's set KEYS[1] (expired entries before ARGV[2] too) and
/// the lease index KEYS[2]. When no live connection is left and ARGV[7] is
/// `1` (the record named the user ARGV[3] the `offline` envelope ARGV[6]
/// was built for), they leave the online set KEYS[3] and the envelope is
/// published with command ARGV[4] on the partition's channel ARGV[5].
/// Returns 1 when they went offline.
const USER_DISCONNECT: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) > 0 or ARGV[7] ~= '1' then return 0 end
local removed = redis.call('SREM', KEYS[3], ARGV[3])
if removed == 1 and ARGV[6] ~= '' then redis.call(ARGV[4], ARGV[5], ARGV[6]) end
return removed
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
    /// enforcing the per-user cap of `limits`. Returns whether the user
    /// came online, and the connections closed to make room (a
    /// `Control::Close` from `origin` was published for each).
    ///
    /// Two steps: the record (its slot), then the lease, the cap and the
    /// online transition (the user's partition). A failure between them
    /// leaves a record without a lease: the handshake fails, API Gateway
    /// never opens the socket, and the record expires with its TTL.
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
        let user = conn.user.id.as_str();
        let mut redis = CountedRedis(self.redis.clone());
        let _: i64 = REGISTER_SCRIPT
            .key(self.keys.conn(&conn.connection_id))
            .arg(user)
            .arg(&conn.user.username)
            .arg(conn.user.display_name.as_deref().unwrap_or(""))
            .arg(conn.user.avatar.as_deref().unwrap_or(""))
            .arg(if conn.user.is_admin { "1" } else { "0" })
            .arg(&conn.endpoint)
            .arg(conn.connected_at_ms)
            .arg(CONNECTION_RECORD_TTL_SECS)
            .arg(limits.expires_at.map(|e| e.to_string()).unwrap_or_default())
            .arg(limits.jti.as_deref().unwrap_or(""))
            .arg(limits.issued_at.map(|i| i.to_string()).unwrap_or_default())
            .invoke_async(&mut redis)
            .await?;
        let (added, evicted): (i64, Vec<String>) = USER_CONNECT_SCRIPT
            .key(self.keys.user_conns(user))
            .key(self.keys.leases_of(user))
            .key(self.keys.online_of(user))
            .arg(&conn.connection_id)
            .arg(limits.lease(now, ttl))
            .arg(now)
            .arg(CONNECTION_RECORD_TTL_SECS)
            .arg(limits.max_per_user.unwrap_or(0))
            .arg(user)
            .arg(self.redis.publish_command())
            .arg(Keys::bus_channel_of(channel, user))
            .arg(online_envelope.unwrap_or(""))
            .invoke_async(&mut redis)
            .await?;
        for evictee in &evicted {
            // Out of the user's sets already: remove its record and
            // subscriptions, then ask the relay to close it.
            let (_, endpoint) = self.drop_connection(evictee).await?;
            if let Some(endpoint) = endpoint {
                let close = serde_json::json!({
                    "origin": origin,
                    "target": {"type": "connection", "connectionId": evictee},
                    "control": {"type": "close", "connectionId": evictee, "endpoint": endpoint},
                });
                let _: i64 = redis::cmd(self.redis.publish_command())
                    .arg(Keys::bus_channel_of(channel, evictee))
                    .arg(close.to_string())
                    .query_async(&mut redis)
                    .await?;
            }
        }
        Ok((added == 1, evicted))
    }

    /// Removes a connection's record and room set, then its subscriptions
    /// (each room's slot). Returns the user and endpoint its record named.
    async fn drop_connection(
        &self,
        connection_id: &str,
    ) -> Result<(Option<String>, Option<String>)> {
        let mut redis = CountedRedis(self.redis.clone());
        let dropped: Vec<String> = DROP_SCRIPT
            .key(self.keys.conn(connection_id))
            .key(self.keys.conn_rooms(connection_id))
            .invoke_async(&mut redis)
            .await?;
        let mut dropped = dropped.into_iter();
        let user = dropped.next().filter(|u| !u.is_empty());
        let endpoint = dropped.next().filter(|e| !e.is_empty());
        let unsubscribe: Vec<(String, redis::Cmd)> = dropped
            .map(|room| {
                let key = self.keys.room_conns(&room);
                let mut cmd = redis::cmd("HDEL");
                cmd.arg(&key).arg(connection_id);
                (key, cmd)
            })
            .collect();
        self.redis.query_grouped(unsubscribe).await?;
        Ok((user, endpoint))
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
            .arg(limits.expires_at.map(|e| e.to_string()).unwrap_or_default())
            .arg(&conn.user.username)
            .arg(conn.user.display_name.as_deref().unwrap_or(""))
            .arg(conn.user.avatar.as_deref().unwrap_or(""))
            .arg(if conn.user.is_admin { "1" } else { "0" })
            .arg(limits.jti.as_deref().unwrap_or(""))
            .arg(limits.issued_at.map(|i| i.to_string()).unwrap_or_default())
            .invoke_async(&mut redis)
            .await?;
        if renewed != 1 {
            return Ok(false);
        }
        // The lease, in the user's partition (idempotent: a retry or a
        // concurrent frame only sets a later lease).
        let user = conn.user.id.as_str();
        let lease = limits.lease(now_ms(), ttl);
        let _: () = redis::pipe()
            .atomic()
            .zadd(self.keys.user_conns(user), &conn.connection_id, lease)
            .ignore()
            .zadd(self.keys.leases_of(user), &conn.connection_id, lease)
            .ignore()
            .query_async(&mut redis)
            .await?;
        Ok(true)
    }

    /// Whether a token of `user_id` with this `jti` and `iat` was revoked
    /// (see the module docs): one round trip (two keys of two slots, read
    /// concurrently on a cluster), at a handshake or a REST call; open
    /// connections check in their lease renewal.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn is_revoked(
        &self,
        user_id: &UserId,
        jti: Option<&str>,
        issued_at: Option<i64>,
    ) -> Result<bool> {
        let user_key = self.keys.revoked_user(user_id.as_str());
        let mut commands = vec![(user_key.clone(), {
            let mut cmd = redis::cmd("GET");
            cmd.arg(&user_key);
            cmd
        })];
        if let Some(jti) = jti.filter(|j| !j.is_empty()) {
            let key = self.keys.revoked_jti(jti);
            let mut cmd = redis::cmd("EXISTS");
            cmd.arg(&key);
            commands.push((key, cmd));
        }
        let answers = self.redis.query_grouped(commands).await?;
        let since: Option<String> = redis::from_redis_value(answers[0].clone())?;
        let by_jti: bool = match answers.get(1) {
            Some(v) => redis::from_redis_value(v.clone())?,
            None => false,
        };
        Ok(by_jti || covers(since.as_deref(), issued_at))
    }

    /// Renews a connection's lease (any frame does) and returns the
    /// connection; `None` when it is unknown (closed, or swept). With a
    /// `rate`, the frame is also charged to the connection's message-rate
    /// bucket in the same step ([`Touched::rate_limited`]).
    ///
    /// Two steps: the connection's (who it is, its rate), then, at once,
    /// its user's partition (lease, online), the user's and the token's
    /// revocations and, when this process's reading is older than
    /// [`super::online::LAG_READ_EVERY`], the relays' lags: two round trips
    /// on a single Redis, the second spread over up to four slots on a
    /// cluster.
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
            .key(self.keys.rate_conn(connection_id))
            .arg(interval)
            .arg(burst)
            .invoke_async(&mut redis)
            .await?;
        let Some(mut f) = fields else {
            return Ok(None);
        };
        f.resize(12, None);
        let Some(user_id) = f[0].take() else {
            return Ok(None);
        };
        let (exp, jti, iat) = (f[8].take(), f[9].take(), f[10].take());
        let rate_limited = crate::gcra::parse_wait(f[11].as_deref());
        let user_conns = self.keys.user_conns(&user_id);
        let mut user_step = eval_cmd(
            TOUCH_USER,
            &[
                &user_conns,
                &self.keys.leases_of(&user_id),
                &self.keys.online_of(&user_id),
            ],
        );
        user_step
            .arg(connection_id)
            .arg(now_ms() + ttl.as_millis() as i64)
            .arg(exp.as_deref().unwrap_or(""))
            .arg(token_grace.as_millis() as i64)
            .arg(&user_id);
        let revoked_user = self.keys.revoked_user(&user_id);
        let mut revoked_since = redis::cmd("GET");
        revoked_since.arg(&revoked_user);
        let mut commands = vec![(user_conns, user_step), (revoked_user, revoked_since)];
        let has_jti = match jti.filter(|j| !j.is_empty()) {
            Some(jti) => {
                let key = self.keys.revoked_jti(&jti);
                let mut cmd = redis::cmd("EXISTS");
                cmd.arg(&key);
                commands.push((key, cmd));
                true
            }
            None => false,
        };
        let lag_seen = self.lag_seen.fresh();
        if lag_seen.is_none() {
            let lags = self.keys.relay_lags();
            commands.push((lags.clone(), eval_cmd(MAX_LAG, &[&lags])));
        }
        let answers = self.redis.query_grouped(commands).await?;
        let mut answers = answers.into_iter();
        let mut next = || answers.next().unwrap_or(redis::Value::Nil);
        let online: i64 = redis::from_redis_value(next())?;
        let since: Option<String> = redis::from_redis_value(next())?;
        let revoked_by_user = covers(
            since.as_deref(),
            iat.as_deref().and_then(|v| v.parse().ok()),
        );
        let revoked_by_jti: bool = if has_jti {
            redis::from_redis_value(next())?
        } else {
            false
        };
        let delivery_lag_ms = match lag_seen {
            Some(lag) => lag,
            None => {
                let lag: u64 = redis::from_redis_value(next())?;
                self.lag_seen.read(lag);
                lag
            }
        };
        let mut take = |i: usize| f[i].take();
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
            was_online: online == 1,
            rate_limited,
            delivery_lag_ms,
            expires_at: exp.and_then(|v| v.parse().ok()),
            revoked: revoked_by_user || revoked_by_jti,
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
            .key(self.keys.online_of(user_id.as_str()))
            .arg(user_id.as_str())
            .arg(self.redis.publish_command())
            .arg(Keys::bus_channel_of(channel, user_id.as_str()))
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
    /// Three steps, each safe to repeat: the record and room set go first
    /// (so no new subscription or renewal finds the connection), then its
    /// subscriptions, then its leases and the offline transition in the
    /// user's partition. A connection whose record is gone and whose user
    /// is not given has its lease looked for in every partition (a
    /// leftover of a failure between the steps).
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
        let (recorded, _) = self.drop_connection(connection_id).await?;
        let Some(user) = recorded
            .clone()
            .or_else(|| expected_user.map(|u| u.to_string()))
        else {
            self.drop_lease(connection_id).await?;
            return Ok(None);
        };
        let may_go_offline =
            recorded.is_some() && expected_user.is_some_and(|expected| expected.as_str() == user);
        let mut redis = CountedRedis(self.redis.clone());
        let went_offline: i64 = USER_DISCONNECT_SCRIPT
            .key(self.keys.user_conns(&user))
            .key(self.keys.leases_of(&user))
            .key(self.keys.online_of(&user))
            .arg(connection_id)
            .arg(now_ms())
            .arg(&user)
            .arg(self.redis.publish_command())
            .arg(Keys::bus_channel_of(channel, &user))
            .arg(offline_envelope.unwrap_or(""))
            .arg(if may_go_offline { "1" } else { "0" })
            .invoke_async(&mut redis)
            .await?;
        Ok(recorded.map(|u| (UserId::from_trusted(u), went_offline == 1)))
    }

    /// Removes a connection from every partition's lease index (its user
    /// is unknown).
    async fn drop_lease(&self, connection_id: &str) -> Result<()> {
        let commands = (0..PARTITIONS)
            .map(|p| {
                let key = self.keys.leases(p);
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(&key).arg(connection_id);
                (key, cmd)
            })
            .collect();
        self.redis.query_grouped(commands).await?;
        Ok(())
    }

    /// Each connection's user, endpoint and connect time, or `None` for a
    /// connection that is gone (one round trip on a single Redis; one per
    /// connection, concurrently, on a cluster).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn connection_routes(
        &self,
        connection_ids: &[String],
    ) -> Result<Vec<Option<Subscriber>>> {
        let commands = connection_ids
            .iter()
            .map(|conn| {
                let key = self.keys.conn(conn);
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(&key)
                    .arg("userId")
                    .arg("connectedAt")
                    .arg("endpoint");
                (key, cmd)
            })
            .collect();
        let rows = self.redis.query_grouped(commands).await?;
        connection_ids
            .iter()
            .zip(rows)
            .map(|(conn, row)| {
                let row: (Option<String>, Option<String>, Option<String>) =
                    redis::from_redis_value(row)?;
                Ok(match row {
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
            })
            .collect()
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

    /// Up to `limit` connections whose lease ran out before `now_ms`, from
    /// every partition's lease index (read together: one round trip on a
    /// single Redis, one per partition, concurrently, on a cluster).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn expired_connections(&self, now_ms: i64, limit: usize) -> Result<Vec<String>> {
        let commands = (0..PARTITIONS)
            .map(|p| {
                let key = self.keys.leases(p);
                let mut cmd = redis::cmd("ZRANGEBYSCORE");
                cmd.arg(&key)
                    .arg("-inf")
                    .arg(now_ms)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit);
                (key, cmd)
            })
            .collect();
        let mut conns = Vec::new();
        for batch in self.redis.query_grouped(commands).await? {
            let batch: Vec<String> = redis::from_redis_value(batch)?;
            conns.extend(batch);
        }
        conns.truncate(limit);
        Ok(conns)
    }
}

/// Whether a user's revocation time `since` covers a token issued at
/// `issued_at` (s): every token issued at or before it, and every token
/// without `iat` (or when `since` is not a number).
fn covers(since: Option<&str>, issued_at: Option<i64>) -> bool {
    let Some(since) = since else {
        return false;
    };
    match (since.parse::<i64>(), issued_at) {
        (Ok(since), Some(iat)) => iat <= since,
        _ => true,
    }
}
