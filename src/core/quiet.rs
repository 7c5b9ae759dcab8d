//! When the propagation delay may end: once new connections have stopped arriving for long
//! enough, given how often they arrived before. Pure: the times are offsets from one origin,
//! the clock is the caller's.
//!
//! "Long enough" is [`QUIET_PER_GAP`] times the longest gap between arrivals seen in the last
//! [`WINDOW`], and never less than [`QUIET_AT_LEAST`]: a service that gets a connection every
//! 2 s is not quiet after 1 s, one that gets 200 a second is after 300 ms. Until
//! [`GAPS_NEEDED`] gaps have been seen, the rate is unknown (rare traffic looks the same as
//! none), and the delay runs to its ceiling.
//!
//! The socket table shows connections epoll did not report, but not when they came: only that
//! they came since the last look. So the delay looks again [`LOOK_AFTER`] after each arrival
//! ([`next_look`]), and an arrival found by a look long after the one before extends the delay
//! but measures no gap ([`Unseen::Undated`]): dated at the look, it would make a gap of the time
//! between the looks, and a quiet time three times that.

use std::collections::VecDeque;
use std::time::Duration;

use crate::duration::fmt;

/// How far back arrivals count.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Gaps between arrivals needed before the quiet time can be known.
pub const GAPS_NEEDED: usize = 4;
/// Quiet time, as a multiple of the longest gap seen.
pub const QUIET_PER_GAP: u32 = 3;
/// The shortest quiet time, however busy the service.
pub const QUIET_AT_LEAST: Duration = Duration::from_millis(300);
/// How soon after an arrival the socket table is read again: the arrival watch rests this
/// long after each wake (`nginx::arrivals::REST`), and the connections of that rest are only
/// in the table.
pub const LOOK_AFTER: Duration = Duration::from_millis(50);
/// A look finds arrivals since the one before; within this, their time is known as well as
/// that of the watch's own wakes, which come up to a rest late.
pub const DATED_WITHIN: Duration = Duration::from_millis(100);

/// Arrivals of new connections, as offsets from the watch's origin, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Arrivals {
    /// Each arrival, and whether the watch was interrupted just before it (then the time
    /// since the one before is no gap: arrivals in between were not seen).
    times: VecDeque<(Duration, bool)>,
    /// Every arrival recorded, including those that left the window.
    total: u64,
    interrupted: bool,
}

impl Arrivals {
    /// An arrival at `at`; times must not go backwards.
    pub fn record(&mut self, at: Duration) {
        self.total += 1;
        self.times.push_back((at, std::mem::take(&mut self.interrupted)));
        while self
            .times
            .front()
            .is_some_and(|(first, _)| at.saturating_sub(*first) > WINDOW)
        {
            self.times.pop_front();
        }
    }

    /// The watch stopped for a while (a reload): the next arrival starts afresh.
    pub fn interrupted(&mut self) {
        self.interrupted = true;
    }

    /// An arrival known only to have come by `at`: the delay counts from `at`, but neither the
    /// time since the arrival before it nor the time to the next one is a gap.
    pub fn record_undated(&mut self, at: Duration) {
        self.interrupted = true;
        self.record(at);
        self.interrupted = true;
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn last(&self) -> Option<Duration> {
        self.times.back().map(|(at, _)| *at)
    }

    /// Arrivals since `since`.
    pub fn since(&self, since: Duration) -> usize {
        self.times.iter().rev().take_while(|(at, _)| *at >= since).count()
    }

    /// How long without an arrival means the traffic has stopped; `None` while too few
    /// arrivals have been seen to tell.
    pub fn quiet_needed(&self) -> Option<Duration> {
        let gaps: Vec<Duration> = self
            .times
            .iter()
            .zip(self.times.iter().skip(1))
            .filter(|(_, (_, after_interruption))| !after_interruption)
            .map(|((a, _), (b, _))| b.saturating_sub(*a))
            .collect();
        if gaps.len() < GAPS_NEEDED {
            return None;
        }
        let longest = gaps.into_iter().max().unwrap_or_default();
        Some((longest * QUIET_PER_GAP).max(QUIET_AT_LEAST))
    }
}

/// The bounds of an adaptive delay, as offsets from the same origin as the arrivals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The delay lasts at least until here.
    pub floor: Duration,
    /// And ends here at the latest.
    pub ceiling: Duration,
}

