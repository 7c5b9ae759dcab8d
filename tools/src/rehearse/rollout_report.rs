//! What a rollout found, beyond one termination's report: each pod's life (started, ready,
//! terminating, exited), the failed requests by the pod that failed them (the client's port
//! matched against the Service's connection log), and the reconnect burst: the most new
//! connections a surviving pod received in 100 ms while an old pod drained.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::deployment::Limits;
use super::pod::PodExit;
use super::report::{ModeResult, Rehearsal, signed_ms};
use super::service::Routed;
use crate::soak::classify::Failure;
use crate::soak::client::Record;
use crate::soak::report::BUCKET;

/// One pod as the rollout saw it.
#[derive(Debug, Clone)]
pub struct PodLife {
    pub name: String,
    pub addr: SocketAddr,
    /// Started by the rollout (the new version), or there before it.
    pub new: bool,
    pub started: Instant,
    pub ready: Option<Instant>,
    pub terminating: Option<Instant>,
    pub exited: Option<(Instant, PodExit)>,
}

impl PodLife {
    pub fn new(name: &str, addr: SocketAddr, new: bool, started: Instant) -> Self {
        Self {
            name: name.to_owned(),
            addr,
            new,
            started,
            ready: None,
            terminating: None,
            exited: None,
        }
    }
}

/// A pod's times, in ms from the rollout's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTimes {
    pub name: String,
    pub new: bool,
    pub started_ms: i64,
    pub ready_ms: Option<i64>,
    pub terminating_ms: Option<i64>,
    pub exited_ms: Option<i64>,
    pub exit: Option<PodExit>,
}

impl PodTimes {
    /// From the termination's start to the pod's exit.
    pub fn drain_ms(&self) -> Option<i64> {
        Some(self.exited_ms? - self.terminating_ms?)
    }
}

/// The reconnect burst of one termination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Burst {
    pub terminated: String,
    /// The most new connections one surviving pod received in any 100 ms, from the
    /// termination's start to a second after the pod's exit; and which pod.
    pub peak: u32,
    pub on: String,
    /// Every surviving pod's own peak, highest first.
    pub survivors: Vec<(String, u32)>,
}

#[derive(Debug, Clone)]
pub struct Facts {
    pub limits: Limits,
    pub pods: Vec<PodTimes>,
    /// Failed requests by pod ("no endpoint" when the Service had none to give), by class.
    pub by_pod: BTreeMap<String, BTreeMap<Failure, u64>>,
    pub bursts: Vec<Burst>,
    /// The most new connections one pod received in any 100 ms of the second before the
    /// rollout, for scale: the same measure as a burst.
    pub before: u32,
    pub total: Duration,
}

impl Facts {
    /// How the old pods ended: the worst of them (a SIGKILL, then an exit code other than 0).
    pub fn worst_exit(&self) -> PodExit {
        let exits = || self.pods.iter().filter_map(|p| p.exit.clone());
        exits()
            .find(|e| *e == PodExit::KilledAtGracePeriod)
            .or_else(|| exits().find(|e| *e != PodExit::Ended(nginx_graceful::os::reaper::Exit::Code(0))))
            .or_else(|| exits().next_back())
            .unwrap_or(PodExit::KilledAtGracePeriod)
    }

    /// The highest burst of the rollout.
    pub fn peak(&self) -> u32 {
        self.bursts.iter().map(|b| b.peak).max().unwrap_or(0)
    }
}

pub const NO_ENDPOINT: &str = "no endpoint";
/// The rate before the rollout is read over this last stretch before it.
const BEFORE: Duration = Duration::from_secs(1);
const NOT_TRACED: &str = "not traced";

/// Reads the rollout's facts from what the pods, the load and the Service recorded; `start` is
/// the load's start, `t0` the rollout's.
pub fn facts(
    limits: Limits,
    lives: Vec<PodLife>,
    results: &[(ModeResult, Vec<Record>)],
    routed: &[Routed],
    start: Instant,
    t0: Instant,
    done: Instant,
) -> Facts {
    let ms = |at: Instant| signed_ms(at, t0);
    let names: HashMap<SocketAddr, &str> = lives.iter().map(|l| (l.addr, l.name.as_str())).collect();
    let records = results.iter().flat_map(|(_, records)| records.iter());
    let by_pod = failures_by_pod(records, routed, start, &names);
    let arrivals = arrivals_by_pod(routed);
    let bursts = bursts(&lives, &arrivals);
    let since = t0.checked_sub(BEFORE).unwrap_or(start).max(start);
    let before = lives
        .iter()
        .filter(|l| !l.new)
        .filter_map(|l| arrivals.get(&l.addr))
        .map(|times| busiest(times, since, t0))
        .max()
        .unwrap_or(0);
    let pods = lives
        .into_iter()
        .map(|l| PodTimes {
            started_ms: if l.new {
                ms(l.started)
            } else {
                ms(start.min(l.started))
            },
            ready_ms: l.ready.map(ms),
            terminating_ms: l.terminating.map(ms),
            exited_ms: l.exited.as_ref().map(|(at, _)| ms(*at)),
            exit: l.exited.map(|(_, exit)| exit),
            name: l.name,
            new: l.new,
        })
        .collect();
    Facts {
        limits,
        pods,
        by_pod,
        bursts,
        before,
        total: done.saturating_duration_since(t0),
    }
}

