//! The drain's wait and escalation in paused time, against scripted processes: every signal at
//! its exact time (never before its deadline), and the drain's end when the last process exits
//! or the budget does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal::{self, SIGKILL, SIGQUIT, SIGTERM};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::fake::{FakeNginx, Script};
use super::{Drain, NginxProcesses, NginxTree, Sight};
use crate::core::outcome::{DrainOutcome, Observed, Outcome};
use crate::core::phase::Phases;
use crate::core::plan::{DelaySetting, DrainPlan, DrainSettings};
use crate::os::drain_flag::DrainFlag;
use crate::os::reaper::Reaper;

// Above the kernel's PID_MAX_LIMIT: no real process answers to them.
const MASTER: i32 = 5_000_000;
const WORKER_1: i32 = 5_000_001;
const WORKER_2: i32 = 5_000_002;
const STRAGGLER: i32 = 5_000_009;

// The plan's timeline, in milliseconds after the trigger: a 30 s grace period, 2 s of margin.
const FAST_SHUTDOWN_AT: u64 = 28_000;
const KILL_AT: u64 = 29_000;
const GRACE_PERIOD: u64 = 30_000;

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

fn outcome(escalated: bool, killed: usize, elapsed_ms: u64) -> DrainOutcome {
    DrainOutcome {
        escalated,
        // Fake pids hold no sockets: nothing to count.
        connections_at_quit: None,
        closed_by_shutdown_timeout: None,
        killed,
        elapsed: ms(elapsed_ms),
        ..Default::default()
    }
}

/// What a drain holds besides nginx's processes. The flag, the hooks, the delay and the real
/// processes' tree are `run`'s and `orphans`'s part, not reached from `quit` and `quit_orphans`.
struct Parts {
    plan: DrainPlan,
    phases: Phases,
    reaper: Reaper,
    flag: DrainFlag,
    skip_delay: Notify,
}

impl Parts {
    fn new() -> Self {
        let plan = DrainPlan::new(&DrainSettings {
            grace_period: ms(GRACE_PERIOD),
            propagation_delay: DelaySetting::Fixed(Duration::ZERO),
            min_propagation_delay: Duration::ZERO,
            max_propagation_delay: None,
            safety_margin: ms(2_000),
            pre_drain_exec: Vec::new(),
            pre_drain_timeout: ms(5_000),
            probe_ports: Vec::new(),
            close_spread: None,
        })
        .unwrap();
        assert_eq!(
            (plan.fast_shutdown_at, plan.kill_at, plan.grace_period),
            (ms(FAST_SHUTDOWN_AT), ms(KILL_AT), ms(GRACE_PERIOD))
        );
        Self {
            plan,
            phases: Phases::default(),
            reaper: Reaper::default(),
            flag: DrainFlag::in_dir(&std::env::temp_dir()),
            skip_delay: Notify::new(),
        }
    }

    fn drain(&self) -> Drain<'_> {
        Drain {
            plan: &self.plan,
            phases: &self.phases,
            reaper: &self.reaper,
            flag: &self.flag,
            masters: Vec::new(),
            tree: NginxTree {
                roots: Vec::new(),
                include_roots: false,
                comm: "nginx".into(),
            },
            skip_delay: &self.skip_delay,
            shutdown_timeout: None,
            arrivals: None,
        }
    }
}

/// Which way into the wait: after SIGQUIT to the master (`run`), or with the master already
/// gone (`orphans`).
#[derive(Debug, Clone, Copy)]
enum Entry {
    Quit,
    Orphans,
}

/// What a drain did.
#[derive(Debug)]
struct Played {
    /// (milliseconds after the trigger, pid, signal)
    sent: Vec<(u64, i32, Signal)>,
    outcome: DrainOutcome,
    /// The phases entered, in order.
    phases: Vec<String>,
    /// Still tracked when the drain returned.
    left: Vec<i32>,
    logs: String,
    /// How many looks for new processes the drain made.
    looks: usize,
}

/// Plays a drain whose budget starts now and whose wait starts `wait_at` milliseconds later
/// (after hooks and the propagation delay, or after the controller's part).
async fn play(entry: Entry, wait_at: u64, nginx: Vec<Script>) -> Played {
    play_blind(entry, wait_at, nginx, None).await
}

