//! What a rehearsal found: the termination's events, and per client mode the failed requests by
//! class with their times; one block per rehearsal, one table for a comparison, or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Mode;
use super::pod::PodExit;
use crate::soak::client::Record;
use crate::soak::report::{BUCKET, Summary, millis_from};

pub struct Rehearsal {
    pub strategy: &'static str,
    pub repeat: usize,
    pub lag: Duration,
    pub grace: Duration,
    pub modes: Vec<ModeResult>,
    pub events: Vec<Event>,
    pub exit: PodExit,
    /// From the start of the termination to PID 1's exit; for a rollout, from its start to the
    /// last old pod's exit.
    pub exit_after: Duration,
    /// `--rollout`: what the whole rolling update did (times are then from its start).
    pub rollout: Option<super::rollout_report::Facts>,
}

pub struct ModeResult {
    pub mode: Mode,
    pub summary: Summary,
    /// Requests per 100 ms from the termination's start, for the plot: successes by when they
    /// started, failures by when they were seen.
    pub series: Vec<Point>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub at_ms: i64,
    pub ok: u32,
    pub failed: u32,
}

impl ModeResult {
    pub fn new(mode: Mode, summary: Summary, records: &[Record], origin: Duration) -> Self {
        let step = BUCKET.as_millis() as i64;
        let mut buckets: BTreeMap<i64, Point> = BTreeMap::new();
        for record in records {
            // Successes by when they started, failures by when they were seen.
            let seen = match record.failure {
                None => record.at,
                Some(_) => record.at + record.latency,
            };
            let at_ms = millis_from(seen, origin).div_euclid(step) * step;
            let point = buckets.entry(at_ms).or_insert(Point {
                at_ms,
                ok: 0,
                failed: 0,
            });
            match record.failure {
                None => point.ok += 1,
                Some(_) => point.failed += 1,
            }
        }
        Self {
            mode,
            summary,
            series: buckets.into_values().collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    LoadStart,
    Terminating,
    PreStop,
    PreStopDone,
    EndpointRemoved,
    StopSignal,
    Killed,
    Exited,
    /// `--topology local`: the kubelet's readiness probe changed.
    Readiness,
    KubeProxy,
    HealthCheck,
    LoadBalancer,
    /// `--rollout`: the rolling update begins.
    RolloutStart,
    PodStarted,
    EndpointAdded,
}

impl EventKind {
    /// A short label for the plot.
    pub fn label(self) -> &'static str {
        match self {
            EventKind::LoadStart => "load",
            EventKind::Terminating => "terminating",
            EventKind::PreStop => "preStop",
            EventKind::PreStopDone => "preStop done",
            EventKind::EndpointRemoved => "endpoint removed",
            EventKind::StopSignal => "stop signal",
            EventKind::Killed => "SIGKILL",
            EventKind::Exited => "exited",
            EventKind::Readiness => "readiness",
            EventKind::KubeProxy => "kube-proxy",
            EventKind::HealthCheck => "health check",
            EventKind::LoadBalancer => "load balancer",
            EventKind::RolloutStart => "rollout",
            EventKind::PodStarted => "pod started",
            EventKind::EndpointAdded => "endpoint added",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// From the start of the termination; negative before it.
    pub at_ms: i64,
    pub kind: EventKind,
    pub detail: String,
}

impl Event {
    pub fn new(at: Instant, t0: Instant, kind: EventKind, detail: String) -> Self {
        Self {
            at_ms: signed_ms(at, t0),
            kind,
            detail,
        }
    }

    /// The load began at `start`, before the times' origin `t0`.
    pub fn load_start(start: Instant, t0: Instant) -> Self {
        Self::new(start, t0, EventKind::LoadStart, "the load starts".into())
    }
}

/// `at` in ms from `t0`, negative before it.
pub fn signed_ms(at: Instant, t0: Instant) -> i64 {
    if at >= t0 {
        (at - t0).as_millis() as i64
    } else {
        -((t0 - at).as_millis() as i64)
    }
}

fn secs(ms: i64) -> String {
    format!("{:+.2} s", ms as f64 / 1000.0)
}

impl Rehearsal {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let (what, from) = match self.rollout {
            Some(_) => ("rollout, ", "the rollout's start"),
            None => ("", "the termination's start"),
        };
        let _ = writeln!(
            out,
            "\n== {} ({what}run {}; propagation lag {:?}, grace period {:?}); times from {from}",
            self.strategy, self.repeat, self.lag, self.grace
        );
        for event in &self.events {
            let _ = writeln!(out, "  {:>9}  {}", secs(event.at_ms), event.detail);
        }
        for mode in &self.modes {
            let s = &mode.summary;
            let _ = write!(
                out,
                "  {:<11} {} failed of {}",
                mode.mode.name(),
                s.failed,
                s.requests
            );
            let detail: Vec<String> = s
                .by_class
                .iter()
                .map(|(class, n)| {
                    let times: Vec<i64> = s
                        .buckets
                        .iter()
                        .filter(|b| b.by_class.contains_key(class))
                        .map(|b| b.at_ms)
                        .collect();
                    let first = times.first().copied().unwrap_or(0);
                    let last = times.last().copied().unwrap_or(0) + BUCKET.as_millis() as i64;
                    format!("{} {n} between {} and {}", class.name(), secs(first), secs(last))
                })
                .collect();
            if detail.is_empty() {
                let _ = writeln!(out);
            } else {
                let _ = writeln!(out, ": {}", detail.join("; "));
            }
        }
        if let Some(facts) = &self.rollout {
            super::rollout_report::text(facts, &mut out);
        }
        out
    }

    fn to_json(&self) -> Value {
        json!({
            "strategy": self.strategy,
            "repeat": self.repeat,
            "propagation_lag_ms": self.lag.as_millis() as u64,
            "grace_period_ms": self.grace.as_millis() as u64,
            "exit": self.exit.to_string(),
            "exit_after_ms": self.exit_after.as_millis() as u64,
            "events": self.events.iter().map(|e| json!({
                "at_ms": e.at_ms, "event": e.kind.label(), "detail": e.detail,
            })).collect::<Vec<_>>(),
            "modes": self.modes.iter().map(|m| (m.mode.name().to_owned(), m.summary.to_json()))
                .collect::<serde_json::Map<_, _>>(),
            "rollout": self.rollout.as_ref().map(super::rollout_report::to_json),
        })
    }
}

/// Per strategy, over its runs: failed / total per mode, runs with a failure, and the median
/// time from the termination's start to the pod's exit.
pub struct Row {
    pub strategy: &'static str,
    pub runs: usize,
    /// Per mode, in order: (mode, failed, total, runs with a failure).
    pub modes: Vec<(Mode, u64, u64, usize)>,
    pub exit_after: Duration,
    pub exits: Vec<String>,
    pub rollout: Option<super::rollout_report::RolloutRow>,
}

pub fn rows(rehearsals: &[Rehearsal]) -> Vec<Row> {
    let mut order: Vec<&'static str> = Vec::new();
    for r in rehearsals {
        if !order.contains(&r.strategy) {
            order.push(r.strategy);
        }
    }
    order
        .into_iter()
        .map(|strategy| {
            let runs: Vec<&Rehearsal> = rehearsals.iter().filter(|r| r.strategy == strategy).collect();
            let mut modes: Vec<(Mode, u64, u64, usize)> = Vec::new();
            for run in &runs {
                for m in &run.modes {
                    let failed_run = usize::from(m.summary.failed > 0);
                    match modes.iter_mut().find(|(mode, ..)| *mode == m.mode) {
                        Some(entry) => {
                            entry.1 += m.summary.failed;
                            entry.2 += m.summary.requests;
                            entry.3 += failed_run;
                        }
                        None => modes.push((m.mode, m.summary.failed, m.summary.requests, failed_run)),
                    }
                }
            }
            let mut times: Vec<Duration> = runs.iter().map(|r| r.exit_after).collect();
            times.sort();
            let mut exits: Vec<String> = runs.iter().map(|r| r.exit.to_string()).collect();
            exits.sort();
            exits.dedup();
            Row {
                strategy,
                runs: runs.len(),
                modes,
                exit_after: times[times.len() / 2],
                exits,
                rollout: super::rollout_report::row(runs.iter().copied()),
            }
        })
        .collect()
}

/// The comparison: strategy x mode -> failed / total, and how the pod ended.
pub fn table(rehearsals: &[Rehearsal]) -> String {
    let rows = rows(rehearsals);
    let mut out = String::new();
    let Some(first) = rows.first() else { return out };
    // Names with --graceful-args flags are long: the column fits the longest.
    let width = rows.iter().map(|r| r.strategy.len() + 2).fold(26, usize::max);
    let _ = write!(out, "{:<width$}", "strategy");
    for (mode, ..) in &first.modes {
        let _ = write!(out, "{:<30}", format!("{} failed/total", mode.name()));
    }
    match first.rollout {
        Some(_) => {
            let _ = writeln!(
                out,
                "rollout time   drain (median, max)   burst per 100 ms (median, max)   old pods"
            );
        }
        None => {
            let _ = writeln!(out, "pod exited after (median)");
        }
    }
    for row in &rows {
        let _ = write!(out, "{:<width$}", row.strategy);
        for (_, failed, total, failed_runs) in &row.modes {
            let cell = if row.runs > 1 {
                format!("{failed} / {total} ({failed_runs} of {} runs)", row.runs)
            } else {
                format!("{failed} / {total}")
            };
            let _ = write!(out, "{cell:<30}");
        }
        let exits = row.exits.join(", ");
        match &row.rollout {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "{:<15}{:<22}{:<33}{exits}",
                    format!("{:.1} s", r.total.as_secs_f64()),
                    format!(
                        "{:.1} s, {:.1} s",
                        r.drain_median.as_secs_f64(),
                        r.drain_max.as_secs_f64()
                    ),
                    format!("{}, {}", r.peak_median, r.peak_max),
                );
            }
            None => {
                let _ = writeln!(out, "{:.1} s ({exits})", row.exit_after.as_secs_f64());
            }
        }
    }
    out
}

pub fn to_json(rehearsals: &[Rehearsal]) -> Value {
    let table: Vec<Value> = rows(rehearsals)
        .iter()
        .map(|row| {
            json!({
                "strategy": row.strategy,
                "runs": row.runs,
                "exit_after_ms_median": row.exit_after.as_millis() as u64,
                "rollout": row.rollout.as_ref().map(|r| json!({
                    "total_ms_median": r.total.as_millis() as u64,
                    "drain_ms_median": r.drain_median.as_millis() as u64,
                    "drain_ms_max": r.drain_max.as_millis() as u64,
                    "burst_per_100ms_median": r.peak_median,
                    "burst_per_100ms_max": r.peak_max,
                })),
                "exits": row.exits,
                "modes": row.modes.iter().map(|(mode, failed, total, failed_runs)| (mode.name().to_owned(), json!({
                    "failed": failed, "total": total, "runs_with_failures": failed_runs,
                }))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    json!({
        "rehearsals": rehearsals.iter().map(Rehearsal::to_json).collect::<Vec<_>>(),
        "table": table,
    })
}
