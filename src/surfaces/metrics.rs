//! `GET /metrics` on the health listener: what the supervisor did (drains, reloads, escalations)
//! and what nginx is doing now (phase, worker generations), in the Prometheus text format.
//!
//! Counters and histograms are updated where things happen; the gauges that describe the
//! present (phase, generations) are set from the live state at each scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::core::phase::Phase;

/// Seconds since the epoch, as Prometheus timestamps are.
fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What Prometheus negotiates for this format (OpenMetrics text, read by Prometheus 2 and 3).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DelayEndLabel {
    ended: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GenerationState {
    state: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    drains: Family<Outcome, Counter>,
    drain_seconds: Histogram,
    connections_at_quit: Gauge,
    killed: Counter,
    delays: Family<DelayEndLabel, Counter>,
    delay_seconds: Gauge<f64, AtomicU64>,
    delay_arrivals: Gauge,
    reloads: Family<Outcome, Counter>,
    reload_seconds: Histogram,
    generations: Family<GenerationState, Gauge>,
    master_exits: Counter,
    log_lines_dropped: Counter,
    phase: Family<PhaseLabel, Gauge>,
    last_drain_at: Gauge<f64, AtomicU64>,
    last_reload_at: Gauge<f64, AtomicU64>,
    last_reload_ok: Gauge,
    last_reload_ok_at: Gauge<f64, AtomicU64>,
}

impl Metrics {
    /// `worker_crashes` is counted where nginx's log is read.
    pub fn new(worker_crashes: Counter) -> Self {
        let mut registry = Registry::with_prefix("nginx_graceful");
        let build = Family::<Build, Gauge>::default();
        build
            .get_or_create(&Build {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register(
            "build_info",
            "The supervisor's version, as a label; always 1",
            build,
        );
        let drains = Family::<Outcome, Counter>::default();
        registry.register(
            "drains",
            "Drains by outcome: clean, escalated (SIGTERM/SIGKILL at the end of the budget), nginx_failed, nginx_exited, unobserved (the end of nginx's processes not seen)",
            drains.clone(),
        );
        let drain_seconds = Histogram::new([0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]);
        registry.register(
            "drain_duration_seconds",
            "From the drain's trigger to the exit of the last nginx process",
            drain_seconds.clone(),
        );
        let connections_at_quit = Gauge::default();
        registry.register(
            "connections_at_quit",
            "Established connections to nginx when the last drain sent SIGQUIT",
            connections_at_quit.clone(),
        );
        let killed = Counter::default();
        registry.register(
            "escalation_killed_processes",
            "nginx processes killed with SIGKILL when a drain's budget ran out",
            killed.clone(),
        );
        let delays = Family::<DelayEndLabel, Counter>::default();
        registry.register(
            "propagation_delays",
            "Propagation delays by how they ended: quiet (new connections had stopped), ceiling (--max-propagation-delay reached), fixed, cut_short, unwatched (arrivals could not be watched: ran to the ceiling)",
            delays.clone(),
        );
        let delay_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "propagation_delay_seconds",
            "How long the last drain's propagation delay lasted",
            delay_seconds.clone(),
        );
        let delay_arrivals = Gauge::default();
        registry.register(
            "propagation_delay_arrivals",
            "New connections to nginx during the last drain's propagation delay",
            delay_arrivals.clone(),
        );
        let reloads = Family::<Outcome, Counter>::default();
        registry.register(
            "reloads",
            "Reloads by outcome: reloaded, invalid (refused by nginx -t), rolled_back (the master kept the old config), unconfirmed",
            reloads.clone(),
        );
        let reload_seconds = Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        registry.register(
            "reload_duration_seconds",
            "From the reload request to its outcome (config test, SIGHUP, new workers serving)",
            reload_seconds.clone(),
        );
        let generations = Family::<GenerationState, Gauge>::default();
        registry.register(
            "worker_generations",
            "Generations of nginx workers alive: serving, or shutting_down (retired by a reload and still finishing connections)",
            generations.clone(),
        );
        let master_exits = Counter::default();
        registry.register(
            "master_unexpected_exits",
            "Times the nginx master exited without being asked to (crash, OOM kill, nginx -s stop)",
            master_exits.clone(),
        );
        registry.register(
            "worker_crashes",
            "nginx workers that exited on a signal or with an error; the master starts a new one",
            worker_crashes.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines (the supervisor's and nginx's) dropped because stderr was full, closed or failing",
            log_lines_dropped.clone(),
        );
        // Named as ingress-nginx names them, so that its reload alerts and dashboards carry over.
        let last_reload_ok = Gauge::default();
        last_reload_ok.set(1);
        registry.register(
            "config_last_reload_successful",
            "Whether the last reload succeeded (1) or not (0); 1 before any reload",
            last_reload_ok.clone(),
        );
        let last_reload_ok_at = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "config_last_reload_successful_timestamp_seconds",
            "When the last successful reload ended, in seconds since the epoch",
            last_reload_ok_at.clone(),
        );
        let last_reload_at = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_reload_timestamp_seconds",
            "When the last reload ended, whatever its outcome, in seconds since the epoch",
            last_reload_at.clone(),
        );
        let last_drain_at = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_drain_timestamp_seconds",
            "When the last drain ended, in seconds since the epoch",
            last_drain_at.clone(),
        );
        let phase = Family::<PhaseLabel, Gauge>::default();
        registry.register(
            "phase",
            "The supervisor's phase: 1 for the current one",
            phase.clone(),
        );
        Self {
            registry,
            drains,
            drain_seconds,
            connections_at_quit,
            killed,
            delays,
            delay_seconds,
            delay_arrivals,
            reloads,
            reload_seconds,
            generations,
            master_exits,
            log_lines_dropped,
            phase,
            last_drain_at,
            last_reload_at,
            last_reload_ok,
            last_reload_ok_at,
        }
    }

    pub fn drain_finished(&self, outcome: &crate::core::outcome::Outcome) {
        let label = outcome.verdict.name().to_owned();
        self.drains.get_or_create(&Outcome { outcome: label }).inc();
        self.drain_seconds
            .observe(outcome.drain.elapsed.as_millis() as f64 / 1000.0);
        if let Some(n) = outcome.drain.connections_at_quit {
            self.connections_at_quit.set(n as i64);
        }
        self.killed.inc_by(outcome.drain.killed as u64);
        self.last_drain_at.set(now_seconds());
        if let Some(delay) = outcome.drain.delay {
            let ended = delay.how.name().to_owned();
            self.delays.get_or_create(&DelayEndLabel { ended }).inc();
            self.delay_seconds.set(delay.lasted.as_secs_f64());
            if let Some(arrivals) = delay.arrivals {
                self.delay_arrivals.set(arrivals as i64);
            }
        }
    }

    /// How a reload ended, and how long it took.
    pub fn reload_finished(&self, outcome: &crate::reload::ReloadOutcome, took: std::time::Duration) {
        let label = outcome.name().to_owned();
        self.reloads.get_or_create(&Outcome { outcome: label }).inc();
        self.reload_seconds.observe(took.as_secs_f64());
        let now = now_seconds();
        self.last_reload_at.set(now);
        let ok = matches!(outcome, crate::reload::ReloadOutcome::Reloaded { .. });
        self.last_reload_ok.set(i64::from(ok));
        if ok {
            self.last_reload_ok_at.set(now);
        }
    }

    pub fn master_exited_unexpectedly(&self) {
        self.master_exits.inc();
    }

    /// Brings the counter up to the logger's own count. A maximum, not an increment: two
    /// scrapes at once must not add the same lines twice.
    fn note_log_lines_dropped(&self, dropped: u64) {
        self.log_lines_dropped
            .inner()
            .fetch_max(dropped, std::sync::atomic::Ordering::Relaxed);
    }

    /// The text a scrape gets, with the present state filled in first.
    pub fn render(&self, phase: Phase, serving_generations: usize, shutting_down: usize) -> String {
        self.note_log_lines_dropped(crate::logging::dropped_lines());
        for candidate in Phase::ALL {
            let value = i64::from(candidate == phase);
            self.phase
                .get_or_create(&PhaseLabel {
                    phase: candidate.name().to_owned(),
                })
                .set(value);
        }
        for (state, n) in [("serving", serving_generations), ("shutting_down", shutting_down)] {
            self.generations
                .get_or_create(&GenerationState {
                    state: state.to_owned(),
                })
                .set(n as i64);
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::outcome::{DrainOutcome, Outcome};
    use crate::core::quiet::{DelayEnd, DelayEnded};
    use crate::reload::ReloadOutcome;
    use std::time::Duration;

    /// The value of the sample whose line starts with `series`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_scrape_shows_what_happened_and_what_is() {
        let metrics = Metrics::new(Counter::default());
        let reloaded = ReloadOutcome::Reloaded {
            workers: vec![10, 11],
            elapsed: Duration::from_millis(80),
        };
        metrics.reload_finished(&reloaded, Duration::from_millis(120));
        let invalid = ReloadOutcome::Invalid("unknown directive".into());
        metrics.reload_finished(&invalid, Duration::from_millis(30));
        metrics.reload_finished(&reloaded, Duration::from_millis(90));
        metrics.drain_finished(&Outcome::of_drain(DrainOutcome {
            escalated: true,
            connections_at_quit: Some(42),
            closed_by_shutdown_timeout: None,
            killed: 3,
            elapsed: Duration::from_secs(28),
            delay: Some(DelayEnd {
                how: DelayEnded::Ceiling,
                lasted: Duration::from_millis(18_000),
                arrivals: Some(917),
                quiet_for: Some(Duration::from_millis(12)),
                quiet_needed: Some(Duration::from_millis(300)),
            }),
            ..Default::default()
        }));
        metrics.master_exited_unexpectedly();
        let text = metrics.render(Phase::Quitting, 1, 2);

        for (series, value) in [
            ("nginx_graceful_reloads_total{outcome=\"reloaded\"}", 2.0),
            ("nginx_graceful_reloads_total{outcome=\"invalid\"}", 1.0),
            ("nginx_graceful_reload_duration_seconds_count", 3.0),
            ("nginx_graceful_reload_duration_seconds_bucket{le=\"0.1\"}", 2.0),
            ("nginx_graceful_drains_total{outcome=\"escalated\"}", 1.0),
            ("nginx_graceful_drain_duration_seconds_sum", 28.0),
            ("nginx_graceful_connections_at_quit", 42.0),
            ("nginx_graceful_propagation_delays_total{ended=\"ceiling\"}", 1.0),
            ("nginx_graceful_propagation_delay_seconds", 18.0),
            ("nginx_graceful_propagation_delay_arrivals", 917.0),
            ("nginx_graceful_escalation_killed_processes_total", 3.0),
            ("nginx_graceful_master_unexpected_exits_total", 1.0),
            ("nginx_graceful_worker_crashes_total", 0.0),
            ("nginx_graceful_build_info{version=\"0.1.0\"}", 1.0),
            ("nginx_graceful_config_last_reload_successful", 1.0),
            ("nginx_graceful_worker_generations{state=\"serving\"}", 1.0),
            ("nginx_graceful_worker_generations{state=\"shutting_down\"}", 2.0),
            ("nginx_graceful_phase{phase=\"quitting\"}", 1.0),
            ("nginx_graceful_phase{phase=\"serving\"}", 0.0),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        // Its value is the process's own count (see below).
        assert!(
            sample(&text, "nginx_graceful_log_lines_dropped_total").is_some(),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn dropped_log_lines_follow_the_loggers_count() {
        let metrics = Metrics::new(Counter::default());
        let series = "nginx_graceful_log_lines_dropped_total";
        metrics.note_log_lines_dropped(5);
        metrics.note_log_lines_dropped(5);
        assert_eq!(
            metrics.log_lines_dropped.get(),
            5,
            "the same count twice adds nothing"
        );
        metrics.note_log_lines_dropped(3);
        assert_eq!(metrics.log_lines_dropped.get(), 5, "a counter never goes down");
        metrics.note_log_lines_dropped(8);
        let text = metrics.render(Phase::Serving, 1, 0);
        // At least: the scrape brings it up to the logger's count of this test process.
        assert!(sample(&text, series).is_some_and(|n| n >= 8.0), "{text}");
    }
}
