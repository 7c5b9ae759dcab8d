//! The tools' command line: `soak` and `rehearse`, run by hand or in benchmarks, never in a pod.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nginx_graceful::duration;

use crate::rehearse::Mode;
use crate::rehearse::deployment::IntOrPercent;
use crate::rehearse::strategy::{Preset, parse_signal};
use crate::rehearse::topology::Topology;
use crate::soak::mix::PathMix;

const ABOUT: &str = "Prove nginx-graceful: load that classifies every failed request, and a local rehearsal of a Kubernetes rolling termination.";

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
  nginx-graceful-tools soak --url http://127.0.0.1:8080/ -c 32 --duration 30s
  nginx-graceful-tools soak --url http://127.0.0.1:8080/ --no-keepalive --rate 200 --json
  nginx-graceful-tools soak --url http://127.0.0.1:8080/ --first-field -c 8 --duration 30s
  nginx-graceful-tools soak --url https://my-ingress.example/ --cacert ca.pem -c 8";

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
signal goes to PID 1, and SIGKILL when --grace-period is over. Needs root (unshare, nsenter).
The pods inherit this environment: NGINX_GRACEFUL_* variables set the nginx-graceful pods'
options, as --graceful-args does per row.

--topology local puts each pod on a node of its own behind a load balancer
(externalTrafficPolicy: Local): the node's kube-proxy routes to its pod while the pod is ready,
or terminating and still serving (its readiness probe), and the balancer stops sending to the
node --lb-lag after the node's health check fails.

--rollout plays a whole rolling update of a Deployment of --replicas pods (127.0.0.11 on):
new pods start, pass their readiness probe and join the Service, and old pods are terminated,
as --max-surge and --max-unavailable allow. The report adds the failures by pod, each pod's
drain time, the rollout's total time, and the peak of new connections per 100 ms that a
surviving pod received after each termination (the reconnect burst).";

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
  nginx-graceful-tools rehearse
  nginx-graceful-tools rehearse --compare --plot rehearsal.svg
  nginx-graceful-tools rehearse --compare nginx-graceful,naive --propagation-lag 3s --repeat 10
  nginx-graceful-tools rehearse --config my-nginx.conf --path-mix '/=80,/api/slow=20'
  nginx-graceful-tools rehearse --config my-tls.conf --tls     (listen @LISTEN@ ssl; in the config)
  nginx-graceful-tools rehearse --strategy custom --entrypoint 'dumb-init @NGINX@' --stop-signal QUIT
  nginx-graceful-tools rehearse --topology local --lb-lag 5s \
      --graceful-args '' --graceful-args '--unready-at start'      (two nginx-graceful rows)
  nginx-graceful-tools rehearse --rollout --replicas 4 --max-surge 1 --max-unavailable 0 --compare";

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
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
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

    /// Keep-alive as Python's http.client (urllib3, requests) does it: only the first
    /// `Connection` field of a response counts, so `Connection: keep-alive` followed by
    /// `Connection: close` (nginx's own field, then an add_header) keeps the connection. Plain
    /// keep-alive honours a `close` in any field.
    #[arg(long, conflicts_with = "no_keepalive")]
    pub first_field: bool,

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
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration::parse)]
    pub connect_timeout: Duration,

    /// For https: trust the CA certificates in FILE (PEM) instead of the system's.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub cacert: Option<PathBuf>,

    /// For https: trust any certificate (the handshake is still checked), as `curl -k`.
    #[arg(long, short = 'k')]
    pub insecure: bool,

    /// A response not complete by then fails as timeout.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration::parse)]
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
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration::parse)]
    pub propagation_lag: Duration,

    /// cluster: one Service in front of the pods, the endpoint gone after --propagation-lag.
    /// local: externalTrafficPolicy: Local, each pod on a node of its own whose kube-proxy
    /// routes to it while it is ready, or terminating and still serving (its readiness probe);
    /// a load balancer in front stops sending to the node --lb-lag after the node's health
    /// check fails.
    #[arg(long, value_enum, value_name = "cluster|local", default_value = "cluster")]
    pub topology: Topology,

    /// With --topology local: how long the load balancer takes to act on a node's failed
    /// health check (its interval times its unhealthy threshold).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration::parse)]
    pub lb_lag: Duration,

    /// With --topology local or --rollout: the kubelet's readiness probe period
    /// (failureThreshold 1). The nginx-graceful pods are probed on /readyz, the recipes' on
    /// nginx's `/`.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration::parse)]
    pub probe_period: Duration,

    /// Rehearse a Deployment's rolling update (`kubectl rollout restart`) instead of one
    /// termination: each new pod is started, probed ready every --probe-period and added to the
    /// Service (after --propagation-lag), and old pods are terminated in the kubelet's order as
    /// --max-surge and --max-unavailable allow, until every pod has been replaced.
    #[arg(long)]
    pub rollout: bool,

    /// With --rollout: the Deployment's replicas.
    #[arg(long, requires = "rollout", value_name = "N", default_value = "4")]
    pub replicas: usize,

    /// With --rollout: how many pods above --replicas may run, a count or a percentage
    /// (rounded up), as the Deployment's maxSurge.
    #[arg(long, requires = "rollout", value_name = "N|P%", default_value = "25%")]
    pub max_surge: IntOrPercent,

    /// With --rollout: how many of --replicas may be unready, a count or a percentage
    /// (rounded down), as the Deployment's maxUnavailable.
    #[arg(long, requires = "rollout", value_name = "N|P%", default_value = "25%")]
    pub max_unavailable: IntOrPercent,

    /// More flags for `nginx-graceful run` in the nginx-graceful pods, like
    /// '--unready-at start'. Repeatable: each one is a row of its own, named by its flags
    /// ('' for the defaults).
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true)]
    pub graceful_args: Vec<String>,

    /// The pod's terminationGracePeriodSeconds: SIGKILL when it is over.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration::parse)]
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

    /// The nginx-graceful binary the pods of the nginx-graceful strategy run
    /// [default: nginx-graceful beside this program].
    #[arg(long, value_name = "PATH")]
    pub supervisor: Option<PathBuf>,

    /// Client modes, each its own load through the Service at the same time: close (a new
    /// connection per request), keepalive, first-field (keep-alive reading only the first
    /// `Connection` field, as Python's http.client does).
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

    /// Requests per second per mode; 0: as fast as the pods answer, so that a keep-alive
    /// connection carries requests back to back and meets the race at the quit.
    #[arg(long, value_name = "R", default_value = "0")]
    pub rate: f64,

    /// Paths with weights, as for soak.
    #[arg(long, value_name = "MIX", default_value = "/=90,/slow=10")]
    pub path_mix: PathMix,

    /// Load before the termination starts.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration::parse)]
    pub warmup: Duration,

    /// Load after the pod has exited and its endpoint is gone.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration::parse)]
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

