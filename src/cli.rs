//! The command line: every option, its environment variable, and the manual that `--help` prints.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::rehearse::Mode;
use crate::rehearse::strategy::{Preset, parse_signal};
use crate::soak::mix::PathMix;

const ABOUT: &str = "Run nginx in Kubernetes so that restarts, rollouts and reloads drop no request.";

const LONG_ABOUT: &str = "\
Run nginx in Kubernetes so that restarts, rollouts and reloads drop no request.

nginx-graceful is the container ENTRYPOINT: it runs nginx as its child, is a correct PID 1 (it
reaps every zombie) and turns the kubelet's SIGTERM into an ordered drain instead of nginx's fast
shutdown, which cuts requests in flight.

Every option of run, drain and reload (but run --pid-file) can also be set through an
environment variable, named after the option: --grace-period is NGINX_GRACEFUL_GRACE_PERIOD.
Durations read like 500ms, 5s, 1m30s; a bare number is seconds, as in
terminationGracePeriodSeconds.";

const RUN_AFTER_HELP: &str = "\
THE DRAIN TIMELINE (on SIGTERM; times count from the signal):
  0s       readiness fails: GET /readyz answers 503
  0s       keep-alive clients are told to close: every response carries `Connection: close`
           (needs the snippet nginx-conf/graceful-drain.conf in your config)
  0s..     --pre-drain-exec hooks run in order, each within --pre-drain-timeout
  then     --propagation-delay: nginx keeps serving new connections while the endpoint removal
           reaches every kube-proxy, ingress and load balancer
  then     SIGQUIT to the nginx master; requests in flight finish, and the supervisor waits for
           the master and every worker (old generations from reloads too)
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
  0    nginx quit cleanly within the budget
  3    the budget ran out: nginx was stopped with SIGTERM/SIGKILL
  10   the drain plan does not fit in --grace-period
  11   the nginx binary (or COMMAND) cannot be started
  12   the nginx config fails its test (nginx -T)
  13   the runtime directory cannot be used
  14   the health address cannot be bound
  70   internal error
  other  nginx exited on its own: its exit code, or 128 + the signal that killed it

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
  0    nginx quit cleanly within the budget, or was not running
  3    the budget ran out: nginx was stopped with SIGTERM/SIGKILL
  10   the drain plan does not fit in --grace-period
  15   the pid file names a process that is not an nginx master (nothing was signalled)
  16   the nginx master belongs to another user (nothing was signalled)
  17   the pid file cannot be read, is empty, or holds no pid
  18   the supervisor stopped answering before it reported the outcome
  70   internal error";

const RELOAD_AFTER_HELP: &str = "\
With a `run` supervisor (its control socket in --runtime-dir), the supervisor reloads: the same
test, SIGHUP and confirmation as on SIGHUP or a config change, and its --reload-timeout. Without
one, reload finds the master through --pid-file, tests the config with the master's own binary
and arguments, sends SIGHUP and waits for a new generation of workers.

EXIT CODES:
  0    reloaded: a new generation of workers serves
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
  23   nginx is not running
  15, 16, 17  the pid file is not usable (as for drain)";

const SOAK_ABOUT: &str = "\
Load an HTTP server and classify every failed request; exit 1 if any failed.

Like a curl loop run while a deployment rolls, but exact: no request is retried, and every
failure gets a class. A server that answers `Connection: close`, or closes an idle keep-alive
connection before the next request was written, is not a failure: the client reconnects, as
every HTTP client does.";

const SOAK_AFTER_HELP: &str = "\
FAILURE CLASSES:
  refused          connection refused: nothing listened
  connect-timeout  the connect did not complete within --connect-timeout
  connect-error    the connect failed otherwise
  reset-new        reset before any response byte, on a connection opened for the request
  reset-reused     reset before any response byte, on a reused keep-alive connection
  eof              closed after the request, before any response byte
  truncated        the response started, then was cut off
  timeout          no complete response within --timeout
  malformed        bytes that are not an HTTP/1 response
  http-5xx         the server answered 500 to 599
  tls              the TLS handshake failed for TLS's reasons (certificate not trusted, no
                   protocol in common); a handshake cut by the server is reset-new or eof

A worker whose request fails without a response waits 10 ms before its next one, so that a
server that is down is not hammered.

