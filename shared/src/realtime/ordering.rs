//! Per-connection ordering of client frames (issue 16): a frame that
//! carries **`seq`** (a counter the client keeps per connection: 1, 2, 3 …)
//! is handled only after every lower `seq` of the same connection has been
//! handled, so a sender's messages are stored in the order it numbered
//! them, however `$default` is invoked.
//!
//! API Gateway does not promise to invoke `$default` one message at a time
//! per connection: several invocations of one connection may run at once,
//! in different Lambda processes, and finish in any order. So the order
//! cannot be kept in memory: it is kept in Redis, in one hash per
//! connection (`conn:{connectionId}:order`, built by
//! [`crate::presence::Keys::conn_order`]), as a *ticket lock* whose tickets
//! the client hands out:
//!
//! * `turn` is the `seq` that may be handled now (every lower one is done,
//!   or was given up on); a connection starts at 1.
//! * A frame whose `seq` is the turn **claims** it (`until`, a deadline on
//!   Redis's clock), is handled, then **advances** the turn to `seq + 1`.
//! * A frame with a higher `seq` **waits**: it polls (1 ms, doubling, at most
//!   50 ms apart), and a turn advanced in the same process wakes it at once.
//! * A frame with a lower `seq` than the turn is **late**: a later frame was
//!   handled already, so handling it now would break the order. It is
//!   refused with `CONFLICT`, and nothing is done; the client sends it
//!   again with a new `seq`.
//!
//! Bounded waits and what happens when a predecessor never arrives (a
//! throttled invocation, a frame refused by the gateway itself):
//!
//! * **gap**: when the turn's frame has not arrived (nobody claimed it)
//!   [`OrderingLimits::gap_wait`] (2 s) after a later frame first waited
//!   for it, the turn moves to the lowest waiting `seq`: the missing ones
//!   are given up on, and refused as late if they ever come;
//! * **claim**: a claim runs out after [`OrderingLimits::claim`] (30 s,
//!   longer than any invocation may run: the ws-message Lambda's timeout is
//!   10 s, the local gateway's integration timeout 29 s); the frame then
//!   counts as handled;
//! * **wait**: a frame waits at most [`OrderingLimits::max_wait`] (8 s, under
//!   the Lambda's timeout) in all; then it is refused with `RATE_LIMITED`
//!   (nothing done, retry later).
//!
//! Every step is one Lua script (atomic, on Redis's clock, so processes
//! with skewed clocks agree). A frame with `seq` costs two Redis round
//! trips more than one without (claim, advance), plus polls while it
//! waits. Frames without `seq` (v1 clients) are not ordered and cost
//! nothing here: handled in arrival order when the gateway invokes one at a
//! time, in no promised order when it invokes several at once.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crate::presence::RedisConn;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{ClientFrame, RequestIds};
use crate::error::{Error, Result};
use crate::metrics::CountedRedis;
use crate::presence::Keys;

/// The largest `seq`: the largest integer a JavaScript number holds
/// exactly.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

/// The bounds of the ordering wait (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderingLimits {
    /// How long the turn's frame may be missing, from when a later frame
    /// first waited for it, before it is given up on.
    pub gap_wait: Duration,
    /// How long a claimed turn may stay claimed (longer than any
    /// invocation runs).
    pub claim: Duration,
    /// The longest a frame waits for its turn in all.
    pub max_wait: Duration,
    /// How long the state of a connection's turn is kept after its last
    /// change: longer than a connection lives (API Gateway: 2 h).
    pub ttl: Duration,
}

impl OrderingLimits {
    /// 2 s gap, 30 s claim, 8 s wait, 2 h 10 min memory.
    pub const DEFAULT: Self = Self {
        gap_wait: Duration::from_secs(2),
        claim: Duration::from_secs(30),
        max_wait: Duration::from_secs(8),
        ttl: Duration::from_secs(2 * 3600 + 600),
    };
}

impl Default for OrderingLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Waits for, claims or refuses a frame's turn. KEYS[1]: the connection's
/// order hash; ARGV: seq, gap ms, claim ms, ttl ms. Returns `{code, turn}`:
/// 0 the frame may go (it holds the turn), 1 wait, 2 late.
const ENTER: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n, gap, claim = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 'turn', 'until', 'since', 'min')
local turn = tonumber(s[1] or '1')
local held = tonumber(s[2] or '0')
local since = tonumber(s[3] or '0')
local min = tonumber(s[4] or '0')
local changed = false
if held > 0 and held <= now then
  -- The holder's claim ran out: its frame counts as handled.
  turn, held, since, min, changed = turn + 1, 0, 0, 0, true
end
local code = 1
if n < turn then
  code = 2
elseif held > 0 then
  code = 1
