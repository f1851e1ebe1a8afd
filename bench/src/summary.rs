//! Latency histograms and their summary.
//!
//! Latencies are recorded in microseconds in an HDR histogram (1 µs to
//! 10 min, 3 significant digits: a fixed ~200 kB, constant-time record,
//! whatever the rate), and summarised in milliseconds for the JSON line.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency tracked; anything slower is clamped to it.
const MAX_US: u64 = 600_000_000;

/// A latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, MAX_US, 3).expect("constant bounds are valid"),
        }
    }
}

impl Latency {
    /// Records one latency in microseconds (clamped to 1 µs … 10 min: a
    /// receiver clock a hair behind the sender's gives 0, not an error).
    pub fn record(&mut self, us: u64) {
        self.histogram.saturating_record(us.clamp(1, MAX_US));
    }

    /// Adds everything `other` recorded.
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so this cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    /// Forgets everything recorded.
    pub fn reset(&mut self) {
        self.histogram.reset();
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The summary in milliseconds.
    pub fn summary(&self) -> Summary {
        let h = &self.histogram;
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: h.len(),
            mean_ms: round3(h.mean() / 1000.0),
            p50_ms: round3(ms(h.value_at_quantile(0.50))),
            p90_ms: round3(ms(h.value_at_quantile(0.90))),
            p99_ms: round3(ms(h.value_at_quantile(0.99))),
            p999_ms: round3(ms(h.value_at_quantile(0.999))),
            max_ms: round3(ms(h.max())),
        }
    }
}

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// Rounds to three decimals (µs resolution in ms), for readable JSON.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The median of some values (the mean of the middle two for an even
/// count); `None` when there are none. NaNs are left out; infinities are
/// kept, as "never" (a storm run in which not every client joined has an
/// infinite time to all joined, and that must pull the median up).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_out_in_milliseconds() {
        let mut l = Latency::default();
        for us in 1..=1000u64 {
            l.record(us * 100); // 0.1 ms … 100 ms
        }
        let s = l.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.p99_ms - 99.0).abs() < 0.1, "{s:?}");
        assert!((s.max_ms - 100.0).abs() < 0.1, "{s:?}");
        assert!((s.mean_ms - 50.05).abs() < 0.1, "{s:?}");
    }

    #[test]
    fn zero_and_huge_latencies_are_clamped_not_lost() {
        let mut l = Latency::default();
        l.record(0);
        l.record(u64::MAX);
        assert_eq!(l.count(), 2);
        assert!(l.summary().max_ms >= 599_000.0);
    }

    #[test]
    fn merging_adds_counts() {
        let mut a = Latency::default();
        let mut b = Latency::default();
        a.record(1000);
        b.record(3000);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        b.reset();
        assert_eq!(b.count(), 0);
        assert_eq!(b.summary(), Summary::default());
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
        assert_eq!(median(&[3.0, f64::INFINITY, 4.0]), Some(4.0));
        assert_eq!(
            median(&[f64::INFINITY, 2.0, f64::INFINITY]),
            Some(f64::INFINITY)
        );
    }
}