EXIT CODES:
  0    every request succeeded
  1    at least one request failed
  2    the URL cannot be used

EXAMPLES:
  nginx-graceful soak --url http://127.0.0.1:8080/ -c 32 --duration 30s
  nginx-graceful soak --url http://127.0.0.1:8080/ --no-keepalive --rate 200 --json
  nginx-graceful soak --url https://my-ingress.example/ --cacert ca.pem -c 8";

const REHEARSE_ABOUT: &str = "\
Rehearse a Kubernetes rolling termination on this machine, with no cluster, and count every
request it loses.

Two pods each run the strategy's entrypoint as PID 1 of their own PID namespace, nginx
listening on their own loopback address (127.0.0.11, 127.0.0.12). A Service imitation on
127.0.0.10 sends each new connection to one of the current endpoints, as kube-proxy does:
established connections keep their pod, and a pod that refuses or resets is reset to the
client, never retried. soak load goes through it in close and keep-alive modes, with a share of
slow (1 s) requests. Then one pod is terminated in the kubelet's order: its endpoint removal is
scheduled (--propagation-lag), the preStop hook runs inside the pod and is waited for, the stop
signal goes to PID 1, and SIGKILL when --grace-period is over. Needs root (unshare, nsenter).";

const REHEARSE_AFTER_HELP: &str = "\
STRATEGIES:
  nginx-graceful           entrypoint `nginx-graceful run -- nginx`, preStop `nginx-graceful drain`
  naive                    nginx as PID 1; SIGTERM
  stopsignal-quit          nginx as PID 1; SIGQUIT as the stop signal (the official image)
  prestop-quit             preStop `nginx -s quit`; SIGTERM
  prestop-sleep-quit-wait  preStop `sleep 3; nginx -s quit; while [ -d /proc/$PID ]; do sleep 0.1; done`
  tini                     `tini -- nginx`; SIGTERM
  custom                   --entrypoint, --prestop, --stop-signal; @NGINX@ is the nginx command,
                           @CONFIG@, @PID_FILE@, @POD_DIR@ the pod's files

EXIT CODES:
  0    no request failed
  1    at least one request failed (in any strategy, mode or run)
  2    the rehearsal could not be set up (the reason is printed)

EXAMPLES:
  nginx-graceful rehearse
  nginx-graceful rehearse --compare --plot rehearsal.svg
  nginx-graceful rehearse --compare nginx-graceful,naive --propagation-lag 3s --repeat 10
  nginx-graceful rehearse --config my-nginx.conf --path-mix '/=80,/api/slow=20'
  nginx-graceful rehearse --config my-tls.conf --tls     (listen @LISTEN@ ssl; in the config)
  nginx-graceful rehearse --strategy custom --entrypoint 'dumb-init @NGINX@' --stop-signal QUIT";

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
    /// Load an HTTP server and classify every failed request; exit 1 if any failed.
    #[command(long_about = SOAK_ABOUT, after_long_help = SOAK_AFTER_HELP)]
    Soak(SoakArgs),
    /// Show the nginx master, its workers by generation, their connections, the phase and the last reload.
    #[command(after_long_help = STATUS_AFTER_HELP)]
    Status(StatusArgs),
    /// Rehearse a Kubernetes rolling termination locally; exit 1 if any request failed.
    #[command(long_about = REHEARSE_ABOUT, after_long_help = REHEARSE_AFTER_HELP)]
    Rehearse(RehearseArgs),
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log format: `text` for a terminal, `json` (one object per line) for containers.
    #[arg(
        long,
        global = true,
        env = "NGINX_GRACEFUL_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Least severe level logged: error, warn, info, debug or trace.
    #[arg(long, global = true, env = "NGINX_GRACEFUL_LOG_LEVEL", default_value = "info")]
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
    #[arg(value_name = "DURATION", long, env = "NGINX_GRACEFUL_GRACE_PERIOD", default_value = "30s", value_parser = parse_duration)]
    pub grace_period: Duration,

    /// How long nginx keeps accepting new connections after the drain starts, while the endpoint
    /// removal reaches every kube-proxy, ingress and load balancer.
    #[arg(value_name = "DURATION", long, env = "NGINX_GRACEFUL_PROPAGATION_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub propagation_delay: Duration,

    /// Kept free at the end of the grace period: SIGTERM goes to nginx at grace-period minus this,
    /// SIGKILL at grace-period minus half of it, so the supervisor exits before the kubelet kills it.
    #[arg(value_name = "DURATION", long, env = "NGINX_GRACEFUL_SAFETY_MARGIN", default_value = "2s", value_parser = parse_duration)]
    pub safety_margin: Duration,

    /// A command run at the start of the drain, before the propagation delay, e.g. to deregister
    /// from nacos, consul or eureka. Split like a shell would, but run without one: write
    /// `sh -c '...'` for pipes or variables. Repeatable; hooks run in order; a failing hook is
    /// logged and the drain goes on. In the variable, one command per line.
    #[arg(long = "pre-drain-exec", value_name = "CMD", env = "NGINX_GRACEFUL_PRE_DRAIN_EXEC", value_delimiter = '\n', value_parser = parse_hook)]
    pub pre_drain_exec: Vec<Vec<String>>,

    /// How long each --pre-drain-exec hook may run before it is killed.
    #[arg(value_name = "DURATION", long, env = "NGINX_GRACEFUL_PRE_DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub pre_drain_timeout: Duration,
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
    #[arg(long, value_name = "DURATION", env = "NGINX_GRACEFUL_RELOAD_CLOSE_WINDOW", default_value = "100ms", value_parser = parse_duration)]
    pub reload_close_window: Duration,

    /// How long a reload may take to show a new generation of workers before it is reported
    /// as failed.
    #[arg(long, value_name = "DURATION", env = "NGINX_GRACEFUL_RELOAD_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
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
        value_delimiter = ':'
    )]
    pub watch: Vec<PathBuf>,

    /// Reload only on SIGHUP or `nginx-graceful reload`, never on a file change.
    #[arg(long, env = "NGINX_GRACEFUL_NO_WATCH")]
    pub no_watch: bool,

    /// Changes closer together than this become one reload.
    #[arg(long, value_name = "DURATION", env = "NGINX_GRACEFUL_RELOAD_DEBOUNCE", default_value = "500ms", value_parser = parse_duration)]
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

