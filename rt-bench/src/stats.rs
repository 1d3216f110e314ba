//! Latency distributions: HDR histograms of nanoseconds, summarised as p50, p99, p99.9 and
//! max in milliseconds, plus the percentile curve the plots draw.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Samples of one figure for one subject.
#[derive(Clone)]
pub struct Dist {
    hist: Histogram<u64>,
}

/// What the table, the JSON and the plots show of a distribution.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// (percentile, value) pairs from p0 to p100, for the plots.
    pub curve: Vec<(f64, f64)>,
}

impl Default for Dist {
    fn default() -> Dist {
        Dist::new()
    }
}

impl Dist {
    pub fn new() -> Dist {
        // 1 ns to 10 minutes at 3 significant digits.
        Dist {
            hist: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds"),
        }
    }

    /// Records one sample in nanoseconds (clamped into the histogram's range).
    pub fn record_ns(&mut self, ns: u64) {
        let _ = self.hist.record(ns.clamp(1, 600_000_000_000));
    }

    /// Records a value of another unit scaled by 1e6 (percent, per second, MiB), so the
    /// same summary code serves every figure: `summary_scaled` divides it back.
    pub fn record_value(&mut self, v: f64) {
        self.record_ns((v * 1e6).round().max(1.0) as u64);
    }

    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// The summary in milliseconds.
    pub fn summary_ms(&self) -> Summary {
        self.summary_div(1e6)
    }

    /// The summary of values recorded with [`Dist::record_value`].
    pub fn summary_value(&self) -> Summary {
        self.summary_div(1e6)
    }

    fn summary_div(&self, div: f64) -> Summary {
        let q = |p: f64| self.hist.value_at_quantile(p) as f64 / div;
        let mut curve = Vec::new();
        if !self.hist.is_empty() {
            for i in 0..=60 {
                // Denser towards the tail: 1 - 10^(-i/12) runs from 0 to 0.99999.
                let p = 1.0 - 10f64.powf(-(i as f64) / 12.0);
                curve.push((p * 100.0, q(p)));
            }
            curve.push((100.0, self.hist.max() as f64 / div));
        }
        Summary {
            count: self.hist.len(),
            p50: q(0.5),
            p99: q(0.99),
            p999: q(0.999),
            max: self.hist.max() as f64 / div,
            curve,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut d = Dist::new();
        for i in 1..=1000u64 {
            d.record_ns(i * 1_000_000); // 1..1000 ms
        }
        let s = d.summary_ms();
        assert_eq!(s.count, 1000);
        assert!((s.p50 - 500.0).abs() < 1.0, "{}", s.p50);
        assert!((s.p99 - 990.0).abs() < 1.0, "{}", s.p99);
        assert!((s.max - 1000.0).abs() < 1.0, "{}", s.max);
        assert_eq!(s.curve.last().map(|c| c.0), Some(100.0));
    }

    #[test]
    fn values_round_trip_through_the_scale() {
        let mut d = Dist::new();
        d.record_value(0.125);
        d.record_value(0.5);
        let s = d.summary_value();
        assert!((s.max - 0.5).abs() < 0.001, "{}", s.max);
    }
}
