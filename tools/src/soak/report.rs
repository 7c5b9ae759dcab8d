//! From the requests a load made to what a person or a CI job reads: counts by failure class,
//! latency percentiles, and when the failures happened, in 100 ms buckets.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use super::classify::Failure;
use super::client::Record;

pub const BUCKET: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub requests: u64,
    pub failed: u64,
    pub elapsed: Duration,
    pub by_class: BTreeMap<Failure, u64>,
    /// Over the requests that succeeded; None when none did.
    pub latency: Option<Latency>,
    /// Failures per 100 ms by when the client saw them, only buckets with any; times from `origin`.
    pub buckets: Vec<Bucket>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Start of the bucket in ms from the origin (negative before it).
    pub at_ms: i64,
    pub by_class: BTreeMap<Failure, u64>,
}

impl Bucket {
    pub fn count(&self) -> u64 {
        self.by_class.values().sum()
    }
}

/// Sums up `records`; bucket times count from `origin` (the start of the load for `soak`, the
/// start of the termination for `rehearse`).
pub fn summarize(records: &[Record], elapsed: Duration, origin: Duration) -> Summary {
    let mut by_class = BTreeMap::new();
    let mut buckets: BTreeMap<i64, BTreeMap<Failure, u64>> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(records.len());
    for record in records {
        match record.failure {
            None => latencies.push(record.latency),
            Some(failure) => {
                *by_class.entry(failure).or_insert(0) += 1;
                // A failure counts when the client saw it: a slow request cut off at the
                // termination belongs to the termination, not to when it started.
                let at = millis_from(record.at + record.latency, origin);
                let bucket = at.div_euclid(BUCKET.as_millis() as i64) * BUCKET.as_millis() as i64;
                *buckets.entry(bucket).or_default().entry(failure).or_insert(0) += 1;
            }
        }
    }
    latencies.sort_unstable();
    let latency = (!latencies.is_empty()).then(|| Latency {
        p50: percentile(&latencies, 50.0),
        p90: percentile(&latencies, 90.0),
        p99: percentile(&latencies, 99.0),
        max: *latencies.last().expect("not empty"),
    });
    Summary {
        requests: records.len() as u64,
        failed: by_class.values().sum(),
        elapsed,
        by_class,
        latency,
        buckets: buckets
            .into_iter()
            .map(|(at_ms, by_class)| Bucket { at_ms, by_class })
            .collect(),
    }
}

/// Signed milliseconds from `origin` to `at`.
pub fn millis_from(at: Duration, origin: Duration) -> i64 {
    at.as_millis() as i64 - origin.as_millis() as i64
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

impl Summary {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn to_json(&self) -> Value {
        let classes = |map: &BTreeMap<Failure, u64>| -> Value {
            map.iter().map(|(f, n)| (f.name().to_owned(), json!(n))).collect()
        };
        json!({
            "requests": self.requests,
            "ok": self.requests - self.failed,
            "failed": self.failed,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "rate_per_s": self.rate().round(),
            "failures": classes(&self.by_class),
            "latency_ms": self.latency.map(|l| json!({
                "p50": ms(l.p50), "p90": ms(l.p90), "p99": ms(l.p99), "max": ms(l.max),
            })),
            "failures_per_100ms": self.buckets.iter().map(|b| json!({
                "at_ms": b.at_ms, "failed": b.count(), "failures": classes(&b.by_class),
            })).collect::<Vec<_>>(),
        })
    }

    /// The report a person reads; `origin_name` says what bucket times count from.
    pub fn to_text(&self, origin_name: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "requests   {:>9}   {:.0}/s over {:.1} s",
            self.requests,
            self.rate(),
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(out, "ok         {:>9}", self.requests - self.failed);
        let _ = writeln!(out, "failed     {:>9}", self.failed);
        if let Some(l) = self.latency {
            let _ = writeln!(
                out,
                "latency    p50 {} ms   p90 {} ms   p99 {} ms   max {} ms",
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.max)
            );
        }
        if !self.by_class.is_empty() {
            let _ = writeln!(out, "failures by class:");
            for (failure, n) in &self.by_class {
                let _ = writeln!(out, "  {:<16}{n:>7}   {}", failure.name(), failure.meaning());
            }
            let _ = writeln!(out, "failures per 100 ms (time from {origin_name}):");
            for bucket in &self.buckets {
                let classes: Vec<String> = bucket
                    .by_class
                    .iter()
                    .map(|(f, n)| format!("{} {n}", f.name()))
                    .collect();
                let _ = writeln!(
                    out,
                    "  {:>+8.1}s {:>6}   {}",
                    bucket.at_ms as f64 / 1000.0,
                    bucket.count(),
                    classes.join(", ")
                );
            }
        }
        out
    }
}

/// One line per request, for a spreadsheet or a plot: `at_ms,latency_ms,path,reused,status,outcome`.
pub fn timeline_csv(records: &[Record], paths: &super::mix::PathMix, origin: Duration) -> String {
    let mut out = String::from("at_ms,latency_ms,path,reused,status,outcome\n");
    for r in records {
        let _ = writeln!(
            out,
            "{:.3},{:.3},{},{},{},{}",
            (r.at.as_secs_f64() - origin.as_secs_f64()) * 1000.0,
            r.latency.as_secs_f64() * 1000.0,
            paths.path(r.path as usize),
            r.reused,
            r.status,
            r.failure.map_or("ok", Failure::name)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(at_ms: u64, latency_ms: u64, failure: Option<Failure>) -> Record {
        Record {
            at: Duration::from_millis(at_ms),
            latency: Duration::from_millis(latency_ms),
            failure,
            reused: false,
            status: if failure.is_none() { 200 } else { 0 },
            path: 0,
            port: 0,
        }
    }

    #[test]
    fn failures_are_counted_by_class_and_by_100ms() {
        let records = [
            record(10, 1, None),
            record(950, 1, Some(Failure::Refused)),
            record(900, 98, Some(Failure::ResetReused)),
            // Started before the origin, failed after it.
            record(950, 60, Some(Failure::Refused)),
            record(2000, 1, None),
        ];
        let summary = summarize(&records, Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!((summary.requests, summary.failed), (5, 3));
        assert_eq!(summary.by_class[&Failure::Refused], 2);
        let buckets: Vec<(i64, u64)> = summary.buckets.iter().map(|b| (b.at_ms, b.count())).collect();
        // Seen at 951 and 998 ms: the bucket 100 ms before the origin; at 1010 ms: the next.
        assert_eq!(buckets, [(-100, 2), (0, 1)]);
    }

    #[test]
    fn latency_percentiles_are_over_successes_by_nearest_rank() {
        let mut records: Vec<Record> = (1..=100).map(|i| record(i, i, None)).collect();
        records.push(record(0, 5000, Some(Failure::Timeout)));
        let l = summarize(&records, Duration::from_secs(1), Duration::ZERO)
            .latency
            .unwrap();
        let got = [l.p50, l.p90, l.p99, l.max].map(|d| d.as_millis());
        assert_eq!(got, [50, 90, 99, 100]);
        assert_eq!(
            summarize(&[], Duration::from_secs(1), Duration::ZERO).latency,
            None
        );
    }
}
