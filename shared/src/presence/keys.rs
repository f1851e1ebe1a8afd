//! The Redis key schema: every key the backend reads or writes, each name
//! built here and nowhere else, laid out for Redis Cluster.
//!
//! Every key starts with the configured prefix (`REDIS_KEY_PREFIX`, which
//! may not contain `{` or `}`), so a deployment or a test can share a Redis
//! database with others.
//!
//! # Hash tags
//!
//! Redis Cluster hashes only the part of a key between the first `{` and
//! the next `}` (the *hash tag*), so keys with the same tag live in the
//! same slot, and one script or `MULTI` may touch them together. Every key
//! has a tag, chosen by what is read and written together:
//!
//! - `{<connectionId>}`: a connection's record, its room set, its frame
//!   order and its rate bucket (what one frame reads and writes first);
//! - `{p<n>}`, a **partition** (one of [`PARTITIONS`], by FNV-1a of an id,
//!   [`partition_of`]): a user's lease set, the partition's online set,
//!   lease index; a room's subscribers, its
//!   highest published sequence id and its typing flags; and the bus
//!   channel of the partition. So a user's presence transition and its
//!   envelope, or a room's message and its fan-out trigger, are one
//!   script in one slot, published (`SPUBLISH`) in order on the channel of
//!   that slot. 128 partitions spread over any practical number of shards.
//! - `{<userId>}`: a user's REST rate buckets (charged together);
//! - `{<jti>}`, `{<userId>}`: a token's revocation, a user's (keys an
//!   operator writes by hand, so they have no partition to compute);
//! - `{relay}`: the relays' leases, members and lags: one slot, so lease
//!   renewal stays one atomic script (a few calls a second per relay).
//!
//! The same keys run on a single Redis, where the tags mean nothing.
//! Scripts get every key in `KEYS[]`; what a step in another slot needs is
//! done by a separate call (see `docs/ARCHITECTURE.md`, "Redis Cluster").
//!
//! | key | type | holds |
//! |---|---|---|
//! | `conn:{<c>}` | hash | `userId`, `username`, `displayName`, `avatar`, `admin`, `endpoint` (Management API callback URL), `connectedAt` (ms), `greeted` (set once `connected` was delivered), `exp` (the token's expiry, s; absent: none), `jti` and `iat` (the token's, when it has them: revocation) |
//! | `conn:{<c>}:rooms` | set | rooms the connection has joined |
//! | `conn:{<c>}:order` | hash | `turn`, `until`, `since`, `min`: the turn of the connection's frames that carry `seq` (`realtime`'s `ordering` module); expires 2 h 10 min after its last change |
//! | `rl:conn:{<c>}` | string | the connection's message-rate bucket (GCRA arrival time, µs); expires when full (`limits`) |
//! | `presence:{p<n>}:user:<u>` | sorted set | the user's connection ids, scored by lease expiry (ms) |
//! | `presence:{p<n>}:online` | set | the partition's users with at least one live connection |
//! | `presence:{p<n>}:leases` | sorted set | the partition's users' connection ids, scored by lease expiry: what the sweeper scans |
//! | `presence:{p<n>}:rooms` | set | the partition's rooms that have (or recently had) subscribers: the operator console's index |
//! | `revoked:user:{<u>}` | string | a time (s since the epoch): every token of the user issued at or before it (`iat`; a token without `iat` whatever its age) is refused, and their connections are closed at their next frame. Written by the operator, with a TTL of the longest token lifetime |
//! | `room:{p<n>}:<r>:conns` | hash | connection id → `watermark\|userId\|connectedAt\|endpoint`: what the relay fans out to in one read |
//! | `room:{p<n>}:<r>:seq` | string, 1 h TTL | the highest sequence id published for the room: what a join checks for a fan-out it missed |
//! | `typing:{p<n>}:<r>:<u>` | string | `1` / `0`: the last `isTyping` fanned out, for 2 s (coalescing) |
//! | `rl:user:{<u>}:send` | string | the user's REST send-rate bucket, likewise |
//! | `rl:user:{<u>}:rest` | string | the user's REST request-rate bucket, likewise |
//! | `revoked:jti:{<jti>}` | string | present: the token with that `jti` is refused, likewise. Written by the operator, expiring with the token |
//! | `relay:{relay}:lease:<n>` | string, with a TTL | the relay id that holds lease shard `n` (`SET NX PX`, renewed by compare-and-`PEXPIRE`; the relay crate's `cluster` module) |
//! | `relay:{relay}:members` | sorted set | live relay ids, scored by their last heartbeat (ms, Redis clock): what a relay's fair share is computed from |
//! | `relay:{relay}:lags` | hash | relay instance → `lagMs\|atMs`: each relay's delivery lag, reported every 100 ms; read with a frame's lease renewal for load shedding, at most every 100 ms per process |
//!
//! `<c>`, `<u>`, `<r>`, `<jti>` stand for a connection, user, room or
//! token id; `p<n>` for the partition of the user (`presence`) or room (`room`, `typing`) in the key.
//!
//! The bus ([`crate::bus`]) publishes on one channel per partition,
//! `<BROADCAST_CHANNEL>:{p<n>}` ([`Keys::bus_channel`]), by the partition
//! of the envelope's ordering key: the channel is in the slot of the
//! keys its envelopes are decided by.

