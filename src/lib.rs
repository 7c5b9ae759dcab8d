//! nginx-graceful: restart, roll and reload nginx in Kubernetes without one failed request.
//!
//! # Theory of operation
//!
//! Data moves through the modules in this order:
//!
//! 1. Triggers. [`cli`]: options (flags or `NGINX_GRACEFUL_*` variables) become a validated
//!    [`plan::DrainPlan`], a pure timeline of hooks, delay, quit window and escalation.
//!    [`signals`]: every handler is installed before nginx starts, and each signal becomes a
//!    [`signals::Trigger`]. [`watch`]: a change of the config's contents on disk. [`control`]: a
//!    `drain`, `reload` or `status` request on the supervisor's Unix socket.
//! 2. [`supervisor`] (`run`): the one `select!` loop that owns the nginx master. It starts nginx
//!    after `nginx -T`, forwards signals, runs reloads beside the loop, and on a drain trigger
//!    runs [`drain`]. [`prestop`] (`drain`) runs the same drain without a supervisor, on a master
//!    found through its pid file ([`nginx::pidfile`]). In [`controller`] mode the child is an
//!    ingress controller: the master is the one its pid file names, drained before the
//!    controller hears SIGTERM.
//! 3. [`reload`]: test, bound the old worker generations, SIGHUP, confirm the new generation or
//!    report nginx's reason (read from its stderr, [`nginx::log`]).
//! 4. [`drain`]: the ordered drain, one [`phase::Phase`] after another: readiness fails
//!    ([`health`]), keep-alive clients are told to close ([`keepalive`]), pre-drain [`hooks`]
//!    run, the propagation delay passes, SIGQUIT goes to the master, and every nginx process is
//!    awaited through pidfds ([`nginx::pidfd`], found by [`nginx::tree`]) until the budget runs
//!    out and the drain escalates.
//! 5. [`reaper`]: as PID 1 or child subreaper, reaps every zombie and hands exit statuses to
//!    whoever spawned the process.
//! 6. `main` maps the outcome or the [`error::Error`] to one exit code and one line.
//!
//! What the supervisor knows at any moment ([`live`]: phase, master, generations, last reload)
//! is read by the probes ([`health`]), by `/metrics` ([`metrics`]) and by [`status`], which
//! without a supervisor reads the same from the pid file and /proc. Connections are counted from
//! the kernel's socket table ([`nginx::sock_diag`], [`nginx::connections`]).
//!
//! Beside the supervisor, two commands prove it: [`soak`] loads a server and classifies every
//! failed request; [`rehearse`] plays a Kubernetes rolling termination on one machine (pods as
//! PID namespaces, a kube-proxy-like Service, the kubelet's order) for this project's strategy
//! and the common recipes.

pub mod cli;
pub mod core;
pub mod drain;
pub mod drain_hook;
pub mod duration;
pub mod error;
pub mod logging;
pub mod nginx;
pub mod os;
pub mod reload;
pub mod supervisor;
pub mod surfaces;
