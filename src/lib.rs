//! nginx-graceful: restart, roll and reload nginx in Kubernetes without one failed request.
//!
//! # Theory of operation
//!
//! The folders are the layers: [`core`] is the domain, pure and tested with tables; [`os`] and
//! [`nginx`] are the edges to the kernel and to nginx; [`surfaces`] is what others see of the
//! supervisor. Data moves through them in this order:
//!
//! 1. Triggers. [`cli`]: options (flags or `NGINX_GRACEFUL_*` variables) become
//!    [`core::plan::DrainSettings`], checked into a [`core::plan::DrainPlan`], a timeline of
//!    hooks, delay, quit window and escalation. [`os::signals`]: every handler is installed
//!    before nginx starts, and each signal becomes a [`core::policy::Trigger`].
//!    [`os::config_watch`]: a change of the config's contents on disk.
//!    [`surfaces::control_socket`]: a `drain`, `reload` or `status` request on the
//!    supervisor's Unix socket.
//! 2. [`supervisor`] (`run`): the one loop that owns the nginx master. It starts nginx after
//!    `nginx -T`, turns each trigger into a [`core::policy::Input`], and does what
//!    [`core::policy::decide`] says: start the drain, skip its delay, start or refuse a reload,
//!    forward a signal. In controller mode the child is an ingress controller and the master
//!    is the one its pid file names, drained before the controller hears SIGTERM.
//!    [`drain_hook`] (`drain`, the preStop hook) asks the supervisor over the socket, or runs
//!    the same drain itself on a master found through its pid file ([`nginx::pidfile`]); its
//!    `post-start` removes a drain flag whose master no longer runs ([`os::drain_flag`]).
//! 3. [`reload`]: test, bound the old worker generations, SIGHUP, confirm the new generation or
//!    report nginx's reason (read from its stderr, [`nginx::log`]).
//! 4. [`drain`]: the ordered drain, one [`core::phase::Phase`] after another: readiness fails
//!    ([`surfaces::health`]), keep-alive clients are told to close ([`os::drain_flag`]), a
//!    tenth of the connections at a time over the close spread ([`core::close_spread`]),
//!    pre-drain [`os::hooks`] run, the propagation delay lasts until new connections have
//!    stopped arriving ([`nginx::arrivals`] sees them, [`core::quiet`] says when that is),
//!    SIGQUIT goes to the master,
//!    and every nginx process is awaited through pidfds ([`nginx::pidfd`], found by
//!    [`nginx::tree`]) until the budget runs out and the drain escalates.
//! 5. [`os::reaper`]: as PID 1 or child subreaper, reaps every zombie and hands exit statuses
//!    to whoever spawned the process.
//! 6. The drain's [`core::outcome::Outcome`] stays typed until it leaves: the summary line, the
//!    `drain` client, `/metrics`, the outcome file. `main` maps it, or the [`error::Error`], to
//!    one exit code and one line.
//!
//! What the supervisor knows at any moment ([`surfaces::live`]: phase, master, generations,
//! last reload) is read by the probes ([`surfaces::health`]), by `/metrics`
//! ([`surfaces::metrics`]) and by [`surfaces::status`], which without a supervisor reads the
//! same from the pid file and /proc. Connections are counted from the kernel's socket table
//! ([`nginx::sock_diag`], [`nginx::connections`]).
//!
//! The tools that prove all this, `soak` and `rehearse`, are the `nginx-graceful-tools` crate
//! beside this one: the binary that runs as PID 1 carries only what PID 1 needs.

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
