//! The online sets (one per partition), and the delivery lag each relay
//! reports (read with a frame's lease renewal, for load shedding, at most
//! every [`LAG_READ_EVERY`] per process).

use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::Presence;
use crate::domain::UserId;
use crate::error::Result;
use crate::metrics::CountedRedis;

// Built once: `Script::new` hashes the source.
static REPORT_LAG_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(REPORT_LAG));

/// Stores a relay's delivery lag with the time (Redis's clock, the one the
/// lease renewal compares with).
const REPORT_LAG: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. now)
redis.call('PEXPIRE', KEYS[1], 5000)
return 0
";

/// How long a process reuses the relays' delivery lag it read. The relays
/// report every 100 ms and shedding starts at seconds of lag
/// (`WS_MAX_DELIVERY_LAG_MS`), so a reading this old decides the same;
/// reading it with every frame cost a request to the relays' slot per frame
/// on a Redis Cluster.
pub const LAG_READ_EVERY: Duration = Duration::from_millis(100);

/// The relays' delivery lag as this process last read it (shared by the
/// clones of a [`Presence`]).
#[derive(Debug, Default)]
pub(super) struct LagSeen(Mutex<Option<(Instant, u64)>>);

impl LagSeen {
    /// The lag read less than [`LAG_READ_EVERY`] ago, if any.
    pub(super) fn fresh(&self) -> Option<u64> {
        let seen = *self.0.lock().unwrap_or_else(PoisonError::into_inner);
        seen.filter(|(at, _)| at.elapsed() < LAG_READ_EVERY)
            .map(|(_, lag)| lag)
    }

    /// Records a lag just read.
    pub(super) fn read(&self, lag_ms: u64) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), lag_ms));
    }

    /// Forgets the reading (a relay of this process reported a new lag).
    fn forget(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl Presence {
    /// Which of `users` are online, in the given order: one round trip
    /// on a single Redis; one per partition among them, concurrently, on
    /// a cluster.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn online_among(&self, users: &[UserId]) -> Result<Vec<UserId>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let answers = self
            .redis
            .query_grouped(self.online_commands(users))
            .await?;
        self.online_from(users, answers.into_iter())
    }

    /// Records a relay's current delivery lag (`instance` names the relay);
    /// entries older than a second are ignored, so a relay that stops is
    /// forgotten. This process's next frame reads the lags again.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn report_delivery_lag(&self, instance: &str, lag_ms: u64) -> Result<()> {
        let mut redis = CountedRedis(self.redis.clone());
        let _: i64 = REPORT_LAG_SCRIPT
            .key(self.keys.relay_lags())
            .arg(instance)
            .arg(lag_ms)
            .invoke_async(&mut redis)
            .await?;
        self.lag_seen.forget();
        Ok(())
    }
}
