//! The drain plan: options in, a validated timeline out. Pure: no clock, no I/O.

use std::time::Duration;

use crate::duration::fmt;
use crate::error::Error;

/// The least time nginx gets between SIGQUIT and the escalation deadline. Below this a drain is
/// a fast shutdown in all but name, so a plan that leaves less is refused.
pub const MIN_QUIT_WINDOW: Duration = Duration::from_secs(1);

/// How long keep-alive clients are told to close over, a tenth more at a time, unless
/// `--close-spread` says: so that they do not all reconnect to the other pods at one instant.
pub const DEFAULT_CLOSE_SPREAD: Duration = Duration::from_secs(2);

/// What the operator asked of a drain; [`DrainPlan::new`] checks that it fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainSettings {
    pub grace_period: Duration,
    pub propagation_delay: DelaySetting,
    /// The adaptive delay's floor.
    pub min_propagation_delay: Duration,
    /// The adaptive delay's ceiling; `None`: [`default_ceiling`].
    pub max_propagation_delay: Option<Duration>,
    pub safety_margin: Duration,
    /// Pre-drain hooks, each an argv.
    pub pre_drain_exec: Vec<Vec<String>>,
    pub pre_drain_timeout: Duration,
    /// nginx's ports that only probes connect to: no arrival there keeps the delay going.
    pub probe_ports: Vec<u16>,
    /// `--close-spread`; `None`: [`DEFAULT_CLOSE_SPREAD`], shortened to fit the delay.
    pub close_spread: Option<Duration>,
}

/// `--propagation-delay`: `auto`, or a fixed time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelaySetting {
    /// Until new connections stop arriving, between the floor and the ceiling.
    UntilQuiet,
    Fixed(Duration),
}

/// How long nginx keeps serving new connections after the drain starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropagationDelay {
    /// Exactly this long.
    Fixed(Duration),
    /// Until no new connection has arrived for a quiet time (see [`crate::core::quiet`]), at
    /// least `floor`, at most `ceiling`.
    UntilQuiet { floor: Duration, ceiling: Duration },
}

impl PropagationDelay {
    /// The longest the delay may last: what the budget must leave room for.
    pub fn longest(self) -> Duration {
        match self {
            PropagationDelay::Fixed(delay) => delay,
            PropagationDelay::UntilQuiet { ceiling, .. } => ceiling,
        }
    }

    pub fn is_zero(self) -> bool {
        self.longest().is_zero()
    }
}

impl std::fmt::Display for PropagationDelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropagationDelay::Fixed(delay) => write!(f, "{}", fmt(*delay)),
            PropagationDelay::UntilQuiet { floor, ceiling } => {
                write!(f, "until quiet, {} to {}", fmt(*floor), fmt(*ceiling))
            }
        }
    }
}

/// The ceiling when none is given: two thirds of what the grace period leaves after the hooks,
/// the margin and the shortest quit window, so that a third is left for requests in flight.
/// 18 s with the defaults: room for a load balancer that takes 15 s to deregister.
pub fn default_ceiling(grace: Duration, hooks_budget: Duration, margin: Duration) -> Duration {
    let room = grace.saturating_sub(hooks_budget + margin + MIN_QUIT_WINDOW);
    let ceiling = room * 2 / 3;
    // Whole tenths of a second read better in the log.
    Duration::from_millis(ceiling.as_millis() as u64 / 100 * 100)
}

/// A timeline relative to the instant the drain starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainPlan {
    pub hooks: Vec<Vec<String>>,
    pub hook_timeout: Duration,
    pub propagation_delay: PropagationDelay,
    /// SIGTERM to the master (nginx's fast shutdown) if anything is left.
    pub fast_shutdown_at: Duration,
    /// SIGKILL to every nginx process still left.
    pub kill_at: Duration,
    pub grace_period: Duration,
    /// nginx's ports that only probes connect to.
    pub probe_ports: Vec<u16>,
    /// Keep-alive clients are told to close over this long from the drain's start, a tenth
    /// more at a time; zero: all at once. The delay ends after it (an adaptive one at least
    /// the floor after it), so every client is told before SIGQUIT.
    pub close_spread: Duration,
}