/// [`play`], with every look for new processes failing until `blind_until` (`Some(None)`: to
/// the end), as /proc does when the supervisor has no file descriptor left.
async fn play_blind(
    entry: Entry,
    wait_at: u64,
    nginx: Vec<Script>,
    blind_until: Option<Option<Duration>>,
) -> Played {
    let parts = Parts::new();
    let mut feed = parts.phases.feed_source().subscribe();
    let logs = Logs::default();
    let _logging = logs.capture();
    let started = Instant::now();
    let mut nginx = FakeNginx::new(started, nginx);
    if let Some(until) = blind_until {
        nginx = nginx.blind_until(until);
    }
    tokio::time::sleep(ms(wait_at)).await;
    let drain = parts.drain();
    // The look that `run` and `orphans` take before the quit.
    let mut sight = Sight::default();
    sight.note(nginx.find_new());
    let outcome = match entry {
        Entry::Quit => drain.quit(&mut nginx, &mut sight, started).await,
        Entry::Orphans => drain.quit_orphans(&mut nginx, &mut sight, started).await,
    };
    assert_eq!(
        outcome.elapsed,
        started.elapsed(),
        "the elapsed time is when the drain returned"
    );
    let mut phases = Vec::new();
    while let Ok(event) = feed.try_recv() {
        if event["event"] == "phase" {
            phases.push(event["phase"].as_str().unwrap_or_default().to_owned());
        }
    }
    Played {
        sent: nginx.sent(),
        outcome,
        phases,
        left: nginx.pids(),
        logs: logs.text(),
        looks: nginx.looks(),
    }
}

/// One drain and everything it must have done.
struct Case {
    what: &'static str,
    entry: Entry,
    /// When the wait starts, in milliseconds after the trigger.
    wait_at: u64,
    nginx: Vec<Script>,
    sent: Vec<(u64, i32, Signal)>,
    outcome: DrainOutcome,
    phases: &'static [&'static str],
    /// Processes that survived SIGKILL: still tracked, and reported.
    left: &'static [i32],
}

impl Case {
    async fn check(self) {
        let what = self.what;
        let played = play(self.entry, self.wait_at, self.nginx).await;
        // The rule on its own first, then the exact list: no escalation before its deadline.
        for &(at, pid, signal) in &played.sent {
            let earliest = match signal {
                SIGTERM => FAST_SHUTDOWN_AT,
                SIGKILL => KILL_AT,
                _ => 0,
            };
            assert!(
                at >= earliest,
                "{what}: {signal} to {pid} at {at} ms, before {earliest} ms"
            );
        }
        assert_eq!(played.sent, self.sent, "{what}: signals sent");
        assert_eq!(played.outcome, self.outcome, "{what}: outcome");
        assert_eq!(played.phases, self.phases, "{what}: phases");
        assert_eq!(played.left, self.left, "{what}: processes left");
        assert_eq!(
            played.logs.contains("nginx processes survived SIGKILL"),
            !self.left.is_empty(),
            "{what}: survivors reported\n{}",
            played.logs
        );
    }
}