/// What the delay does at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Look again at this time (sooner if something else happens).
    WaitUntil(Duration),
    /// No arrival for the quiet time, and past the floor: the removal has propagated.
    Quiet { quiet_needed: Duration },
    /// The ceiling is reached.
    Ceiling,
}

/// An arrival the socket table shows and epoll did not, by how well its time is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unseen {
    /// The last look was at most [`DATED_WITHIN`] before: an arrival like the watch's own.
    Dated,
    /// The last look was longer before: see [`Arrivals::record_undated`].
    Undated,
}

/// Whether the look at `now` shows an arrival that epoll did not: a connection the last look,
/// at `looked`, did not have (`new_peers`). Within [`DATED_WITHIN`] of that look it is an
/// arrival of its own even after one epoll saw (it may have come during the watch's rest);
/// after longer, only if epoll saw none since that look (else it may be the one epoll saw).
pub fn unseen_arrival(
    new_peers: bool,
    last_seen: Option<Duration>,
    looked: Duration,
    now: Duration,
) -> Option<Unseen> {
    if !new_peers {
        return None;
    }
    if now.saturating_sub(looked) <= DATED_WITHIN {
        return Some(Unseen::Dated);
    }
    match last_seen.is_some_and(|last| last >= looked) {
        true => None,
        false => Some(Unseen::Undated),
    }
}

/// When the socket table must be read next, apart from the verdict's own time: [`LOOK_AFTER`]
/// the last arrival, unless a look since then already covers the watch's rest after it.
pub fn next_look(last_arrival: Option<Duration>, looked: Duration) -> Option<Duration> {
    let due = last_arrival? + LOOK_AFTER;
    (looked < due).then_some(due)
}

/// Whether the delay ends at `now`.
pub fn verdict(arrivals: &Arrivals, bounds: Bounds, now: Duration) -> Verdict {
    if now >= bounds.ceiling {
        return Verdict::Ceiling;
    }
    let Some(quiet_needed) = arrivals.quiet_needed() else {
        return Verdict::WaitUntil(bounds.ceiling);
    };
    // quiet_needed() is Some only once arrivals exist.
    let last = arrivals.last().unwrap_or_default();
    let quiet_at = (last + quiet_needed).max(bounds.floor);
    if now >= quiet_at {
        Verdict::Quiet { quiet_needed }
    } else {
        Verdict::WaitUntil(quiet_at.min(bounds.ceiling))
    }
}

/// How a drain's propagation delay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelayEnded {
    /// `--propagation-delay DURATION`: it ran its fixed time.
    Fixed,
    /// New connections had stopped arriving.
    Quiet,
    /// The ceiling came first.
    Ceiling,
    /// A second SIGINT or a SIGQUIT skipped the rest.
    CutShort,
    /// Arrivals could not be watched: the delay ran to its ceiling, as a fixed one.
    Unwatched,
}

impl DelayEnded {
    pub const ALL: [DelayEnded; 5] = [
        DelayEnded::Fixed,
        DelayEnded::Quiet,
        DelayEnded::Ceiling,
        DelayEnded::CutShort,
        DelayEnded::Unwatched,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DelayEnded::Fixed => "fixed",
            DelayEnded::Quiet => "quiet",
            DelayEnded::Ceiling => "ceiling",
            DelayEnded::CutShort => "cut_short",
            DelayEnded::Unwatched => "unwatched",
        }
    }
}

/// What a drain's propagation delay did, for the outcome, `/metrics` and the summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayEnd {
    pub how: DelayEnded,
    pub lasted: Duration,
    /// New connections that arrived during the delay; `None` when not watched.
    pub arrivals: Option<u64>,
    /// From the last arrival seen (in the last minute) to the end of the delay.
    pub quiet_for: Option<Duration>,
    /// The quiet time the traffic called for, once known.
    pub quiet_needed: Option<Duration>,
}

