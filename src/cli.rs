//! The command line: every option, its environment variable, and the manual that `--help` prints.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::core::phase::UnreadyAt;
use crate::core::plan::{DelaySetting, DrainSettings};
use crate::duration;

const ABOUT: &str = "Run nginx in Kubernetes so that restarts, rollouts and reloads drop no request.";

const LONG_ABOUT: &str = "\
Run nginx in Kubernetes so that restarts, rollouts and reloads drop no request.

nginx-graceful is the container ENTRYPOINT: it runs nginx as its child, is a correct PID 1 (it
reaps every zombie) and turns the kubelet's SIGTERM into an ordered drain instead of nginx's fast
shutdown, which cuts requests in flight.

Every option of run, drain, reload and status (but run --pid-file) can also be set through an
environment variable, named after the option: --grace-period is NGINX_GRACEFUL_GRACE_PERIOD.
Durations read like 500ms, 5s, 1m30s; a bare number is seconds, as in
terminationGracePeriodSeconds. None is longer than a day.";

const RUN_AFTER_HELP: &str = "\
THE DRAIN TIMELINE (on SIGTERM; times count from the signal):
  0s       the drain starts (readiness fails now with --unready-at start)
  0s..     keep-alive clients are told to close: responses carry `Connection: close`, on a
           tenth of the connections more at a time over --close-spread (2s), then on all
           (needs the snippet nginx-conf/graceful-drain.conf in your config)
  0s..     --pre-drain-exec hooks run in order, each within --pre-drain-timeout
  then     --propagation-delay: nginx keeps serving new connections while the endpoint removal
           reaches every kube-proxy, ingress and load balancer; by default until no new
           connection has arrived for a quiet time scaled to the traffic (at least 1s after the
           close spread, at most --max-propagation-delay)
  then     SIGQUIT to the nginx master, readiness fails (GET /readyz answers 503); requests in
           flight finish, and the supervisor waits for the master and every worker (old
           generations from reloads too)
  G - M    the budget runs out (G = --grace-period, M = --safety-margin): SIGTERM to the master
  G - M/2  SIGKILL to every nginx process left; the supervisor exits before the kubelet's SIGKILL

SIGNALS:
  SIGTERM          the drain above; a repeated SIGTERM is logged and changes nothing
  SIGINT           the same drain; a second SIGINT skips what is left of the propagation delay
  SIGQUIT          the drain without the propagation delay
  SIGHUP           reload: the config is tested first (nginx -T), a config that fails is not
                   loaded; then a new generation of workers confirms the reload
  SIGUSR1/USR2/WINCH  forwarded to the nginx master

EXIT CODES:
  0    nginx quit cleanly within the budget, or quit on its own (exit code 0) during the drain
       before the drain asked it (outcome nginx_exited: a leftover `nginx -s quit`, say)
  3    the budget ran out: nginx was stopped with SIGTERM/SIGKILL
  4    controller mode, or a COMMAND that stays nginx's parent: the nginx master died before
       it was asked to quit (its workers were); its status is not ours to know
  5    nginx's processes could not be seen to their end (/proc or pidfds unreadable:
       too many open files, say)
  10   the drain plan does not fit in --grace-period
  11   the nginx binary (or COMMAND) cannot be started, or nginx would daemonize
  12   the nginx config fails its test (nginx -T)
  13   the runtime directory cannot be used
  14   the health address cannot be bound
  70   internal error
  other  nginx exited on its own, or its master died during the drain: its exit code, or
         128 + the signal that killed it

CONTROLLER MODE (--pid-file, and a COMMAND that is not nginx):
  For ingress images whose main process is a controller that starts nginx itself. COMMAND is
  the controller; the nginx master is the process --pid-file names, read again at each use, so
  a master the controller restarted is followed. On SIGTERM the drain above runs on nginx;
  only when every nginx process has exited does the controller get SIGTERM (and SIGKILL at
  G - M/2). SIGHUP, SIGUSR1, SIGUSR2 and SIGWINCH go to the nginx master; the controller owns
  nginx's config, so there is no config test or watch, and nginx's worker_shutdown_timeout is
  the controller's to set (below G - M - the propagation delay).