#[tokio::test(start_paused = true)]
async fn after_sigquit_the_drain_waits_then_escalates_each_step_at_its_deadline() {
    use Entry::Quit;
    use Script as S;
    let cases = [
        Case {
            what: "clean: the workers finish within 3 s of SIGQUIT, the master after them",
            entry: Quit,
            wait_at: 0,
            nginx: vec![
                S::master(MASTER).on(SIGQUIT, ms(3_100)),
                S::worker(WORKER_1).on(SIGQUIT, ms(3_000)),
                S::worker(WORKER_2).on(SIGQUIT, ms(1_000)),
            ],
            sent: vec![(0, MASTER, SIGQUIT)],
            outcome: outcome(false, 0, 3_100),
            phases: &["quitting", "stopped"],
            left: &[],
        },
        Case {
            what: "clean with 1 ms to spare: no SIGTERM",
            entry: Quit,
            wait_at: 0,
            nginx: vec![S::master(MASTER).on(SIGQUIT, ms(FAST_SHUTDOWN_AT - 1))],
            sent: vec![(0, MASTER, SIGQUIT)],
            outcome: outcome(false, 0, FAST_SHUTDOWN_AT - 1),
            phases: &["quitting", "stopped"],
            left: &[],
        },
        Case {
            what: "1 ms too slow: SIGTERM at fast_shutdown_at, the drain ends at the exit",
            entry: Quit,
            wait_at: 0,
            nginx: vec![S::master(MASTER).exits_at(ms(FAST_SHUTDOWN_AT + 1))],
            sent: vec![(0, MASTER, SIGQUIT), (FAST_SHUTDOWN_AT, MASTER, SIGTERM)],
            outcome: outcome(true, 0, FAST_SHUTDOWN_AT + 1),
            phases: &["quitting", "fast_shutdown", "stopped"],
            left: &[],
        },
        Case {
            what: "a worker holds a connection past SIGQUIT: SIGTERM, passed on by the master, ends it",
            entry: Quit,
            wait_at: 0,
            nginx: vec![
                S::master(MASTER).on(SIGTERM, ms(300)),
                S::worker(WORKER_1).on(SIGQUIT, ms(2_000)),
                S::worker(WORKER_2).on(SIGTERM, ms(200)),
            ],
            sent: vec![(0, MASTER, SIGQUIT), (FAST_SHUTDOWN_AT, MASTER, SIGTERM)],
            outcome: outcome(true, 0, FAST_SHUTDOWN_AT + 300),
            phases: &["quitting", "fast_shutdown", "stopped"],
            left: &[],
        },
        Case {
            what: "deaf to SIGQUIT and SIGTERM: SIGKILL to every process at kill_at",
            entry: Quit,
            wait_at: 0,
            nginx: vec![S::master(MASTER), S::worker(WORKER_1), S::worker(WORKER_2)],
            sent: vec![
                (0, MASTER, SIGQUIT),
                (FAST_SHUTDOWN_AT, MASTER, SIGTERM),
                (KILL_AT, MASTER, SIGKILL),
                (KILL_AT, WORKER_1, SIGKILL),
                (KILL_AT, WORKER_2, SIGKILL),
            ],
            outcome: outcome(true, 3, KILL_AT),
            phases: &["quitting", "fast_shutdown", "killing", "stopped"],
            left: &[],
        },
        Case {
            what: "SIGQUIT 10 s after the trigger (hooks, delay): the deadlines count from the trigger",
            entry: Quit,
            wait_at: 10_000,
            nginx: vec![S::master(MASTER)],
            sent: vec![
                (10_000, MASTER, SIGQUIT),
                (FAST_SHUTDOWN_AT, MASTER, SIGTERM),
                (KILL_AT, MASTER, SIGKILL),
            ],
            outcome: outcome(true, 1, KILL_AT),
            phases: &["quitting", "fast_shutdown", "killing", "stopped"],
            left: &[],
        },
        Case {
            what: "a worker stuck in the kernel survives SIGKILL: reported, and the drain ends at the grace period",
            entry: Quit,
            wait_at: 0,
            nginx: vec![S::master(MASTER), S::worker(WORKER_1).survives_sigkill()],
            sent: vec![
                (0, MASTER, SIGQUIT),
                (FAST_SHUTDOWN_AT, MASTER, SIGTERM),
                (KILL_AT, MASTER, SIGKILL),
                (KILL_AT, WORKER_1, SIGKILL),
            ],
            outcome: outcome(true, 2, GRACE_PERIOD),
            phases: &["quitting", "fast_shutdown", "killing", "stopped"],
            left: &[WORKER_1],
        },
    ];
    for case in cases {
        case.check().await;
    }
}