/// Each failed request's pod: the last connection the Service accepted from the request's
/// client port before the client saw the failure.
fn failures_by_pod<'a>(
    records: impl Iterator<Item = &'a Record>,
    routed: &[Routed],
    start: Instant,
    names: &HashMap<SocketAddr, &str>,
) -> BTreeMap<String, BTreeMap<Failure, u64>> {
    let failed: Vec<&Record> = records.filter(|r| r.failure.is_some()).collect();
    // Only the ports of failed requests are looked up: the log holds every connection.
    let ports: HashSet<u16> = failed.iter().map(|r| r.port).collect();
    let mut by_port: HashMap<u16, Vec<&Routed>> = HashMap::new();
    for r in routed.iter().filter(|r| ports.contains(&r.client_port)) {
        by_port.entry(r.client_port).or_default().push(r);
    }
    let mut by_pod: BTreeMap<String, BTreeMap<Failure, u64>> = BTreeMap::new();
    for record in failed {
        let Some(failure) = record.failure else { continue };
        let seen = start + record.at + record.latency;
        let connection = by_port
            .get(&record.port)
            .and_then(|list| list.iter().rev().find(|r| r.at <= seen));
        let pod = match connection {
            None => NOT_TRACED,
            Some(Routed { backend: None, .. }) => NO_ENDPOINT,
            Some(Routed {
                backend: Some(addr), ..
            }) => names.get(addr).copied().unwrap_or(NOT_TRACED),
        };
        *by_pod
            .entry(pod.to_owned())
            .or_default()
            .entry(failure)
            .or_default() += 1;
    }
    by_pod
}

/// Each pod's new connections, in the order the Service routed them.
fn arrivals_by_pod(routed: &[Routed]) -> HashMap<SocketAddr, Vec<Instant>> {
    let mut per_pod: HashMap<SocketAddr, Vec<Instant>> = HashMap::new();
    for r in routed {
        if let Some(addr) = r.backend {
            per_pod.entry(addr).or_default().push(r.at);
        }
    }
    per_pod
}

/// The most of `times` (in order) that fall in any one 100 ms inside `from..until`.
fn busiest(times: &[Instant], from: Instant, until: Instant) -> u32 {
    let first = times.partition_point(|t| *t < from);
    let end = times.partition_point(|t| *t < until);
    let inside = &times[first..end];
    let mut most = 0;
    let mut tail = 0;
    for (head, at) in inside.iter().enumerate() {
        while *at - inside[tail] >= BUCKET {
            tail += 1;
        }
        most = most.max(head + 1 - tail);
    }
    most as u32
}

/// Per old pod's termination: the most new connections another pod received in any 100 ms,
/// from the termination's start to a second after the exit, counting each other pod only
/// until its own termination began (a draining pod is no survivor).
fn bursts(lives: &[PodLife], arrivals: &HashMap<SocketAddr, Vec<Instant>>) -> Vec<Burst> {
    let mut bursts = Vec::new();
    for gone in lives {
        let (Some(from), Some((exited, _))) = (gone.terminating, &gone.exited) else {
            continue;
        };
        let until = *exited + Duration::from_secs(1);
        let mut peaks: Vec<(String, u32)> = lives
            .iter()
            .filter(|l| l.addr != gone.addr && l.terminating.is_none_or(|t| t > from))
            .filter_map(|l| {
                let times = arrivals.get(&l.addr)?;
                let most = busiest(times, from, l.terminating.map_or(until, |t| t.min(until)));
                (most > 0).then(|| (l.name.clone(), most))
            })
            .collect();
        peaks.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if let Some((on, peak)) = peaks.first().cloned() {
            bursts.push(Burst {
                terminated: gone.name.clone(),
                peak,
                on,
                survivors: peaks,
            });
        }
    }
    bursts
}

fn secs(ms: i64) -> String {
    format!("{:+.2} s", ms as f64 / 1000.0)
}

