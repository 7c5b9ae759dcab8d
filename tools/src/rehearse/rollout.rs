//! `rehearse --rollout`: a Deployment's rolling update on one machine. `--replicas` old pods
//! serve behind the Service; the controller's rules ([`super::deployment`]) say when a new pod
//! starts and when an old one is terminated. A new pod counts as ready at the first readiness
//! probe it passes (probed at once, then every `--probe-period`, as the kubelet does), and its
//! endpoint joins the Service `--propagation-lag` later; an old pod is terminated in the
//! kubelet's order ([`super::terminate`]), its endpoint leaving `--propagation-lag` later. The
//! load runs through the Service the whole time; what it saw is read per pod and per 100 ms
//! ([`super::rollout_report`]).

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::deployment::{Counts, Limits};
use super::pod::{Pod, PodExit};
use super::readiness::Probe;
use super::report::{Event, EventKind, Rehearsal};
use super::rollout_report::{self, PodLife};
use super::service::Service;
use super::strategy::{Strategy, Variant};
use super::topology::Topology;
use super::{SERVICE_IP, Settings, finish_loads, start_loads, start_pod, terminate};
use crate::cli::RehearseArgs;
use crate::error::Error;

/// Pod i listens on 127.0.0.(11 + i): old pods first, then new ones.
const FIRST_POD_HOST: usize = 11;
/// The last host number a pod can have in 127.0.0.0/24 (.255 is its broadcast address).
const LAST_POD_HOST: usize = 254;
/// How long a new pod may take to pass its first readiness probe.
const READY_WITHIN: Duration = Duration::from_secs(30);

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, (FIRST_POD_HOST + i) as u8)
}

/// Everything a rollout needs from this machine, checked before any pod starts: the limits
/// make sense, every pod has a loopback address, and the load's sockets fit the file
/// descriptor limit (raised to its hard limit first).
pub fn preflight(args: &RehearseArgs) -> Result<Limits, Error> {
    let limits =
        Limits::resolve(args.replicas, args.max_surge, args.max_unavailable).map_err(Error::Rehearsal)?;
    if args.topology != Topology::Cluster {
        return Err(Error::Rehearsal(
            "--rollout plays a Service in front of the pods: leave out --topology local".into(),
        ));
    }
    let pods = 2 * limits.replicas;
    let room = LAST_POD_HOST - FIRST_POD_HOST + 1;
    if pods > room {
        return Err(Error::Rehearsal(format!(
            "--replicas {} needs {pods} pod addresses (old and new), and 127.0.0.{FIRST_POD_HOST} to 127.0.0.{LAST_POD_HOST} hold {room}: give --replicas {} or fewer",
            limits.replicas,
            room / 2
        )));
    }
    let last = pod_ip(pods - 1);
    for i in 0..pods {
        let ip = pod_ip(i);
        TcpListener::bind((ip, 0)).map_err(|e| {
            Error::Rehearsal(format!(
                "cannot listen on {ip} ({e}): the pods need 127.0.0.{FIRST_POD_HOST} to {last} on the loopback interface (ip addr add 127.0.0.0/8 dev lo)"
            ))
        })?;
    }
    // Each connection of the load is three sockets here (the client's, and both ends of the
    // Service's forwarding); each pod holds a few (its log, pidfd, pipes).
    let needed = (args.modes.len())
        .saturating_mul(args.concurrency.max(1))
        .saturating_mul(3)
        .saturating_add(pods * 8 + 256) as u64;
    let limit = raise_open_files_limit();
    if needed > limit {
        return Err(Error::Rehearsal(format!(
            "the rollout needs about {needed} file descriptors ({} modes x {} connections x 3, and the pods), and the hard limit is {limit}: raise it (ulimit -Hn as root, LimitNOFILE= for a service) or lower --concurrency",
            args.modes.len(),
            args.concurrency.max(1)
        )));
    }
    Ok(limits)
}

/// Raises the soft limit on open files to the hard one (the pods inherit it), and returns it.
fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// What the rollout's tasks report to the controller.
enum News {
    /// The new pod `life` passed its first readiness probe.
    Ready(usize, Instant),
    NeverReady(usize, Probe),
    /// The pod's endpoint change reached the Service.
    EndpointAdded(usize, Instant),
    EndpointRemoved(usize, Instant),
    /// The old pod's termination ended (the pod is handed back, to be dropped last).
    Terminated(usize, Box<Pod>, Result<(PodExit, Instant, Vec<Event>), Error>),
}

