//! Room subscriptions: joining (with the watermark of the snapshot),
//! leaving, a room's subscribers for the relay's fan-out, and the
//! delivered watermarks the relay writes back.

use std::sync::LazyLock;

use super::{Connection, Presence, Subscriber};
use crate::bus::JoinedTemplate;
use crate::domain::{RoomId, UserId};
use crate::error::Result;
use crate::metrics::CountedRedis;

// Built once: `Script::new` hashes the source.
static UNSUBSCRIBE_USER_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(UNSUBSCRIBE_USER));
static RAISE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RAISE));
static JOIN_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(JOIN));
static ACTIVATE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ACTIVATE));

/// Unsubscribes every connection of a user (KEYS[1]) from a room (KEYS[2],
/// id ARGV[2]), atomically, and returns the connections that were joined.
/// Each connection's room set is `ARGV[1] .. id .. ARGV[3]`
/// ([`crate::presence::Keys::conn_rooms_pattern`]).
const UNSUBSCRIBE_USER: &str = r"
local conns = redis.call('ZRANGE', KEYS[1], 0, -1)
local left = {}
for _, c in ipairs(conns) do
  if redis.call('HDEL', KEYS[2], c) == 1 then
    redis.call('SREM', ARGV[1] .. c .. ARGV[3], ARGV[2])
    table.insert(left, c)
  end
end
return left
";

/// Subscribes a live connection to a room, *pending* (its value ARGV[2]
/// behind a `~`), answers which of the users ARGV[8..] are online
/// (KEYS[5]) and publishes, on channel ARGV[4], the join's
/// `Control::Joined` envelope: ARGV[5] + those users as a JSON array +
/// ARGV[6] + the room's highest published sequence id (KEYS[4]) + ARGV[7]
/// ([`crate::bus::JoinedTemplate`]). Returns {'0'} for a connection that
/// is gone, else {'1', online users...}.
const JOIN: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'0'} end
redis.call('HSET', KEYS[2], ARGV[1], '~' .. ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
local published = redis.call('GET', KEYS[4]) or '0'
local out, online = {'1'}, {}
for i = 8, #ARGV do
  if redis.call('SISMEMBER', KEYS[5], ARGV[i]) == 1 then
    out[#out + 1] = ARGV[i]
    online[#online + 1] = cjson.encode(ARGV[i])
  end
end
redis.call('PUBLISH', ARGV[4],
  ARGV[5] .. '[' .. table.concat(online, ',') .. ']' .. ARGV[6] .. published .. ARGV[7])
return out
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

/// Raises watermarks. `KEYS`: one `room:{id}:conns` hash per room. `ARGV`:
/// for each key in order, the number of marks, then that many
/// `connectionId, sequenceId` pairs.
const RAISE: &str = r"
local a = 1
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, n do
    local conn, mark = ARGV[a], ARGV[a + 1]
    a = a + 2
    local v = redis.call('HGET', key, conn)
    if v then
      local sep = string.find(v, '|', 1, true)
      if sep then
        local cur = tonumber(string.sub(v, 1, sep - 1))
        if cur and tonumber(mark) > cur then
          redis.call('HSET', key, conn, mark .. string.sub(v, sep))
        end
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
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn unsubscribe_user(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Vec<String>> {
        let conn_rooms = self.keys.conn_rooms_pattern();
        let mut redis = CountedRedis(self.redis.clone());
        let left: Vec<String> = UNSUBSCRIBE_USER_SCRIPT
            .key(self.keys.user_conns(user_id.as_str()))
            .key(self.keys.room_conns(room_id.as_str()))
            .arg(&conn_rooms.head)
            .arg(room_id.as_str())
            .arg(conn_rooms.tail)
            .invoke_async(&mut redis)
            .await?;
        Ok(left)
    }

    /// Subscribes a connection to a room with the watermark of its
    /// snapshot, *pending*, answers which of `members` are online, and
    /// publishes the join's `Control::Joined` envelope (`joined`) on
    /// `channel`, in one round trip; `None` when the connection is gone.
    ///
    /// The relay leaves a pending subscription out of the room's events
    /// until it handles that envelope, in order with the room's messages:
    /// it posts the `roomJoined`, then every stored message above the
    /// watermark up to the room's highest published sequence id (which the
    /// script writes into the envelope: a message stored after the snapshot
    /// was read may have been fanned out before the subscription existed),
    /// and makes the subscription joined ([`Presence::activate`]). So no
    /// event of the room overtakes the `roomJoined`, and none is missed.
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
            .arg(channel)
            .arg(&joined.head)
            .arg(&joined.middle)
            .arg(&joined.tail);
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

    /// Raises the stored watermark of each `(room, connection)` to its
    /// delivered mark (never lowers it; skips subscriptions that are gone):
    /// the relay writes back what it delivered, so a restarted relay, or
    /// one that forgot an idle room, never delivers it again. The script
    /// replaces only the number before the first `|` of the subscription's
    /// value (see [`Subscriber`]).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn raise_watermarks(&self, rooms: &[RoomMarks]) -> Result<()> {
        let mut redis = self.redis.clone();
        let mut invocation = RAISE_SCRIPT.prepare_invoke();
        let mut in_call = 0;
        for (room_id, marks) in rooms {
            for chunk in marks.chunks(MARKS_PER_CALL) {
                invocation.key(self.keys.room_conns(room_id));
                invocation.arg(chunk.len());
                for (connection_id, mark) in chunk {
                    invocation.arg(connection_id).arg(*mark);
                }
                in_call += chunk.len();
                if in_call >= MARKS_PER_CALL {
                    let _: i64 = invocation.invoke_async(&mut redis).await?;
                    invocation = RAISE_SCRIPT.prepare_invoke();
                    in_call = 0;
                }
            }
        }
        if in_call > 0 {
            let _: i64 = invocation.invoke_async(&mut redis).await?;
        }
        Ok(())
    }
}
