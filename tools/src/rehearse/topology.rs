//! The way into the pods. `cluster`: the Service imitation ([`super::service`]), the endpoint
//! removed everywhere `--propagation-lag` after the termination starts. `local`: a Service with
//! `externalTrafficPolicy: Local` behind a cloud load balancer, imitated by these rules
//! (KEP-1669, Kubernetes 1.26 and later), one a line:
//!
//! - Each pod runs on a node of its own, whose kube-proxy routes only to the pods of its node.
//! - An endpoint is ready when its pod is serving and not terminating; serving is the pod's
//!   readiness as the kubelet last probed it ([`super::readiness`]).
//! - Every change to an endpoint (terminating, serving, removed when the pod has exited)
//!   reaches kube-proxy `--propagation-lag` after it happened, in the order it happened.
//! - kube-proxy sends a new connection to a ready local endpoint; with none, to a terminating
//!   one that is serving; with neither it drops it (a reset here, at once; a real DROP rule
//!   makes the client wait for its connect timeout instead: a failure either way).
//! - A node's health check (healthCheckNodePort) passes while it has a ready local endpoint.
//! - The load balancer hears of a health check's change `--lb-lag` after it happened, and
//!   sends each new connection to the next node whose check passed; with none passing it sends
//!   to every node (fails open, as cloud load balancers do).
//! - An established connection keeps its node and pod until one side closes it (conntrack).
//!
//! One proxy plays the load balancer and the nodes' kube-proxies together: the decisions are
//! the two hops', the bytes make one hop, as through NAT.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::readiness::{self, Probe};
use super::report::EventKind;
use super::service::{Service, forward};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Topology {
    /// One Service in front of the pods; their endpoint leaves it after --propagation-lag.
    Cluster,
    /// externalTrafficPolicy: Local: a node per pod, its kube-proxy, and a load balancer in
    /// front whose health check lags by --lb-lag.
    Local,
}

/// One endpoint as a kube-proxy sees it in the EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    pub const READY: Endpoint = Endpoint {
        serving: true,
        terminating: false,
    };

    pub fn ready(self) -> bool {
        self.serving && !self.terminating
    }
}

/// What happened to a pod, as its endpoint records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The kubelet's readiness probe passed (true) or failed (false), after the opposite.
    Serving(bool),
    /// The pod's deletion has begun.
    Terminating,
    /// The pod has exited: its endpoint leaves the slice.
    Removed,
}

/// kube-proxy's choice among a node's local endpoints: the `turn`-th ready one; with none
/// ready, the `turn`-th terminating one that is serving; `None` drops the connection.
pub fn pick_endpoint(local: &[Endpoint], turn: usize) -> Option<usize> {
    let ready: Vec<usize> = (0..local.len()).filter(|&i| local[i].ready()).collect();
    let candidates = match ready.is_empty() {
        false => ready,
        true => (0..local.len())
            .filter(|&i| local[i].terminating && local[i].serving)
            .collect(),
    };
    (!candidates.is_empty()).then(|| candidates[turn % candidates.len()])
}

/// kube-proxy's answer on the healthCheckNodePort: passing while a local endpoint is ready.
pub fn health_check(local: &[Endpoint]) -> bool {
    local.iter().any(|e| e.ready())
}

/// The load balancer's choice: the `turn`-th node whose check passed as it last saw it, or the
/// `turn`-th of all when none passed (fail open).
pub fn pick_node(passing: &[bool], turn: usize) -> usize {
    let healthy: Vec<usize> = (0..passing.len()).filter(|&i| passing[i]).collect();
    match healthy.is_empty() {
        false => healthy[turn % healthy.len()],
        true => turn % passing.len().max(1),
    }
}

/// A change in the topology worth a line in the report, with when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub at: Instant,
    pub kind: EventKind,
    pub detail: String,
}

/// The way in, for either topology.
pub enum Front {
    Cluster(Service),
    Local(Local),
}

