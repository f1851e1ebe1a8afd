//! Room subscriptions: joining (with the watermark of the snapshot),
//! leaving, a room's subscribers for the relay's fan-out, and the
//! delivered watermarks the relay writes back.
//!
//! A room's subscribers, its highest published sequence id and its bus
//! channel are in the room's partition (one slot), so a join's
//! subscription and its check for a missed fan-out are one script, and a
//! message's publish is another in the same slot. The connection's room
//! set (its own slot) is written after the subscription (see
//! [`Presence::join`]).

use std::sync::LazyLock;

use super::{Connection, Presence, Subscriber, eval_cmd};
use crate::bus::JoinedTemplate;
use crate::domain::{RoomId, UserId};
use crate::error::Result;
use crate::metrics::CountedRedis;
use crate::presence::keys::{Keys, partition_of};

// Built once: `Script::new` hashes the source.
static UNSUBSCRIBE_CONNS_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(UNSUBSCRIBE_CONNS));
static JOIN_ROOM_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(JOIN_ROOM));
static ACTIVATE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ACTIVATE));

/// Unsubscribes the connections ARGV[1..] from a room (KEYS[1]) and
/// returns those that were joined.
const UNSUBSCRIBE_CONNS: &str = r"
local left = {}
for _, c in ipairs(ARGV) do
  if redis.call('HDEL', KEYS[1], c) == 1 then table.insert(left, c) end
end
return left
";

/// The room's step of a join: subscribes connection ARGV[1] to the room
/// KEYS[1], *pending* (its value ARGV[2] behind a `~`), lists the room
/// (ARGV[3]) in the partition's index KEYS[3] and publishes, with command
/// ARGV[4] on the room's channel ARGV[5], the join's `Control::Joined`
/// envelope: ARGV[6] + the online users ARGV[9..] as a JSON array +
/// ARGV[7] + the room's highest published sequence id (KEYS[2]) + ARGV[8]
/// ([`crate::bus::JoinedTemplate`]).
const JOIN_ROOM: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], '~' .. ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
local published = redis.call('GET', KEYS[2]) or '0'
local online = {}
for i = 9, #ARGV do online[#online + 1] = cjson.encode(ARGV[i]) end
redis.call(ARGV[4], ARGV[5],
  ARGV[6] .. '[' .. table.concat(online, ',') .. ']' .. ARGV[7] .. published .. ARGV[8])
return 1
";

/// The connection's step of a join, before the room's: records the room
/// ARGV[1] in the connection's room set KEYS[2] if its record KEYS[1] is
/// still there. Returns 0 when the connection is gone.
const JOINED: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
";

/// Makes a pending subscription (KEYS[1], field ARGV[1]) joined: drops the
/// `~` in front of its value. Returns {} when there is no subscription,
/// else {'1', value} when it was pending, {'0', value} when it was joined
/// already.
const ACTIVATE: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return {} end
if string.sub(v, 1, 1) ~= '~' then return {'0', v} end
v = string.sub(v, 2)
redis.call('HSET', KEYS[1], ARGV[1], v)
return {'1', v}
";

/// Raises watermarks of one room's subscriptions (KEYS[1]). `ARGV`:
/// `connectionId, sequenceId` pairs.
const RAISE: &str = r"
for a = 1, #ARGV, 2 do
  local conn, mark = ARGV[a], ARGV[a + 1]
  local v = redis.call('HGET', KEYS[1], conn)
  if v then
    local sep = string.find(v, '|', 1, true)
    if sep then
      local cur = tonumber(string.sub(v, 1, sep - 1))
      if cur and tonumber(mark) > cur then
        redis.call('HSET', KEYS[1], conn, mark .. string.sub(v, sep))
      end
    end
  end
end
return 0
";

/// Most marks per script call, so one call never blocks Redis for long.
const MARKS_PER_CALL: usize = 2000;

/// Delivered marks of one room: the room id and its
/// `(connection id, delivered sequence id)` pairs.
pub type RoomMarks = (String, Vec<(String, i64)>);