EXAMPLES:
  nginx-graceful run
      nginx with the bundled config on port 8080, health on 8081; Ctrl-C shows the drain
  nginx-graceful run --grace-period 60s -- nginx -g 'daemon off;'
      your own nginx, for a pod with terminationGracePeriodSeconds: 60
  nginx-graceful run --pid-file /tmp/nginx/nginx.pid -- /nginx-ingress-controller ...
      ingress-nginx: the controller starts nginx; nginx drains before the controller stops";

const DRAIN_ABOUT: &str = "\
Drain nginx and block until it has exited: the preStop hook.

With a `run` supervisor in the container (its control socket in --runtime-dir), drain asks it to
drain, follows the drain and exits with its outcome; the SIGTERM that the kubelet sends after the
hook finds the drain under way or done, and starts nothing new. Without one (nginx as PID 1, under
tini or dumb-init, or started by an ingress controller), drain does the same drain itself: it
finds the master through the pid file, checks in /proc that it is an nginx master, pins it with
a pidfd, and never signals anything else. It needs nothing from the image: no shell, sleep or
pkill.";

const DRAIN_AFTER_HELP: &str = "\
KUBERNETES:
  lifecycle:
    preStop:
      exec:
        command: [\"nginx-graceful\", \"drain\"]
  The grace period counts from the start of the hook: give --grace-period the pod's
  terminationGracePeriodSeconds.

EXIT CODES:
  With a supervisor, the drain's outcome code is the supervisor's, the one `run` exits with
  (0, 3, 4, 5, or nginx's own status: 137 when the master was SIGKILLed). Without one, and
  for drain's own failures:
  0    nginx quit cleanly within the budget, or had exited already (its pid file names a
       process that is gone)
  3    the budget ran out: nginx was stopped with SIGTERM/SIGKILL
  4    the nginx master died before it was asked to quit (its workers were); its status is not
       the hook's to know
  5    nginx's processes could not be seen to their end (/proc or pidfds unreadable:
       too many open files, say)
  10   the drain plan does not fit in --grace-period
  15   the pid file names a process that is not an nginx master (nothing was signalled)
  16   the nginx master belongs to another user (nothing was signalled)
  17   the pid file cannot be read, is empty, holds no pid, or is not a small regular file
  18   the supervisor stopped answering before it reported the outcome, or did not report it
       within --grace-period (a supervisor stopped with SIGSTOP, say)
  19   the supervisor cannot be used: it runs as another user (a socket put there by another
       process), refused this user, or runs another nginx than --pid-file names; nothing was done
  23   nothing to drain: no pid file (or no directory for it) and no drain recorded
       (a repeat of the hook after a drain exits with that drain's code)
  70   internal error";

const POST_START_ABOUT: &str = "\
Remove a drain flag that a previous life of this container left behind: the postStart hook
beside a preStop `drain` without a supervisor.

With nginx as PID 1, the kernel ends the preStop hook as soon as nginx exits. `drain` lowers the
drain flag when the last worker exits, a moment before, but a hook killed earlier (the grace
period ran out) leaves it in the emptyDir. A restart of the container in the same pod (a
liveness failure runs preStop too) would then answer /readyz 503 and `Connection: close` on every
response, for good. The flag names the nginx master it was raised for (pid, start time and PID
namespace); post-start removes it when that master no longer runs, and keeps a running drain's.";

const POST_START_AFTER_HELP: &str = "\
KUBERNETES (nginx as PID 1, preStop `nginx-graceful drain`):
  lifecycle:
    postStart:
      exec:
        command: [\"nginx-graceful\", \"post-start\"]

EXIT CODES:
  0    no stale flag, or it was removed
  13   a stale flag cannot be removed from the runtime directory";

const RELOAD_AFTER_HELP: &str = "\
With a `run` supervisor (its control socket in --runtime-dir), the supervisor reloads: the same
test, SIGHUP and confirmation as on SIGHUP or a config change, and its --reload-timeout. Without
one, reload finds the master through --pid-file, tests the config with the master's own binary
and arguments, sends SIGHUP and waits for a new generation of workers.

EXIT CODES:
  0    reloaded: a new generation of workers serves
  18   the supervisor did not take the request within 5s, or gave no outcome in time
  19   the supervisor cannot be used (another user, or another nginx than --pid-file names)
  20   the config fails its test: nothing was signalled, nginx serves the old config
  21   nginx kept the old config (its reason is printed), or no new workers came in time
  22   refused: a drain has begun
  23   nginx is not running";

const STATUS_AFTER_HELP: &str = "\
With a `run` supervisor (its control socket in --runtime-dir), the supervisor answers: its
phase, the last reload and its outcome, and the worker generations it retired. Without one,
status reads the master from --pid-file (checked in /proc like `drain` checks it), and tells
generations apart by their workers' start times. Connections are the established TCP
connections each worker holds.

In a pod:  kubectl exec POD -- nginx-graceful status

EXIT CODES:
  0    nginx runs
  15, 16, 17  the pid file is not usable (as for drain)
  18   the supervisor did not answer within 5s
  19   the supervisor cannot be used (another user, or another nginx than --pid-file names)
  23   nginx is not running";

#[derive(Debug, Parser)]
#[command(name = "nginx-graceful", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run nginx as a child and drain it in order on SIGTERM (the container ENTRYPOINT).
    #[command(after_long_help = RUN_AFTER_HELP)]
    Run(RunArgs),
    /// Test the config and reload nginx now; wait until the new workers serve.
    #[command(after_long_help = RELOAD_AFTER_HELP)]
    Reload(ReloadArgs),
    /// Drain nginx and block until it has exited (the preStop hook).
    #[command(long_about = DRAIN_ABOUT, after_long_help = DRAIN_AFTER_HELP)]
    Drain(PreStopArgs),
    /// Remove a drain flag left by a previous life of this container (the postStart hook).
    #[command(long_about = POST_START_ABOUT, after_long_help = POST_START_AFTER_HELP)]
    PostStart(PostStartArgs),
    /// Show the nginx master, its workers by generation, their connections, the phase and the last reload.
    #[command(after_long_help = STATUS_AFTER_HELP)]
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log format: `text` for a terminal, `json` (one object per line) for containers.
    #[arg(
        long,
        global = true,
        env = "NGINX_GRACEFUL_LOG_FORMAT",
        default_value = "text",
        help_heading = "Logging (every command)",
        display_order = 1000
    )]
    pub log_format: LogFormat,

    /// Least severe level logged: error, warn, info, debug or trace.
    #[arg(
        long,
        global = true,
        env = "NGINX_GRACEFUL_LOG_LEVEL",
        default_value = "info",
        help_heading = "Logging (every command)",
        display_order = 1001
    )]
    pub log_level: tracing::Level,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The drain budget; `drain` will share these with `run`.
