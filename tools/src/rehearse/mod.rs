//! `rehearse`: a Kubernetes rolling termination on one machine. Two pods ([`pod`]) run the
//! chosen [`strategy`] behind a Service imitation ([`service`]), or behind a load balancer and
//! per-node kube-proxies that heed the pods' readiness ([`topology`], [`readiness`]); `soak`
//! load goes through it in close and keep-alive modes (and first-field, on request) while one
//! pod is terminated in the kubelet's order; every failed request is reported with its class
//! and its time relative to the termination ([`report`], [`plot`]).

pub mod deployment;
pub mod plot;
pub mod pod;
pub mod pod_config;
pub mod readiness;
pub mod report;
pub mod rollout;
pub mod rollout_report;
pub mod service;
pub mod strategy;
pub mod topology;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;

use crate::cli::RehearseArgs;
use crate::error::{Error, exit};
use crate::soak::client::{self, Load, Progress, Reuse};
use crate::soak::report::summarize;
use crate::soak::tls::{Tls, Trust};
use nginx_graceful::os::reaper::Exit;
use pod::{HookEnd, Pod, PodExit};
use readiness::Probe;
use report::{Event, EventKind, ModeResult, Rehearsal};
use strategy::{Custom, Preset, Strategy, Variant};
use topology::{Front, Topology};

/// How the clients use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Mode {
    /// A new connection per request (`Connection: close`).
    Close,
    /// Connections reused for many requests.
    Keepalive,
    /// Keep-alive reading only the first `Connection` field, as Python's http.client.
    FirstField,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Close => "close",
            Mode::Keepalive => "keep-alive",
            Mode::FirstField => "first-field",
        }
    }

    fn reuse(self) -> Reuse {
        match self {
            Mode::Close => Reuse::Never,
            Mode::Keepalive => Reuse::KeepAlive,
            Mode::FirstField => Reuse::FirstField,
        }
    }
}

const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
const POD_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 0, 0, 11), Ipv4Addr::new(127, 0, 0, 12)];
/// The pod that is terminated; the other keeps serving.
const TERMINATED: usize = 0;

pub async fn run(args: RehearseArgs) -> Result<i32, Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::Rehearsal(
            "rehearse makes a PID namespace per pod (unshare --pid), which needs root: run it as root".into(),
        ));
    }
    let variants = strategy::variants(&presets(&args)?, &args.graceful_args).map_err(Error::Rehearsal)?;
    let template = match &args.config {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            Error::Rehearsal(format!(
                "cannot read --config {}: {e}: give an nginx config file",
                path.display()
            ))
        })?,
        None => pod_config::REHEARSAL_CONFIG.to_owned(),
    };
    pod_config::check(&template)?;
    let custom = custom(&args)?;
    let rollout = args.rollout.then(|| rollout::preflight(&args)).transpose()?;
    let (work, made_work) = match &args.work_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("nginx-graceful-rehearse-{}", std::process::id())),
            true,
        ),
    };
    let graceful = supervisor_binary(&args)?;
    // The pods' certificate is whatever the config names: trusted as it is, as `curl -k`.
    let tls = match args.tls {
        true => Some(Tls::new("rehearsal.local", Trust::Insecure).map_err(Error::Rehearsal)?),
        false => None,
    };
    let settings = Settings {
        args: &args,
        template,
        custom,
        graceful,
        tls,
    };
    let mut rehearsals = Vec::new();
    let mut outcome = Ok(());
    'all: for repeat in 1..=args.repeat.max(1) {
        for variant in &variants {
            let dir = work.join(format!("{}-{repeat}", variant.dir));
            let rehearsed = match rollout {
                Some(limits) => rollout::rollout(&settings, variant, limits, repeat, &dir).await,
                None => rehearse(&settings, variant, repeat, dir).await,
            };
            match rehearsed {
                Ok(rehearsal) => {
                    if !args.json {
                        print!("{}", rehearsal.to_text());
                    }
                    rehearsals.push(rehearsal);
                }
                Err(err) => {
                    outcome = Err(err);
                    break 'all;
                }
            }
        }
    }
    if outcome.is_err() {
        eprintln!(
            "rehearse: the pods' files and logs are kept in {}",
            work.display()
        );
    } else if made_work {
        let _ = std::fs::remove_dir_all(&work);
    }
    outcome?;
    if args.json {
        println!("{}", report::to_json(&rehearsals));
    } else if rehearsals.len() > 1 {
        print!("\n{}", report::table(&rehearsals));
    }
    if let Some(path) = &args.plot {
        plot::draw(path, &rehearsals)?;
    }
    let failed = rehearsals
        .iter()
        .any(|r| r.modes.iter().any(|m| m.summary.failed > 0));
    Ok(if failed { exit::REQUESTS_FAILED } else { exit::OK })
}

