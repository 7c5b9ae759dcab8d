//! How things ended: a process ([`Exit`]), a drain ([`DrainOutcome`]) and the supervisor's whole
//! run ([`Outcome`]). Typed until they leave the process: [`Outcome::to_json`] is what the log,
//! the `drain` client and the outcome file get, and [`Outcome::from_json`] reads it back on the
//! other side of the socket or the file.

use std::fmt;
use std::time::Duration;

use serde_json::{Value, json};

use crate::core::close_spread::Told;
use crate::core::quiet::DelayEnd;
use crate::duration::fmt as fmt_duration;
use crate::error::exit;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The status a shell would report: the exit code, or 128 + the signal number.
    pub fn as_exit_code(self) -> i32 {
        match self {
            Exit::Code(code) => code,
            Exit::Signal(sig) => 128 + sig,
        }
    }

    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl From<std::process::ExitStatus> for Exit {
    /// A waited-for status is always one of the two; -1 stands for what cannot happen.
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Code(-1),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit code {code}"),
            Exit::Signal(sig) => {
                let name = nix::sys::signal::Signal::try_from(*sig).map_or("?", |s| s.as_str());
                write!(f, "killed by {name}")
            }
        }
    }
}

/// What the drain procedure observed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainOutcome {
    /// The budget ran out and nginx was stopped by SIGTERM or SIGKILL.
    pub escalated: bool,
    /// Established connections when SIGQUIT went out; `None` when nginx was gone before the
    /// count finished (it had nothing in flight worth waiting for).
    pub connections_at_quit: Option<usize>,
    /// Connections still open when nginx's worker_shutdown_timeout fired, which nginx then
    /// closed itself (WebSockets, streams, slow downloads); `None` when the timeout is unknown.
    pub closed_by_shutdown_timeout: Option<usize>,
    /// nginx processes killed with SIGKILL.
    pub killed: usize,
    pub elapsed: Duration,
    /// A master the drain was given had died before its SIGQUIT (killed, crashed): its
    /// workers, orphaned, were sent SIGQUIT directly.
    pub master_died_before_quit: bool,
    /// Whether the drain could see nginx's processes throughout.
    pub observed: Observed,
    /// How the propagation delay ended; `None` when the drain had none (SIGQUIT).
    pub delay: Option<DelayEnd>,
    /// How keep-alive clients were told to close; `None` for a sweep of orphans.
    pub told: Option<Told>,
}

impl DrainOutcome {
    /// This drain followed by `rest`, a later sweep within the same budget (the nginx a
    /// controller started meanwhile): what either saw counts, the worse sight wins.
    pub fn then(self, rest: DrainOutcome) -> DrainOutcome {
        DrainOutcome {
            escalated: self.escalated || rest.escalated,
            killed: self.killed + rest.killed,
            elapsed: self.elapsed.max(rest.elapsed),
            master_died_before_quit: self.master_died_before_quit || rest.master_died_before_quit,
            observed: self.observed.worse(rest.observed),
            // The counts and the delay are taken at the drain's SIGQUIT and timeout, not the sweep's.
            ..self
        }
    }
}

/// What a drain could see of nginx's processes. A read of /proc or a pidfd that fails (too
/// many open files, say) leaves a process unknown, never gone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Observed {
    /// Every look succeeded.
    #[default]
    Fully,
    /// Some looks failed (the first reason), but the drain saw the last process exit.
    WithGaps(String),
    /// The drain ended without seeing whether nginx processes were left (the first reason).
    NotTheEnd(String),
}

impl Observed {
    pub fn name(&self) -> &'static str {
        match self {
            Observed::Fully => "fully",
            Observed::WithGaps(_) => "with_gaps",
            Observed::NotTheEnd(_) => "not_the_end",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Observed::Fully => None,
            Observed::WithGaps(reason) | Observed::NotTheEnd(reason) => Some(reason),
        }
    }

    /// The worse of two sights (the first one on a tie): an end not seen over gaps, gaps over
    /// a full view.
    fn worse(self, other: Observed) -> Observed {
        let rank = |o: &Observed| match o {
            Observed::Fully => 0,
            Observed::WithGaps(_) => 1,
            Observed::NotTheEnd(_) => 2,
        };
        match rank(&other) > rank(&self) {
            true => other,
            false => self,
        }
    }

    fn from_json(name: &str, reason: Option<&str>) -> Self {
        let reason = reason.unwrap_or_default().to_owned();
        match name {
            "with_gaps" => Observed::WithGaps(reason),
            "not_the_end" => Observed::NotTheEnd(reason),
            _ => Observed::Fully,
        }
    }

    /// For the summary line: nothing when every look succeeded.
    fn words(&self) -> String {
        match self {
            Observed::Fully => String::new(),
            Observed::WithGaps(reason) => {
                format!(" nginx's processes could not always be seen ({reason}),")
            }
            Observed::NotTheEnd(reason) => {
                format!(" the end was not seen: nginx's processes could not be read ({reason}),")
            }
        }
    }
}