#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    /// The pod's terminationGracePeriodSeconds: the whole drain, hooks included, must end within it.
    #[arg(value_name = "DURATION", long, env = "NGINX_GRACEFUL_GRACE_PERIOD", default_value = "30s", value_parser = duration::parse)]
    pub grace_period: Duration,

    /// How long nginx keeps accepting new connections after the drain starts, while the endpoint
    /// removal reaches every kube-proxy, ingress and load balancer. `auto`: until new connections
    /// have stopped arriving for a quiet time that scales with the traffic seen before (at least
    /// 300 ms, three times the longest gap between arrivals in the last minute), within
    /// --min-propagation-delay and --max-propagation-delay. A duration: exactly that long, as
    /// a fixed sleep would.
    #[arg(value_name = "auto|DURATION", long, env = "NGINX_GRACEFUL_PROPAGATION_DELAY", default_value = "auto", value_parser = parse_delay)]
    pub propagation_delay: DelaySetting,

    /// With --propagation-delay auto: nginx keeps serving new connections at least this long,
    /// however quiet (kube-proxy applies endpoint changes at most once a second).
    #[arg(value_name = "DURATION", long, env = "NGINX_GRACEFUL_MIN_PROPAGATION_DELAY", default_value = "1s", value_parser = duration::parse)]
    pub min_propagation_delay: Duration,

    /// With --propagation-delay auto: nginx quits at the latest this long after the delay began,
    /// even while connections still arrive (a warning then: raise it). Default: two thirds of
    /// what the grace period leaves after hooks, --safety-margin and a 1 s quit window (18s with
    /// the defaults).
    #[arg(value_name = "DURATION", long, env = "NGINX_GRACEFUL_MAX_PROPAGATION_DELAY", value_parser = duration::parse)]
    pub max_propagation_delay: Option<Duration>,

    /// Kept free at the end of the grace period: SIGTERM goes to nginx at grace-period minus this,
    /// SIGKILL at grace-period minus half of it, so the supervisor exits before the kubelet kills it.
    #[arg(value_name = "DURATION", long, env = "NGINX_GRACEFUL_SAFETY_MARGIN", default_value = "2s", value_parser = duration::parse)]
    pub safety_margin: Duration,

    /// A command run at the start of the drain, before the propagation delay, e.g. to deregister
    /// from nacos, consul or eureka. Split like a shell would, but run without one: write
    /// `sh -c '...'` for pipes or variables. Repeatable; hooks run in order; a failing hook is
    /// logged and the drain goes on. In the variable, one command per line.
    #[arg(long = "pre-drain-exec", value_name = "CMD", env = "NGINX_GRACEFUL_PRE_DRAIN_EXEC", value_delimiter = '\n', value_parser = parse_hook)]
    pub pre_drain_exec: Vec<Vec<String>>,

    /// How long each --pre-drain-exec hook may run before it is killed.
    #[arg(value_name = "DURATION", long, env = "NGINX_GRACEFUL_PRE_DRAIN_TIMEOUT", default_value = "5s", value_parser = duration::parse)]
    pub pre_drain_timeout: Duration,

    /// A port of nginx's that only the kubelet's probes connect to (nginx serving /readyz
    /// itself): its new connections are not traffic, and do not keep the adaptive propagation
    /// delay going. Repeatable, or comma-separated in the variable.
    #[arg(
        long = "probe-port",
        value_name = "PORT",
        env = "NGINX_GRACEFUL_PROBE_PORT",
        value_delimiter = ','
    )]
    pub probe_port: Vec<u16>,

    /// Keep-alive clients are told to close (`Connection: close`) over this long from the
    /// drain's start, a tenth of the connections more at a time, so that they do not all
    /// reconnect to the other pods (with TLS, each with a handshake) at one instant. 0s: all
    /// at once. The propagation delay ends after it: a fixed one must be at least this long,
    /// an adaptive one lasts at least --min-propagation-delay more. Default: 2s, at most half
    /// a fixed --propagation-delay or what --max-propagation-delay leaves above the minimum.
    #[arg(value_name = "DURATION", long, env = "NGINX_GRACEFUL_CLOSE_SPREAD", value_parser = duration::parse)]
    pub close_spread: Option<Duration>,
}

