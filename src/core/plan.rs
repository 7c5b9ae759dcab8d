//! The drain plan: options in, a validated timeline out. Pure: no clock, no I/O.

use std::time::Duration;

use crate::duration::fmt;
use crate::error::Error;

/// The least time nginx gets between SIGQUIT and the escalation deadline. Below this a drain is
/// a fast shutdown in all but name, so a plan that leaves less is refused.
pub const MIN_QUIT_WINDOW: Duration = Duration::from_secs(1);

/// What the operator asked of a drain; [`DrainPlan::new`] checks that it fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainSettings {
    pub grace_period: Duration,
    pub propagation_delay: Duration,
    pub safety_margin: Duration,
    /// Pre-drain hooks, each an argv.
    pub pre_drain_exec: Vec<Vec<String>>,
    pub pre_drain_timeout: Duration,
}

/// A timeline relative to the instant the drain starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainPlan {
    pub hooks: Vec<Vec<String>>,
    pub hook_timeout: Duration,
    pub propagation_delay: Duration,
    /// SIGTERM to the master (nginx's fast shutdown) if anything is left.
    pub fast_shutdown_at: Duration,
    /// SIGKILL to every nginx process still left.
    pub kill_at: Duration,
    pub grace_period: Duration,
}

impl DrainPlan {
    pub fn new(args: &DrainSettings) -> Result<Self, Error> {
        let hooks_budget = args.pre_drain_timeout * args.pre_drain_exec.len() as u32;
        let needed = hooks_budget + args.propagation_delay + MIN_QUIT_WINDOW + args.safety_margin;
        if needed > args.grace_period {
            // Name the largest share of the budget: that is the flag most likely set by mistake.
            let largest = [
                (args.propagation_delay, "--propagation-delay"),
                (hooks_budget, "--pre-drain-timeout"),
                (args.safety_margin, "--safety-margin"),
            ]
            .into_iter()
            .max_by_key(|(d, _)| *d)
            .map_or("--propagation-delay", |(_, flag)| flag);
            let fix = format!("lower {largest} or raise --grace-period (and terminationGracePeriodSeconds)");
            return Err(Error::PlanDoesNotFit {
                detail: format!(
                    "the drain needs {} (hooks {} + propagation delay {} + quit window {} + safety margin {}) but --grace-period is {}",
                    fmt(needed),
                    fmt(hooks_budget),
                    fmt(args.propagation_delay),
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
            propagation_delay: args.propagation_delay,
            fast_shutdown_at: args.grace_period - args.safety_margin,
            kill_at: args.grace_period - args.safety_margin / 2,
            grace_period: args.grace_period,
        })
    }

    /// How long nginx may keep connections after SIGQUIT before it closes them itself
    /// (`worker_shutdown_timeout`): the quit window, less a second for nginx to close them and
    /// exit, so long-lived connections (WebSockets, streams) end cleanly before the escalation.
    pub fn worker_shutdown_timeout(&self) -> Option<Duration> {
        let quit_at = self.hook_timeout * self.hooks.len() as u32 + self.propagation_delay;
        let window = self
            .fast_shutdown_at
            .checked_sub(quit_at)?
            .checked_sub(Duration::from_secs(1))?;
        (window >= Duration::from_secs(1)).then_some(window)
    }

    /// The same plan for SIGQUIT: straight to the quit, no propagation delay.
    pub fn without_delay(&self) -> Self {
        Self {
            propagation_delay: Duration::ZERO,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(grace: u64, delay: u64, margin: u64, hooks: usize, hook_timeout: u64) -> DrainSettings {
        DrainSettings {
            grace_period: Duration::from_secs(grace),
            propagation_delay: Duration::from_secs(delay),
            safety_margin: Duration::from_secs(margin),
            pre_drain_exec: vec![vec!["true".into()]; hooks],
            pre_drain_timeout: Duration::from_secs(hook_timeout),
        }
    }

    #[test]
    fn the_defaults_give_the_documented_timeline() {
        let plan = DrainPlan::new(&args(30, 5, 2, 0, 5)).unwrap();
        assert_eq!(plan.fast_shutdown_at, Duration::from_secs(28));
        assert_eq!(plan.kill_at, Duration::from_secs(29));
        assert_eq!(plan.propagation_delay, Duration::from_secs(5));
        assert_eq!(plan.without_delay().propagation_delay, Duration::ZERO);
        assert_eq!(plan.without_delay().kill_at, plan.kill_at);
        // 28 s to the escalation, 5 s of delay first, 1 s for nginx to close and exit.
        assert_eq!(plan.worker_shutdown_timeout(), Some(Duration::from_secs(22)));
        assert_eq!(
            DrainPlan::new(&args(8, 5, 2, 0, 5))
                .unwrap()
                .worker_shutdown_timeout(),
            None
        );
    }

    #[test]
    fn plans_that_do_not_fit_name_the_flag_to_change() {
        // (grace, delay, margin, hooks, hook timeout, fits, flag named in the fix)
        let table = [
            (30, 5, 2, 0, 5, true, ""),
            (8, 5, 2, 0, 5, true, ""), // exactly 5 + 1 + 2
            (7, 5, 2, 0, 5, false, "--propagation-delay"),
            (30, 5, 2, 5, 5, false, "--pre-drain-timeout"), // 25 + 5 + 1 + 2 = 33
            (30, 5, 2, 4, 5, true, ""),                     // 20 + 5 + 1 + 2 = 28
            (2, 0, 2, 0, 5, false, "--safety-margin"),
        ];
        for (grace, delay, margin, hooks, timeout, fits, flag) in table {
            let result = DrainPlan::new(&args(grace, delay, margin, hooks, timeout));
            assert_eq!(result.is_ok(), fits, "grace {grace} delay {delay} hooks {hooks}");
            if let Err(err) = result {
                let text = err.to_string();
                assert!(text.contains(flag), "{text}");
                assert!(text.contains("--grace-period"), "{text}");
            }
        }
    }
}
