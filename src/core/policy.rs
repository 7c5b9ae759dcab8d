//! What the supervisor does about each thing that happens to it. [`decide`] is a pure function
//! from the supervisor's state and one input to the actions its loop carries out: what SIGINT
//! does mid-drain, what SIGHUP does in controller mode, who hears that a reload was refused.
//! Every rule is a row in the table test below.

use nix::sys::signal::Signal;

/// What a signal asks of the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGTERM or SIGINT: the ordered drain.
    Drain { signal: Signal },
    /// SIGQUIT: the drain without the propagation delay.
    DrainNow,
    /// SIGHUP: validate, then reload.
    Reload,
    /// SIGUSR1, SIGUSR2, SIGWINCH: passed on to the nginx master as they are.
    Forward(Signal),
}

/// Who the supervisor's child is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// nginx itself: the supervisor tests and reloads its config.
    Nginx,
    /// An ingress controller that starts nginx and owns its config.
    Controller,
}

/// Where the supervisor is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Serving,
    Draining,
    /// The child exited on its own: what is left is cleanup.
    Ended,
}

/// A client on the control socket that waits for a reload's outcome, by the loop's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Waiter(pub u64);

/// One thing that happened, as the loop hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Signal(Trigger),
    /// A `drain` client (the preStop hook) on the control socket.
    DrainRequested,
    /// A `reload` client on the control socket.
    ReloadRequested(Waiter),
    /// The config changed on disk.
    ConfigChanged,
    /// The reload under way ended, however it ended.
    ReloadFinished,
    /// The child (nginx's master, or the controller) exited.
    ChildExited,
}

/// Why a reload was not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Draining,
    ControllerOwnsConfig,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Draining => "a drain has begun: nginx is shutting down",
            Refusal::ControllerOwnsConfig => {
                "the controller owns nginx's config and reloads it: change it through the controller"
            }
        }
    }
}

/// Decisions that only need saying: the loop logs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// A drain signal mid-drain that changes nothing.
    AlreadyDraining(Signal),
    /// A second `drain` client: it follows the drain under way.
    FollowingDrain,
    /// A SIGHUP mid-drain.
    ReloadRefused,
    /// A reload asked for while one runs: one more follows it.
    ReloadQueued,
    /// The child exited mid-drain (in controller mode, the controller; nginx drains on).
    ChildExitedWhileDraining,
}

/// What started a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// SIGTERM (the kubelet) or SIGINT (Ctrl-C).
    Signal(Signal),
    /// SIGQUIT: the official nginx image's stop signal; no propagation delay.
    Quit,
    /// A `drain` client on the control socket: the preStop hook.
    PreStopHook,
}

impl Cause {
    /// Whether nginx keeps serving through the propagation delay.
    pub fn keeps_delay(self) -> bool {
        self != Cause::Quit
    }
}

/// What the loop does, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the ordered drain.
    Drain(Cause),
    /// Cut what is left of the propagation delay short.
    SkipDelay,
    StartReload,
    /// Drop the reload under way: a drain has begun, or nginx is gone.
    AbandonReload,
    /// Close the config watch: no reload from here on.
    StopWatching,
    /// Tell these clients the outcome of the reload that just ended.
    ReplyOutcome(Vec<Waiter>),
    Refuse(Vec<Waiter>, Refusal),
    /// Pass a signal to the nginx master.
    Forward(Signal),
    /// The child ended on its own while serving: wait for what is left of nginx, then exit
    /// with the child's status.
    EndWithoutDrain,
    Say(Note),
}

/// The supervisor's state as far as its decisions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub mode: Mode,
    pub stage: Stage,
    reloads: Reloads,
}

/// Reloads asked for: those waiting for the one under way, and those for the one after it.
/// Requests that come while one runs are coalesced into one more after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Reloads {
    running: bool,
    waiting: Vec<Waiter>,
    next: Option<Vec<Waiter>>,
}

impl Reloads {
    /// A reload is wanted; true when it should start now.
    fn ask(&mut self, waiter: Option<Waiter>) -> Vec<Action> {
        if self.running {
            self.next.get_or_insert_default().extend(waiter);
            return vec![Action::Say(Note::ReloadQueued)];
        }
        self.running = true;
        self.waiting.extend(waiter);
        vec![Action::StartReload]
    }