#[derive(Debug, Parser)]
#[command(name = "nginx-graceful-tools", version, about = ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load an HTTP server and classify every failed request; exit 1 if any failed.
    #[command(long_about = SOAK_ABOUT, after_long_help = SOAK_AFTER_HELP)]
    Soak(SoakArgs),
    /// Rehearse a Kubernetes rolling termination locally; exit 1 if any request failed.
    #[command(long_about = REHEARSE_ABOUT, after_long_help = REHEARSE_AFTER_HELP)]
    Rehearse(Box<RehearseArgs>),
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
    fn rehearse_takes_the_first_field_mode_beside_the_default_two() {
        let modes =
            |args: &[&str]| match Cli::parse_from([&["nginx-graceful-tools", "rehearse"], args].concat())
                .command
            {
                Command::Rehearse(args) => args.modes,
                Command::Soak(_) => unreachable!(),
            };
        assert_eq!(modes(&[]), [Mode::Close, Mode::Keepalive]);
        assert_eq!(
            modes(&["--modes", "close,keepalive,first-field"]),
            [Mode::Close, Mode::Keepalive, Mode::FirstField]
        );
    }

    #[test]
    fn rehearse_takes_graceful_args_that_start_with_dashes_and_repeat() {
        let rehearse =
            |args: &[&str]| match Cli::parse_from([&["nginx-graceful-tools", "rehearse"], args].concat())
                .command
            {
                Command::Rehearse(args) => args,
                Command::Soak(_) => unreachable!(),
            };
        let args = rehearse(&[
            "--graceful-args",
            "",
            "--graceful-args",
            "--unready-at start",
            "--topology",
            "local",
        ]);
        assert_eq!(args.graceful_args, ["", "--unready-at start"]);
        assert_eq!(args.topology, Topology::Local);
        let defaults = rehearse(&[]);
        assert!(defaults.graceful_args.is_empty());
        assert_eq!(
            (defaults.topology, defaults.lb_lag, defaults.probe_period),
            (Topology::Cluster, Duration::from_secs(5), Duration::from_secs(1))
        );
    }

    #[test]
    fn tools_take_flags_only() {
        // NGINX_GRACEFUL_* variables are meant for a supervisor: they must never change a
        // tool's own settings (the nginx-graceful pods of a rehearsal do read them).
        for sub in Cli::command().get_subcommands() {
            for arg in sub.get_arguments() {
                assert!(arg.get_env().is_none(), "{} --{}", sub.get_name(), arg.get_id());
            }
        }
    }
}