elseif n == turn then
  held, since, min, changed, code = now + claim, 0, 0, true, 0
else
  -- The turn's frame has not arrived: wait for it, at most `gap` from
  -- when the first later frame started waiting, then give it up and move
  -- the turn to the lowest waiting frame.
  if since == 0 then
    since, min, changed = now, n, true
  elseif n < min then
    min, changed = n, true
  end
  if now - since >= gap then
    turn, since, min, changed = min, 0, 0, true
    if n == turn then held, code = now + claim, 0 end
  end
end
if changed then
  redis.call('HSET', KEYS[1], 'turn', string.format('%.0f', turn),
    'until', string.format('%.0f', held), 'since', string.format('%.0f', since),
    'min', string.format('%.0f', min))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return {code, turn}
";

/// Advances the turn past a handled frame. KEYS[1]: the order hash; ARGV:
/// seq, ttl ms. Returns 1, or 0 when the turn had moved on already (the
/// claim ran out).
const LEAVE: &str = r"
local turn = tonumber(redis.call('HGET', KEYS[1], 'turn') or '1')
if turn ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'turn', string.format('%.0f', turn + 1), 'until', '0',
  'since', '0', 'min', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

static ENTER_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ENTER));
static LEAVE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(LEAVE));

/// Wake-up slots: a frame waiting for its turn listens on the slot of its
/// connection, and a turn advanced in this process notifies that slot, so
/// waiting in one process (the local gateway) is not polling. Collisions
/// only cost a spurious check.
const WAKE_SLOTS: usize = 64;

/// The longest pause between two checks of a waiting frame.
const MAX_POLL: Duration = Duration::from_millis(50);

/// Orders the sequenced frames of every connection (see the module docs).
#[derive(Clone)]
pub(crate) struct Sequencer {
    redis: RedisConn,
    keys: Keys,
    limits: OrderingLimits,
    /// Per process, not per deployment: other processes are reached by
    /// polling Redis.
    wake: Arc<[Notify]>,
}

crate::debug_fields!(Sequencer { limits });

/// A frame's claimed turn: give it back with [`Sequencer::leave`] once the
/// frame is handled. Dropped without that (the handler panicked, or its
/// future was dropped), it is given back from a task of its own, so the
/// next frame does not wait for the claim to run out.
#[derive(Debug)]
pub(crate) struct Turn {
    key: String,
    seq: u64,
    slot: usize,
    /// `Some` until given back.
    sequencer: Option<Sequencer>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(sequencer) = self.sequencer.take() else {
            return;
        };
        let (key, seq, slot) = (std::mem::take(&mut self.key), self.seq, self.slot);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { sequencer.advance(&key, seq, slot).await });
        }
    }
}

/// The only part of a frame read before its turn: `seq`, with every other
/// field skipped without being built.
#[derive(Deserialize)]
struct SeqOnly {
    #[serde(default)]
    seq: Option<Value>,
}

/// The `seq` of a text frame: `Ok(None)` when it has none, or is not a JSON
/// object (checked first: serde would read an array as a struct's fields) (`$default` then answers the frame's own error).
///
/// # Errors
/// `BAD_REQUEST` for a `seq` that is not an integer in 1..=2^53-1.
pub(crate) fn frame_seq(body: &str) -> Result<Option<u64>> {
    // Most frames (every v1 client's) have no `seq`: skip the parse.
    if !body.contains("\"seq\"") || !body.trim_start().starts_with('{') {
        return Ok(None);
    }
    let Ok(SeqOnly { seq }) = serde_json::from_str::<SeqOnly>(body) else {
        return Ok(None);
    };
    match seq {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_u64() {
            Some(seq @ 1..=MAX_SEQ) => Ok(Some(seq)),
            _ => Err(Error::bad_request(
                "seq must be an integer from 1 to 9007199254740991",
            )),
        },
    }
}