impl DrainPlan {
    pub fn new(args: &DrainSettings) -> Result<Self, Error> {
        let hooks_budget = args.pre_drain_timeout * args.pre_drain_exec.len() as u32;
        let (delay, delay_flag) = propagation_delay(args, hooks_budget)?;
        let close_spread = close_spread(args, delay)?;
        let longest = delay.longest();
        let needed = hooks_budget + longest + MIN_QUIT_WINDOW + args.safety_margin;
        if needed > args.grace_period {
            // Name the largest share of the budget: that is the flag most likely set by mistake.
            let largest = [
                (longest, delay_flag),
                (hooks_budget, "--pre-drain-timeout"),
                (args.safety_margin, "--safety-margin"),
            ]
            .into_iter()
            .max_by_key(|(d, _)| *d)
            .map_or(delay_flag, |(_, flag)| flag);
            let fix = format!("lower {largest} or raise --grace-period (and terminationGracePeriodSeconds)");
            let what = match delay {
                PropagationDelay::Fixed(_) => "propagation delay",
                PropagationDelay::UntilQuiet { .. } => "longest propagation delay",
            };
            return Err(Error::PlanDoesNotFit {
                detail: format!(
                    "the drain needs {} (hooks {} + {what} {} + quit window {} + safety margin {}) but --grace-period is {}",
                    fmt(needed),
                    fmt(hooks_budget),
                    fmt(longest),
                    fmt(MIN_QUIT_WINDOW),
                    fmt(args.safety_margin),
                    fmt(args.grace_period)
                ),
                fix,
            });
        }
        Ok(Self {
            hooks: args.pre_drain_exec.clone(),
            hook_timeout: args.pre_drain_timeout,
            propagation_delay: delay,
            fast_shutdown_at: args.grace_period - args.safety_margin,
            kill_at: args.grace_period - args.safety_margin / 2,
            grace_period: args.grace_period,
            probe_ports: args.probe_ports.clone(),
            close_spread,
        })
    }

    /// How long nginx may keep connections after SIGQUIT before it closes them itself
    /// (`worker_shutdown_timeout`): the quit window, less a second for nginx to close them and
    /// exit, so long-lived connections (WebSockets, streams) end cleanly before the escalation.
    pub fn worker_shutdown_timeout(&self) -> Option<Duration> {
        // The latest the quit can come: an adaptive delay may run to its ceiling.
        let quit_at = self.hook_timeout * self.hooks.len() as u32 + self.propagation_delay.longest();
        let window = self
            .fast_shutdown_at
            .checked_sub(quit_at)?
            .checked_sub(Duration::from_secs(1))?;
        (window >= Duration::from_secs(1)).then_some(window)
    }

    /// The same plan for SIGQUIT: straight to the quit, no propagation delay, every keep-alive
    /// client told at once.
    pub fn without_delay(&self) -> Self {
        Self {
            propagation_delay: PropagationDelay::Fixed(Duration::ZERO),
            close_spread: Duration::ZERO,
            ..self.clone()
        }
    }
}

/// The close spread that fits `delay`. Given, it must end before a fixed delay does, and leave
/// an adaptive one its floor after it. The default never refuses a plan: it is shortened to
/// half a fixed delay (the last clients told get the other half), or to what the ceiling
/// leaves above the floor.
fn close_spread(args: &DrainSettings, delay: PropagationDelay) -> Result<Duration, Error> {
    let room = match delay {
        PropagationDelay::Fixed(delay) => delay,
        PropagationDelay::UntilQuiet { floor, ceiling } => ceiling.saturating_sub(floor),
    };
    let Some(spread) = args.close_spread else {
        let room = match delay {
            PropagationDelay::Fixed(delay) => delay / 2,
            PropagationDelay::UntilQuiet { .. } => room,
        };
        return Ok(DEFAULT_CLOSE_SPREAD.min(room));
    };
    if spread <= room {
        return Ok(spread);
    }
    let (detail, fix) = match delay {
        PropagationDelay::Fixed(delay) => (
            format!(
                "--close-spread {} is longer than --propagation-delay {}: clients would still be told to close after SIGQUIT",
                fmt(spread),
                fmt(delay)
            ),
            "lower --close-spread or raise --propagation-delay",
        ),
        PropagationDelay::UntilQuiet { floor, ceiling } => (
            format!(
                "--close-spread {} + --min-propagation-delay {} is longer than --max-propagation-delay {}",
                fmt(spread),
                fmt(floor),
                fmt(ceiling)
            ),
            "lower --close-spread or --min-propagation-delay, or raise --max-propagation-delay",
        ),
    };
    Err(Error::PlanDoesNotFit {
        detail,
        fix: fix.into(),
    })
}