impl Presence {
    /// Unsubscribes all of a user's connections from a room (they were
    /// removed from it); returns the connection ids that had joined it.
    ///
    /// Three steps, each idempotent: the user's connections (their
    /// partition), the room's subscriptions (the room's), then each
    /// connection's room set (its own; a leftover there is harmless: it
    /// only makes a later disconnect delete a subscription that is gone).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn unsubscribe_user(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Vec<String>> {
        let conns = self.user_connections(user_id.as_str()).await?;
        if conns.is_empty() {
            return Ok(Vec::new());
        }
        let mut redis = CountedRedis(self.redis.clone());
        let mut invocation = UNSUBSCRIBE_CONNS_SCRIPT.key(self.keys.room_conns(room_id.as_str()));
        for conn in &conns {
            invocation.arg(conn);
        }
        let left: Vec<String> = invocation.invoke_async(&mut redis).await?;
        let forget = left
            .iter()
            .map(|conn| {
                let key = self.keys.conn_rooms(conn);
                let mut cmd = redis::cmd("SREM");
                cmd.arg(&key).arg(room_id.as_str());
                (key, cmd)
            })
            .collect();
        self.redis.query_grouped(forget).await?;
        Ok(left)
    }

    /// Subscribes a connection to a room with the watermark of its
    /// snapshot, *pending*, answers which of `members` are online, and
    /// publishes the join's `Control::Joined` envelope (`joined`) on the
    /// room's channel of `channel`; `None` when the connection is gone.
    ///
    /// The relay leaves a pending subscription out of the room's events
    /// until it handles that envelope, in order with the room's messages
    /// (the envelope goes on the room's channel): it posts the
    /// `roomJoined`, then every stored message above the watermark up to
    /// the room's highest published sequence id (which the script writes
    /// into the envelope: a message stored after the snapshot was read may
    /// have been fanned out before the subscription existed), and makes the
    /// subscription joined ([`Presence::activate`]). So no event of the
    /// room overtakes the `roomJoined`, and none is missed.
    ///
    /// Two round trips, in three slots (docs/ARCHITECTURE.md, "Redis
    /// Cluster"):
    /// 1. the connection's step (the room goes into its room set if its
    ///    record still exists; `None` otherwise), with the members' online
    ///    flags read at the same time (their partitions);
    /// 2. the room's step: the pending subscription, the room's highest
    ///    published sequence id and the envelope, one script in the room's
    ///    slot, so the envelope is published in order with the room's
    ///    messages.
    ///
    /// A disconnect that runs between the steps has already read the room
    /// set (with the room in it) and removed a subscription that did not
    /// exist yet, so a check of the record follows in the background and
    /// takes such a subscription back (best effort: the relay drops a
    /// subscription whose connection is gone at its first post anyway).
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
        joined: &JoinedTemplate,
    ) -> Result<Option<Vec<UserId>>> {
        let mut redis = CountedRedis(self.redis.clone());
        let record = self.keys.conn(&conn.connection_id);
        let mut joined_cmd = eval_cmd(
            JOINED,
            &[&record, &self.keys.conn_rooms(&conn.connection_id)],
        );
        joined_cmd.arg(room_id.as_str());
        let mut commands = vec![(record.clone(), joined_cmd)];
        commands.extend(self.online_commands(members));
        let mut answers = self.redis.query_grouped(commands).await?.into_iter();
        let still_there: i64 =
            redis::from_redis_value(answers.next().unwrap_or(redis::Value::Nil))?;
        if still_there == 0 {
            return Ok(None);
        }
        let online = self.online_from(members, answers)?;
        let room_conns = self.keys.room_conns(room_id.as_str());
        let mut invocation = JOIN_ROOM_SCRIPT.prepare_invoke();
        invocation
            .key(&room_conns)
            .key(self.keys.room_seq(room_id.as_str()))
            .key(self.keys.rooms_index_of(room_id.as_str()))
            .arg(&conn.connection_id)
            .arg(Subscriber::encode(watermark, conn))
            .arg(room_id.as_str())
            .arg(self.redis.publish_command())
            .arg(Keys::bus_channel_of(channel, room_id.as_str()))
            .arg(&joined.head)
            .arg(&joined.middle)
            .arg(&joined.tail);
        for user in &online {
            invocation.arg(user.as_str());
        }
        let _: i64 = invocation.invoke_async(&mut redis).await?;
        let connection_id = conn.connection_id.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let exists: redis::RedisResult<bool> = redis::cmd("EXISTS")
                    .arg(&record)
                    .query_async(&mut redis)
                    .await;
                if let Ok(false) = exists {
                    let _: redis::RedisResult<i64> = redis::cmd("HDEL")
                        .arg(&room_conns)
                        .arg(&connection_id)
                        .query_async(&mut redis)
                        .await;
                }
            });
        }
        Ok(Some(online))
    }

    /// Makes a connection's pending subscription to a room joined (the
    /// relay, once it has posted the `roomJoined`). Returns the
    /// subscription (as now joined) and whether it was pending; `None` when
    /// there is none (the connection left the room, or is gone).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn activate(
        &self,
        room_id: &str,
        connection_id: &str,
    ) -> Result<Option<(Subscriber, bool)>> {
        let mut redis = CountedRedis(self.redis.clone());
        let answer: Vec<String> = ACTIVATE_SCRIPT
            .key(self.keys.room_conns(room_id))
            .arg(connection_id)
            .invoke_async(&mut redis)
            .await?;
        let [was_pending, value] = answer.as_slice() else {
            return Ok(None);
        };
        Ok(Subscriber::decode(connection_id.to_owned(), value).map(|s| (s, was_pending == "1")))
    }

    /// Unsubscribes a connection from a room (nothing if it had not joined):
    /// the subscription, then the room set (two slots, both removals).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn leave(&self, room_id: &RoomId, connection_id: &str) -> Result<()> {
        let mut redis = CountedRedis(self.redis.clone());
        let _: i64 = redis::cmd("HDEL")
            .arg(self.keys.room_conns(room_id.as_str()))
            .arg(connection_id)
            .query_async(&mut redis)
            .await?;
        let _: i64 = redis::cmd("SREM")
            .arg(self.keys.conn_rooms(connection_id))
            .arg(room_id.as_str())
            .query_async(&mut redis)
            .await?;
        Ok(())
    }

    /// The connections joined to each of `room_ids` (one round trip on a
    /// single Redis; one per partition, concurrently, on a cluster).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn subscribers(&self, room_ids: &[&str]) -> Result<Vec<Vec<Subscriber>>> {
        let commands = room_ids
            .iter()
            .map(|room| {
                let key = self.keys.room_conns(room);
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(&key);
                (key, cmd)
            })
            .collect();
        self.redis
            .query_grouped(commands)
            .await?
            .into_iter()
            .map(|entries| {
                let entries: Vec<(String, String)> = redis::from_redis_value(entries)?;
                Ok(entries
                    .into_iter()
                    .filter_map(|(conn, value)| Subscriber::decode(conn, &value))
                    .collect())
            })
            .collect()
    }

    /// Raises the stored watermark of each `(room, connection)` to its
    /// delivered mark (never lowers it; skips subscriptions that are gone):
    /// the relay writes back what it delivered, so a restarted relay, or
    /// one that forgot an idle room, never delivers it again. The script
    /// replaces only the number before the first `|` of the subscription's
    /// value (see [`Subscriber`]). One script call per room (and per
    /// [`MARKS_PER_CALL`] marks), pipelined by partition.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn raise_watermarks(&self, rooms: &[RoomMarks]) -> Result<()> {
        let mut commands = Vec::new();
        for (room_id, marks) in rooms {
            let key = self.keys.room_conns(room_id);
            for chunk in marks.chunks(MARKS_PER_CALL) {
                let mut cmd = eval_cmd(RAISE, &[&key]);
                for (connection_id, mark) in chunk {
                    cmd.arg(connection_id).arg(*mark);
                }
                commands.push((key.clone(), cmd));
            }
        }
        self.redis.query_grouped(commands).await?;
        Ok(())
    }

    /// `SMISMEMBER` of `users` on their partitions' online sets, one command
    /// per partition (in the order of first appearance).
    pub(super) fn online_commands(&self, users: &[UserId]) -> Vec<(String, redis::Cmd)> {
        let mut by_partition: Vec<(usize, Vec<&str>)> = Vec::new();
        for user in users {
            let p = partition_of(user.as_str());
            match by_partition.iter_mut().find(|(q, _)| *q == p) {
                Some((_, list)) => list.push(user.as_str()),
                None => by_partition.push((p, vec![user.as_str()])),
            }
        }
        by_partition
            .into_iter()
            .map(|(p, list)| {
                let key = self.keys.online(p);
                let mut cmd = redis::cmd("SMISMEMBER");
                cmd.arg(&key).arg(list);
                (key, cmd)
            })
            .collect()
    }

    /// Which of `users` are online, in their order, from the answers of
    /// [`Presence::online_commands`].
    pub(super) fn online_from(
        &self,
        users: &[UserId],
        answers: impl Iterator<Item = redis::Value>,
    ) -> Result<Vec<UserId>> {
        let mut order: Vec<usize> = Vec::new();
        for user in users {
            let p = partition_of(user.as_str());
            if !order.contains(&p) {
                order.push(p);
            }
        }
        let mut flags: std::collections::HashMap<usize, std::vec::IntoIter<bool>> =
            std::collections::HashMap::new();
        for (p, answer) in order.into_iter().zip(answers) {
            let list: Vec<bool> = redis::from_redis_value(answer)?;
            flags.insert(p, list.into_iter());
        }
        Ok(users
            .iter()
            .filter(|user| {
                flags
                    .get_mut(&partition_of(user.as_str()))
                    .and_then(Iterator::next)
                    .unwrap_or(false)
            })
            .cloned()
            .collect())
    }
}