/// Where `drain` and `reload` find what they act on.
#[derive(Debug, Clone, Args)]
pub struct NginxTarget {
    /// nginx's pid file (its `pid` directive), read when no supervisor answers. During a binary
    /// upgrade, `drain` drains the old master's FILE.oldbin too.
    #[arg(
        long,
        value_name = "FILE",
        env = "NGINX_GRACEFUL_PID_FILE",
        default_value = "/run/nginx.pid"
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

#[derive(Debug, Args)]
pub struct PreStopArgs {
    /// Used only without a supervisor: with one, its own plan and budget apply.
    #[command(flatten)]
    pub drain: DrainArgs,

    #[command(flatten)]
    pub target: NginxTarget,
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

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// What to load: an http:// or https:// URL, like http://127.0.0.1:8080/. Its path is
    /// requested unless --path-mix is given. HTTP/1.1 either way.
    #[arg(long, value_name = "URL")]
    pub url: String,

    /// Connections at once, each with one request in flight.
    #[arg(long, short = 'c', value_name = "N", default_value = "32")]
    pub concurrency: usize,

    /// Start no request after this long [default: 10s, or 1h with --requests].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Stop after this many requests (or at --duration, whichever comes first).
    #[arg(long, short = 'n', value_name = "N")]
    pub requests: Option<u64>,

    /// Reuse each connection for many requests (HTTP/1.1 keep-alive). The default.
    #[arg(long, overrides_with = "no_keepalive")]
    pub keepalive: bool,

    /// A new connection for every request, which asks `Connection: close`.
    #[arg(long, overrides_with = "keepalive")]
    pub no_keepalive: bool,

    /// Requests per second over all connections [default: as fast as the server answers].
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,

    /// Paths with weights, like '/=90,/slow=10' (90 % / and 10 % /slow).
    #[arg(long, value_name = "MIX")]
    pub path_mix: Option<PathMix>,

    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,

    /// Write every request to FILE as CSV: at_ms,latency_ms,path,reused,status,outcome.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,

    /// A connect (with the TLS handshake, for https) that takes longer fails as connect-timeout.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// For https: trust the CA certificates in FILE (PEM) instead of the system's.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub cacert: Option<PathBuf>,

