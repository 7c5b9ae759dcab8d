//! Every way start-up can fail, each with its cause, its fix and its documented exit code.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Exit codes, as `--help` and the README document them.
pub mod exit {
    pub const OK: i32 = 0;
    pub const ESCALATED: i32 = 3;
    /// `drain` without a supervisor: the master died before it was asked to quit, its status
    /// unknown (not our child). Under `run` the master's own status is the exit code.
    pub const MASTER_DIED: i32 = 4;
    /// The drain could not see whether nginx processes were left when it ended.
    pub const UNOBSERVED: i32 = 5;
    pub const PLAN_DOES_NOT_FIT: i32 = 10;
    pub const CANNOT_START: i32 = 11;
    pub const CONFIG_TEST_FAILED: i32 = 12;
    pub const RUNTIME_DIR: i32 = 13;
    pub const HEALTH_LISTEN: i32 = 14;
    pub const NOT_NGINX: i32 = 15;
    pub const OTHER_USER: i32 = 16;
    pub const PID_FILE: i32 = 17;
    pub const CONTROL_BROKEN: i32 = 18;
    pub const CONTROL_REFUSED: i32 = 19;
    pub const RELOAD_INVALID: i32 = 20;
    pub const RELOAD_FAILED: i32 = 21;
    pub const RELOAD_REFUSED: i32 = 22;
    pub const NOT_RUNNING: i32 = 23;
    pub const INTERNAL: i32 = 70;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{detail}: {fix}")]
    PlanDoesNotFit { detail: String, fix: String },

    #[error("cannot start `{program}`: not found: install nginx, or give its full path after `--`")]
    NotFound { program: String },

    #[error(
        "cannot start `{program}`: {source}: check that it is an executable the supervisor's user may run"
    )]
    Spawn { program: String, source: std::io::Error },

    #[error(
        "nginx would go to the background (its default `daemon on`) and the supervisor would lose it: add -g 'daemon off;' to the command, or `daemon off;` to the config; nothing was started"
    )]
    WouldDaemonize,

    #[error("the nginx config fails its test (nginx -T): {detail}: fix the config; nothing was started")]
    ConfigTest { detail: String },

    #[error("cannot use runtime directory {}: {source}: pass --runtime-dir with a directory this user can write", path.display())]
    RuntimeDir { path: PathBuf, source: std::io::Error },

    #[error("runtime directory {} is in use by another supervisor: give each supervisor its own --runtime-dir", path.display())]
    RuntimeDirBusy { path: PathBuf },

    #[error(
        "cannot serve health checks on {addr}: {source}: choose a free address with --health-listen, or `off`"
    )]
    HealthListen {
        addr: SocketAddr,
        source: std::io::Error,
    },

    #[error("cannot read pid file {}: {detail}: point --pid-file at nginx's pid file (the `pid` directive)", path.display())]
    PidFile { path: PathBuf, detail: String },

    #[error("pid file {} names pid {pid} (`{what}`), which is not an nginx master: nothing was signalled; the pid file is stale or --pid-file is wrong", pid_file.display())]
    NotNginx {
        pid_file: PathBuf,
        pid: i32,
        what: String,
    },

    #[error(
        "the nginx master (pid {pid}) belongs to uid {uid}: nothing was signalled; run drain as that user or as root"
    )]
    OtherUser { pid: i32, uid: u32 },

    #[error(
        "nothing to drain: {detail}: point --pid-file (NGINX_GRACEFUL_PID_FILE) at nginx's pid file (its `pid` directive)"
    )]
    NoPidFile { detail: String },

    #[error("the supervisor stopped answering before it reported the drain's outcome: see its log")]
    ControlBroken,

    #[error(
        "the supervisor at {} did not {what} within {within}: it is stopped (SIGSTOP), hung or swamped; see its log, and its state in `ps`", socket.display()
    )]
    ControlTimeout {
        socket: PathBuf,
        what: &'static str,
        within: String,
    },

    #[error("{detail}; nothing was done")]
    ControlRefused { detail: String },

    #[error("{context}: {source}")]
    Internal {
        context: &'static str,
        source: std::io::Error,
    },
}

/// An error that ends a command with a documented exit code.
pub trait Failure: std::fmt::Display {
    fn exit_code(&self) -> i32;
}

impl Failure for Error {
    fn exit_code(&self) -> i32 {
        Error::exit_code(self)
    }
}

/// A binary's `main`: runs `command` on a one-thread runtime, then exits with its code, or with
/// the error's after one line that says what went wrong. The runtime is not dropped: tasks still
/// parked on sockets have nothing left to do.
pub fn run_and_exit<E: Failure>(program: &str, command: impl Future<Output = Result<i32, E>>) -> ! {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{program}: cannot start the async runtime: {err}");
            std::process::exit(exit::INTERNAL);
        }
    };
    let code = match runtime.block_on(command) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(exit_code = err.exit_code(), "{err}");
            err.exit_code()
        }
    };
    crate::logging::flush();
    std::process::exit(code);
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::PlanDoesNotFit { .. } => exit::PLAN_DOES_NOT_FIT,
            Error::NotFound { .. } | Error::Spawn { .. } | Error::WouldDaemonize => exit::CANNOT_START,
            Error::ConfigTest { .. } => exit::CONFIG_TEST_FAILED,
            Error::RuntimeDir { .. } | Error::RuntimeDirBusy { .. } => exit::RUNTIME_DIR,
            Error::HealthListen { .. } => exit::HEALTH_LISTEN,
            Error::PidFile { .. } => exit::PID_FILE,
            Error::NotNginx { .. } => exit::NOT_NGINX,
            Error::OtherUser { .. } => exit::OTHER_USER,
            Error::NoPidFile { .. } => exit::NOT_RUNNING,
            Error::ControlBroken | Error::ControlTimeout { .. } => exit::CONTROL_BROKEN,
            Error::ControlRefused { .. } => exit::CONTROL_REFUSED,
            Error::Internal { .. } => exit::INTERNAL,
        }
    }

    pub fn internal(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Internal { context, source }
    }
}