/// The rollout's part of a rehearsal's text: pods, failures by pod, bursts, total time.
pub fn text(facts: &Facts, out: &mut String) {
    for pod in &facts.pods {
        let mut line = format!("  {:<6}", pod.name);
        if pod.new {
            let _ = write!(line, " started {}", secs(pod.started_ms));
        }
        if let Some(ready) = pod.ready_ms {
            let _ = write!(line, ", ready {}", secs(ready));
        }
        if let (Some(term), Some(exit_ms), Some(exit)) = (pod.terminating_ms, pod.exited_ms, &pod.exit) {
            let _ = write!(
                line,
                " terminating {}, exited {} ({exit}; drained in {:.2} s)",
                secs(term),
                secs(exit_ms),
                (exit_ms - term) as f64 / 1000.0
            );
        }
        if let Some(burst) = facts.bursts.iter().find(|b| b.terminated == pod.name) {
            let _ = write!(
                line,
                "; then at most {} new connections in 100 ms on {}",
                burst.peak, burst.on
            );
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "  in the second before the rollout: at most {} new connections in 100 ms on a pod",
        facts.before
    );
    if !facts.by_pod.is_empty() {
        let per_pod: Vec<String> = facts
            .by_pod
            .iter()
            .map(|(pod, classes)| {
                let n: u64 = classes.values().sum();
                let detail: Vec<String> = classes.iter().map(|(c, n)| format!("{} {n}", c.name())).collect();
                format!("{pod} {n} ({})", detail.join(", "))
            })
            .collect();
        let _ = writeln!(out, "  failed by pod: {}", per_pod.join("; "));
    }
    let _ = writeln!(
        out,
        "  rollout: {} pods replaced in {:.2} s (until every new pod was ready and every old pod had exited)",
        facts.limits.replicas,
        facts.total.as_secs_f64()
    );
}

pub fn to_json(facts: &Facts) -> Value {
    json!({
        "replicas": facts.limits.replicas,
        "max_surge": facts.limits.surge,
        "max_unavailable": facts.limits.unavailable,
        "total_ms": facts.total.as_millis() as u64,
        "before_per_100ms": facts.before,
        "pods": facts.pods.iter().map(|p| json!({
            "name": p.name, "new": p.new, "started_ms": p.started_ms, "ready_ms": p.ready_ms,
            "terminating_ms": p.terminating_ms, "exited_ms": p.exited_ms, "drain_ms": p.drain_ms(),
            "exit": p.exit.as_ref().map(ToString::to_string),
        })).collect::<Vec<_>>(),
        "bursts": facts.bursts.iter().map(|b| json!({
            "terminated": b.terminated, "peak_per_100ms": b.peak, "on": b.on,
            "survivors": b.survivors.iter().map(|(pod, n)| (pod.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
        "failed_by_pod": facts.by_pod.iter().map(|(pod, classes)| (pod.clone(), json!(
            classes.iter().map(|(c, n)| (c.name().to_owned(), json!(n))).collect::<serde_json::Map<_, _>>()
        ))).collect::<serde_json::Map<_, _>>(),
    })
}

/// Per strategy over its runs: the medians of the rollout time, of every drain, and of each
/// run's highest burst.
pub struct RolloutRow {
    pub total: Duration,
    pub drain_median: Duration,
    pub drain_max: Duration,
    pub peak_median: u32,
    pub peak_max: u32,
}

pub fn row<'a>(runs: impl Iterator<Item = &'a Rehearsal>) -> Option<RolloutRow> {
    let facts: Vec<&Facts> = runs.filter_map(|r| r.rollout.as_ref()).collect();
    if facts.is_empty() {
        return None;
    }
    let mut totals: Vec<Duration> = facts.iter().map(|f| f.total).collect();
    let mut drains: Vec<i64> = facts
        .iter()
        .flat_map(|f| f.pods.iter().filter_map(PodTimes::drain_ms))
        .collect();
    let mut peaks: Vec<u32> = facts.iter().map(|f| f.peak()).collect();
    totals.sort();
    drains.sort();
    peaks.sort();
    let ms = |v: Option<&i64>| Duration::from_millis(v.copied().unwrap_or(0).max(0) as u64);
    Some(RolloutRow {
        total: totals[totals.len() / 2],
        drain_median: ms(drains.get(drains.len() / 2)),
        drain_max: ms(drains.last()),
        peak_median: peaks[peaks.len() / 2],
        peak_max: peaks.last().copied().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(host: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, host], 80))
    }

    fn failed(at_ms: u64, port: u16) -> Record {
        Record {
            at: Duration::from_millis(at_ms),
            latency: Duration::from_millis(5),
            failure: Some(Failure::ResetNew),
            reused: false,
            status: 0,
            path: 0,
            port,
        }
    }

    #[test]
    fn a_failure_belongs_to_the_last_connection_from_its_port_before_it_was_seen() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let routed = [
            Routed {
                at: at(10),
                client_port: 5000,
                backend: Some(addr(11)),
            },
            // The port is reused later for a connection to another pod.
            Routed {
                at: at(500),
                client_port: 5000,
                backend: Some(addr(12)),
            },
            Routed {
                at: at(600),
                client_port: 6000,
                backend: None,
            },
        ];
        let names = HashMap::from([(addr(11), "v1-a"), (addr(12), "v1-b")]);
        let records = [
            failed(100, 5000),
            failed(700, 5000),
            failed(650, 6000),
            failed(5, 7000),
        ];
        let by_pod = failures_by_pod(records.iter(), &routed, start, &names);
        let count = |pod: &str| by_pod.get(pod).map_or(0, |c| c.values().sum::<u64>());
        assert_eq!(
            (
                count("v1-a"),
                count("v1-b"),
                count(NO_ENDPOINT),
                count(NOT_TRACED)
            ),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn the_busiest_100_ms_is_found_wherever_it_falls() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Five at 150..190 and five at 210..240: ten within 100 ms, across a 200 ms mark.
        let times: Vec<Instant> = [150, 160, 170, 180, 190, 210, 220, 230, 240, 245, 400]
            .into_iter()
            .map(at)
            .collect();
        assert_eq!(busiest(&times, t0, at(1000)), 10);
        // Only within the window asked for.
        assert_eq!(busiest(&times, at(200), at(1000)), 5);
        assert_eq!(busiest(&times, t0, at(150)), 0);
    }

    #[test]
    fn pods_terminated_together_are_not_each_others_survivors() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let exit = || {
            Some((
                at(2000),
                PodExit::Ended(nginx_graceful::os::reaper::Exit::Code(0)),
            ))
        };
        let mut a = PodLife::new("v1-a", addr(11), false, t0);
        let mut b = PodLife::new("v1-b", addr(12), false, t0);
        (a.terminating, a.exited) = (Some(at(1000)), exit());
        (b.terminating, b.exited) = (Some(at(1000)), exit());
        // v1-c is terminated later: what it gets after that does not count.
        let mut c = PodLife::new("v1-c", addr(13), false, t0);
        c.terminating = Some(at(1500));
        let routed: Vec<Routed> = [(1100, 12), (1100, 12), (1200, 13), (1600, 13), (1600, 13)]
            .into_iter()
            .map(|(ms, host)| Routed {
                at: at(ms),
                client_port: 1,
                backend: Some(addr(host)),
            })
            .collect();
        let bursts = bursts(&[a, b, c], &arrivals_by_pod(&routed));
        let peaks: Vec<(&str, &str, u32)> = bursts
            .iter()
            .map(|b| (b.terminated.as_str(), b.on.as_str(), b.peak))
            .collect();
        assert_eq!(peaks, [("v1-a", "v1-c", 1), ("v1-b", "v1-c", 1)]);
    }

    #[test]
    fn the_burst_is_the_busiest_100_ms_of_a_survivor_while_the_pod_drains() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut gone = PodLife::new("v1-a", addr(11), false, t0);
        gone.terminating = Some(at(1000));
        gone.exited = Some((
            at(2000),
            PodExit::Ended(nginx_graceful::os::reaper::Exit::Code(0)),
        ));
        let survivor = PodLife::new("v1-b", addr(12), false, t0);
        // A pod that was already draining is no survivor, however many it got.
        let mut draining = PodLife::new("v1-c", addr(13), false, t0);
        draining.terminating = Some(at(500));
        let mut routed = Vec::new();
        let mut connect = |ms: u64, host: u8, n: usize| {
            for _ in 0..n {
                routed.push(Routed {
                    at: at(ms),
                    client_port: 1,
                    backend: Some(addr(host)),
                });
            }
        };
        connect(100, 12, 50); // before the termination: not its burst
        connect(1210, 12, 7);
        connect(1250, 12, 3);
        connect(2500, 12, 4);
        connect(1200, 13, 30);
        connect(3500, 12, 40); // more than a second after the exit
        let bursts = bursts(&[gone, survivor, draining], &arrivals_by_pod(&routed));
        assert_eq!(
            bursts,
            [Burst {
                terminated: "v1-a".into(),
                peak: 10,
                on: "v1-b".into(),
                survivors: vec![("v1-b".into(), 10)],
            }]
        );
    }
}