    fn finished(&mut self) -> Vec<Action> {
        let mut actions = vec![Action::ReplyOutcome(std::mem::take(&mut self.waiting))];
        match self.next.take() {
            Some(next) => {
                self.waiting = next;
                actions.push(Action::StartReload);
            }
            None => self.running = false,
        }
        actions
    }

    /// Nobody gets a reload any more: the one under way is dropped, every client is told why.
    fn end(&mut self, why: Refusal) -> Vec<Action> {
        let mut actions = Vec::new();
        if std::mem::take(&mut self.running) {
            actions.push(Action::AbandonReload);
        }
        let waiters: Vec<Waiter> = self
            .waiting
            .drain(..)
            .chain(self.next.take().into_iter().flatten())
            .collect();
        if !waiters.is_empty() {
            actions.push(Action::Refuse(waiters, why));
        }
        actions
    }
}

impl State {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            stage: Stage::Serving,
            reloads: Reloads::default(),
        }
    }
}

/// The supervisor's one rule book: `input` happened in `state`; returns what to do, and moves
/// `state` on.
pub fn decide(state: &mut State, input: Input) -> Vec<Action> {
    use Action::*;
    match (state.stage, input) {
        (Stage::Serving, Input::Signal(Trigger::Drain { signal })) => {
            start_drain(state, Cause::Signal(signal))
        }
        (Stage::Serving, Input::Signal(Trigger::DrainNow)) => start_drain(state, Cause::Quit),
        (Stage::Serving, Input::DrainRequested) => start_drain(state, Cause::PreStopHook),
        // The controller owns nginx's config: a SIGHUP or a change is nginx's plain reload.
        (Stage::Serving, Input::Signal(Trigger::Reload) | Input::ConfigChanged) => match state.mode {
            Mode::Controller => vec![Forward(Signal::SIGHUP)],
            Mode::Nginx => state.reloads.ask(None),
        },
        (Stage::Serving, Input::ReloadRequested(waiter)) => match state.mode {
            Mode::Controller => vec![Refuse(vec![waiter], Refusal::ControllerOwnsConfig)],
            Mode::Nginx => state.reloads.ask(Some(waiter)),
        },
        (Stage::Serving, Input::ReloadFinished) => state.reloads.finished(),
        (Stage::Serving, Input::ChildExited) => {
            state.stage = Stage::Ended;
            let mut actions = state.reloads.end(Refusal::Draining);
            actions.push(EndWithoutDrain);
            actions
        }

        // Draining: only a second interrupt changes anything.
        (
            Stage::Draining,
            Input::Signal(
                Trigger::Drain {
                    signal: Signal::SIGINT,
                }
                | Trigger::DrainNow,
            ),
        ) => {
            vec![SkipDelay]
        }
        (Stage::Draining, Input::Signal(Trigger::Drain { signal })) => {
            vec![Say(Note::AlreadyDraining(signal))]
        }
        (Stage::Draining, Input::Signal(Trigger::Reload)) => vec![Say(Note::ReloadRefused)],
        (Stage::Draining, Input::ReloadRequested(waiter)) => {
            vec![Refuse(vec![waiter], Refusal::Draining)]
        }
        (Stage::Draining, Input::DrainRequested) => vec![Say(Note::FollowingDrain)],
        (Stage::Draining, Input::ChildExited) => vec![Say(Note::ChildExitedWhileDraining)],
        // The watch is closed and the reload abandoned when the drain starts.
        (Stage::Draining, Input::ConfigChanged | Input::ReloadFinished) => Vec::new(),

        // Signals for nginx reach it in every stage: the last workers may still want a
        // SIGUSR1 to reopen their logs.
        (_, Input::Signal(Trigger::Forward(signal))) => vec![Forward(signal)],
        (Stage::Ended, Input::ReloadRequested(waiter)) => {
            vec![Refuse(vec![waiter], Refusal::Draining)]
        }
        (Stage::Ended, _) => Vec::new(),
    }
}

fn start_drain(state: &mut State, cause: Cause) -> Vec<Action> {
    state.stage = Stage::Draining;
    let mut actions = state.reloads.end(Refusal::Draining);
    actions.push(Action::StopWatching);
    actions.push(Action::Drain(cause));
    actions
}

