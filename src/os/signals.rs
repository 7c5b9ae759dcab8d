//! Signals in, triggers out. Every handler is installed at once, before nginx starts, so no
//! signal is lost or meets the default disposition (which, for PID 1, is to ignore it).

use nix::sys::signal::Signal as Sig;

pub use crate::core::policy::Trigger;
use tokio::signal::unix::{Signal, SignalKind, signal};

pub struct Signals {
    term: Signal,
    int: Signal,
    quit: Signal,
    hup: Signal,
    usr1: Signal,
    usr2: Signal,
    winch: Signal,
    /// Taken by the reaper.
    pub child: Option<Signal>,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
            winch: signal(SignalKind::window_change())?,
            child: Some(signal(SignalKind::child())?),
        })
    }

    pub async fn next(&mut self) -> Trigger {
        tokio::select! {
            Some(()) = self.term.recv() => Trigger::Drain { signal: Sig::SIGTERM },
            Some(()) = self.int.recv() => Trigger::Drain { signal: Sig::SIGINT },
            Some(()) = self.quit.recv() => Trigger::DrainNow,
            Some(()) = self.hup.recv() => Trigger::Reload,
            Some(()) = self.usr1.recv() => Trigger::Forward(Sig::SIGUSR1),
            Some(()) = self.usr2.recv() => Trigger::Forward(Sig::SIGUSR2),
            Some(()) = self.winch.recv() => Trigger::Forward(Sig::SIGWINCH),
        }
    }
}
