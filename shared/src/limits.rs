//! Rate limits and typing coalescing, kept in Redis so that they hold
//! across every Lambda instance (and every local gateway) at once.
//!
//! # Rate limits
//!
//! | bucket | key | rate ([`RateLimits`]) | what is charged |
//! |---|---|---|---|
//! | a WebSocket connection | `rl:conn:{connectionId}` | `messages` | every client frame except `ping` |
//! | a user's REST sends | `rl:user:{userId}:send` | `messages` | `POST /rooms/:roomId/messages` |
//! | a user's REST requests | `rl:user:{userId}:rest` | `rest` | every authenticated REST request |
//!
//! Each bucket is one Redis string run as GCRA (the generic cell rate
//! algorithm, a token bucket without a refill timer): the key holds the
//! bucket's *theoretical arrival time* (TAT, µs on Redis's clock). A
//! request is allowed when `TAT + interval - burst × interval <= now`, and
//! then moves the TAT one interval on; the key expires when the bucket is
//! full again, so an idle client costs no memory. The time comes from
//! Redis `TIME`, so instances with skewed clocks share one time line.
//!
//! Round trips: the connection's bucket is charged inside the `TOUCH`
//! script that every frame runs anyway (`presence`), so a
//! WebSocket `sendMessage` costs no Redis round trip for it beyond the
//! lease renewal's two steps before PostgreSQL. A REST request charges its buckets (the request bucket, and
//! for a send the send bucket too) in one script call, all or nothing: a
//! refused request charges no bucket.
//!
//! `ping` is never charged: PROTOCOL §2 keeps it fast, and it is what keeps
//! a connection's presence alive.
//!
//! # Typing
//!
//! `typing` events are coalesced per user and room: one goes out, and
//! repeats of the same `isTyping` within [`TYPING_WINDOW`] of it are
//! dropped. A change (`isTyping: false` after `true`, or back) always goes
//! out, so a "stopped typing" is never swallowed and no client shows a
//! stuck indicator. `typing:{roomId}:{userId}` holds the last state that
//! went out (`1` or `0`) for the window; one script decides and publishes.

use std::sync::LazyLock;
use std::time::Duration;

use crate::config::RateLimits;
use crate::domain::{RoomId, UserId};
use crate::error::{Error, Result};
use crate::gcra::{bucket_args, parse_wait};
use crate::metrics::CountedRedis;
use crate::presence::{Keys, RedisConn};

/// Repeats of a user's `typing` state in a room within this window of the
/// last one fanned out are dropped.
pub const TYPING_WINDOW: Duration = Duration::from_secs(2);

/// Charges one request to each bucket in KEYS (ARGV: interval µs and
/// burst per key), all or nothing; returns 0 or the µs to wait.
const CHARGE: &str = concat!(
    crate::gcra::gcra_lua!(),
    r"
local buckets = {}
for i, key in ipairs(KEYS) do buckets[i] = {key, ARGV[2 * i - 1], ARGV[2 * i]} end
return string.format('%.0f', gcra(buckets))
"
);

/// Publishes a `typing` envelope unless it repeats the state that last
/// went out within the window. KEYS[1]: the typing key (in the room's
/// partition); ARGV: state (`1` or `0`), window ms, the publish command,
/// the room's channel (same slot), envelope. Returns 1 when published.
const TYPING: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call(ARGV[3], ARGV[4], ARGV[5])
return 1
";

// Built once: `Script::new` hashes the source.
static CHARGE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CHARGE));
static TYPING_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TYPING));

/// The `RATE_LIMITED` error for a request that may succeed after `wait`;
/// `Retry-After` is `wait` rounded up to whole seconds.
pub fn refused(wait: Duration) -> Error {
    let millis = wait.as_millis().max(1);
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Error::rate_limited(
        format!("rate limit exceeded; retry in {millis} ms"),
        secs.max(1),
    )
}

/// Charges rate-limit buckets and coalesces `typing`, in Redis.
#[derive(Clone)]
pub struct Limiter {
    redis: RedisConn,
    keys: Keys,
    limits: RateLimits,
}

crate::debug_fields!(Limiter { limits });

impl Limiter {
    /// Limits of `limits`, with buckets under `keys`.
    pub fn new(redis: RedisConn, keys: Keys, limits: RateLimits) -> Self {
        Self {
            redis,
            keys,
            limits,
        }
    }

    /// The configured limits.
    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    /// Charges one authenticated REST request of `user` to their request
    /// bucket, and when `send` (a message sent over REST) to their send
    /// bucket too, in one round trip (none when both limits are off).
    ///
    /// # Errors
    /// `RATE_LIMITED` with the seconds to wait when a bucket is empty (no
    /// bucket is charged then); `UNAVAILABLE` when Redis does not answer.
    pub async fn charge_rest(&self, user: &UserId, send: bool) -> Result<()> {
        let buckets = [
            (self.limits.rest, self.keys.rate_user_rest(user.as_str())),
            (
                self.limits.messages.filter(|_| send),
                self.keys.rate_user_send(user.as_str()),
            ),
        ];
        let mut invocation = CHARGE_SCRIPT.prepare_invoke();
        let mut charged = 0;
        for (rate, key) in buckets {
            let Some(rate) = rate else { continue };
            let (interval, burst) = bucket_args(rate);
            invocation.key(key).arg(interval).arg(burst);
            charged += 1;
        }
        if charged == 0 {
            return Ok(());
        }
        let mut redis = CountedRedis(self.redis.clone());
        let wait: String = invocation.invoke_async(&mut redis).await?;
        match parse_wait(Some(&wait)) {
            Some(wait) => Err(refused(wait)),
            None => Ok(()),
        }
    }

    /// Publishes `envelope` (a `typing` event of `user` in `room_id`) on
    /// `channel`, unless it repeats the `is_typing` that last went out for
    /// them there within [`TYPING_WINDOW`]. One round trip. Returns whether
    /// it was published.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn publish_typing(
        &self,
        room_id: &RoomId,
        user: &UserId,
        is_typing: bool,
        channel: &str,
        envelope: &str,
    ) -> Result<bool> {
        let mut redis = CountedRedis(self.redis.clone());
        let published: i64 = TYPING_SCRIPT
            .key(self.keys.typing(room_id.as_str(), user.as_str()))
            .arg(if is_typing { "1" } else { "0" })
            .arg(TYPING_WINDOW.as_millis() as u64)
            .arg(self.redis.publish_command())
            .arg(Keys::bus_channel_of(channel, room_id.as_str()))
            .arg(envelope)
            .invoke_async(&mut redis)
            .await?;
        Ok(published == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let err = refused(Duration::from_millis(50));
        assert_eq!(err.code(), ErrorCode::RateLimited);
        assert_eq!(err.retry_after_secs(), Some(1));
        assert_eq!(err.client_message(), "rate limit exceeded; retry in 50 ms");
        assert_eq!(refused(Duration::from_secs(2)).retry_after_secs(), Some(2));
        assert_eq!(
            refused(Duration::from_millis(2001)).retry_after_secs(),
            Some(3)
        );
    }
}
