//! The Redis key schema: every key the backend reads or writes, each name
//! built here and nowhere else. The Lua scripts get their keys in `KEYS[]`
//! where the key is known before the call; where a script finds the key
//! from what it reads (a user's lease set from the user id in a connection
//! record, the rooms a connection joined) it gets the key's head and tail
//! from here ([`KeyPattern`]) and joins them around the id.
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
//! | `conn:{connectionId}:order` | hash | `turn`, `until`, `since`, `min`: the turn of the connection's frames that carry `seq` (`realtime`'s `ordering` module); expires 2 h 10 min after its last change |
//! | `room:{roomId}:conns` | hash | connection id → `watermark\|userId\|connectedAt\|endpoint`: what the relay fans out to in one read |
//! | `room:{roomId}:seq` | string, 1 h TTL | the highest sequence id published for the room: what a join checks for a fan-out it missed |
//! | `relay:lease:{n}` | string, with a TTL | the relay id that holds lease shard `n` (`SET NX PX`, renewed by compare-and-`PEXPIRE`; the relay crate's `cluster` module) |
//! | `relay:members` | sorted set | live relay ids, scored by their last heartbeat (ms, Redis clock): what a relay's fair share is computed from |
//! | `relay:lags` | hash | relay instance → `lagMs\|atMs`: each relay's delivery lag, reported every 100 ms; read by every frame's lease renewal for load shedding |
//! | `rl:conn:{connectionId}` | string | the connection's message-rate bucket (GCRA arrival time, µs); expires when full (`limits`) |
//! | `rl:user:{userId}:send` | string | the user's REST send-rate bucket, likewise |
//! | `rl:user:{userId}:rest` | string | the user's REST request-rate bucket, likewise |
//! | `typing:{roomId}:{userId}` | string | `1` / `0`: the last `isTyping` fanned out, for 2 s (coalescing) |
//! | `revoked:user:{userId}` | string | a time (s since the epoch): every token of the user issued at or before it (`iat`; a token without `iat` whatever its age) is refused, and their connections are closed at their next frame. Written by the operator, with a TTL of the longest token lifetime |
//! | `revoked:jti:{jti}` | string | present: the token with that `jti` is refused, likewise. Written by the operator, expiring with the token |
//!
//! The keys scripts build from what they read, so not in `KEYS[]`:
//! `presence:user:{userId}`, `conn:{connectionId}` and
//! `conn:{connectionId}:rooms` of other connections, `room:{roomId}:conns`
//! of a connection's rooms, and `revoked:*` of the token a record names.
//! They assume a single Redis shard: ElastiCache with cluster mode
//! disabled, as `template.yaml` creates.

// Every key name's pieces, once. The builders below join them.
const ONLINE: &str = "presence:online";
const USER_CONNS: &str = "presence:user:";
const LEASES: &str = "presence:leases";
const CONN: &str = "conn:";
const CONN_ROOMS_TAIL: &str = ":rooms";
const CONN_ORDER_TAIL: &str = ":order";
const ROOM: &str = "room:";
const ROOM_CONNS_TAIL: &str = ":conns";
const ROOM_SEQ_TAIL: &str = ":seq";
const RELAY_LAGS: &str = "relay:lags";
const RELAY_LEASE: &str = "relay:lease:";
const RELAY_MEMBERS: &str = "relay:members";
const RATE_CONN: &str = "rl:conn:";
const RATE_USER: &str = "rl:user:";
const RATE_SEND_TAIL: &str = ":send";
const RATE_REST_TAIL: &str = ":rest";
const TYPING: &str = "typing:";
const REVOKED_USER: &str = "revoked:user:";
const REVOKED_JTI: &str = "revoked:jti:";

/// A family of keys `{head}{id}{tail}` whose id a Lua script reads
/// itself (so the key cannot be declared in `KEYS[]`): the script gets
/// `head` and `tail` as arguments and joins them around the id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPattern {
    /// Everything before the id, the deployment's prefix included.
    pub head: String,
    /// Everything after it (often empty).
    pub tail: &'static str,
}