/// One rolling update of one strategy.
pub(crate) async fn rollout(
    settings: &Settings<'_>,
    variant: &Variant,
    limits: Limits,
    repeat: usize,
    dir: &Path,
) -> Result<Rehearsal, Error> {
    let args = settings.args;
    let mut lives: Vec<PodLife> = Vec::new();
    let mut old: VecDeque<(usize, Pod, Strategy)> = VecDeque::new();
    // Every pod stays here (or in `old`) until the end: dropping a pod kills it.
    let mut kept: Vec<Pod> = Vec::new();
    let before = Instant::now();
    for i in 0..limits.replicas {
        let name = pod_name("v1", i);
        let (pod, strategy, _) = start_pod(settings, variant, dir, &name, pod_ip(i)).await?;
        lives.push(PodLife::new(&name, pod.addr, false, before));
        old.push_back((i, pod, strategy));
    }
    for (_, pod, _) in &old {
        pod.wait_serving(settings.tls.as_ref(), Duration::from_secs(15))
            .await?;
    }
    let service = Service::start(
        SocketAddr::new(SERVICE_IP.into(), 0),
        old.iter().map(|(_, pod, _)| pod.addr).collect(),
    )
    .await
    .map_err(Error::internal(
        "cannot listen on 127.0.0.10 for the Service imitation",
    ))?;

    let start = Instant::now();
    // A bound for the load only: the rollout stops it when done.
    let per_pod = args.grace_period + 2 * args.propagation_lag + READY_WITHIN;
    let bound = args.warmup + per_pod * limits.replicas as u32 + args.tail + Duration::from_secs(30);
    let loads = start_loads(settings, service.addr(), start, bound);
    tokio::time::sleep(args.warmup).await;

    let t0 = Instant::now();
    let mut events = vec![Event::load_start(start, t0)];
    events.push(Event::new(
        t0,
        t0,
        EventKind::RolloutStart,
        format!(
            "the rollout starts: {} replicas, maxSurge {}, maxUnavailable {}",
            limits.replicas, limits.surge, limits.unavailable
        ),
    ));
    let (tell, mut news) = mpsc::unbounded_channel();
    // Endpoint changes scheduled and not yet heard of: the rollout waits for them too.
    let mut endpoint_changes = 0usize;
    let deadline = t0 + per_pod * limits.replicas as u32 + Duration::from_secs(30);
    loop {
        let before = counts(&lives);
        let step = limits.step(before);
        for new in before.new..before.new + step.start_new {
            let index = lives.len();
            let name = pod_name("v2", new);
            let (pod, _, probe) = start_pod(settings, variant, dir, &name, pod_ip(index)).await?;
            let started = Instant::now();
            events.push(Event::new(
                started,
                t0,
                EventKind::PodStarted,
                format!("{name} started"),
            ));
            lives.push(PodLife::new(&name, pod.addr, true, started));
            tokio::spawn(until_ready(probe, args.probe_period, index, tell.clone()));
            kept.push(pod);
        }
        // Pods terminated in one step start together.
        let at = Instant::now();
        for _ in 0..step.terminate_old {
            let (index, mut pod, strategy) = old
                .pop_front()
                .expect("the controller terminates only old pods that run");
            lives[index].terminating = Some(at);
            events.push(Event::new(
                at,
                t0,
                EventKind::Terminating,
                format!(
                    "{} is terminating; its endpoint goes in {:?}",
                    pod.name, args.propagation_lag
                ),
            ));
            let removal = service.remove_after(pod.addr, args.propagation_lag);
            let heard = tell.clone();
            tokio::spawn(async move {
                let _ = removal.await;
                let _ = heard.send(News::EndpointRemoved(index, Instant::now()));
            });
            let grace = args.grace_period;
            let done = tell.clone();
            tokio::spawn(async move {
                let ended = terminate(&mut pod, &strategy, grace, t0).await;
                let _ = done.send(News::Terminated(index, Box::new(pod), ended));
            });
            endpoint_changes += 1;
        }
        let (counts, draining) = (counts(&lives), draining(&lives));
        if limits.done(counts) && draining == 0 && endpoint_changes == 0 {
            break;
        }
        let heard = tokio::time::timeout_at(deadline.into(), news.recv())
            .await
            .ok()
            .flatten();
        match heard {
            None => {
                return Err(Error::Rehearsal(format!(
                    "the rollout did not finish within {:?}: {} of {} new pods ready, {draining} old pods still draining, {endpoint_changes} endpoint changes pending; the pods' logs are in {}",
                    deadline - t0,
                    counts.new_ready,
                    limits.replicas,
                    dir.display()
                )));
            }
            Some(News::Ready(index, at)) => {
                lives[index].ready = Some(at);
                let name = &lives[index].name;
                events.push(Event::new(
                    at,
                    t0,
                    EventKind::Readiness,
                    format!("{name} is ready"),
                ));
                let addition = service.add_after(lives[index].addr, args.propagation_lag);
                let heard = tell.clone();
                tokio::spawn(async move {
                    let _ = addition.await;
                    let _ = heard.send(News::EndpointAdded(index, Instant::now()));
                });
                endpoint_changes += 1;
            }
            Some(News::NeverReady(index, probe)) => {
                let life = &lives[index];
                return Err(Error::Rehearsal(format!(
                    "{} did not pass its readiness probe (GET {} on {}) within {READY_WITHIN:?}, and the rollout stalled: see why in {}",
                    life.name,
                    probe.path,
                    probe.addr,
                    dir.join(format!("{}.log", life.name)).display()
                )));
            }
            Some(News::EndpointAdded(index, at)) => {
                endpoint_changes -= 1;
                let name = &lives[index].name;
                events.push(Event::new(
                    at,
                    t0,
                    EventKind::EndpointAdded,
                    format!("{name}'s endpoint added to the Service"),
                ));
            }
            Some(News::EndpointRemoved(index, at)) => {
                endpoint_changes -= 1;
                let name = &lives[index].name;
                events.push(Event::new(
                    at,
                    t0,
                    EventKind::EndpointRemoved,
                    format!("{name}'s endpoint removed from the Service"),
                ));
            }
            Some(News::Terminated(index, pod, ended)) => {
                let (exit, exited_at, kubelet) = ended?;
                let name = &pod.name;
                events.extend(kubelet.into_iter().map(|mut e| {
                    if e.kind != EventKind::Exited {
                        e.detail = format!("{name}: {}", e.detail);
                    }
                    e
                }));
                lives[index].exited = Some((exited_at, exit));
                kept.push(*pod);
            }
        }
    }
    // Done when every new pod is ready and every old one has exited (Kubernetes calls the
    // rollout complete at the first; the old pods' drains are part of what it costs).
    let done = lives
        .iter()
        .filter_map(|l| l.exited.as_ref().map(|(at, _)| *at).or(l.ready.filter(|_| l.new)))
        .max()
        .unwrap_or(t0);
    // Requests keep coming a little after the last change, to see what it left behind.
    tokio::time::sleep(args.tail).await;
    let results = finish_loads(loads, start, t0 - start).await?;
    let routed = service.routed();
    drop(service);
    drop(kept);
    events.sort_by_key(|e| e.at_ms);
    let facts = rollout_report::facts(limits, lives, &results, &routed, start, t0, done);
    let (exit, exit_after) = (facts.worst_exit(), done - t0);
    Ok(Rehearsal {
        strategy: variant.name,
        repeat,
        lag: args.propagation_lag,
        grace: args.grace_period,
        modes: results.into_iter().map(|(mode, _)| mode).collect(),
        events,
        exit,
        exit_after,
        rollout: Some(facts),
    })
}

