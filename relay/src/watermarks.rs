//! Writes delivered watermarks back to Redis.
//!
//! A room subscription (`room:{roomId}:conns`, see `chat_shared::presence`)
//! carries the highest sequence id the connection already has, as its
//! `roomJoined` snapshot left it. The relay remembers in memory what it has
//! delivered since; if that memory were all, a restarted relay (or one that
//! evicted an idle room) would see the old watermark, take every message
//! since the join for a gap, and deliver it all again. So shards write their
//! delivered marks back every 200 ms (only marks whose posts are done), and
//! before they hand a cluster shard over or exit, raising the stored
//! watermark and never lowering it. A relay taking a shard over starts
//! from them.
//!
//! The value format is `watermark|userId|connectedAt|endpoint` (module docs
//! of `chat_shared::presence`); the script only replaces the number before
//! the first `|`, and only for a subscription that still exists, so a
//! connection that left meanwhile is not re-subscribed. A test in
//! `tests/it` reads the result back through `Presence::subscribers`, which
//! would catch a change of that format.

use std::sync::LazyLock;

use chat_shared::presence::Presence;

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

// Built once: `Script::new` hashes the source.
static RAISE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RAISE));

/// Most marks per script call, so one call never blocks Redis for long.
const MARKS_PER_CALL: usize = 2000;

/// Marks of one room: `(connection id, delivered sequence id)`.
pub(crate) type RoomMarks = (String, Vec<(String, i64)>);

/// Raises the stored watermark of each `(room, connection)` to its mark
/// (never lowers it; skips subscriptions that are gone).
///
/// # Errors
/// `UNAVAILABLE` when Redis does not answer.
pub(crate) async fn raise(presence: &Presence, rooms: &[RoomMarks]) -> chat_shared::Result<()> {
    let mut redis = presence.redis();
    let mut invocation = RAISE_SCRIPT.prepare_invoke();
    let mut in_call = 0;
    for (room_id, marks) in rooms {
        for chunk in marks.chunks(MARKS_PER_CALL) {
            invocation.key(presence.keys().room_conns(room_id));
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