/// How the run (or a `drain` without a supervisor) ended, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// nginx quit within the budget.
    Clean,
    /// The budget ran out: nginx was stopped with SIGTERM/SIGKILL.
    Escalated,
    /// The nginx master (or the controller) exited on its own while serving; or, under `run`,
    /// the master quit cleanly (exit code 0) during the drain before the drain asked it.
    NginxExited,
    /// The nginx master died mid-drain without quitting cleanly (OOM-killed, say).
    NginxFailed,
    /// The drain could not see whether nginx processes were left when it ended.
    Unobserved,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Clean => "clean",
            Verdict::Escalated => "escalated",
            Verdict::NginxExited => "nginx_exited",
            Verdict::NginxFailed => "nginx_failed",
            Verdict::Unobserved => "unobserved",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [
            Verdict::Clean,
            Verdict::Escalated,
            Verdict::NginxExited,
            Verdict::NginxFailed,
            Verdict::Unobserved,
        ]
        .into_iter()
        .find(|v| v.name() == name)
    }
}

/// How a controller ended after its nginx had drained (controller mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerEnd {
    /// Its exit status as words (`exit code 0`, `killed by SIGKILL`), when known.
    pub status: Option<String>,
    /// It did not exit on SIGTERM within the budget and was killed.
    pub killed: bool,
}

/// The end of a drain as the supervisor reports it: the one exit code, and what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub exit_code: i32,
    pub drain: DrainOutcome,
    pub controller: Option<ControllerEnd>,
}

impl Outcome {
    /// A drain that ran to its end. Clean only if it saw the end, and the masters quit when
    /// asked; a master that died first has no status here (not our child, for `drain`):
    /// under `run`, [`Outcome::nginx_ended`] gives its own.
    pub fn of_drain(drain: DrainOutcome) -> Self {
        let (verdict, exit_code) = if matches!(drain.observed, Observed::NotTheEnd(_)) {
            (Verdict::Unobserved, exit::UNOBSERVED)
        } else if drain.escalated {
            (Verdict::Escalated, exit::ESCALATED)
        } else if drain.master_died_before_quit {
            (Verdict::NginxFailed, exit::MASTER_DIED)
        } else {
            (Verdict::Clean, exit::OK)
        };
        Self {
            verdict,
            exit_code,
            drain,
            controller: None,
        }
    }

    /// nginx (or the controller) ended with `status` before or during the drain; the exit code
    /// is its own.
    pub fn nginx_ended(verdict: Verdict, status: Exit, drain: DrainOutcome) -> Self {
        Self {
            verdict,
            exit_code: status.as_exit_code(),
            drain,
            controller: None,
        }
    }

    /// The master quit cleanly (exit code 0) before the drain asked it (an `nginx -s quit`
    /// from elsewhere): not a failure of nginx, and the exit code is its status.
    pub fn master_quit_first(drain: DrainOutcome) -> Self {
        Self::nginx_ended(Verdict::NginxExited, Exit::Code(0), drain)
    }

