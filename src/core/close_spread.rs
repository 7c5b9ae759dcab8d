//! The close spread: when each share of the keep-alive clients is told to close, and how a
//! drain reports it. Pure: times are offsets from the drain's start.
//!
//! nginx cannot count connections from a file test, but it knows each connection's serial
//! number (`$connection`): the snippet tells a connection to close once the flag of its last
//! digit is up. Raising the ten flags one after another over the window tells a tenth of the
//! clients more each time, so they reconnect elsewhere over the window, not all at once.

use std::time::Duration;

use serde_json::{Value, json};

use crate::duration::fmt;

/// The shares told in turn: one per last digit of nginx's `$connection`.
pub const SLOTS: usize = 10;

/// When slot `slot` is raised: the first at the drain's start (a tenth told at once), the last
/// at the window's end, evenly between.
pub fn due(slot: usize, window: Duration) -> Duration {
    window * slot.min(SLOTS - 1) as u32 / (SLOTS - 1) as u32
}

/// How a drain told its keep-alive clients to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Told {
    /// The window planned (`--close-spread`); zero: all at once.
    pub spread: Duration,
    /// When every client had been told, from the drain's start.
    pub all_after: Duration,
    /// The propagation delay was cut short before the window's end: the rest were told then.
    pub cut_short: bool,
}

impl Told {
    pub fn to_json(&self) -> Value {
        json!({
            "spread_ms": self.spread.as_millis() as u64,
            "all_told_ms": self.all_after.as_millis() as u64,
            "cut_short": self.cut_short,
        })
    }

    pub fn from_json(value: &Value) -> Option<Self> {
        let ms = |field: &str| value[field].as_u64().map(Duration::from_millis);
        Some(Self {
            spread: ms("spread_ms")?,
            all_after: ms("all_told_ms")?,
            cut_short: value["cut_short"].as_bool().unwrap_or(false),
        })
    }

    /// For the summary line.
    pub fn words(&self) -> String {
        match (self.spread.is_zero(), self.cut_short) {
            (true, _) => "keep-alive clients told to close at once".into(),
            (false, false) => format!("keep-alive clients told to close over {}", fmt(self.spread)),
            (false, true) => format!(
                "keep-alive clients told to close over {} (the {} spread cut short)",
                fmt(self.all_after),
                fmt(self.spread)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slots_spread_evenly_from_the_start_to_the_window_end() {
        let window = Duration::from_millis(900);
        let dues: Vec<u64> = (0..SLOTS)
            .map(|slot| due(slot, window).as_millis() as u64)
            .collect();
        assert_eq!(dues, [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]);
        assert_eq!(due(SLOTS + 3, window), window, "never past the window");
        assert!((0..SLOTS).all(|slot| due(slot, Duration::ZERO).is_zero()));
    }

    #[test]
    fn what_was_told_reads_back_and_in_words() {
        let ms = Duration::from_millis;
        let table = [
            (
                Told {
                    spread: ms(0),
                    all_after: ms(0),
                    cut_short: false,
                },
                "keep-alive clients told to close at once",
            ),
            (
                Told {
                    spread: ms(1000),
                    all_after: ms(1001),
                    cut_short: false,
                },
                "keep-alive clients told to close over 1s",
            ),
            (
                Told {
                    spread: ms(2000),
                    all_after: ms(700),
                    cut_short: true,
                },
                "keep-alive clients told to close over 700ms (the 2s spread cut short)",
            ),
        ];
        for (told, words) in table {
            assert_eq!(Told::from_json(&told.to_json()), Some(told));
            assert_eq!(told.words(), words);
        }
        assert_eq!(Told::from_json(&Value::Null), None);
    }
}
