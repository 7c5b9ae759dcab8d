//! A Deployment's rolling update, as its controller decides it: how many new pods may start and
//! how many old ones may be terminated, from the replica count, `maxSurge` and `maxUnavailable`.
//! Pure: the rollout ([`super::rollout`]) feeds it the pods' states and carries out its answer.
//!
//! The rules, as kube-controller-manager's deployment controller applies them:
//! - `maxSurge` as a percentage rounds up, `maxUnavailable` rounds down; both given as 0 is
//!   refused (the API server refuses it too), and when both only round to 0, one pod may be
//!   unavailable (the controller's fencepost rule).
//! - New pods start while old and new pods together (terminating ones not counted) are fewer
//!   than replicas + maxSurge, until there are `replicas` new pods.
//! - Old pods are terminated while the ready pods (old not terminating, new ready) stay at
//!   replicas - maxUnavailable or more.

use std::fmt;
use std::str::FromStr;

/// `maxSurge` or `maxUnavailable`: a count of pods, or a percentage of the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntOrPercent {
    Int(usize),
    Percent(u32),
}

impl FromStr for IntOrPercent {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is neither a number of pods nor a percentage: give 1 or 25%");
        match s.trim().strip_suffix('%') {
            Some(percent) => percent.parse().map(IntOrPercent::Percent).map_err(|_| bad()),
            None => s.trim().parse().map(IntOrPercent::Int).map_err(|_| bad()),
        }
    }
}

impl fmt::Display for IntOrPercent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrPercent::Int(n) => write!(f, "{n}"),
            IntOrPercent::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl IntOrPercent {
    fn is_zero(self) -> bool {
        matches!(self, IntOrPercent::Int(0) | IntOrPercent::Percent(0))
    }

    fn resolve(self, replicas: usize, round_up: bool) -> usize {
        match self {
            IntOrPercent::Int(n) => n,
            IntOrPercent::Percent(p) => {
                let scaled = replicas * p as usize;
                if round_up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                }
            }
        }
    }
}

/// A rolling update's limits, resolved against the replica count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub replicas: usize,
    pub surge: usize,
    pub unavailable: usize,
}

impl Limits {
    pub fn resolve(
        replicas: usize,
        max_surge: IntOrPercent,
        max_unavailable: IntOrPercent,
    ) -> Result<Self, String> {
        if replicas == 0 {
            return Err("--replicas 0 has nothing to roll: give 1 or more".into());
        }
        if max_surge.is_zero() && max_unavailable.is_zero() {
            return Err(format!(
                "--max-surge {max_surge} and --max-unavailable {max_unavailable} are both 0: \
                 the rollout could neither start a pod nor stop one; make one of them 1 or more"
            ));
        }
        if let IntOrPercent::Percent(p) = max_unavailable
            && p > 100
        {
            return Err(format!(
                "--max-unavailable {max_unavailable} is more than every pod: give 100% or less"
            ));
        }
        let surge = max_surge.resolve(replicas, true);
        let mut unavailable = max_unavailable.resolve(replicas, false).min(replicas);
        // Both rounded to 0: one pod may go, as the controller decides (surge might be
        // impossible under a quota).
        if surge == 0 && unavailable == 0 {
            unavailable = 1;
        }
        Ok(Self {
            replicas,
            surge,
            unavailable,
        })
    }
}

/// The pods as the controller counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Old pods not yet terminating (all of them ready: the rollout starts from a ready state).
    pub old: usize,
    /// New pods started, ready or not.
    pub new: usize,
    pub new_ready: usize,
}

/// What the controller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Step {
    pub start_new: usize,
    pub terminate_old: usize,
}

impl Limits {
    pub fn step(&self, counts: Counts) -> Step {
        let most = self.replicas + self.surge;
        let start_new =
            (self.replicas.saturating_sub(counts.new)).min(most.saturating_sub(counts.old + counts.new));
        let least_ready = self.replicas - self.unavailable;
        let ready = counts.old + counts.new_ready;
        let terminate_old = counts.old.min(ready.saturating_sub(least_ready));
        Step {
            start_new,
            terminate_old,
        }
    }