    /// For the summary line: how a master that ended before the drain asked it ended.
    fn early_master_words(&self) -> &'static str {
        match (self.drain.master_died_before_quit, self.verdict) {
            (false, _) => "",
            (true, Verdict::NginxExited) => " the nginx master quit before the drain asked it,",
            (true, _) => " the nginx master died before SIGQUIT (its workers were sent it directly),",
        }
    }

    /// The event that ends a drain, for the log, the outcome file and `drain` clients.
    pub fn to_json(&self) -> Value {
        let drain = &self.drain;
        let mut event = json!({
            "event": "outcome",
            "outcome": self.verdict.name(),
            "exit_code": self.exit_code,
            "elapsed_ms": drain.elapsed.as_millis() as u64,
            "connections_at_quit": drain.connections_at_quit,
            "closed_by_shutdown_timeout": drain.closed_by_shutdown_timeout,
            "killed": drain.killed,
            "master_died_before_quit": drain.master_died_before_quit,
            "observed": drain.observed.name(),
            "unobserved": drain.observed.reason(),
            "propagation": drain.delay.map(|d| d.to_json()),
            "close_spread": drain.told.map(|t| t.to_json()),
        });
        if let Some(controller) = &self.controller {
            event["controller_exit"] = controller.status.clone().into();
            event["controller_killed"] = controller.killed.into();
        }
        event
    }

    /// An outcome event written by [`Outcome::to_json`] (by a supervisor, or in the outcome
    /// file); `None` when it is not one.
    pub fn from_json(event: &Value) -> Option<Self> {
        let count = |field: &str| event[field].as_u64().map(|n| n as usize);
        Some(Self {
            verdict: Verdict::from_name(event["outcome"].as_str()?)?,
            exit_code: i32::try_from(event["exit_code"].as_i64()?).ok()?,
            drain: DrainOutcome {
                escalated: event["outcome"] == "escalated",
                connections_at_quit: count("connections_at_quit"),
                closed_by_shutdown_timeout: count("closed_by_shutdown_timeout"),
                killed: count("killed").unwrap_or(0),
                elapsed: Duration::from_millis(event["elapsed_ms"].as_u64().unwrap_or(0)),
                master_died_before_quit: event["master_died_before_quit"].as_bool().unwrap_or(false),
                observed: Observed::from_json(
                    event["observed"].as_str().unwrap_or_default(),
                    event["unobserved"].as_str(),
                ),
                delay: DelayEnd::from_json(&event["propagation"]),
                told: Told::from_json(&event["close_spread"]),
            },
            controller: event.get("controller_killed").map(|killed| ControllerEnd {
                status: event["controller_exit"].as_str().map(str::to_owned),
                killed: killed.as_bool().unwrap_or(false),
            }),
        })
    }

    /// The drain's last line: verdict, total time, connections at SIGQUIT, processes killed.
    /// Returns the exit code.
    pub fn log_summary(&self, how: &str) -> i32 {
        let drain = &self.drain;
        tracing::info!(
            outcome = self.verdict.name(),
            elapsed_ms = drain.elapsed.as_millis() as u64,
            connections_at_quit = drain.connections_at_quit,
            closed_by_shutdown_timeout = drain.closed_by_shutdown_timeout,
            killed = drain.killed,
            master_died_before_quit = drain.master_died_before_quit,
            observed = drain.observed.name(),
            unobserved = drain.observed.reason(),
            propagation = drain.delay.map(|d| d.how.name()),
            propagation_ms = drain.delay.map(|d| d.lasted.as_millis() as u64),
            propagation_arrivals = drain.delay.and_then(|d| d.arrivals),
            close_spread_ms = drain.told.map(|t| t.spread.as_millis() as u64),
            all_told_ms = drain.told.map(|t| t.all_after.as_millis() as u64),
            // Controller mode: how the controller ended once nginx had.
            controller_exit = self.controller.as_ref().and_then(|c| c.status.as_deref()),
            controller_killed = self.controller.as_ref().map(|c| c.killed),
            exit_code = self.exit_code,
            "{how}: {} in {},{}{}{} {},{}{} {} processes killed",
            self.verdict.name(),
            fmt_duration(drain.elapsed),
            drain.told.map_or(String::new(), |t| format!(" {},", t.words())),
            drain
                .delay
                .map_or(String::new(), |d| format!(" propagation delay: {},", d.words())),
            self.early_master_words(),
            // Not counted when nginx was gone before the count was: it held nothing for long.
            drain.connections_at_quit.map_or(
                "nginx exited before its connections at SIGQUIT were counted".to_string(),
                |n| format!("{n} connections at SIGQUIT")
            ),
            drain
                .closed_by_shutdown_timeout
                .map_or(String::new(), |n| format!(
                    " {n} closed by worker_shutdown_timeout,"
                )),
            drain.observed.words(),
            drain.killed,
        );
        self.exit_code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_like_a_shell_reports_them() {
        for (exit, code, success, words) in [
            (Exit::Code(0), 0, true, "exit code 0"),
            (Exit::Code(3), 3, false, "exit code 3"),
            (Exit::Signal(9), 137, false, "killed by SIGKILL"),
            (Exit::Signal(15), 143, false, "killed by SIGTERM"),
        ] {
            assert_eq!(exit.as_exit_code(), code, "{exit:?}");
            assert_eq!(exit.success(), success, "{exit:?}");
            assert_eq!(exit.to_string(), words);
        }
    }

    #[test]
    fn verdicts_and_exit_codes() {
        let escalated = DrainOutcome {
            escalated: true,
            ..Default::default()
        };
        for (outcome, verdict, code) in [
            (Outcome::of_drain(DrainOutcome::default()), "clean", 0),
            (Outcome::of_drain(escalated), "escalated", 3),
            (
                Outcome::nginx_ended(Verdict::NginxExited, Exit::Code(1), DrainOutcome::default()),
                "nginx_exited",
                1,
            ),
            (
                Outcome::nginx_ended(Verdict::NginxFailed, Exit::Signal(9), DrainOutcome::default()),
                "nginx_failed",
                137,
            ),
            (
                Outcome::of_drain(DrainOutcome {
                    master_died_before_quit: true,
                    ..Default::default()
                }),
                "nginx_failed",
                4,
            ),
            (
                Outcome::master_quit_first(DrainOutcome {
                    master_died_before_quit: true,
                    ..Default::default()
                }),
                "nginx_exited",
                0,
            ),
            (
                Outcome::of_drain(DrainOutcome {
                    observed: Observed::WithGaps("cannot read /proc".into()),
                    ..Default::default()
                }),
                "clean",
                0,
            ),
            (
                Outcome::of_drain(DrainOutcome {
                    escalated: true,
                    master_died_before_quit: true,
                    observed: Observed::NotTheEnd("cannot read /proc".into()),
                    ..Default::default()
                }),
                "unobserved",
                5,
            ),
        ] {
            assert_eq!(outcome.verdict.name(), verdict);
            assert_eq!(outcome.exit_code, code, "{verdict}");
            assert_eq!(outcome.to_json()["outcome"], verdict);
            assert_eq!(outcome.to_json()["exit_code"], code);
        }
    }

    #[test]
    fn a_later_sweep_adds_what_it_saw_and_the_worse_sight_wins() {
        let drain = DrainOutcome {
            connections_at_quit: Some(3),
            killed: 1,
            elapsed: Duration::from_secs(4),
            observed: Observed::WithGaps("first".into()),
            ..Default::default()
        };
        let rest = DrainOutcome {
            escalated: true,
            connections_at_quit: Some(9),
            killed: 2,
            elapsed: Duration::from_secs(6),
            master_died_before_quit: true,
            observed: Observed::NotTheEnd("second".into()),
            ..Default::default()
        };
        let both = drain.clone().then(rest);
        assert_eq!(
            both,
            DrainOutcome {
                escalated: true,
                connections_at_quit: Some(3),
                killed: 3,
                elapsed: Duration::from_secs(6),
                master_died_before_quit: true,
                observed: Observed::NotTheEnd("second".into()),
                ..drain.clone()
            }
        );
        assert_eq!(Outcome::of_drain(both).exit_code, exit::UNOBSERVED);

        let gaps = |r: &str| Observed::WithGaps(r.into());
        let not_the_end = |r: &str| Observed::NotTheEnd(r.into());
        for (first, second, worse) in [
            (Observed::Fully, Observed::Fully, Observed::Fully),
            (Observed::Fully, gaps("b"), gaps("b")),
            (gaps("a"), Observed::Fully, gaps("a")),
            (gaps("a"), gaps("b"), gaps("a")),
            (gaps("a"), not_the_end("b"), not_the_end("b")),
            (not_the_end("a"), gaps("b"), not_the_end("a")),
            (not_the_end("a"), not_the_end("b"), not_the_end("a")),
        ] {
            assert_eq!(first.clone().worse(second.clone()), worse, "{first:?} {second:?}");
        }
    }

    #[test]
    fn an_outcome_reads_back_as_it_was_written() {
        let drain = DrainOutcome {
            escalated: true,
            connections_at_quit: Some(12),
            closed_by_shutdown_timeout: None,
            killed: 2,
            elapsed: Duration::from_millis(28_500),
            told: Some(Told {
                spread: Duration::from_secs(1),
                all_after: Duration::from_millis(1_002),
                cut_short: false,
            }),
            ..Default::default()
        };
        let mut with_controller = Outcome::of_drain(drain.clone());
        with_controller.controller = Some(ControllerEnd {
            status: Some("exit code 1".into()),
            killed: false,
        });
        let unobserved = Outcome::of_drain(DrainOutcome {
            master_died_before_quit: true,
            observed: Observed::NotTheEnd("cannot read /proc: Too many open files".into()),
            ..Default::default()
        });
        for outcome in [Outcome::of_drain(drain), with_controller, unobserved] {
            let json = outcome.to_json();
            assert_eq!(json["event"], "outcome");
            assert_eq!(Outcome::from_json(&json), Some(outcome), "{json}");
        }
        assert_eq!(Outcome::from_json(&json!({"event": "accepted"})), None);
        assert_eq!(
            Outcome::from_json(&json!({"outcome": "vanished", "exit_code": 0})),
            None
        );
    }
}