/// How many partitions (see the module docs): bus channels, online sets,
/// lease indexes. Fixed: every process of a deployment must agree, and
/// changing it moves every partitioned key.
pub const PARTITIONS: usize = 128;

/// FNV-1a of an id: stable across processes and machines.
fn fnv1a(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The partition of an id (a user id, a room id, an envelope's ordering
/// key).
pub fn partition_of(id: &str) -> usize {
    (fnv1a(id) % PARTITIONS as u64) as usize
}

/// The hash tag of a key (what Redis Cluster hashes): the text between the
/// first `{` and the next `}` when it is not empty, else the whole key.
/// Keys with the same tag are in the same slot; used to group commands
/// into single-slot pipelines.
pub fn hash_tag(key: &str) -> &str {
    let Some(open) = key.find('{') else {
        return key;
    };
    match key[open + 1..].find('}') {
        Some(len) if len > 0 => &key[open + 1..open + 1 + len],
        _ => key,
    }
}

/// Builds the key names (see the module docs).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (which must not contain `{` or `}`: the config
    /// checks `REDIS_KEY_PREFIX`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn tagged(&self, family: &str, tag: &str, tail: &str) -> String {
        format!("{}{family}:{{{tag}}}{tail}", self.prefix)
    }

    fn partitioned(&self, family: &str, partition: usize, tail: &str) -> String {
        format!("{}{family}:{{p{partition}}}{tail}", self.prefix)
    }

    /// The online users of a partition.
    pub fn online(&self, partition: usize) -> String {
        self.partitioned("presence", partition, ":online")
    }

    /// The online set that holds `user_id`.
    pub fn online_of(&self, user_id: &str) -> String {
        self.online(partition_of(user_id))
    }

    /// A user's connections, scored by lease expiry.
    pub fn user_conns(&self, user_id: &str) -> String {
        self.partitioned(
            "presence",
            partition_of(user_id),
            &format!(":user:{user_id}"),
        )
    }

    /// The connections of a partition's users, scored by lease expiry.
    pub fn leases(&self, partition: usize) -> String {
        self.partitioned("presence", partition, ":leases")
    }

    /// The lease index that holds `user_id`'s connections.
    pub fn leases_of(&self, user_id: &str) -> String {
        self.leases(partition_of(user_id))
    }

    /// The rooms of a partition that have had subscribers (console index).
    pub fn rooms_index(&self, partition: usize) -> String {
        self.partitioned("presence", partition, ":rooms")
    }

    /// The console index that holds `room_id`.
    pub fn rooms_index_of(&self, room_id: &str) -> String {
        self.rooms_index(partition_of(room_id))
    }

    /// A connection's record.
    pub fn conn(&self, connection_id: &str) -> String {
        self.tagged("conn", connection_id, "")
    }

    /// The rooms a connection has joined.
    pub fn conn_rooms(&self, connection_id: &str) -> String {
        self.tagged("conn", connection_id, ":rooms")
    }

    /// The turn of a connection's sequenced frames (issue 16; the
    /// `ordering` module of `realtime`).
    pub fn conn_order(&self, connection_id: &str) -> String {
        self.tagged("conn", connection_id, ":order")
    }

    /// The connections joined to a room.
    pub fn room_conns(&self, room_id: &str) -> String {
        self.partitioned("room", partition_of(room_id), &format!(":{room_id}:conns"))
    }

    /// The highest sequence id published for a room (see
    /// [`crate::presence::Presence::join`]); expires an hour after the last
    /// publish.
    pub fn room_seq(&self, room_id: &str) -> String {
        self.partitioned("room", partition_of(room_id), &format!(":{room_id}:seq"))
    }

    /// Each relay's recent delivery lag (load shedding).
    pub fn relay_lags(&self) -> String {
        self.tagged("relay", "relay", ":lags")
    }

    /// A connection's message-rate bucket (`limits`).
    pub fn rate_conn(&self, connection_id: &str) -> String {
        self.tagged("rl:conn", connection_id, "")
    }

    /// A user's REST send-rate bucket (`limits`).
    pub fn rate_user_send(&self, user_id: &str) -> String {
        self.tagged("rl:user", user_id, ":send")
    }

    /// A user's REST request-rate bucket (`limits`).
    pub fn rate_user_rest(&self, user_id: &str) -> String {
        self.tagged("rl:user", user_id, ":rest")
    }

    /// The last `typing` state of a user in a room that went out
    /// (`limits`): in the room's partition, with the room's bus channel.
    pub fn typing(&self, room_id: &str, user_id: &str) -> String {
        self.partitioned(
            "typing",
            partition_of(room_id),
            &format!(":{room_id}:{user_id}"),
        )
    }

    /// The lease of relay lease shard `shard`: the owning relay's id.
    pub fn relay_lease(&self, shard: usize) -> String {
        self.tagged("relay", "relay", &format!(":lease:{shard}"))
    }

    /// The live relays, scored by heartbeat.
    pub fn relay_members(&self) -> String {
        self.tagged("relay", "relay", ":members")
    }

    /// The revocation of every token of a user issued up to a time.
    pub fn revoked_user(&self, user_id: &str) -> String {
        self.tagged("revoked:user", user_id, "")
    }

    /// The revocation of the token with this `jti`.
    pub fn revoked_jti(&self, jti: &str) -> String {
        self.tagged("revoked:jti", jti, "")
    }

    /// The bus channel of a partition: `base` (`BROADCAST_CHANNEL`) and
    /// the partition's tag, so it hashes to the slot of the partition's
    /// keys.
    pub fn bus_channel(base: &str, partition: usize) -> String {
        format!("{base}:{{p{partition}}}")
    }

    /// The bus channel of an ordering key (a room, user or connection id).
    pub fn bus_channel_of(base: &str, ordering_key: &str) -> String {
        Self::bus_channel(base, partition_of(ordering_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_documented_names_under_the_prefix() {
        let keys = Keys::new("p:");
        let (u, r) = (partition_of("u1"), partition_of("r1"));
        for (key, want) in [
            (keys.online(3), "p:presence:{p3}:online".to_owned()),
            (
                keys.user_conns("u1"),
                format!("p:presence:{{p{u}}}:user:u1"),
            ),
            (keys.leases(3), "p:presence:{p3}:leases".to_owned()),
            (keys.rooms_index(3), "p:presence:{p3}:rooms".to_owned()),
            (keys.conn("c1"), "p:conn:{c1}".to_owned()),
            (keys.conn_rooms("c1"), "p:conn:{c1}:rooms".to_owned()),
            (keys.conn_order("c1"), "p:conn:{c1}:order".to_owned()),
            (keys.room_conns("r1"), format!("p:room:{{p{r}}}:r1:conns")),
            (keys.room_seq("r1"), format!("p:room:{{p{r}}}:r1:seq")),
            (keys.relay_lags(), "p:relay:{relay}:lags".to_owned()),
            (keys.rate_conn("c1"), "p:rl:conn:{c1}".to_owned()),
            (keys.rate_user_send("u1"), "p:rl:user:{u1}:send".to_owned()),
            (keys.rate_user_rest("u1"), "p:rl:user:{u1}:rest".to_owned()),
            (keys.typing("r1", "u1"), format!("p:typing:{{p{r}}}:r1:u1")),
            (keys.relay_lease(7), "p:relay:{relay}:lease:7".to_owned()),
            (keys.relay_members(), "p:relay:{relay}:members".to_owned()),
            (keys.revoked_user("u1"), "p:revoked:user:{u1}".to_owned()),
            (keys.revoked_jti("j1"), "p:revoked:jti:{j1}".to_owned()),
            (
                Keys::bus_channel("chat:broadcast", 5),
                "chat:broadcast:{p5}".to_owned(),
            ),
        ] {
            assert_eq!(key, want);
        }
    }

    #[test]
    fn what_is_read_together_shares_a_hash_tag() {
        let keys = Keys::new("p:");
        let conn = hash_tag(&keys.conn("c1")).to_owned();
        for key in [
            keys.conn_rooms("c1"),
            keys.conn_order("c1"),
            keys.rate_conn("c1"),
        ] {
            assert_eq!(hash_tag(&key), conn);
        }
        let user = hash_tag(&keys.user_conns("u1")).to_owned();
        for key in [keys.online_of("u1"), keys.leases_of("u1")] {
            assert_eq!(hash_tag(&key), user);
        }
        assert_eq!(hash_tag(&Keys::bus_channel_of("b", "u1")), user);
        let room = hash_tag(&keys.room_conns("r1")).to_owned();
        for key in [
            keys.room_seq("r1"),
            keys.typing("r1", "u9"),
            keys.rooms_index_of("r1"),
        ] {
            assert_eq!(hash_tag(&key), room);
        }
        assert_eq!(hash_tag(&Keys::bus_channel_of("b", "r1")), room);
        assert_eq!(
            hash_tag(&keys.relay_lease(1)),
            hash_tag(&keys.relay_members())
        );
        assert_eq!(
            hash_tag(&keys.relay_lags()),
            hash_tag(&keys.relay_members())
        );
        assert_eq!(
            hash_tag(&keys.rate_user_send("u1")),
            hash_tag(&keys.rate_user_rest("u1"))
        );
    }

    #[test]
    fn hash_tags_follow_the_cluster_rule() {
        assert_eq!(hash_tag("a{b}c"), "b");
        assert_eq!(hash_tag("a{b}{c}"), "b");
        assert_eq!(hash_tag("a{}b"), "a{}b");
        assert_eq!(hash_tag("ab"), "ab");
        assert_eq!(hash_tag("a{b"), "a{b");
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition_of("u1"), partition_of("u1"));
        let all: std::collections::BTreeSet<usize> = (0..10_000)
            .map(|i| partition_of(&format!("user{i}")))
            .collect();
        assert_eq!(all.len(), PARTITIONS, "every partition is used");
        assert!(all.iter().all(|p| *p < PARTITIONS));
    }
}