fn slot_of(connection_id: &str) -> usize {
    // FNV-1a: stable and cheap; only spreads connections over the slots.
    let hash = connection_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    (hash % WAKE_SLOTS as u64) as usize
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Sequencer {
    pub(crate) fn new(redis: RedisConn, keys: Keys, limits: OrderingLimits) -> Self {
        Self {
            redis,
            keys,
            limits,
            wake: (0..WAKE_SLOTS).map(|_| Notify::new()).collect(),
        }
    }

    pub(crate) fn limits(&self) -> OrderingLimits {
        self.limits
    }

    /// Waits for the turn of a frame of `connection_id` (`body` as
    /// received): `Ok(None)` at once for a frame without `seq`.
    ///
    /// # Errors
    /// With what an `error` reply echoes: `BAD_REQUEST` for a bad `seq`;
    /// `CONFLICT` for a late frame; `RATE_LIMITED` when the wait ran over
    /// its bound; a Redis failure. Nothing was done for the frame.
    pub(crate) async fn enter(
        &self,
        connection_id: &str,
        body: &str,
        binary: bool,
    ) -> std::result::Result<Option<Turn>, (RequestIds, Error)> {
        if binary {
            return Ok(None);
        }
        let ids = || {
            ClientFrame::parse(body)
                .map(|frame| frame.ids().clone())
                .unwrap_or_default()
        };
        let seq = match frame_seq(body) {
            Ok(Some(seq)) => seq,
            Ok(None) => return Ok(None),
            Err(err) => return Err((ids(), err)),
        };
        self.wait_turn(connection_id, seq)
            .await
            .map(Some)
            .map_err(|err| (ids(), err))
    }

    async fn wait_turn(&self, connection_id: &str, seq: u64) -> Result<Turn> {
        let key = self.keys.conn_order(connection_id);
        let slot = slot_of(connection_id);
        let deadline = Instant::now() + self.limits.max_wait;
        let mut pause = Duration::from_millis(1);
        loop {
            // Listening before checking: an advance between the check and
            // the sleep still wakes this frame.
            let woken = self.wake[slot].notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let mut redis = CountedRedis(self.redis.clone());
            let (code, turn): (u8, u64) = ENTER_SCRIPT
                .key(&key)
                .arg(seq)
                .arg(millis(self.limits.gap_wait))
                .arg(millis(self.limits.claim))
                .arg(millis(self.limits.ttl))
                .invoke_async(&mut redis)
                .await?;
            match code {
                0 => {
                    return Ok(Turn {
                        key,
                        seq,
                        slot,
                        sequencer: Some(self.clone()),
                    });
                }
                2 => {
                    tracing::debug!(connection_id, seq, turn, "late frame refused");
                    return Err(Error::Conflict(format!(
                        "seq {seq} arrived after a later frame was handled (the next is {turn}): \
                         nothing was done; send it again with a new seq"
                    )));
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::debug!(connection_id, seq, turn, "gave up waiting for the turn");
                return Err(Error::rate_limited(
                    "earlier frames of this connection are still being handled; retry later",
                    1,
                ));
            }
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep_until((now + pause).min(deadline)) => {}
            }
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// Gives back a turn taken by [`Sequencer::enter`]: the next `seq` may
    /// go. A failure is logged, not returned: the frame was handled, and
    /// the next one goes after the gap wait.
    pub(crate) async fn leave(&self, turn: Option<Turn>) {
        let Some(mut turn) = turn else {
            return;
        };
        turn.sequencer = None;
        self.advance(&turn.key, turn.seq, turn.slot).await;
    }

    async fn advance(&self, key: &str, seq: u64, slot: usize) {
        let mut redis = CountedRedis(self.redis.clone());
        let advanced: redis::RedisResult<u8> = LEAVE_SCRIPT
            .key(key)
            .arg(seq)
            .arg(millis(self.limits.ttl))
            .invoke_async(&mut redis)
            .await;
        if let Err(error) = advanced {
            tracing::warn!(%error, seq, "could not advance the frame turn");
        }
        self.wake[slot].notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_is_optional_and_must_be_a_positive_safe_integer() {
        for body in [
            r#"{"type":"ping"}"#,
            r#"{"type":"sendMessage","payload":{"content":"\"seq\""}}"#,
            r#"{"type":"ping","seq":null}"#,
            "not json \"seq\"",
            r#"["seq"]"#,
        ] {
            assert_eq!(frame_seq(body).ok(), Some(None), "{body}");
        }
        assert_eq!(frame_seq(r#"{"seq":1,"type":"ping"}"#).ok(), Some(Some(1)));
        assert_eq!(
            frame_seq(r#"{"type":"sendMessage","payload":{"seq":9},"seq":42}"#).ok(),
            Some(Some(42))
        );
        assert_eq!(
            frame_seq(&format!(r#"{{"seq":{MAX_SEQ}}}"#)).ok(),
            Some(Some(MAX_SEQ))
        );
        for bad in [
            r#"{"seq":0}"#,
            r#"{"seq":-1}"#,
            r#"{"seq":1.5}"#,
            r#"{"seq":"1"}"#,
            r#"{"seq":9007199254740992}"#,
        ] {
            let err = frame_seq(bad).expect_err(bad);
            assert_eq!(err.code(), crate::ErrorCode::BadRequest, "{bad}");
        }
    }

    #[test]
    fn connections_spread_over_the_wake_slots() {
        let used: std::collections::HashSet<usize> =
            (0..1000).map(|i| slot_of(&format!("conn-{i}"))).collect();
        assert_eq!(used.len(), WAKE_SLOTS);
    }
}