impl KeyPattern {
    /// The key of `id`.
    pub fn key(&self, id: &str) -> String {
        format!("{}{id}{}", self.head, self.tail)
    }
}

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

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn pattern(&self, head: &str, tail: &'static str) -> KeyPattern {
        KeyPattern {
            head: format!("{}{head}", self.prefix),
            tail,
        }
    }

    /// The set of online users.
    pub fn online(&self) -> String {
        format!("{}{ONLINE}", self.prefix)
    }

    /// A user's connections, scored by lease expiry.
    pub fn user_conns(&self, user_id: &str) -> String {
        format!("{}{USER_CONNS}{user_id}", self.prefix)
    }

    /// [`Keys::user_conns`] of a user a script reads from a record.
    pub fn user_conns_pattern(&self) -> KeyPattern {
        self.pattern(USER_CONNS, "")
    }

    /// Every connection, scored by lease expiry.
    pub fn leases(&self) -> String {
        format!("{}{LEASES}", self.prefix)
    }

    /// A connection's record.
    pub fn conn(&self, connection_id: &str) -> String {
        format!("{}{CONN}{connection_id}", self.prefix)
    }

    /// [`Keys::conn`] of a connection a script finds.
    pub fn conn_pattern(&self) -> KeyPattern {
        self.pattern(CONN, "")
    }

    /// The rooms a connection has joined.
    pub fn conn_rooms(&self, connection_id: &str) -> String {
        format!("{}{CONN}{connection_id}{CONN_ROOMS_TAIL}", self.prefix)
    }

    /// [`Keys::conn_rooms`] of a connection a script finds.
    pub fn conn_rooms_pattern(&self) -> KeyPattern {
        self.pattern(CONN, CONN_ROOMS_TAIL)
    }

    /// The turn of a connection's sequenced frames (issue 16; the
    /// `ordering` module of `realtime`).
    pub fn conn_order(&self, connection_id: &str) -> String {
        format!("{}{CONN}{connection_id}{CONN_ORDER_TAIL}", self.prefix)
    }

    /// The connections joined to a room.
    pub fn room_conns(&self, room_id: &str) -> String {
        format!("{}{ROOM}{room_id}{ROOM_CONNS_TAIL}", self.prefix)
    }

    /// [`Keys::room_conns`] of a room a script finds (or a scan matches).
    pub fn room_conns_pattern(&self) -> KeyPattern {
        self.pattern(ROOM, ROOM_CONNS_TAIL)
    }

    /// The highest sequence id published for a room (see
    /// [`crate::presence::Presence::join`]); expires an hour after the last
    /// publish.
    pub fn room_seq(&self, room_id: &str) -> String {
        format!("{}{ROOM}{room_id}{ROOM_SEQ_TAIL}", self.prefix)
    }

    /// Each relay's recent delivery lag (load shedding).
    pub fn relay_lags(&self) -> String {
        format!("{}{RELAY_LAGS}", self.prefix)
    }

    /// A connection's message-rate bucket (`limits`).
    pub fn rate_conn(&self, connection_id: &str) -> String {
        format!("{}{RATE_CONN}{connection_id}", self.prefix)
    }

    /// A user's REST send-rate bucket (`limits`).
    pub fn rate_user_send(&self, user_id: &str) -> String {
        format!("{}{RATE_USER}{user_id}{RATE_SEND_TAIL}", self.prefix)
    }

    /// A user's REST request-rate bucket (`limits`).
    pub fn rate_user_rest(&self, user_id: &str) -> String {
        format!("{}{RATE_USER}{user_id}{RATE_REST_TAIL}", self.prefix)
    }

    /// The last `typing` state of a user in a room that went out
    /// (`limits`).
    pub fn typing(&self, room_id: &str, user_id: &str) -> String {
        format!("{}{TYPING}{room_id}:{user_id}", self.prefix)
    }

    /// The lease of relay lease shard `shard`: the owning relay's id.
    pub fn relay_lease(&self, shard: usize) -> String {
        format!("{}{RELAY_LEASE}{shard}", self.prefix)
    }

    /// The live relays, scored by heartbeat.
    pub fn relay_members(&self) -> String {
        format!("{}{RELAY_MEMBERS}", self.prefix)
    }

    /// The revocation of every token of a user issued up to a time.
    pub fn revoked_user(&self, user_id: &str) -> String {
        format!("{}{REVOKED_USER}{user_id}", self.prefix)
    }

    /// [`Keys::revoked_user`] of a user a script reads from a record.
    pub fn revoked_user_pattern(&self) -> KeyPattern {
        self.pattern(REVOKED_USER, "")
    }

    /// The revocation of the token with this `jti`.
    pub fn revoked_jti(&self, jti: &str) -> String {
        format!("{}{REVOKED_JTI}{jti}", self.prefix)
    }

    /// [`Keys::revoked_jti`] of a token a script reads from a record.
    pub fn revoked_jti_pattern(&self) -> KeyPattern {
        self.pattern(REVOKED_JTI, "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_build_the_same_keys_as_the_builders() {
        let keys = Keys::new("p:");
        assert_eq!(keys.conn_pattern().key("c1"), keys.conn("c1"));
        assert_eq!(keys.conn_rooms_pattern().key("c1"), keys.conn_rooms("c1"));
        assert_eq!(keys.room_conns_pattern().key("r1"), keys.room_conns("r1"));
        assert_eq!(keys.user_conns_pattern().key("u1"), keys.user_conns("u1"));
        assert_eq!(
            keys.revoked_user_pattern().key("u1"),
            keys.revoked_user("u1")
        );
        assert_eq!(keys.revoked_jti_pattern().key("j1"), keys.revoked_jti("j1"));
    }

    #[test]
    fn keys_are_the_documented_names_under_the_prefix() {
        let keys = Keys::new("p:");
        for (key, want) in [
            (keys.online(), "p:presence:online"),
            (keys.user_conns("u1"), "p:presence:user:u1"),
            (keys.leases(), "p:presence:leases"),
            (keys.conn("c1"), "p:conn:c1"),
            (keys.conn_rooms("c1"), "p:conn:c1:rooms"),
            (keys.conn_order("c1"), "p:conn:c1:order"),
            (keys.room_conns("r1"), "p:room:r1:conns"),
            (keys.room_seq("r1"), "p:room:r1:seq"),
            (keys.relay_lags(), "p:relay:lags"),
            (keys.rate_conn("c1"), "p:rl:conn:c1"),
            (keys.rate_user_send("u1"), "p:rl:user:u1:send"),
            (keys.rate_user_rest("u1"), "p:rl:user:u1:rest"),
            (keys.typing("r1", "u1"), "p:typing:r1:u1"),
            (keys.relay_lease(7), "p:relay:lease:7"),
            (keys.relay_members(), "p:relay:members"),
            (keys.revoked_user("u1"), "p:revoked:user:u1"),
            (keys.revoked_jti("j1"), "p:revoked:jti:j1"),
        ] {
            assert_eq!(key, want);
        }
    }
}