/// The delay the settings ask for, and the flag that sets its longest.
fn propagation_delay(
    args: &DrainSettings,
    hooks_budget: Duration,
) -> Result<(PropagationDelay, &'static str), Error> {
    let floor = args.min_propagation_delay;
    match (args.propagation_delay, args.max_propagation_delay) {
        (DelaySetting::Fixed(delay), _) => Ok((PropagationDelay::Fixed(delay), "--propagation-delay")),
        (DelaySetting::UntilQuiet, Some(ceiling)) if floor > ceiling => Err(Error::PlanDoesNotFit {
            detail: format!(
                "--min-propagation-delay {} is longer than --max-propagation-delay {}",
                fmt(floor),
                fmt(ceiling)
            ),
            fix: "lower --min-propagation-delay or raise --max-propagation-delay".into(),
        }),
        (DelaySetting::UntilQuiet, Some(ceiling)) => Ok((
            PropagationDelay::UntilQuiet { floor, ceiling },
            "--max-propagation-delay",
        )),
        (DelaySetting::UntilQuiet, None) => {
            let ceiling = default_ceiling(args.grace_period, hooks_budget, args.safety_margin);
            // A floor above the default ceiling raises it: the plan check then says whether it fits.
            match ceiling < floor {
                true => Ok((
                    PropagationDelay::UntilQuiet {
                        floor,
                        ceiling: floor,
                    },
                    "--min-propagation-delay",
                )),
                false => Ok((
                    PropagationDelay::UntilQuiet { floor, ceiling },
                    "--max-propagation-delay",
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn args(grace: u64, delay: u64, margin: u64, hooks: usize, hook_timeout: u64) -> DrainSettings {
        DrainSettings {
            grace_period: secs(grace),
            propagation_delay: DelaySetting::Fixed(secs(delay)),
            min_propagation_delay: secs(1),
            max_propagation_delay: None,
            safety_margin: secs(margin),
            pre_drain_exec: vec![vec!["true".into()]; hooks],
            pre_drain_timeout: secs(hook_timeout),
            probe_ports: Vec::new(),
            close_spread: None,
        }
    }

    fn adaptive(grace: u64, floor: u64, ceiling: Option<u64>) -> DrainSettings {
        DrainSettings {
            propagation_delay: DelaySetting::UntilQuiet,
            min_propagation_delay: secs(floor),
            max_propagation_delay: ceiling.map(secs),
            ..args(grace, 0, 2, 0, 5)
        }
    }

    #[test]
    fn a_fixed_delay_gives_the_documented_timeline() {
        let plan = DrainPlan::new(&args(30, 5, 2, 0, 5)).unwrap();
        assert_eq!(plan.fast_shutdown_at, secs(28));
        assert_eq!(plan.kill_at, secs(29));
        assert_eq!(plan.propagation_delay, PropagationDelay::Fixed(secs(5)));
        assert!(plan.without_delay().propagation_delay.is_zero());
        assert_eq!(plan.without_delay().kill_at, plan.kill_at);
        // 28 s to the escalation, 5 s of delay first, 1 s for nginx to close and exit.
        assert_eq!(plan.worker_shutdown_timeout(), Some(secs(22)));
        assert_eq!(
            DrainPlan::new(&args(8, 5, 2, 0, 5))
                .unwrap()
                .worker_shutdown_timeout(),
            None
        );
    }

    #[test]
    fn the_adaptive_delay_leaves_a_third_to_quit() {
        let plan = DrainPlan::new(&adaptive(30, 1, None)).unwrap();
        // (30 - 2 - 1) * 2/3 = 18 s at most; nginx closes what is left 9 s after a quit then.
        assert_eq!(
            plan.propagation_delay,
            PropagationDelay::UntilQuiet {
                floor: secs(1),
                ceiling: secs(18)
            }
        );
        assert_eq!(plan.worker_shutdown_timeout(), Some(secs(9)));
        assert_eq!(
            default_ceiling(secs(10), Duration::ZERO, secs(2)),
            Duration::from_millis(4600)
        );
        assert_eq!(default_ceiling(secs(2), Duration::ZERO, secs(2)), Duration::ZERO);
    }

    #[test]
    fn the_close_spread_fits_the_delay_or_the_plan_is_refused() {
        let spread = |settings: DrainSettings, spread: Option<u64>| {
            DrainPlan::new(&DrainSettings {
                close_spread: spread.map(Duration::from_millis),
                ..settings
            })
            .map(|plan| plan.close_spread.as_millis() as u64)
            .map_err(|err| err.to_string())
        };
        // (settings, --close-spread ms, the spread planned)
        let fits = [
            (adaptive(30, 1, None), None, 2_000),
            (adaptive(30, 1, None), Some(0), 0),
            (adaptive(30, 1, None), Some(5_000), 5_000),
            (adaptive(30, 1, Some(2)), Some(1_000), 1_000),
            // The default shrinks to fit, never refuses: what the ceiling leaves above the
            // floor, half a fixed delay.
            (adaptive(30, 1, Some(1)), None, 0),
            (args(30, 5, 2, 0, 5), None, 2_000),
            (args(30, 1, 2, 0, 5), None, 500),
            (args(30, 0, 2, 0, 5), None, 0),
            (args(30, 5, 2, 0, 5), Some(5_000), 5_000),
        ];
        for (settings, given, planned) in fits {
            assert_eq!(
                spread(settings.clone(), given),
                Ok(planned),
                "{settings:?} {given:?}"
            );
        }
        let refused = [
            (
                args(30, 1, 2, 0, 5),
                1_500,
                ["--close-spread 1s 500ms", "--propagation-delay 1s"],
            ),
            (
                args(30, 0, 2, 0, 5),
                1_000,
                ["--close-spread 1s", "--propagation-delay 0s"],
            ),
            (
                adaptive(30, 1, Some(2)),
                1_500,
                ["--close-spread 1s 500ms", "--max-propagation-delay 2s"],
            ),
        ];
        for (settings, given, named) in refused {
            let err = spread(settings, Some(given)).unwrap_err();
            assert!(named.iter().all(|n| err.contains(n)), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let plan = DrainPlan::new(&adaptive(30, 1, None)).unwrap();
        assert_eq!(
            plan.without_delay().close_spread,
            Duration::ZERO,
            "SIGQUIT tells all at once"
        );
    }

    #[test]
    fn plans_that_do_not_fit_name_the_flag_to_change() {
        // (settings, fits, flag named in the fix)
        let table = [
            (args(30, 5, 2, 0, 5), true, ""),
            (args(8, 5, 2, 0, 5), true, ""), // exactly 5 + 1 + 2
            (args(7, 5, 2, 0, 5), false, "--propagation-delay"),
            (args(30, 5, 2, 5, 5), false, "--pre-drain-timeout"), // 25 + 5 + 1 + 2 = 33
            (args(30, 5, 2, 4, 5), true, ""),                     // 20 + 5 + 1 + 2 = 28
            (args(2, 0, 2, 0, 5), false, "--safety-margin"),
            (adaptive(30, 1, Some(27)), true, ""),
            (adaptive(30, 1, Some(28)), false, "--max-propagation-delay"),
            (adaptive(30, 5, Some(3)), false, "--min-propagation-delay"),
            // A floor above the default ceiling raises it, if it fits.
            (adaptive(10, 6, None), true, ""),
            (adaptive(10, 8, None), false, "--min-propagation-delay"),
        ];
        for (settings, fits, flag) in table {
            let result = DrainPlan::new(&settings);
            assert_eq!(result.is_ok(), fits, "{settings:?}");
            if let Err(err) = result {
                let text = err.to_string();
                assert!(text.contains(flag), "{text}");
            }
        }
    }
}