    /// Every old pod is terminating and every new pod is ready.
    pub fn done(&self, counts: Counts) -> bool {
        counts.old == 0 && counts.new_ready == self.replicas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(replicas: usize, surge: &str, unavailable: &str) -> Result<Limits, String> {
        Limits::resolve(replicas, surge.parse()?, unavailable.parse()?)
    }

    #[test]
    fn percentages_round_as_the_controller_rounds_them() {
        // (replicas, maxSurge, maxUnavailable) -> (surge, unavailable)
        let cases = [
            (4, "25%", "25%", (1, 1)),
            (1, "25%", "25%", (1, 0)),
            (10, "25%", "25%", (3, 2)),
            (3, "0", "1", (0, 1)),
            (5, "100%", "0%", (5, 0)),
            (2, "1", "5", (1, 2)),
            // Both round to 0: one pod may be unavailable.
            (3, "0", "25%", (0, 1)),
        ];
        for (replicas, surge, unavailable, expected) in cases {
            let l = limits(replicas, surge, unavailable).unwrap();
            assert_eq!(
                (l.surge, l.unavailable),
                expected,
                "{replicas} {surge} {unavailable}"
            );
        }
    }

    #[test]
    fn a_rollout_that_cannot_move_is_refused_naming_the_flags() {
        let both_zero = limits(4, "0", "0%").unwrap_err();
        assert!(
            both_zero.contains("--max-surge 0") && both_zero.contains("--max-unavailable 0%"),
            "{both_zero}"
        );
        assert!(limits(0, "1", "1").unwrap_err().contains("--replicas 0"));
        assert!(limits(4, "1", "101%").unwrap_err().contains("100% or less"));
        assert!("x%".parse::<IntOrPercent>().unwrap_err().contains("25%"));
        assert!("-1".parse::<IntOrPercent>().is_err());
    }

    /// Plays a rollout where every started pod is ready before the next step: the sequence of
    /// steps the controller takes.
    fn play(l: Limits) -> Vec<Step> {
        let mut counts = Counts {
            old: l.replicas,
            ..Counts::default()
        };
        let mut steps = Vec::new();
        for _ in 0..100 {
            if l.done(counts) {
                return steps;
            }
            let step = l.step(counts);
            steps.push(step);
            counts.new += step.start_new;
            counts.old -= step.terminate_old;
            counts.new_ready = counts.new;
        }
        panic!("the rollout never finished: {steps:?}");
    }

    #[test]
    fn default_limits_replace_four_pods_one_up_one_down() {
        let steps = play(limits(4, "25%", "25%").unwrap());
        let s = |start_new, terminate_old| Step {
            start_new,
            terminate_old,
        };
        // One surges and one goes at once; each new pod that is ready lets one more of each go.
        assert_eq!(steps, [s(1, 1); 4]);
    }

    #[test]
    fn no_unavailability_waits_for_each_new_pod_before_an_old_one_goes() {
        let steps = play(limits(1, "1", "0").unwrap());
        let s = |start_new, terminate_old| Step {
            start_new,
            terminate_old,
        };
        assert_eq!(steps, [s(1, 0), s(0, 1)]);
    }

    #[test]
    fn never_fewer_ready_than_allowed_nor_more_pods_than_the_surge() {
        for replicas in 1..=6 {
            for surge in 0..=3 {
                for unavailable in 0..=3 {
                    let Ok(l) =
                        Limits::resolve(replicas, IntOrPercent::Int(surge), IntOrPercent::Int(unavailable))
                    else {
                        continue;
                    };
                    let mut counts = Counts {
                        old: replicas,
                        ..Counts::default()
                    };
                    for _ in 0..100 {
                        if l.done(counts) {
                            break;
                        }
                        let step = l.step(counts);
                        counts.new += step.start_new;
                        counts.old -= step.terminate_old;
                        assert!(counts.old + counts.new <= replicas + l.surge, "{l:?} {counts:?}");
                        assert!(
                            counts.old + counts.new_ready >= replicas - l.unavailable,
                            "{l:?} {counts:?}"
                        );
                        counts.new_ready = counts.new;
                    }
                    assert!(l.done(counts), "{l:?} stuck at {counts:?}");
                }
            }
        }
    }
}