impl DelayEnd {
    /// The ceiling came while the traffic had not stopped: the endpoint removal had not
    /// reached every client yet, and connections after the quit were refused.
    pub fn still_arriving(&self) -> bool {
        self.how == DelayEnded::Ceiling
            && match (self.quiet_for, self.quiet_needed) {
                (Some(quiet), Some(needed)) => quiet < needed,
                (Some(quiet), None) => quiet < Duration::from_secs(1),
                (None, _) => false,
            }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        serde_json::json!({
            "state": "ended",
            "ended": self.how.name(),
            "lasted_ms": self.lasted.as_millis() as u64,
            "arrivals": self.arrivals,
            "quiet_for_ms": ms(self.quiet_for),
            "quiet_needed_ms": ms(self.quiet_needed),
        })
    }

    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        let ms = |field: &str| value[field].as_u64().map(Duration::from_millis);
        let name = value["ended"].as_str()?;
        Some(Self {
            how: DelayEnded::ALL.into_iter().find(|h| h.name() == name)?,
            lasted: ms("lasted_ms")?,
            arrivals: value["arrivals"].as_u64(),
            quiet_for: ms("quiet_for_ms"),
            quiet_needed: ms("quiet_needed_ms"),
        })
    }

    /// For the summary line.
    pub fn words(&self) -> String {
        let lasted = fmt(self.lasted);
        let arrivals = self.arrivals.unwrap_or(0);
        let last = self
            .quiet_for
            .map_or(String::new(), |q| format!(", the last {} before", fmt(q)));
        match self.how {
            DelayEnded::Fixed => format!("a fixed {lasted}"),
            DelayEnded::Quiet => format!("quiet after {lasted} ({arrivals} bursts of new connections{last})"),
            DelayEnded::Ceiling if self.still_arriving() => {
                format!("its ceiling, {lasted}, with connections still arriving ({arrivals}{last})")
            }
            DelayEnded::Ceiling => format!(
                "its ceiling, {lasted}: too few new connections to tell when they stopped ({arrivals})"
            ),
            DelayEnded::CutShort => format!("cut short after {lasted}"),
            DelayEnded::Unwatched => format!("its ceiling, {lasted}: new connections could not be watched"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn arrivals(every_ms: u64, count: u64) -> Arrivals {
        let mut a = Arrivals::default();
        for i in 0..count {
            a.record(ms(i * every_ms));
        }
        a
    }

    #[test]
    fn the_quiet_time_scales_with_the_longest_gap() {
        // (arrival every ms, count, quiet needed)
        let table = [
            (5, 1000, Some(ms(300))), // busy: the floor of the quiet time
            (500, 20, Some(ms(1500))),
            (2000, 10, Some(ms(6000))), // a connection every 2 s is not quiet after 1 s
            (100, 4, None),             // 3 gaps: too few to tell
            (100, 5, Some(ms(300))),
        ];
        for (every, count, quiet) in table {
            assert_eq!(
                arrivals(every, count).quiet_needed(),
                quiet,
                "every {every} ms, {count}"
            );
        }
        assert_eq!(Arrivals::default().quiet_needed(), None);
    }

    #[test]
    fn arrivals_older_than_the_window_are_forgotten() {
        let mut a = arrivals(100, 10);
        a.record(ms(10_000)); // a 9.1 s gap
        assert_eq!(a.quiet_needed(), Some(ms(27_300)));
        for i in 0..10 {
            a.record(ms(71_000 + i * 100)); // more than 60 s after the gap began
        }
        assert_eq!(a.quiet_needed(), Some(ms(300)), "{a:?}");
        assert_eq!(a.total(), 21);
        assert_eq!(a.since(ms(71_000)), 10);
    }

    #[test]
    fn a_connection_epoll_missed_counts_only_without_an_arrival_since_the_last_look() {
        use Unseen::{Dated, Undated};
        // (new peers, last arrival seen, last look, now, an unseen arrival)
        let table = [
            (false, None, 1000, 1050, None),
            (true, None, 1000, 1050, Some(Dated)),
            (true, Some(900), 1000, 1050, Some(Dated)),
            (true, Some(900), 1000, 1100, Some(Dated)),
            // Seen by epoll since the look, but it may have come during the watch's rest.
            (true, Some(1000), 1000, 1050, Some(Dated)),
            (true, Some(1020), 1000, 1070, Some(Dated)),
            (false, Some(900), 1000, 1050, None),
            // Long after the look, and epoll saw one since: it may be that one.
            (true, Some(1100), 1000, 1150, None),
            (true, Some(1000), 1000, 3900, None),
            // Found at a look long after the one before: when it came is not known.
            (true, Some(900), 1000, 1101, Some(Undated)),
            (true, Some(900), 1000, 3900, Some(Undated)),
        ];
        for (new, last, looked, now, unseen) in table {
            assert_eq!(
                unseen_arrival(new, last.map(ms), ms(looked), ms(now)),
                unseen,
                "{new} {last:?} {looked} {now}"
            );
        }
    }

    #[test]
    fn the_table_is_read_again_a_rest_after_each_arrival() {
        // (last arrival, last look, next look)
        let table = [
            (None, 1000, None),
            (Some(1000), 1000, Some(1050)),
            (Some(1000), 1020, Some(1050)), // the look came during the watch's rest
            (Some(1000), 1050, None),       // it came after: nothing new to see
            (Some(1000), 4000, None),
            (Some(900), 800, Some(950)),
        ];
        for (last, looked, next) in table {
            assert_eq!(
                next_look(last.map(ms), ms(looked)),
                next.map(ms),
                "{last:?} {looked}"
            );
        }
    }

    #[test]
    fn an_undated_arrival_extends_the_delay_but_measures_no_gap() {
        // Waves of connections a second apart: a quiet time of three seconds.
        let mut a = Arrivals::default();
        for wave in 0..3 {
            a.record(ms(wave * 1000));
            a.record(ms(wave * 1000 + 50));
        }
        assert_eq!(a.quiet_needed(), Some(ms(2850)));
        // A look at that quiet time's end finds a connection of the last wave that came while
        // the watch rested: dated at the look, it would make a gap of 2.8 s, 8.4 s of quiet.
        a.record_undated(ms(4900));
        assert_eq!(a.quiet_needed(), Some(ms(2850)), "{a:?}");
        assert_eq!(a.last(), Some(ms(4900)));
        let bounds = Bounds {
            floor: ms(1000),
            ceiling: ms(20_000),
        };
        assert_eq!(verdict(&a, bounds, ms(5000)), Verdict::WaitUntil(ms(7750)));
        // Nor is the time from it to the next arrival a gap; the one after that is.
        a.record(ms(9000));
        assert_eq!(a.quiet_needed(), Some(ms(2850)));
        a.record(ms(10_500));
        assert_eq!(a.quiet_needed(), Some(ms(4500)));
    }

    #[test]
    fn time_the_watch_was_stopped_is_no_gap() {
        let mut a = arrivals(100, 3); // two gaps
        a.interrupted();
        a.record(ms(5_000)); // 4.8 s later, but unseen in between
        assert_eq!(a.quiet_needed(), None, "two gaps only");
        a.record(ms(5_100));
        a.record(ms(5_200));
        assert_eq!(a.quiet_needed(), Some(ms(300)), "{a:?}");
    }

    #[test]
    fn the_delay_ends_when_quiet_after_the_floor_or_at_the_ceiling() {
        let bounds = Bounds {
            floor: ms(1000),
            ceiling: ms(20_000),
        };
        let busy = arrivals(10, 100); // last at 990 ms, quiet needed 300 ms
        let quiet = Verdict::Quiet {
            quiet_needed: ms(300),
        };
        let table = [
            (&busy, 500, Verdict::WaitUntil(ms(1290))),
            (&busy, 1289, Verdict::WaitUntil(ms(1290))),
            (&busy, 1290, quiet),
            (&busy, 20_000, Verdict::Ceiling),
            // Never a connection: rare traffic and none look alike, so the ceiling.
            (&Arrivals::default(), 1000, Verdict::WaitUntil(ms(20_000))),
            (&Arrivals::default(), 20_001, Verdict::Ceiling),
        ];
        for (arrivals, now, expected) in table {
            assert_eq!(verdict(arrivals, bounds, ms(now)), expected, "at {now} ms");
        }
        // Quiet early still waits for the floor.
        let early = arrivals(10, 10); // last at 90 ms
        assert_eq!(verdict(&early, bounds, ms(500)), Verdict::WaitUntil(ms(1000)));
        assert_eq!(verdict(&early, bounds, ms(1000)), quiet);
        // A quiet time past the ceiling is cut to it.
        let slow = arrivals(4000, 5); // last at 16 s, quiet needed 12 s
        assert_eq!(verdict(&slow, bounds, ms(17_000)), Verdict::WaitUntil(ms(20_000)));
    }
}