    /// For https: trust any certificate (the handshake is still checked), as `curl -k`.
    #[arg(long, short = 'k')]
    pub insecure: bool,

    /// A response not complete by then fails as timeout.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct RehearseArgs {
    /// The strategy to rehearse.
    #[arg(long, value_enum, value_name = "NAME", default_value = "nginx-graceful")]
    pub strategy: Preset,

    /// Rehearse several strategies with the same settings and print one table: a list of the
    /// strategies above like nginx-graceful,naive, or every one but custom when given alone.
    #[arg(
        long,
        value_enum,
        value_name = "LIST",
        value_delimiter = ',',
        num_args = 0..,
        hide_possible_values = true
    )]
    pub compare: Option<Vec<Preset>>,

    /// Rehearse each strategy this many times.
    #[arg(long, value_name = "N", default_value = "1")]
    pub repeat: usize,

    /// How long after the termination starts the pod's endpoint leaves the Service (the time
    /// kube-proxy, ingresses and load balancers take to hear of it).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub propagation_lag: Duration,

    /// The pod's terminationGracePeriodSeconds: SIGKILL when it is over.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub grace_period: Duration,

    /// The pods serve HTTPS: your --config says `listen @LISTEN@ ssl;` and names a certificate.
    /// The load and the readiness checks speak TLS, trusting any certificate (as `curl -k`).
    #[arg(long)]
    pub tls: bool,

    /// Your nginx config, with `listen @LISTEN@;` where each pod's address goes and
    /// @RUNTIME_DIR@ for the pod's own directory (pid file, temp paths, drain snippet)
    /// [default: nginx-conf/rehearsal.conf, which also serves a 1 s /slow].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The nginx binary.
    #[arg(long, value_name = "PATH", default_value = "nginx")]
    pub nginx: String,

    /// Client modes, each its own load through the Service at the same time.
    #[arg(
        long,
        value_enum,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "close,keepalive"
    )]
    pub modes: Vec<Mode>,

    /// Connections per mode (slow requests hold theirs for 1 s).
    #[arg(long, short = 'c', value_name = "N", default_value = "32")]
    pub concurrency: usize,

    /// Requests per second per mode.
    #[arg(long, value_name = "R", default_value = "200")]
    pub rate: f64,

    /// Paths with weights, as for soak.
    #[arg(long, value_name = "MIX", default_value = "/=90,/slow=10")]
    pub path_mix: PathMix,

    /// Load before the termination starts.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Load after the pod has exited and its endpoint is gone.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub tail: Duration,

    /// The custom strategy's entrypoint, e.g. 'dumb-init @NGINX@'.
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,

    /// The custom strategy's preStop command, run inside the pod.
    #[arg(long, value_name = "CMD")]
    pub prestop: Option<String>,

    /// The custom strategy's stop signal [default: SIGTERM].
    #[arg(long, value_name = "SIGNAL", value_parser = parse_signal)]
    pub stop_signal: Option<nix::sys::signal::Signal>,

    /// Print everything as one JSON object.
    #[arg(long)]
    pub json: bool,

    /// Draw requests and failures over time per strategy into an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// Keep the pods' files (configs, logs) here instead of a temporary directory.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
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

/// A duration like 500ms, 5s or 1m30s; a bare number is seconds, as in Kubernetes' own fields
/// (terminationGracePeriodSeconds), so a manifest can hand its value over as it is.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(seconds) = s.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration like 500ms, 5s, 1m30s or 30 (seconds) ({e})"))
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
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_read_like_a_person_writes_them() {
        for (text, ms) in [
            ("5s", 5000),
            ("1m30s", 90_000),
            ("500ms", 500),
            ("0s", 0),
            (" 2s ", 2000),
            ("30", 30_000),
        ] {
            assert_eq!(parse_duration(text), Ok(Duration::from_millis(ms)), "{text}");
        }
        for bad in ["", "five seconds", "-1s", "-5", "1.5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
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
        // The commands a container runs. soak and rehearse are run by hand and take flags only,
        // so that NGINX_GRACEFUL_* variables meant for a supervisor never change their own
        // settings (the nginx-graceful pods of a rehearsal do read them, as a supervisor would).
        let subcommands = cmd
            .get_subcommands()
            .filter(|sub| ["run", "drain", "reload"].contains(&sub.get_name()))
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
