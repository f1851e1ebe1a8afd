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
use crate::domain::{RoomId, UserId};
use crate::error::Result;
use crate::metrics::CountedRedis;
use crate::presence::keys::{Keys, partition_of};

// Built once: `Script::new` hashes the source.
static UNSUBSCRIBE_CONNS_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(UNSUBSCRIBE_CONNS));
static JOINED_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(JOINED));

/// Unsubscribes the connections ARGV[1..] from a room (KEYS[1]) and
/// returns those that were joined.
const UNSUBSCRIBE_CONNS: &str = r"
local left = {}
for _, c in ipairs(ARGV) do
  if redis.call('HDEL', KEYS[1], c) == 1 then table.insert(left, c) end
end
return left
";

/// The room's step of a join: subscribes connection ARGV[1] (value ARGV[2])
/// to the room KEYS[1] and lists the room (ARGV[3]) in the partition's
/// index KEYS[3]; when a message above the watermark ARGV[4] was published
/// before the subscription existed (KEYS[2]), publishes the `Sync` control
/// ARGV[7] (if not empty) with command ARGV[5] on the room's channel
/// ARGV[6].
const JOIN_ROOM: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
local published = tonumber(redis.call('GET', KEYS[2]) or '0')
if published > tonumber(ARGV[4]) and ARGV[7] ~= '' then redis.call(ARGV[5], ARGV[6], ARGV[7]) end
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

    /// Subscribes a connection to a room with the watermark of its snapshot
    /// and answers which of `members` are online; `None` when the
    /// connection is gone.
    ///
    /// A message stored after the snapshot was read may have been fanned out
    /// before the subscription existed. Every `message` is published
    /// together with its room's highest published sequence id
    /// ([`crate::bus::Bus::publish_room_message`], one script in the room's
    /// slot), so the subscription and that check are one atomic step in the
    /// same slot: a message published before it shows in the check, and
    /// `sync_envelope` (a `Sync` control) is published for the relay to
    /// push what the connection is missing; one published after it finds
    /// the subscription.
    ///
    /// Two steps, the connection's first: the room goes into its room set
    /// if its record still exists (`None` otherwise); then the room's
    /// step (with the members' online sets, read at the same time). The
    /// subscription is the last thing written, so a push of the relay can
    /// overtake the caller's `roomJoined` only in the same short window as
    /// with one step.
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
        sync_envelope: &str,
    ) -> Result<Option<Vec<UserId>>> {
        let mut redis = CountedRedis(self.redis.clone());
        let joined: i64 = JOINED_SCRIPT
            .key(self.keys.conn(&conn.connection_id))
            .key(self.keys.conn_rooms(&conn.connection_id))
            .arg(room_id.as_str())
            .invoke_async(&mut redis)
            .await?;
        if joined == 0 {
            return Ok(None);
        }
        let room_conns = self.keys.room_conns(room_id.as_str());
        let mut subscribe = eval_cmd(
            JOIN_ROOM,
            &[
                &room_conns,
                &self.keys.room_seq(room_id.as_str()),
                &self.keys.rooms_index_of(room_id.as_str()),
            ],
        );
        subscribe
            .arg(&conn.connection_id)
            .arg(Subscriber::encode(watermark, conn))
            .arg(room_id.as_str())
            .arg(watermark)
            .arg(self.redis.publish_command())
            .arg(Keys::bus_channel_of(channel, room_id.as_str()))
            .arg(sync_envelope);
        let mut commands = vec![(room_conns.clone(), subscribe)];
        commands.extend(self.online_commands(members));
        let mut answers = self.redis.query_grouped(commands).await?.into_iter();
        answers.next();
        let online = self.online_from(members, answers)?;
        let (record, connection_id) = (
            self.keys.conn(&conn.connection_id),
            conn.connection_id.clone(),
        );
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