#[tokio::test(start_paused = true)]
async fn stragglers_the_snapshot_missed_are_waited_for_and_killed_with_the_rest() {
    use Entry::Quit;
    use Script as S;
    let cases = [
        Case {
            // Between the once-a-second looks: only the look when the set empties finds it.
            what: "found when the tracked processes are all gone",
            entry: Quit,
            wait_at: 0,
            nginx: vec![
                S::master(MASTER).on(SIGQUIT, ms(1_500)),
                S::worker(WORKER_1).on(SIGQUIT, ms(1_500)),
                S::worker(STRAGGLER).appears_at(ms(1_200)).exits_at(ms(4_500)),
            ],
            sent: vec![(0, MASTER, SIGQUIT)],
            outcome: outcome(false, 0, 4_500),
            phases: &["quitting", "stopped"],
            left: &[],
        },
        Case {
            what: "found while the master holds on, and killed with it",
            entry: Quit,
            wait_at: 0,
            nginx: vec![S::master(MASTER), S::worker(STRAGGLER).appears_at(ms(1_200))],
            sent: vec![
                (0, MASTER, SIGQUIT),
                (FAST_SHUTDOWN_AT, MASTER, SIGTERM),
                (KILL_AT, MASTER, SIGKILL),
                (KILL_AT, STRAGGLER, SIGKILL),
            ],
            outcome: outcome(true, 2, KILL_AT),
            phases: &["quitting", "fast_shutdown", "killing", "stopped"],
            left: &[],
        },
    ];
    for case in cases {
        case.check().await;
    }
}

