//! nginx-graceful: restart, roll and reload nginx in Kubernetes without one failed request.
//!
//! # Theory of operation
//!
//! Data moves through the modules in this order:
//!
//! 1. [`cli`]: options (flags or `NGINX_GRACEFUL_*` variables) become [`plan::DrainPlan`], a pure,
//!    validated timeline: hooks, propagation delay, quit window, escalation deadlines.
//! 2. [`signals`]: every signal handler is installed before nginx starts, and each signal becomes a
//!    [`signals::Trigger`] for the supervisor.
//! 3. [`supervisor`]: the one `select!` loop that owns the nginx master. It starts nginx (after
//!    `nginx -T`), forwards signals, validates reloads, and on a drain trigger runs [`drain`].
//! 4. [`drain`]: the ordered drain, one [`phase::Phase`] after another: readiness fails, keep-alive
//!    clients are told to close ([`keepalive`]), pre-drain [`hooks`] run, the propagation delay
//!    passes, SIGQUIT goes to the master, and every nginx process is awaited through pidfds
//!    ([`nginx::tree`]) until the budget runs out and the drain escalates.
//! 5. [`reaper`]: as PID 1 or child subreaper, reaps every zombie and hands exit statuses to whoever
//!    spawned the process.
//! 6. `main` maps the outcome or the [`error::Error`] to one exit code and one line.

pub mod cli;
pub mod control;
pub mod drain;
pub mod error;
pub mod health;
pub mod hooks;
pub mod keepalive;
pub mod logging;
pub mod nginx;
pub mod phase;
pub mod plan;
pub mod prestop;
pub mod reaper;
pub mod reload;
pub mod runtime_dir;
pub mod signals;
pub mod supervisor;
pub mod watch;