impl Front {
    /// Listens on `addr` in front of `pods`, every pod ready.
    pub async fn start(
        topology: Topology,
        addr: SocketAddr,
        pods: Vec<SocketAddr>,
        propagation_lag: Duration,
        lb_lag: Duration,
    ) -> io::Result<Front> {
        Ok(match topology {
            Topology::Cluster => Front::Cluster(Service::start(addr, pods).await?),
            Topology::Local => Front::Local(Local::start(addr, pods, propagation_lag, lb_lag).await?),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            Front::Cluster(service) => service.addr(),
            Front::Local(local) => local.addr,
        }
    }

    /// The termination of the pod `index` has begun; resolves when the first place that
    /// routes to it has heard of it.
    pub async fn terminating(&self, index: usize, pod: SocketAddr, lag: Duration) -> Instant {
        match self {
            Front::Cluster(service) => {
                let _ = service.remove_after(pod, lag).await;
            }
            Front::Local(local) => {
                local.report(index, Change::Terminating);
                tokio::time::sleep(lag).await;
            }
        }
        Instant::now()
    }

    /// The pod `index` has exited: a local topology removes its endpoint (the cluster one
    /// removed it at the termination's start).
    pub fn exited(&self, index: usize) {
        if let Front::Local(local) = self {
            local.report(index, Change::Removed);
        }
    }

    /// Starts the kubelet's readiness probes, one per pod in order, from `first` every
    /// `period` until `until`; only the local topology heeds readiness.
    pub fn watch_readiness(&mut self, probes: Vec<Probe>, first: Instant, period: Duration, until: Instant) {
        if let Front::Local(local) = self {
            local.watch_readiness(probes, first, period, until);
        }
    }

    /// How the termination of `pod` reaches the data path, for the report.
    pub fn plan(&self, pod: &str, lag: Duration) -> String {
        match self {
            Front::Cluster(_) => format!("{pod} is terminating; its endpoint goes in {lag:?}"),
            Front::Local(local) => format!(
                "{pod} is terminating; its node's kube-proxy hears in {lag:?}, the load balancer {:?} after the node's health check fails",
                local.lb_lag
            ),
        }
    }

    /// When every change the termination set off has reached the data path: the endpoint's
    /// removal, or for the local topology the balancer's reaction and the exited pod's removal.
    pub fn settled(&self, exited: Instant, heard: Instant) -> Instant {
        match self {
            Front::Cluster(_) => exited.max(heard),
            Front::Local(local) => (exited + local.propagation_lag).max(heard + local.lb_lag),
        }
    }

    /// What changed so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        match self {
            Front::Cluster(_) => Vec::new(),
            Front::Local(local) => local.seen.lock().expect("not poisoned").clone(),
        }
    }
}

/// The load balancer and the nodes of `--topology local`.
pub struct Local {
    addr: SocketAddr,
    propagation_lag: Duration,
    lb_lag: Duration,
    changes: mpsc::UnboundedSender<(Instant, usize, Change)>,
    seen: Arc<Mutex<Vec<Seen>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// The cluster as the data path sees it: node `i` runs pod `i`.
struct State {
    /// Each node's local endpoints as its kube-proxy sees them, by address.
    nodes: Vec<Vec<(SocketAddr, Endpoint)>>,
    /// Each node's health check as the load balancer last saw it.
    passing: Vec<bool>,
    turn: usize,
}

impl State {
    /// Where a new connection goes: a node, then one of its pods, or nowhere (dropped).
    fn route(&mut self) -> Option<SocketAddr> {
        self.turn = self.turn.wrapping_add(1);
        let node = &self.nodes[pick_node(&self.passing, self.turn)];
        let local: Vec<Endpoint> = node.iter().map(|(_, e)| *e).collect();
        pick_endpoint(&local, self.turn).map(|i| node[i].0)
    }