#[tokio::test(start_paused = true)]
async fn orphaned_workers_get_sigquit_and_what_is_left_of_the_budget() {
    use Entry::Orphans;
    use Script as S;
    let cases = [
        Case {
            what: "both finish",
            entry: Orphans,
            wait_at: 0,
            nginx: vec![
                S::worker(WORKER_1).on(SIGQUIT, ms(2_000)),
                S::worker(WORKER_2).on(SIGQUIT, ms(1_000)),
            ],
            sent: vec![(0, WORKER_1, SIGQUIT), (0, WORKER_2, SIGQUIT)],
            outcome: outcome(false, 0, 2_000),
            phases: &["quitting", "stopped"],
            left: &[],
        },
        Case {
            what: "one holds on: no master to send SIGTERM to, SIGKILL at kill_at",
            entry: Orphans,
            wait_at: 0,
            nginx: vec![S::worker(WORKER_1).on(SIGQUIT, ms(2_000)), S::worker(WORKER_2)],
            sent: vec![
                (0, WORKER_1, SIGQUIT),
                (0, WORKER_2, SIGQUIT),
                (KILL_AT, WORKER_2, SIGKILL),
            ],
            outcome: outcome(true, 1, KILL_AT),
            phases: &["quitting", "fast_shutdown", "killing", "stopped"],
            left: &[],
        },
        Case {
            what: "after a controller's drain took 20 s of the budget",
            entry: Orphans,
            wait_at: 20_000,
            nginx: vec![S::worker(WORKER_1)],
            sent: vec![(20_000, WORKER_1, SIGQUIT), (KILL_AT, WORKER_1, SIGKILL)],
            outcome: outcome(true, 1, KILL_AT),
            phases: &["quitting", "fast_shutdown", "killing", "stopped"],
            left: &[],
        },
        Case {
            what: "none left",
            entry: Orphans,
            wait_at: 0,
            nginx: vec![],
            sent: vec![],
            outcome: outcome(false, 0, 0),
            phases: &["stopped"],
            left: &[],
        },
    ];
    for case in cases {
        case.check().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_master_dead_before_the_quit_leaves_workers_that_get_sigquit_directly() {
    use Script as S;
    // The master was SIGKILLed 500 ms into a 2 s propagation delay; its workers serve on.
    let nginx = vec![
        S::master(MASTER).exits_at(ms(500)),
        S::worker(WORKER_1).on(SIGQUIT, ms(1_000)),
        S::worker(WORKER_2).on(SIGQUIT, ms(10)),
    ];
    let played = play(Entry::Quit, 2_000, nginx).await;
    assert_eq!(
        played.sent,
        [(2_000, WORKER_1, SIGQUIT), (2_000, WORKER_2, SIGQUIT)],
        "SIGQUIT to each worker at the delay's end, none to the dead master"
    );
    assert_eq!(
        played.outcome,
        DrainOutcome {
            master_died_before_quit: true,
            ..outcome(false, 0, 3_000)
        }
    );
    assert_eq!(played.phases, ["quitting", "stopped"]);
    let reported = Outcome::of_drain(played.outcome);
    assert_eq!(
        (reported.verdict.name(), reported.exit_code),
        ("nginx_failed", 4),
        "not clean: the master died"
    );
    assert!(
        played
            .logs
            .contains("master died before the drain asked it to quit"),
        "{}",
        played.logs
    );
}

#[tokio::test(start_paused = true)]
async fn processes_that_cannot_be_seen_are_unknown_never_gone() {
    use Script as S;
    const REASON: &str = "cannot read /proc: Too many open files (os error 24)";
    // The worker exists from the start, but no look can see it while /proc is unreadable: only
    // the master, held from before, is tracked.
    let unseen_worker = || S::worker(WORKER_1).appears_at(ms(0)).on(SIGQUIT, ms(5_000));

    // Sight comes back at 2.5 s: the worker is found and waited for, the end is seen.
    let played = play_blind(
        Entry::Quit,
        0,
        vec![S::master(MASTER).on(SIGQUIT, ms(3_000)), unseen_worker()],
        Some(Some(ms(2_500))),
    )
    .await;
    assert_eq!(
        played.outcome,
        DrainOutcome {
            observed: Observed::WithGaps(REASON.into()),
            ..outcome(false, 0, 5_000)
        },
        "the drain ends at the worker's exit, not at the master's"
    );
    assert_eq!(Outcome::of_drain(played.outcome).exit_code, 0);
    assert!(played.logs.contains("never taken for gone"), "{}", played.logs);
    assert!(played.logs.contains("can be seen again"), "{}", played.logs);

    // Blind to the end, and the worker never finishes: the drain waits out the plan, then says
    // it did not see the end.
    let played = play_blind(
        Entry::Quit,
        0,
        vec![
            S::master(MASTER).on(SIGQUIT, ms(1_000)),
            S::worker(WORKER_1).appears_at(ms(0)),
        ],
        Some(None),
    )
    .await;
    assert_eq!(
        played.outcome,
        DrainOutcome {
            observed: Observed::NotTheEnd(REASON.into()),
            ..outcome(false, 0, FAST_SHUTDOWN_AT)
        }
    );
    assert_eq!(played.sent, [(0, MASTER, SIGQUIT)], "nothing unseen is signalled");
    assert_eq!(played.phases, ["quitting", "stopped"]);
    let reported = Outcome::of_drain(played.outcome);
    assert_eq!((reported.verdict.name(), reported.exit_code), ("unobserved", 5));
    // 27 s without sight: looks again a little later each time, at most every second.
    assert!((20..80).contains(&played.looks), "{} looks in 27 s", played.looks);

    // Blind, but nothing can be left (as reaper: no child left): the end is seen.
    let played = play_blind(
        Entry::Quit,
        0,
        vec![S::master(MASTER).on(SIGQUIT, ms(1_000))],
        Some(None),
    )
    .await;
    assert_eq!(
        played.outcome,
        DrainOutcome {
            observed: Observed::WithGaps(REASON.into()),
            ..outcome(false, 0, 1_000)
        }
    );
}

#[tokio::test(start_paused = true)]
async fn the_flag_is_lowered_with_the_last_worker_before_the_master_exits() {
    // With nginx as PID 1 the kernel ends the hook with the master: the flag must be gone by then.
    let dir = std::env::temp_dir().join(format!("ng-drain-flag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut parts = Parts::new();
    parts.flag = DrainFlag::in_dir(&dir);
    parts.flag.raise(std::process::id() as i32).unwrap();
    let flag = parts.flag.path().to_owned();
    let started = Instant::now();
    let mut nginx = FakeNginx::new(
        started,
        vec![
            Script::master(MASTER).on(SIGQUIT, ms(2_000)),
            Script::worker(WORKER_1).on(SIGQUIT, ms(500)),
            Script::worker(WORKER_2).on(SIGQUIT, ms(1_000)),
        ],
    );
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        for at in [750, 1_500] {
            tokio::time::sleep_until(started + ms(at)).await;
            seen.push((at, flag.exists()));
        }
        seen
    });
    parts
        .drain()
        .quit(&mut nginx, &mut Sight::default(), started)
        .await;
    assert_eq!(seen.await.unwrap(), [(750, true), (1_500, false)]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The log lines written on this thread while a guard from [`Logs::capture`] is held.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || logs.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