/// How a reload runs; `run` and `reload` share these.
#[derive(Debug, Clone, Args)]
pub struct ReloadOptions {
    /// While this many old worker generations are still draining connections, a reload waits
    /// (requests meanwhile become one more reload after it) instead of stacking worker sets.
    #[arg(
        long,
        value_name = "N",
        env = "NGINX_GRACEFUL_MAX_DRAINING_GENERATIONS",
        default_value = "2"
    )]
    pub max_draining_generations: usize,

    /// Before each reload, tell keep-alive clients to close for this long (the drain flag), so
    /// none is reusing an idle connection when the old workers close it. 0s turns it off.
    #[arg(long, value_name = "DURATION", env = "NGINX_GRACEFUL_RELOAD_CLOSE_WINDOW", default_value = "100ms", value_parser = duration::parse)]
    pub reload_close_window: Duration,

    /// How long a reload may take to show a new generation of workers before it is reported
    /// as failed.
    #[arg(long, value_name = "DURATION", env = "NGINX_GRACEFUL_RELOAD_TIMEOUT", default_value = "10s", value_parser = duration::parse)]
    pub reload_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub drain: DrainArgs,

    /// Where /healthz (liveness) and /readyz (readiness) are served, or `off`.
    #[arg(
        long,
        value_name = "ADDR|off",
        env = "NGINX_GRACEFUL_HEALTH_LISTEN",
        default_value = "0.0.0.0:8081"
    )]
    pub health_listen: HealthListen,

    /// When GET /readyz starts answering 503 in a drain: `quit` (when SIGQUIT goes to nginx and
    /// its listeners close), `start` (the drain's first instant), or a duration after the
    /// start (or at SIGQUIT, if sooner). Until then a terminating pod's endpoint is `serving`,
    /// and kube-proxy still sends it traffic when no ready endpoint is left (a Service down to
    /// its last pod, externalTrafficPolicy: Local while the load balancer's health check lags).
    #[arg(long, value_name = "quit|start|DURATION", env = "NGINX_GRACEFUL_UNREADY_AT", default_value = "quit", value_parser = parse_unready_at)]
    pub unready_at: UnreadyAt,

    /// Directory for what the supervisor creates at run time: the drain flag, the bundled config,
    /// a lock. Two supervisors on one host need two directories.
    #[arg(
        long,
        value_name = "DIR",
        env = "NGINX_GRACEFUL_RUNTIME_DIR",
        default_value = "/run/nginx-graceful"
    )]
    pub runtime_dir: PathBuf,

    /// A file or directory whose changes reload nginx (repeatable). By default the directories
    /// of every file of the loaded config are watched; a Kubernetes ConfigMap's symlink swap, an
    /// editor's rename and a plain write each reload once.
    #[arg(
        long,
        value_name = "PATH",
        env = "NGINX_GRACEFUL_WATCH",
        value_delimiter = ':',
        value_parser = existing_path
    )]
    pub watch: Vec<PathBuf>,

    /// Reload only on SIGHUP or `nginx-graceful reload`, never on a file change.
    #[arg(long, env = "NGINX_GRACEFUL_NO_WATCH")]
    pub no_watch: bool,

    /// Changes closer together than this become one reload.
    #[arg(long, value_name = "DURATION", env = "NGINX_GRACEFUL_RELOAD_DEBOUNCE", default_value = "500ms", value_parser = duration::parse)]
    pub reload_debounce: Duration,

    #[command(flatten)]
    pub reload: ReloadOptions,

    /// nginx's pid file, when COMMAND is not nginx but a program that starts nginx itself (an
    /// ingress controller). The nginx master it names is drained first; COMMAND gets SIGTERM
    /// only once nginx has exited. With nginx as COMMAND this option changes nothing. No
    /// environment variable: NGINX_GRACEFUL_PID_FILE is for drain, reload and status, and an
    /// image that sets it must not turn a wrapper script into a controller.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,

    /// Address the bundled config listens on (only without COMMAND).
    #[arg(
        long,
        value_name = "ADDR",
        env = "NGINX_GRACEFUL_LISTEN",
        default_value = "8080"
    )]
    pub listen: String,

    /// The command to supervise; default: nginx in the foreground with the bundled config.
    /// Give nginx `-g 'daemon off;'` so that it stays in the foreground.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Where nginx writes its pid unless told otherwise (Debian's, and the official image's).