#[cfg(test)]
mod tests {
    use super::Action::*;
    use super::*;
    use nix::sys::signal::Signal as Sig;

    const W1: Waiter = Waiter(1);
    const W2: Waiter = Waiter(2);
    const TERM: Input = Input::Signal(Trigger::Drain { signal: Sig::SIGTERM });
    const INT: Input = Input::Signal(Trigger::Drain { signal: Sig::SIGINT });
    const QUIT: Input = Input::Signal(Trigger::DrainNow);
    const HUP: Input = Input::Signal(Trigger::Reload);
    const USR1: Input = Input::Signal(Trigger::Forward(Sig::SIGUSR1));

    /// A rule: its name, the mode, the inputs from a fresh state, the actions of the last one,
    /// and the stage after it.
    type Rule = (&'static str, Mode, Vec<Input>, Vec<Action>, Stage);

    /// Runs `inputs` from a fresh state; returns the actions of the last one and the stage.
    fn after(mode: Mode, inputs: &[Input]) -> (Vec<Action>, Stage) {
        let mut state = State::new(mode);
        let mut last = Vec::new();
        for input in inputs {
            last = decide(&mut state, input.clone());
        }
        (last, state.stage)
    }

    #[test]
    fn every_rule() {
        use Input::*;
        use Mode::*;
        use Stage::*;
        let refused_draining = |w: Vec<Waiter>| Refuse(w, Refusal::Draining);
        #[rustfmt::skip]
        let table: Vec<Rule> = vec![
            // Serving: the three drain triggers.
            ("SIGTERM drains", Nginx, vec![TERM], vec![StopWatching, Drain(Cause::Signal(Sig::SIGTERM))], Draining),
            ("SIGINT drains", Nginx, vec![INT], vec![StopWatching, Drain(Cause::Signal(Sig::SIGINT))], Draining),
            ("SIGQUIT drains without the delay", Nginx, vec![QUIT], vec![StopWatching, Drain(Cause::Quit)], Draining),
            ("the preStop hook drains", Nginx, vec![DrainRequested], vec![StopWatching, Drain(Cause::PreStopHook)], Draining),
            ("a controller drains the same", Controller, vec![TERM], vec![StopWatching, Drain(Cause::Signal(Sig::SIGTERM))], Draining),
            // Serving: reloads.
            ("SIGHUP reloads", Nginx, vec![HUP], vec![StartReload], Serving),
            ("a config change reloads", Nginx, vec![ConfigChanged], vec![StartReload], Serving),
            ("a client's reload starts", Nginx, vec![ReloadRequested(W1)], vec![StartReload], Serving),
            ("a reload during one is queued", Nginx, vec![HUP, ConfigChanged], vec![Say(Note::ReloadQueued)], Serving),
            ("the waiters hear the outcome", Nginx, vec![ReloadRequested(W1), ReloadFinished], vec![ReplyOutcome(vec![W1])], Serving),
            ("a queued reload follows the first", Nginx, vec![ReloadRequested(W1), ReloadRequested(W2), ReloadFinished], vec![ReplyOutcome(vec![W1]), StartReload], Serving),
            ("and its waiters hear its outcome", Nginx, vec![ReloadRequested(W1), ReloadRequested(W2), ReloadFinished, ReloadFinished], vec![ReplyOutcome(vec![W2])], Serving),
            ("after the last one, a new one starts", Nginx, vec![HUP, ReloadFinished, HUP], vec![StartReload], Serving),
            // Serving, controller mode: the controller owns the config.
            ("SIGHUP goes to the controller's nginx", Controller, vec![HUP], vec![Forward(Sig::SIGHUP)], Serving),
            ("so does a config change", Controller, vec![ConfigChanged], vec![Forward(Sig::SIGHUP)], Serving),
            ("a client's reload is refused", Controller, vec![ReloadRequested(W1)], vec![Refuse(vec![W1], Refusal::ControllerOwnsConfig)], Serving),
            ("other signals go to nginx", Nginx, vec![USR1], vec![Forward(Sig::SIGUSR1)], Serving),
            // A drain ends every reload.
            ("a drain abandons the reload under way", Nginx, vec![ReloadRequested(W1), ReloadRequested(W2), TERM], vec![AbandonReload, refused_draining(vec![W1, W2]), StopWatching, Drain(Cause::Signal(Sig::SIGTERM))], Draining),
            ("a drain after a reload has nothing to abandon", Nginx, vec![HUP, ReloadFinished, TERM], vec![StopWatching, Drain(Cause::Signal(Sig::SIGTERM))], Draining),
            // Draining.
            ("a second SIGINT skips the delay", Nginx, vec![INT, INT], vec![SkipDelay], Draining),
            ("SIGQUIT mid-drain skips the delay", Nginx, vec![TERM, QUIT], vec![SkipDelay], Draining),
            ("a second SIGTERM changes nothing", Nginx, vec![TERM, TERM], vec![Say(Note::AlreadyDraining(Sig::SIGTERM))], Draining),
            ("SIGHUP mid-drain is refused", Nginx, vec![TERM, HUP], vec![Say(Note::ReloadRefused)], Draining),
            ("a client's reload mid-drain is refused", Nginx, vec![TERM, ReloadRequested(W1)], vec![refused_draining(vec![W1])], Draining),
            ("a second preStop hook follows the drain", Nginx, vec![DrainRequested, DrainRequested], vec![Say(Note::FollowingDrain)], Draining),
            ("a SIGTERM after the hook follows it", Nginx, vec![DrainRequested, TERM], vec![Say(Note::AlreadyDraining(Sig::SIGTERM))], Draining),
            ("signals still reach nginx mid-drain", Nginx, vec![TERM, USR1], vec![Forward(Sig::SIGUSR1)], Draining),
            ("the child's exit mid-drain is noted", Controller, vec![TERM, ChildExited], vec![Say(Note::ChildExitedWhileDraining)], Draining),
            ("a late reload outcome changes nothing", Nginx, vec![TERM, ReloadFinished], vec![], Draining),
            // The child ends on its own.
            ("nginx exits while serving", Nginx, vec![ChildExited], vec![EndWithoutDrain], Ended),
            ("its reloads are refused", Nginx, vec![ReloadRequested(W1), ChildExited], vec![AbandonReload, refused_draining(vec![W1]), EndWithoutDrain], Ended),
            ("nothing drains after the end", Nginx, vec![ChildExited, TERM], vec![], Ended),
            ("a reload after the end is refused", Nginx, vec![ChildExited, ReloadRequested(W1)], vec![refused_draining(vec![W1])], Ended),
        ];
        for (rule, mode, inputs, actions, stage) in table {
            assert_eq!(after(mode, &inputs), (actions, stage), "{rule}: {inputs:?}");
        }
    }

    #[test]
    fn a_refusal_says_its_cause_and_the_way_out() {
        assert!(Refusal::Draining.reason().contains("drain has begun"));
        let controller = Refusal::ControllerOwnsConfig.reason();
        assert!(controller.contains("controller owns"), "{controller}");
        assert!(
            controller.contains("change it through the controller"),
            "{controller}"
        );
    }

    #[test]
    fn only_sigquit_skips_the_delay() {
        assert!(Cause::Signal(Sig::SIGTERM).keeps_delay());
        assert!(Cause::Signal(Sig::SIGINT).keeps_delay());
        assert!(Cause::PreStopHook.keeps_delay());
        assert!(!Cause::Quit.keeps_delay());
    }

    #[test]
    fn every_waiter_hears_exactly_once() {
        // However requests, ends and drains interleave, each client gets one reply.
        let inputs = [
            Input::ReloadRequested(W1),
            Input::ReloadRequested(W2),
            Input::ReloadRequested(Waiter(3)),
            Input::ReloadFinished,
            Input::ReloadRequested(Waiter(4)),
            TERM,
            Input::ReloadRequested(Waiter(5)),
        ];
        let mut state = State::new(Mode::Nginx);
        let mut heard = Vec::new();
        for input in inputs {
            for action in decide(&mut state, input) {
                match action {
                    ReplyOutcome(waiters) | Refuse(waiters, _) => heard.extend(waiters),
                    _ => {}
                }
            }
        }
        heard.sort();
        assert_eq!(heard, (1..=5).map(Waiter).collect::<Vec<_>>());
    }
}
