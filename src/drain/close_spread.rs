//! Telling keep-alive clients to close over the close spread: the first slot flag at the
//! drain's start, the others at their times ([`crate::core::close_spread::due`]), `draining`
//! with the last. Each raise is a timer in the drain's own wait, beside the hooks and the
//! propagation delay: no task, no tick.

use std::future::Future;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};

use crate::core::close_spread::{SLOTS, Told, due};
use crate::duration::fmt;
use crate::os::drain_flag::DrainFlag;

pub struct CloseSpread<'a> {
    flag: &'a DrainFlag,
    /// The master the flags name.
    master: i32,
    started: Instant,
    window: Duration,
    /// Slot flags raised so far.
    raised: usize,
    /// When `draining` went up: every client told.
    all_at: Option<Instant>,
    cut_short: bool,
    warned: bool,
}

impl<'a> CloseSpread<'a> {
    pub fn new(flag: &'a DrainFlag, master: i32, started: Instant, window: Duration) -> Self {
        Self {
            flag,
            master,
            started,
            window,
            raised: 0,
            all_at: None,
            cut_short: false,
            warned: false,
        }
    }

    /// Tells the first clients: a tenth, or with no window all of them.
    pub fn begin(&mut self) -> std::io::Result<()> {
        match self.window.is_zero() {
            true => self.tell_all(),
            false => self.raise_next(),
        }
    }

    /// For the phase's message.
    pub fn announcement(&self) -> String {
        match self.window.is_zero() {
            true => "keep-alive clients are told to close".into(),
            false => format!(
                "keep-alive clients are told to close: a tenth of the connections now, all in {}",
                fmt(self.window)
            ),
        }
    }

    /// Runs `work` (the hooks and the propagation delay) with the spread's timers beside it.
    pub async fn alongside<T>(&mut self, work: impl Future<Output = T>, skip: &Notify) -> T {
        tokio::pin!(work);
        tokio::select! {
            done = &mut work => done,
            () = self.run(skip) => work.await,
        }
    }

    /// Raises each slot flag at its time until every client is told. A cut-short (a second
    /// interrupt) tells the rest at once, and is passed on to the delay it was meant for.
    async fn run(&mut self, skip: &Notify) {
        while self.all_at.is_none() {
            tokio::select! {
                () = sleep_until(self.started + due(self.raised, self.window)) => {
                    if let Err(err) = self.raise_next() {
                        self.warn(&err);
                    }
                }
                () = skip.notified() => {
                    self.cut_short();
                    skip.notify_one();
                }
            }
        }
    }

    /// The delay is over: whoever is not told yet (it was cut short) is told now.
    pub fn finish(mut self) -> Told {
        if self.all_at.is_none() {
            self.cut_short();
        }
        let all_at = self.all_at.unwrap_or_else(Instant::now);
        Told {
            spread: self.window,
            all_after: all_at.saturating_duration_since(self.started),
            cut_short: self.cut_short,
        }
    }

    fn cut_short(&mut self) {
        self.cut_short = true;
        tracing::info!(
            slots_raised = self.raised,
            "the close spread is cut short: every keep-alive client is told to close now"
        );
        if let Err(err) = self.tell_all() {
            self.warn(&err);
        }
    }

    /// The next slot flag; for the last, all of them and `draining`.
    fn raise_next(&mut self) -> std::io::Result<()> {
        let slot = self.raised;
        if slot + 1 == SLOTS {
            return self.tell_all();
        }
        self.raised += 1;
        let raised = self.flag.raise_slot(slot, self.master);
        tracing::debug!(slot, ok = raised.is_ok(), "close spread: slot flag raised");
        raised
    }

    /// Every slot flag and `draining`: every client, whichever snippet tests which.
    fn tell_all(&mut self) -> std::io::Result<()> {
        let first = std::mem::replace(&mut self.raised, SLOTS);
        self.all_at = Some(Instant::now());
        self.flag.raise_from(first, self.master)?;
        if !self.window.is_zero() {
            tracing::info!("every keep-alive client is told to close");
        }
        Ok(())
    }

    /// Once: a runtime directory that refuses one flag refuses the rest too.
    fn warn(&mut self, err: &std::io::Error) {
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!(flag = %self.flag.path().display(), %err, "cannot raise a drain flag: some keep-alive clients are told to close later, or not at all");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn told_now(flag: &DrainFlag) -> usize {
        flag.tenths_told()
    }

    fn flag_in(name: &str) -> (std::path::PathBuf, DrainFlag) {
        let dir = std::env::temp_dir().join(format!("ng-spread-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let flag = DrainFlag::in_dir(&dir);
        (dir, flag)
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenth_more_is_told_at_each_slot_time_and_all_at_the_window_end() {
        let (dir, flag) = flag_in("timeline");
        let me = std::process::id() as i32;
        let started = Instant::now();
        let mut spread = CloseSpread::new(&flag, me, started, Duration::from_millis(900));
        spread.begin().unwrap();
        assert_eq!(told_now(&flag), 1, "a tenth at once");
        assert!(!flag.path().exists());
        let skip = Notify::new();
        // The delay: 1.5 s, with looks at the flags every 50 ms (paused time: no real wait).
        let seen = std::cell::RefCell::new(Vec::new());
        let delay = async {
            for step in 1..=30 {
                sleep_until(started + Duration::from_millis(step * 50)).await;
                seen.borrow_mut().push((step * 50, told_now(&flag)));
            }
        };
        spread.alongside(delay, &skip).await;
        let told = spread.finish();
        let seen = seen.into_inner();
        let at = |ms: u64| seen.iter().find(|(t, _)| *t == ms).unwrap().1;
        assert_eq!((at(50), at(150), at(450), at(850)), (1, 2, 5, 9), "{seen:?}");
        assert_eq!(at(950), SLOTS, "{seen:?}");
        assert!(flag.path().exists(), "draining at the window's end");
        assert_eq!(
            told,
            Told {
                spread: Duration::from_millis(900),
                all_after: Duration::from_millis(900),
                cut_short: false
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_short_tells_everyone_at_once_and_reaches_the_delay() {
        let (dir, flag) = flag_in("cut");
        let started = Instant::now();
        let mut spread = CloseSpread::new(&flag, std::process::id() as i32, started, Duration::from_secs(2));
        spread.begin().unwrap();
        let skip = Notify::new();
        // During the hooks, 300 ms in: the delay after them still hears of it.
        let hooks_then_delay = async {
            sleep_until(started + Duration::from_millis(300)).await;
            skip.notify_one();
            sleep_until(started + Duration::from_millis(400)).await;
            let told = told_now(&flag);
            tokio::select! {
                () = skip.notified() => {}
                () = sleep_until(started + Duration::from_secs(10)) => panic!("the delay missed the cut"),
            }
            told
        };
        let told_during_hooks = spread.alongside(hooks_then_delay, &skip).await;
        assert_eq!(told_during_hooks, SLOTS);
        let told = spread.finish();
        assert!(
            told.cut_short && told.all_after == Duration::from_millis(300),
            "{told:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn no_window_raises_every_flag_at_once() {
        let (dir, flag) = flag_in("zero");
        let mut spread = CloseSpread::new(&flag, std::process::id() as i32, Instant::now(), Duration::ZERO);
        spread.begin().unwrap();
        assert!(flag.path().exists());
        assert_eq!(told_now(&flag), SLOTS, "every slot flag at once");
        let told = spread.finish();
        assert!(!told.cut_short && told.all_after.is_zero(), "{told:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