pub const DEFAULT_PID_FILE: &str = "/run/nginx.pid";

/// Where `drain` and `reload` find what they act on.
#[derive(Debug, Clone, Args)]
pub struct NginxTarget {
    /// nginx's pid file (its `pid` directive), read when no supervisor answers (and, by `drain`
    /// during a binary upgrade, FILE.oldbin too). Not given, the `pid` that `nginx -T` shows,
    /// else the default. A file other than the default names the target: a supervisor that
    /// runs another nginx is refused.
    #[arg(
        long,
        value_name = "FILE",
        env = "NGINX_GRACEFUL_PID_FILE",
        default_value = DEFAULT_PID_FILE
    )]
    pub pid_file: PathBuf,

    /// The supervisor's runtime directory: its control socket, and the drain flag that the
    /// keep-alive snippet tests.
    #[arg(
        long,
        value_name = "DIR",
        env = "NGINX_GRACEFUL_RUNTIME_DIR",
        default_value = "/run/nginx-graceful"
    )]
    pub runtime_dir: PathBuf,
}

impl NginxTarget {
    /// The pid file, when one other than the default was named (the option or its variable):
    /// the nginx to act on, which a supervisor that answers must be the one running.
    pub fn named_pid_file(&self) -> Option<&std::path::Path> {
        (self.pid_file != std::path::Path::new(DEFAULT_PID_FILE)).then_some(self.pid_file.as_path())
    }
}