pub(crate) struct Settings<'a> {
    args: &'a RehearseArgs,
    template: String,
    custom: Custom,
    graceful: String,
    /// With --tls: how the load and the readiness checks speak to the pods.
    tls: Option<Tls>,
}

fn presets(args: &RehearseArgs) -> Result<Vec<Preset>, Error> {
    let (mut presets, explicit) = match &args.compare {
        None => (vec![args.strategy], true),
        Some(list) if list.is_empty() => (Preset::COMPARED.to_vec(), false),
        Some(list) => (list.clone(), true),
    };
    if presets.contains(&Preset::Tini) && !on_path("tini") {
        if explicit {
            return Err(Error::Rehearsal(
                "the tini strategy needs tini: install it (apt-get install tini) or leave it out".into(),
            ));
        }
        eprintln!("rehearse: tini is not installed: the comparison leaves it out");
        presets.retain(|p| *p != Preset::Tini);
    }
    if presets.contains(&Preset::Custom) && args.entrypoint.is_none() {
        return Err(Error::Rehearsal(
            "the custom strategy needs --entrypoint (and --prestop, --stop-signal if it has them)".into(),
        ));
    }
    Ok(presets)
}

fn custom(args: &RehearseArgs) -> Result<Custom, Error> {
    let split = |what: &str, s: &str| {
        shell_words::split(s).map_err(|e| Error::Rehearsal(format!("cannot split {what} `{s}`: {e}")))
    };
    Ok(Custom {
        entrypoint: args
            .entrypoint
            .as_deref()
            .map(|s| split("--entrypoint", s))
            .transpose()?
            .unwrap_or_default(),
        pre_stop: args
            .prestop
            .as_deref()
            .map(|s| split("--prestop", s))
            .transpose()?,
        stop_signal: args.stop_signal,
    })
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Two ports that are free on `ip` at this moment, and different: both are held until both
/// are known.
fn free_ports(ip: Ipv4Addr) -> Result<(SocketAddr, SocketAddr), Error> {
    let bind = || TcpListener::bind((ip, 0)).map_err(Error::internal("cannot find a free port on loopback"));
    let (first, second) = (bind()?, bind()?);
    let addr = |l: &TcpListener| {
        l.local_addr()
            .map_err(Error::internal("cannot read a bound address"))
    };
    Ok((addr(&first)?, addr(&second)?))
}

/// One rolling termination of one strategy.
async fn rehearse(
    settings: &Settings<'_>,
    variant: &Variant,
    repeat: usize,
    dir: PathBuf,
) -> Result<Rehearsal, Error> {
    let args = settings.args;
    let mut pods = Vec::new();
    let mut strategies: Vec<Strategy> = Vec::new();
    let mut probes = Vec::new();
    for (i, ip) in POD_IPS.into_iter().enumerate() {
        let name = format!("pod-{}", (b'a' + i as u8) as char);
        let (pod, chosen, probe) = start_pod(settings, variant, &dir, &name, ip).await?;
        probes.push(probe);
        pods.push(pod);
        strategies.push(chosen);
    }
    // Each pod's commands name its own files: the terminated pod's are the ones that run.
    let strategy = strategies.swap_remove(TERMINATED);
    for pod in &pods {
        pod.wait_serving(settings.tls.as_ref(), Duration::from_secs(15))
            .await?;
    }
    let mut front = Front::start(
        args.topology,
        SocketAddr::new(IpAddr::V4(SERVICE_IP), 0),
        pods.iter().map(|p| p.addr).collect(),
        args.propagation_lag,
        args.lb_lag,
    )
    .await
    .map_err(Error::internal(
        "cannot listen on 127.0.0.10 for the Service or load balancer imitation",
    ))?;

    // The load, in each mode, through the Service (or the load balancer).
    let start = Instant::now();
    let bound = args.warmup
        + args.grace_period
        + args.propagation_lag
        + args.lb_lag
        + args.tail
        + Duration::from_secs(30);
    let first_probe = readiness::first_probe(start, start + args.warmup, args.probe_period);
    front.watch_readiness(probes, first_probe, args.probe_period, start + bound);
    let loads = start_loads(settings, front.addr(), start, bound);
    tokio::time::sleep(args.warmup).await;

    // The kubelet's termination of one pod, beside the endpoint removal it set off.
    let t0 = Instant::now();
    let pod = &mut pods[TERMINATED];
    let mut events = vec![Event::load_start(start, t0)];
    events.push(Event::new(
        t0,
        t0,
        EventKind::Terminating,
        front.plan(&pod.name, args.propagation_lag),
    ));
    let heard = front.terminating(TERMINATED, pod.addr, args.propagation_lag);
    let (kubelet, heard_at) = tokio::join!(terminate(pod, &strategy, args.grace_period, t0), heard);
    let (exit, exited_at, kubelet_events) = kubelet?;
    front.exited(TERMINATED);
    events.extend(kubelet_events);
    if args.topology == Topology::Cluster {
        events.push(Event::new(
            heard_at,
            t0,
            EventKind::EndpointRemoved,
            "endpoint removed from the Service".into(),
        ));
    }

    // Requests keep coming until the changes have reached everyone, and a little after.
    tokio::time::sleep_until((front.settled(exited_at, heard_at) + args.tail).into()).await;
    let seen = front.seen().into_iter();
    events.extend(seen.map(|s| Event::new(s.at, t0, s.kind, s.detail)));
    events.sort_by_key(|e| e.at_ms);
    let modes = finish_loads(loads, start, t0 - start)
        .await?
        .into_iter()
        .map(|(result, _)| result)
        .collect();
    drop(front);
    drop(pods);
    Ok(Rehearsal {
        strategy: strategy.name,
        repeat,
        lag: args.propagation_lag,
        grace: args.grace_period,
        modes,
        events,
        exit,
        exit_after: exited_at - t0,
        rollout: None,
    })
}

/// Starts one pod of `variant` named `name` on `ip`, its files in `dir/name`: the pod, the
/// commands that name its files, and its readiness probe.
pub(crate) async fn start_pod(
    settings: &Settings<'_>,
    variant: &Variant,
    dir: &std::path::Path,
    name: &str,
    ip: Ipv4Addr,
) -> Result<(Pod, Strategy, Probe), Error> {
    let args = settings.args;
    let pod_dir = dir.join(name);
    let (listen, health) = free_ports(ip)?;
    let files = pod_config::prepare(&pod_dir, listen, health, &settings.template, &args.nginx)?;
    let mut chosen = strategy::strategy(
        variant.preset,
        &files,
        &settings.graceful,
        &variant.graceful_args,
        args.grace_period,
        &settings.custom,
    );
    chosen.name = variant.name;
    let probe = Probe::of(variant.preset, listen, health, settings.tls.as_ref());
    // Beside the pod's directory, not in it: nginx-graceful watches its runtime directory for
    // config changes, and a log written there under load would wake it for every line.
    let pod = Pod::start(name, listen, &chosen, &dir.join(format!("{name}.log"))).await?;
    Ok((pod, chosen, probe))
}

/// One load per client mode, through `addr` (the Service or the load balancer), started now.
pub(crate) struct Loads(Vec<(Mode, Arc<Progress>, tokio::task::JoinHandle<Vec<client::Record>>)>);

pub(crate) fn start_loads(
    settings: &Settings<'_>,
    addr: SocketAddr,
    start: Instant,
    bound: Duration,
) -> Loads {
    let args = settings.args;
    let mut loads = Vec::new();
    for &mode in &args.modes {
        let load = Arc::new(Load {
            addr,
            host: format!("rehearsal.local:{}", addr.port()),
            paths: args.path_mix.clone(),
            concurrency: args.concurrency.max(1),
            reuse: mode.reuse(),
            rate: Some(args.rate).filter(|r| *r > 0.0),
            requests: None,
            duration: bound,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
            tls: settings.tls.clone(),
            bind_first: true,
        });
        let progress = Arc::new(Progress::default());
        let running = tokio::spawn(client::run(load, start, progress.clone()));
        loads.push((mode, progress, running));
    }
    Loads(loads)
}

/// Stops the loads and collects each mode's result and records; times from `origin` (after
/// the load's start).
pub(crate) async fn finish_loads(
    loads: Loads,
    start: Instant,
    origin: Duration,
) -> Result<Vec<(ModeResult, Vec<client::Record>)>, Error> {
    for (_, progress, _) in &loads.0 {
        progress.stop();
    }
    let mut modes = Vec::new();
    for (mode, _, running) in loads.0 {
        // A load that died has no count: reading it as 0 failures would pass any strategy.
        let records = running.await.map_err(|err| {
            Error::Rehearsal(format!(
                "the {mode:?} load stopped before the end ({err}): its requests are not counted, so the rehearsal has no result"
            ))
        })?;
        let summary = summarize(&records, start.elapsed(), origin);
        modes.push((ModeResult::new(mode, summary, &records, origin), records));
    }
    Ok(modes)
}

/// The kubelet's order: preStop (blocking, within the grace period), the stop signal to PID 1,
/// SIGKILL when the grace period is over. Returns how and when the pod exited.
pub(crate) async fn terminate(
    pod: &mut Pod,
    strategy: &Strategy,
    grace: Duration,
    t0: Instant,
) -> Result<(PodExit, Instant, Vec<Event>), Error> {
    let mut events = Vec::new();
    let deadline = t0 + grace;
    if let Some(hook) = &strategy.pre_stop {
        events.push(Event::new(
            Instant::now(),
            t0,
            EventKind::PreStop,
            format!("preStop: {}", hook.join(" ")),
        ));
        let code = pod.exec(hook, deadline).await?;
        let detail = match code {
            HookEnd::Ended(Exit::Code(code)) => format!("preStop exited {code}"),
            // The kernel ends every process of a PID namespace whose PID 1 has exited.
            HookEnd::Ended(Exit::Signal(signal)) => {
                format!("preStop ended by signal {signal} (the pod's PID 1 had exited)")
            }
            HookEnd::TimedOut => "preStop still running at the end of the grace period".to_owned(),
        };
        events.push(Event::new(Instant::now(), t0, EventKind::PreStopDone, detail));
    }
    let signal = strategy.stop_signal;
    pod.signal(signal);
    events.push(Event::new(
        Instant::now(),
        t0,
        EventKind::StopSignal,
        format!("{signal} to PID 1"),
    ));
    // A preStop hook that used up the grace period leaves 2 s, as the kubelet gives.
    let kill_at = deadline.max(Instant::now() + Duration::from_secs(2));
    tokio::select! {
        _ = pod.exited() => {}
        _ = tokio::time::sleep_until(kill_at.into()) => {
            pod.kill();
            events.push(Event::new(Instant::now(), t0, EventKind::Killed, "SIGKILL: the grace period is over".into()));
            pod.exited().await;
        }
    }
    let exited_at = Instant::now();
    let exit = pod.exit().await;
    events.push(Event::new(
        exited_at,
        t0,
        EventKind::Exited,
        format!("{}: {exit}", pod.name),
    ));
    Ok((exit, exited_at, events))
}

/// The supervisor the pods run: `--supervisor`, or `nginx-graceful` beside this program (both
/// are built into the same directory).
fn supervisor_binary(args: &RehearseArgs) -> Result<String, Error> {
    let path = match &args.supervisor {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(Error::internal("cannot find this program's path"))?
            .with_file_name("nginx-graceful"),
    };
    if !path.is_file() {
        return Err(Error::Rehearsal(format!(
            "the supervisor binary {} does not exist: build it (cargo build -p nginx-graceful) or pass --supervisor",
            path.display()
        )));
    }
    Ok(path.to_string_lossy().into_owned())
}
