//! The supervisor's phases, their order, and the one place that announces a change of phase.

use std::fmt;
use std::time::Instant;

use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// Where the supervisor is in the life of nginx. The drain phases come in this order; a phase
/// may be skipped (no hooks, no escalation) but never revisited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Signal handlers installed, nginx being tested and started.
    Starting,
    /// nginx runs; readiness follows nginx.
    Serving,
    /// A drain trigger arrived (SIGTERM, SIGINT, SIGQUIT): /readyz answers 503 from now on.
    Unready,
    /// The drain flags go up: HTTP/1 responses tell the client to close its connection, on a
    /// tenth of the connections more at a time over the close spread, then on all.
    KeepAliveClose,
    /// The --pre-drain-exec hooks run, in order.
    PreDrainHooks,
    /// nginx keeps serving while endpoint removal propagates.
    PropagationDelay,
    /// SIGQUIT sent: nginx finishes requests in flight; waiting for every nginx process.
    Quitting,
    /// The budget ran out: SIGTERM to the master (nginx's fast shutdown).
    FastShutdown,
    /// SIGKILL to every nginx process left.
    Killing,
    /// No nginx process is left.
    Stopped,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 10] = [
        Phase::Starting,
        Phase::Serving,
        Phase::Unready,
        Phase::KeepAliveClose,
        Phase::PreDrainHooks,
        Phase::PropagationDelay,
        Phase::Quitting,
        Phase::FastShutdown,
        Phase::Killing,
        Phase::Stopped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Unready => "unready",
            Phase::KeepAliveClose => "keepalive_close",
            Phase::PreDrainHooks => "pre_drain_hooks",
            Phase::PropagationDelay => "propagation_delay",
            Phase::Quitting => "quitting",
            Phase::FastShutdown => "fast_shutdown",
            Phase::Killing => "killing",
            Phase::Stopped => "stopped",
        }
    }

    /// True from the first instant of a drain on.
    pub fn is_draining(self) -> bool {
        self >= Phase::Unready && self != Phase::Stopped
    }

    /// Phases only move forward; `Stopped` can follow any phase (nginx may die at any time).
    pub fn may_follow(self, previous: Phase) -> bool {
        self > previous
    }
}

/// When `/readyz` starts failing in a drain (`--unready-at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnreadyAt {
    /// At the drain's first instant.
    Start,
    /// At SIGQUIT, when nginx closes its listeners: until then the endpoint is terminating but
    /// serving, and a kube-proxy with no ready endpoint left still sends it traffic.
    Quit,
    /// This long after the drain began, or at SIGQUIT if that comes first.
    After(std::time::Duration),
}

impl UnreadyAt {
    /// Whether readiness holds in `phase`, `since_drain` after the drain began.
    pub fn ready_in(self, phase: Phase, since_drain: std::time::Duration) -> bool {
        match phase {
            Phase::Serving => true,
            phase if phase.is_draining() && phase < Phase::Quitting => match self {
                UnreadyAt::Start => false,
                UnreadyAt::Quit => true,
                UnreadyAt::After(after) => since_drain < after,
            },
            _ => false,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Announces phase changes: one `info` event each, a watch channel for readiness, and a feed
/// of events for `drain` clients on the control socket.
#[derive(Debug)]
pub struct Phases {
    tx: watch::Sender<Phase>,
    feed: broadcast::Sender<Value>,
    /// The propagation delay's state: while it runs, and how it ended.
    delay: watch::Sender<Option<Value>>,
    drain_started: watch::Sender<Option<Instant>>,
    started: Instant,
}

impl Default for Phases {
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(Phase::Starting),
            feed: broadcast::Sender::new(64),
            delay: watch::Sender::new(None),
            drain_started: watch::Sender::new(None),
            started: Instant::now(),
        }
    }
}

impl Phases {
    pub fn current(&self) -> Phase {
        *self.tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.tx.subscribe()
    }

    /// The feed of phase changes and progress events, as JSON objects; each `subscribe()` sees
    /// the events from then on.
    pub fn feed_source(&self) -> broadcast::Sender<Value> {
        self.feed.clone()
    }