#[derive(Debug, Args)]
pub struct PreStopArgs {
    /// Used only without a supervisor: with one, its own plan and budget apply, and
    /// --grace-period bounds how long this hook follows its drain.
    #[command(flatten)]
    pub drain: DrainArgs,

    #[command(flatten)]
    pub target: NginxTarget,
}

#[derive(Debug, Args)]
pub struct PostStartArgs {
    /// The runtime directory whose drain flag the keep-alive snippet and health.conf test.
    #[arg(
        long,
        value_name = "DIR",
        env = "NGINX_GRACEFUL_RUNTIME_DIR",
        default_value = "/run/nginx-graceful"
    )]
    pub runtime_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: NginxTarget,

    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub target: NginxTarget,

    /// Used only without a supervisor: with one, its own settings apply.
    #[command(flatten)]
    pub reload: ReloadOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthListen {
    Off,
    On(SocketAddr),
}

impl FromStr for HealthListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(Self::Off);
        }
        s.parse()
            .map(Self::On)
            .map_err(|_| format!("`{s}` is not an address like 0.0.0.0:8081, nor `off`"))
    }
}

impl DrainArgs {
    pub fn settings(&self) -> DrainSettings {
        DrainSettings {
            grace_period: self.grace_period,
            propagation_delay: self.propagation_delay,
            min_propagation_delay: self.min_propagation_delay,
            max_propagation_delay: self.max_propagation_delay,
            safety_margin: self.safety_margin,
            pre_drain_exec: self.pre_drain_exec.clone(),
            pre_drain_timeout: self.pre_drain_timeout,
            probe_ports: self.probe_port.clone(),
            close_spread: self.close_spread,
        }
    }
}

/// A path that exists at start: a watch on one that does not would never fire, silently.
fn existing_path(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    match path.try_exists() {
        Ok(true) => Ok(path),
        Ok(false) => Err(format!(
            "{s} does not exist, so a watch on it would never fire: give an existing file or directory (a ConfigMap's mount point)"
        )),
        Err(err) => Err(format!("cannot check {s}: {err}")),
    }
}

impl Cli {
    /// The command line, or exit 2 with clap's error; a COMMAND given to `run` without `--`
    /// before it gets the fix as a tip.
    pub fn parse_or_exit() -> Self {
        use clap::error::{ContextKind, ContextValue, ErrorKind};
        Self::try_parse().unwrap_or_else(|mut err| {
            let stray = match err.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(arg)) if !arg.starts_with('-') => Some(arg.clone()),
                _ => None,
            };
            if let (ErrorKind::InvalidSubcommand, Some(ContextValue::String(typed)), None) = (
                err.kind(),
                err.get(ContextKind::InvalidSubcommand),
                err.get(ContextKind::SuggestedSubcommand),
            ) && let Some(meant) = subcommand_like(typed)
            {
                err.insert(
                    ContextKind::SuggestedSubcommand,
                    ContextValue::String(meant.to_owned()),
                );
            }
            let in_run = std::env::args().any(|a| a == "run");
            if let (ErrorKind::UnknownArgument, Some(arg), true) = (err.kind(), stray, in_run) {
                err.insert(
                    ContextKind::Suggested,
                    ContextValue::StyledStrs(vec![
                        format!("a COMMAND goes after `--`: nginx-graceful run [OPTIONS] -- {arg} ...")
                            .into(),
                    ]),
                );
            }
            err.exit()
        })
    }
}

