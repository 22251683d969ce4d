//! Latency histogram and Prometheus text parsing.

use serde::Serialize;

/// Buckets of [`Hist`]: exact below 128 µs, then 64 sub-buckets per power of two (~1.6 %).
const BUCKETS: usize = 128 + 57 * 64;

/// A log-linear histogram of microsecond values.
#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    sum: u128,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
            sum: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < 128 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros() as usize;
    let sub = ((v >> (e - 6)) & 63) as usize;
    (128 + (e - 7) * 64 + sub).min(BUCKETS - 1)
}

/// The middle of bucket `i`.
fn value_of(i: usize) -> u64 {
    if i < 128 {
        return i as u64;
    }
    let e = (i - 128) / 64 + 7;
    let sub = ((i - 128) % 64) as u64;
    ((64 + sub) << (e - 6)) + ((1u64 << (e - 6)) / 2)
}

impl Hist {
    /// Adds one value (µs).
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
        self.sum += v as u128;
    }

    /// Adds bucket counts made elsewhere with the same buckets (the Go watcher's).
    pub fn add_counts(&mut self, counts: &[(usize, u64)], max: u64, sum: u64) {
        for &(i, c) in counts {
            self.counts[i.min(BUCKETS - 1)] += c;
            self.total += c;
        }
        self.max = self.max.max(max);
        self.sum += sum as u128;
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    /// The value at quantile `q` (0..=1), µs.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let target = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        if target == self.total {
            return self.max;
        }
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return value_of(i).min(self.max);
            }
        }
        self.max
    }

    /// Summary in milliseconds.
    pub fn summary(&self) -> LatencySummary {
        let ms = |v: u64| v as f64 / 1000.0;
        LatencySummary {
            count: self.total,
            mean_ms: if self.total == 0 {
                0.0
            } else {
                self.sum as f64 / self.total as f64 / 1000.0
            },
            p50_ms: ms(self.quantile(0.50)),
            p90_ms: ms(self.quantile(0.90)),
            p99_ms: ms(self.quantile(0.99)),
            p999_ms: ms(self.quantile(0.999)),
            max_ms: ms(self.max),
        }
    }
}

/// Latency quantiles, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Sum of every sample of `name` whose labels contain every `label` (`k="v"`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((head, val)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, lab) = match head.split_once('{') {
            Some((n, rest)) => (n, rest),
            None => (head, ""),
        };
        if n != name || !labels.iter().all(|l| lab.contains(l)) {
            continue;
        }
        if let Ok(v) = val.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The counters and gauges read from etcd's `/metrics`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EtcdCounters {
    pub watchers: f64,
    pub watch_streams: f64,
    pub grpc_watch_started: f64,
    pub grpc_range_started: f64,
    pub grpc_put_started: f64,
    pub grpc_started_total: f64,
}

impl EtcdCounters {
    pub fn parse(text: &str) -> EtcdCounters {
        let started = |m: &str| {
            metric(
                text,
                "grpc_server_started_total",
                &[&format!("grpc_method=\"{m}\"")],
            )
            .unwrap_or(0.0)
        };
        EtcdCounters {
            watchers: metric(text, "etcd_debugging_mvcc_watcher_total", &[]).unwrap_or(f64::NAN),
            watch_streams: metric(text, "etcd_debugging_mvcc_watch_stream_total", &[])
                .unwrap_or(f64::NAN),
            grpc_watch_started: started("Watch"),
            grpc_range_started: started("Range"),
            grpc_put_started: started("Put"),
            grpc_started_total: metric(text, "grpc_server_started_total", &[]).unwrap_or(0.0),
        }
    }

    /// Counter increase from `before` to `self`.
    pub fn delta(&self, before: &EtcdCounters) -> CounterDelta {
        CounterDelta {
            watch: self.grpc_watch_started - before.grpc_watch_started,
            range: self.grpc_range_started - before.grpc_range_started,
            put: self.grpc_put_started - before.grpc_put_started,
            all: self.grpc_started_total - before.grpc_started_total,
        }
    }
}

/// Increase of etcd's `grpc_server_started_total` over one phase, by method.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CounterDelta {
    pub watch: f64,
    pub range: f64,
    pub put: f64,
    pub all: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = Hist::default();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, want) in [(0.5, 50_000.0), (0.99, 99_000.0), (0.999, 99_900.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.02, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.quantile(1.0), 100_000);
        assert_eq!(h.summary().count, 100_000);
        for v in [0u64, 1, 127, 128, 129, 255, 256, 1 << 20, u64::MAX / 2] {
            let i = index(v);
            assert!(i < BUCKETS);
            if v < (1 << 40) {
                let back = value_of(i) as f64;
                assert!((back - v as f64).abs() <= (v as f64 * 0.02).max(1.0), "{v}");
            }
        }
    }

    #[test]
    fn metric_sums_labelled_samples() {
        let text = "# HELP x\n\
            grpc_server_started_total{grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 3\n\
            grpc_server_started_total{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 5\n\
            etcd_debugging_mvcc_watcher_total 7\n";
        let c = EtcdCounters::parse(text);
        assert_eq!(c.grpc_watch_started, 3.0);
        assert_eq!(c.grpc_range_started, 5.0);
        assert_eq!(c.grpc_started_total, 8.0);
        assert_eq!(c.watchers, 7.0);
        assert!(c.watch_streams.is_nan());
    }
}