/// The controller's counts, read off the pods' lives.
fn counts(lives: &[PodLife]) -> Counts {
    let new = || lives.iter().filter(|l| l.new);
    Counts {
        old: lives.iter().filter(|l| !l.new && l.terminating.is_none()).count(),
        new: new().count(),
        new_ready: new().filter(|l| l.ready.is_some()).count(),
    }
}

/// Old pods terminated and not yet exited.
fn draining(lives: &[PodLife]) -> usize {
    lives
        .iter()
        .filter(|l| l.terminating.is_some() && l.exited.is_none())
        .count()
}

/// `v1-a`, `v1-b`, ... `v1-z`, `v1-aa`, ...: the version, and a letter per pod.
fn pod_name(version: &str, i: usize) -> String {
    let letters = (b'a'..=b'z').map(char::from).collect::<Vec<_>>();
    let mut suffix = String::new();
    let mut n = i;
    loop {
        suffix.insert(0, letters[n % 26]);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    format!("{version}-{suffix}")
}

/// The kubelet's readiness probe of a new pod: at once, then every `period`, until it passes
/// (reported as [`News::Ready`]) or [`READY_WITHIN`] is over.
async fn until_ready(probe: Probe, period: Duration, index: usize, tell: mpsc::UnboundedSender<News>) {
    let give_up = Instant::now() + READY_WITHIN;
    let mut ticks = tokio::time::interval(period.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < give_up {
        ticks.tick().await;
        if probe.passes(period).await {
            let _ = tell.send(News::Ready(index, Instant::now()));
            return;
        }
    }
    let _ = tell.send(News::NeverReady(index, probe));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_named_by_version_and_letter() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 52]
            .iter()
            .map(|&i| pod_name("v2", i))
            .collect();
        assert_eq!(names, ["v2-a", "v2-b", "v2-z", "v2-aa", "v2-ab", "v2-ba"]);
    }

    #[test]
    fn pod_addresses_stay_inside_127_0_0_0_24() {
        assert_eq!(pod_ip(0), Ipv4Addr::new(127, 0, 0, 11));
        assert_eq!(
            pod_ip(LAST_POD_HOST - FIRST_POD_HOST),
            Ipv4Addr::new(127, 0, 0, 254)
        );
    }
}
