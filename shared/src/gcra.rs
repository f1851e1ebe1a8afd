//! GCRA, the generic cell rate algorithm (a token bucket without a refill
//! timer), as the Lua function the rate-limit scripts share, with the
//! arguments and answers on the Rust side. A module of its own because two
//! modules charge buckets: `limits` (REST requests, in one script) and
//! `presence` (a connection's frames, inside the lease renewal every frame
//! runs anyway), and neither should depend on the other for it. The
//! algorithm is described in the `limits` module docs.

use std::time::Duration;

use crate::config::Rate;

/// The GCRA function the rate-limit scripts share (see the module docs).
/// `gcra({{key, interval_us, burst}, ...})` charges every bucket and
/// returns 0, or charges none and returns the µs until all would allow a
/// request. A macro, so scripts can be `concat!`-ed into constants.
macro_rules! gcra_lua {
    () => {
        r"
local function gcra(buckets)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local wait, tats = 0, {}
  for i, b in ipairs(buckets) do
    local interval, burst = tonumber(b[2]), tonumber(b[3])
    local tat = tonumber(redis.call('GET', b[1]) or now)
    if tat < now then tat = now end
    tats[i] = tat + interval
    local early = tats[i] - interval * burst - now
    if early > wait then wait = early end
  end
  if wait > 0 then return wait end
  for i, b in ipairs(buckets) do
    redis.call('SET', b[1], string.format('%.0f', tats[i]),
      'PX', string.format('%d', math.max(1, math.ceil((tats[i] - now) / 1000))))
  end
  return 0
end
"
    };
}
pub(crate) use gcra_lua;

/// The arguments of one bucket: its GCRA interval (µs) and burst.
pub(crate) fn bucket_args(rate: Rate) -> (u64, u32) {
    (
        1_000_000 / u64::from(rate.per_sec.max(1)),
        rate.burst.max(1),
    )
}

/// Parses a script's "µs to wait" answer: `None` when the request was
/// allowed.
pub(crate) fn parse_wait(answer: Option<&str>) -> Option<Duration> {
    let micros: u64 = answer?.parse().ok()?;
    (micros > 0).then(|| Duration::from_micros(micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_parse_and_zero_means_allowed() {
        assert_eq!(parse_wait(Some("0")), None);
        assert_eq!(parse_wait(None), None);
        assert_eq!(parse_wait(Some("50000")), Some(Duration::from_millis(50)));
    }

    #[test]
    fn bucket_intervals_are_microseconds() {
        let (interval, burst) = bucket_args(Rate {
            per_sec: 20,
            burst: 40,
        });
        assert_eq!((interval, burst), (50_000, 40));
    }
}