/// A subcommand `typed` is a slip of, where clap's own guess found none: the same letters in
/// another order (`rnu`), or one letter off.
fn subcommand_like(typed: &str) -> Option<&'static str> {
    let sorted = |s: &str| {
        let mut letters: Vec<char> = s.chars().collect();
        letters.sort_unstable();
        letters
    };
    let one_off = |a: &str, b: &str| {
        let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
        match a.len().abs_diff(b.len()) {
            0 => a.iter().zip(&b).filter(|(x, y)| x != y).count() == 1,
            1 => {
                let (short, long) = if a.len() < b.len() { (&a, &b) } else { (&b, &a) };
                (0..long.len()).any(|skip| {
                    long.iter()
                        .enumerate()
                        .filter(|(i, _)| *i != skip)
                        .map(|(_, c)| c)
                        .eq(short.iter())
                })
            }
            _ => false,
        }
    };
    ["run", "drain", "post-start", "reload", "status"]
        .into_iter()
        .find(|name| sorted(name) == sorted(typed) || one_off(name, typed))
}

fn parse_unready_at(s: &str) -> Result<UnreadyAt, String> {
    match s {
        "quit" => Ok(UnreadyAt::Quit),
        "start" => Ok(UnreadyAt::Start),
        _ => duration::parse(s)
            .map(UnreadyAt::After)
            .map_err(|e| format!("{e}; or `quit`, or `start`")),
    }
}

fn parse_delay(s: &str) -> Result<DelaySetting, String> {
    match s {
        "auto" => Ok(DelaySetting::UntilQuiet),
        _ => duration::parse(s).map(DelaySetting::Fixed),
    }
}

fn parse_hook(s: &str) -> Result<Vec<String>, String> {
    let argv = shell_words::split(s).map_err(|e| format!("cannot split `{s}`: {e}"))?;
    if argv.is_empty() {
        return Err("an empty command".into());
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slip_of_a_subcommand_is_named() {
        for (typed, meant) in [
            ("rnu", Some("run")),
            ("drian", Some("drain")),
            ("statsu", Some("status")),
            ("relaod", Some("reload")),
            ("ru", Some("run")),
            ("runs", Some("run")),
            ("xyz", None),
            ("stop", None),
        ] {
            assert_eq!(subcommand_like(typed), meant, "{typed}");
        }
    }
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn hooks_are_split_like_a_shell_but_not_run_by_one() {
        assert_eq!(
            parse_hook("curl -X DELETE 'http://nacos/v1?ip=1 2'").unwrap(),
            ["curl", "-X", "DELETE", "http://nacos/v1?ip=1 2"]
        );
        assert_eq!(parse_hook("sh -c 'a; b'").unwrap(), ["sh", "-c", "a; b"]);
        assert!(parse_hook("  ").is_err());
        assert!(parse_hook("echo 'unclosed").is_err());
    }

    #[test]
    fn health_listen_takes_an_address_or_off() {
        assert_eq!("off".parse(), Ok(HealthListen::Off));
        assert_eq!(
            "127.0.0.1:9".parse(),
            Ok(HealthListen::On("127.0.0.1:9".parse().unwrap()))
        );
        assert!("8081".parse::<HealthListen>().is_err());
    }

    #[test]
    fn every_option_has_an_environment_variable() {
        let cmd = Cli::command();
        // The commands a container runs.
        let subcommands = cmd
            .get_subcommands()
            .filter(|sub| ["run", "drain", "reload", "post-start"].contains(&sub.get_name()))
            .flat_map(|sub| sub.get_arguments().map(move |arg| (sub.get_name(), arg)));
        for (command, arg) in subcommands.chain(cmd.get_arguments().map(|arg| ("", arg))) {
            let id = arg.get_id().as_str();
            if ["command", "help", "version"].contains(&id) {
                continue;
            }
            if (command, id) == ("run", "pid_file") {
                // NGINX_GRACEFUL_PID_FILE is drain's: set in an image, it must not turn `run`
                // of a wrapper script into controller mode.
                assert!(arg.get_env().is_none(), "run --pid-file");
                continue;
            }
            let expected = format!("NGINX_GRACEFUL_{}", id.to_uppercase());
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(expected.as_str()),
                "--{id}"
            );
        }
    }
}