    /// Applies `change` to pod `index`'s endpoint; returns its node's health check if the
    /// change turned it.
    fn apply(&mut self, index: usize, pod: SocketAddr, change: Change) -> Option<bool> {
        let node = &mut self.nodes[index];
        let before = health_check(&endpoints(node));
        match change {
            Change::Removed => node.retain(|(addr, _)| *addr != pod),
            Change::Serving(serving) => node
                .iter_mut()
                .filter(|(addr, _)| *addr == pod)
                .for_each(|(_, e)| e.serving = serving),
            Change::Terminating => node
                .iter_mut()
                .filter(|(addr, _)| *addr == pod)
                .for_each(|(_, e)| e.terminating = true),
        }
        let after = health_check(&endpoints(node));
        (after != before).then_some(after)
    }
}

fn endpoints(node: &[(SocketAddr, Endpoint)]) -> Vec<Endpoint> {
    node.iter().map(|(_, e)| *e).collect()
}

impl Local {
    /// Listens on `addr` as the load balancer, every pod ready on its own node.
    pub async fn start(
        addr: SocketAddr,
        pods: Vec<SocketAddr>,
        propagation_lag: Duration,
        lb_lag: Duration,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            nodes: pods.iter().map(|pod| vec![(*pod, Endpoint::READY)]).collect(),
            passing: vec![true; pods.len()],
            turn: 0,
        }));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (changes, endpoint_changes) = mpsc::unbounded_channel();
        let (health_changes, checks) = mpsc::unbounded_channel();
        let routes = state.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let backend = routes.lock().expect("not poisoned").route();
                tokio::spawn(forward(client, backend));
            }
        });
        let kube_proxies = tokio::spawn(propagate(
            endpoint_changes,
            pods,
            propagation_lag,
            state.clone(),
            health_changes,
            seen.clone(),
        ));
        let balancer = tokio::spawn(balance(checks, lb_lag, state, seen.clone()));
        Ok(Self {
            addr,
            propagation_lag,
            lb_lag,
            changes,
            seen,
            tasks: vec![accepting, kube_proxies, balancer],
        })
    }

    fn report(&self, index: usize, change: Change) {
        let _ = self.changes.send((Instant::now(), index, change));
    }

    fn watch_readiness(&mut self, probes: Vec<Probe>, first: Instant, period: Duration, until: Instant) {
        for (index, probe) in probes.into_iter().enumerate() {
            let changes = self.changes.clone();
            let seen = self.seen.clone();
            let heard = move |serving: bool| {
                let at = Instant::now();
                let _ = changes.send((at, index, Change::Serving(serving)));
                seen.lock().expect("not poisoned").push(Seen {
                    at,
                    kind: EventKind::Readiness,
                    detail: format!(
                        "pod-{}'s readiness probe {}",
                        node(index),
                        if serving { "passes" } else { "fails" }
                    ),
                });
            };
            self.tasks
                .push(tokio::spawn(readiness::watch(probe, first, period, until, heard)));
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The EndpointSlice's way to every kube-proxy: each change applied `lag` after it happened;
/// a health check it turns goes on to the load balancer. Ends with the topology.
async fn propagate(
    mut changes: mpsc::UnboundedReceiver<(Instant, usize, Change)>,
    pods: Vec<SocketAddr>,
    lag: Duration,
    state: Arc<Mutex<State>>,
    health: mpsc::UnboundedSender<(Instant, usize, bool)>,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    while let Some((at, index, change)) = changes.recv().await {
        tokio::time::sleep_until((at + lag).into()).await;
        let turned = state
            .lock()
            .expect("not poisoned")
            .apply(index, pods[index], change);
        let now = Instant::now();
        let mut seen = seen.lock().expect("not poisoned");
        seen.push(Seen {
            at: now,
            kind: EventKind::KubeProxy,
            detail: format!(
                "node-{}'s kube-proxy sees pod-{} {}",
                node(index),
                node(index),
                what(change)
            ),
        });
        if let Some(passing) = turned {
            let _ = health.send((now, index, passing));
            seen.push(Seen {
                at: now,
                kind: EventKind::HealthCheck,
                detail: format!(
                    "node-{}'s health check {}",
                    node(index),
                    if passing {
                        "passes"
                    } else {
                        "fails (no ready local endpoint)"
                    }
                ),
            });
        }
    }
}

/// The load balancer's health checking: each change seen `lag` after it happened. Ends with
/// the topology.
async fn balance(
    mut checks: mpsc::UnboundedReceiver<(Instant, usize, bool)>,
    lag: Duration,
    state: Arc<Mutex<State>>,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    while let Some((at, index, passing)) = checks.recv().await {
        tokio::time::sleep_until((at + lag).into()).await;
        state.lock().expect("not poisoned").passing[index] = passing;
        seen.lock().expect("not poisoned").push(Seen {
            at: Instant::now(),
            kind: EventKind::LoadBalancer,
            detail: format!(
                "the load balancer {} node-{} new connections",
                if passing { "sends" } else { "stops sending" },
                node(index)
            ),
        });
    }
}

/// The letter of node and pod `index`, as the pods are named.
fn node(index: usize) -> char {
    (b'a' + index as u8) as char
}

fn what(change: Change) -> &'static str {
    match change {
        Change::Serving(true) => "serving",
        Change::Serving(false) => "not serving",
        Change::Terminating => "terminating",
        Change::Removed => "removed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ep(serving: bool, terminating: bool) -> Endpoint {
        Endpoint { serving, terminating }
    }
    const READY: Endpoint = ep(true, false);
    const DRAINING: Endpoint = ep(true, true);
    const GONE_UNREADY: Endpoint = ep(false, true);
    const UNREADY: Endpoint = ep(false, false);

    #[test]
    fn kube_proxy_prefers_ready_then_terminating_and_serving_else_drops() {
        let cases: &[(&[Endpoint], usize, Option<usize>)] = &[
            (&[READY], 0, Some(0)),
            (&[DRAINING], 0, Some(0)),
            (&[GONE_UNREADY], 0, None),
            (&[UNREADY], 0, None),
            (&[], 0, None),
            (&[DRAINING, READY], 0, Some(1)),
            (&[DRAINING, READY], 1, Some(1)),
            (&[READY, DRAINING, READY], 1, Some(2)),
            (&[GONE_UNREADY, DRAINING], 0, Some(1)),
            (&[UNREADY, GONE_UNREADY], 1, None),
        ];
        for (local, turn, expected) in cases {
            assert_eq!(pick_endpoint(local, *turn), *expected, "{local:?} turn {turn}");
        }
    }

    #[test]
    fn the_health_check_passes_only_with_a_ready_local_endpoint() {
        let cases: &[(&[Endpoint], bool)] = &[
            (&[READY], true),
            (&[DRAINING], false),
            (&[GONE_UNREADY], false),
            (&[UNREADY], false),
            (&[], false),
            (&[DRAINING, READY], true),
        ];
        for (local, expected) in cases {
            assert_eq!(health_check(local), *expected, "{local:?}");
        }
    }

    #[test]
    fn the_load_balancer_spreads_over_passing_nodes_and_fails_open() {
        let cases: &[(&[bool], usize, usize)] = &[
            (&[true, true], 0, 0),
            (&[true, true], 1, 1),
            (&[false, true], 0, 1),
            (&[false, true], 1, 1),
            (&[true, false], 7, 0),
            (&[false, false], 0, 0),
            (&[false, false], 1, 1),
        ];
        for (passing, turn, expected) in cases {
            assert_eq!(pick_node(passing, *turn), *expected, "{passing:?} turn {turn}");
        }
    }

    fn two_nodes() -> (State, [SocketAddr; 2]) {
        let pods: [SocketAddr; 2] = ["127.0.0.11:1".parse().unwrap(), "127.0.0.12:1".parse().unwrap()];
        let state = State {
            nodes: pods.iter().map(|p| vec![(*p, Endpoint::READY)]).collect(),
            passing: vec![true, true],
            turn: 0,
        };
        (state, pods)
    }

    #[test]
    fn a_draining_pod_keeps_its_nodes_traffic_until_the_load_balancer_hears() {
        let (mut state, pods) = two_nodes();
        // Terminating: the health check turns, but the balancer has not heard yet.
        assert_eq!(state.apply(0, pods[0], Change::Terminating), Some(false));
        let routes: Vec<_> = (0..4).map(|_| state.route()).collect();
        assert!(routes.contains(&Some(pods[0])), "{routes:?}");
        // Readiness fails before the balancer hears: that node drops its connections.
        assert_eq!(state.apply(0, pods[0], Change::Serving(false)), None);
        let routes: Vec<_> = (0..4).map(|_| state.route()).collect();
        assert!(routes.contains(&None), "{routes:?}");
        // Once it has heard, every connection goes to the other node.
        state.passing[0] = false;
        assert!((0..4).all(|_| state.route() == Some(pods[1])));
    }

    #[test]
    fn a_removed_endpoint_leaves_its_node_with_nothing_to_route() {
        let (mut state, pods) = two_nodes();
        assert_eq!(state.apply(1, pods[1], Change::Removed), Some(false));
        assert_eq!(state.apply(1, pods[1], Change::Serving(true)), None);
        state.turn = 0;
        assert_eq!(state.route(), None);
        assert_eq!(state.route(), Some(pods[0]));
    }

    #[tokio::test]
    async fn changes_reach_kube_proxy_and_the_balancer_after_their_lags_in_order() {
        let pods = vec!["127.0.0.11:9".parse().unwrap(), "127.0.0.12:9".parse().unwrap()];
        let lag = Duration::from_millis(50);
        let local = Local::start("127.0.0.1:0".parse().unwrap(), pods, lag, lag * 2)
            .await
            .unwrap();
        let start = Instant::now();
        local.report(0, Change::Terminating);
        local.report(0, Change::Serving(false));
        let deadline = start + Duration::from_secs(5);
        while local.seen.lock().unwrap().len() < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seen = local.seen.lock().unwrap().clone();
        let kinds: Vec<EventKind> = seen.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::KubeProxy,
                EventKind::HealthCheck,
                EventKind::KubeProxy,
                EventKind::LoadBalancer
            ],
            "{seen:?}"
        );
        assert!(seen[0].at - start >= lag, "{seen:?}");
        assert!(seen[3].at - seen[1].at >= lag * 2, "{seen:?}");
        assert!(seen[2].detail.ends_with("not serving"), "{seen:?}");
    }
}
