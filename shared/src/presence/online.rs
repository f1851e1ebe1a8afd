//! The online sets (one per partition), and the delivery lag each relay reports (read by every
//! frame's lease renewal, for load shedding).

use std::sync::LazyLock;

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
    /// forgotten.
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
        Ok(())
    }
}