    /// When the drain began, once it has.
    pub fn drain_start(&self) -> watch::Receiver<Option<Instant>> {
        self.drain_started.subscribe()
    }

    /// The propagation delay's state, for `status`.
    pub fn delay_state(&self) -> watch::Receiver<Option<Value>> {
        self.delay.subscribe()
    }

    /// Records the propagation delay's state, and sends it to the feed.
    pub fn report_delay(&self, state: Value) {
        self.publish(json!({"event": "propagation", "propagation": state.clone()}));
        self.delay.send_replace(Some(state));
    }

    /// Sends an event to the feed only (the caller logs it).
    pub fn publish(&self, event: Value) {
        let _ = self.feed.send(event);
    }

    /// Moves to `next` and logs it with `message`; a move backwards is a bug and is ignored.
    pub fn enter(&self, next: Phase, message: &str) {
        let previous = self.current();
        if !next.may_follow(previous) {
            tracing::debug!(phase = %previous, refused = %next, "phase change refused");
            return;
        }
        if next.is_draining() && !previous.is_draining() {
            self.drain_started.send_replace(Some(Instant::now()));
        }
        self.tx.send_replace(next);
        let since_start_ms = self.started.elapsed().as_millis() as u64;
        tracing::info!(phase = next.name(), since_start_ms, "{message}");
        self.publish(json!({"event": "phase", "phase": next.name(), "message": message}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phases_are_the_documented_timeline() {
        // The names and their order are a contract: the log's `phase` field, /metrics' label,
        // `status`, the drain timeline in docs/drain.md and the tests' expected sequences.
        let names: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(
            names,
            [
                "starting",
                "serving",
                "unready",
                "keepalive_close",
                "pre_drain_hooks",
                "propagation_delay",
                "quitting",
                "fast_shutdown",
                "killing",
                "stopped"
            ]
        );
        assert!(Phase::Quitting.may_follow(Phase::PropagationDelay));
        assert!(
            Phase::Stopped.may_follow(Phase::Serving),
            "nginx may die at any time"
        );
        assert!(!Phase::Unready.may_follow(Phase::Quitting));
        assert!(!Phase::Serving.may_follow(Phase::Serving));
        for phase in Phase::ALL {
            assert_eq!(phase.to_string(), phase.name());
        }
    }

    #[test]
    fn draining_means_readiness_must_fail() {
        use Phase::*;
        for (phase, draining) in [
            (Starting, false),
            (Serving, false),
            (Unready, true),
            (PropagationDelay, true),
            (Quitting, true),
            (Killing, true),
            (Stopped, false),
        ] {
            assert_eq!(phase.is_draining(), draining, "{phase}");
        }
    }

    #[test]
    fn readiness_fails_when_the_setting_says() {
        use Phase::*;
        let secs = std::time::Duration::from_secs;
        // (setting, phase, seconds into the drain, ready)
        let table = [
            (UnreadyAt::Start, Serving, 0, true),
            (UnreadyAt::Start, Unready, 0, false),
            (UnreadyAt::Quit, PropagationDelay, 10, true),
            (UnreadyAt::Quit, Quitting, 10, false),
            (UnreadyAt::After(secs(3)), PropagationDelay, 2, true),
            (UnreadyAt::After(secs(3)), PropagationDelay, 3, false),
            (UnreadyAt::After(secs(3)), Quitting, 1, false),
            (UnreadyAt::Quit, Starting, 0, false),
            (UnreadyAt::Quit, Stopped, 0, false),
        ];
        for (at, phase, since, ready) in table {
            assert_eq!(at.ready_in(phase, secs(since)), ready, "{at:?} {phase} {since}s");
        }
    }

    #[test]
    fn phases_refuse_to_go_back() {
        let phases = Phases::default();
        let rx = phases.subscribe();
        phases.enter(Phase::Serving, "up");
        phases.enter(Phase::Quitting, "quit");
        phases.enter(Phase::Unready, "late signal");
        assert_eq!(*rx.borrow(), Phase::Quitting);
    }
}
