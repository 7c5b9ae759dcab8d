//! Reloads under load, in one run: what clients see across 50 reloads with plain
//! `nginx -s reload`, with `nginx-graceful reload`, and with its keep-alive close window; and how
//! long a config change on disk takes to become a confirmed new generation.
//!
//! `cargo bench --bench reload`; BENCH_RELOADS (default 50) and BENCH_CHANGES (default 20)
//! change the effort.

use test_support as common;
use test_support::exits;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::http::{self, LoopControl, LoopReport};
use common::{Site, Supervisor};

/// One reload every this long, in every mode.
const PACE: Duration = Duration::from_millis(300);

enum Mode {
    NginxSReload,
    Graceful { close_window: &'static str },
}

impl Mode {
    fn name(&self) -> String {
        match self {
            Mode::NginxSReload => "`nginx -s reload`".into(),
            Mode::Graceful { close_window: "0s" } => "`nginx-graceful reload`".into(),
            Mode::Graceful { close_window } => {
                format!("`nginx-graceful reload`, close window {close_window}")
            }
        }
    }
}

struct Result {
    keepalive: LoopReport,
    one_shot: LoopReport,
}

fn run_mode(mode: &Mode, reloads: usize) -> Result {
    let site = Site::new();
    let (_daemon, _supervisor) = match mode {
        Mode::NginxSReload => (Some(site.start_daemon()), None),
        Mode::Graceful { close_window } => {
            let supervisor =
                Supervisor::start_serving(&site, &["--no-watch", "--reload-close-window", close_window]);
            (None, Some(supervisor))
        }
    };
    let never = LoopControl::default();
    let stop = LoopControl::default();
    let limit = PACE * reloads as u32 + Duration::from_secs(1);
    let keepalive = http::keepalive_loop(site.addr(), 8, Duration::from_millis(10), never, limit);
    let one_shot = http::close_loop(site.addr(), stop.clone(), limit);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..reloads {
        let started = Instant::now();
        let status = match mode {
            Mode::NginxSReload => Command::new("nginx")
                .arg("-c")
                .arg(&site.config)
                .args(["-s", "reload"])
                .stderr(Stdio::null())
                .status(),
            Mode::Graceful { .. } => Command::new(common::bin())
                .args(["reload", "--runtime-dir"])
                .arg(&site.runtime)
                .stderr(Stdio::null())
                .status(),
        };
        assert!(status.unwrap().success(), "{} failed", mode.name());
        std::thread::sleep(PACE.saturating_sub(started.elapsed()));
    }
    stop.remove_endpoint();
    Result {
        keepalive: keepalive.join().unwrap(),
        one_shot: one_shot.join().unwrap(),
    }
}

/// Milliseconds from a write of the config to the `reload confirmed` event.
fn change_to_confirmed(changes: usize, debounce: &str) -> Vec<f64> {
    let site = Site::new();
    let supervisor = Supervisor::start_serving(&site, &["--reload-debounce", debounce]);
    let config = std::fs::read_to_string(&site.config).unwrap();
    let mut latencies = Vec::new();
    for i in 0..changes {
        let changed_at = SystemTime::now();
        std::fs::write(
            &site.config,
            config.replace("\"ok\\n\"", &format!("\"change {i}\\n\"")),
        )
        .unwrap();
        common::wait_until("the reload", Duration::from_secs(10), || {
            supervisor.log.count("\"reload\":\"confirmed\"") == i + 1
        });
        let line = supervisor
            .log
            .lines()
            .into_iter()
            .filter(|l| l.contains("\"reload\":\"confirmed\""))
            .nth(i)
            .unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        let at = humantime::parse_rfc3339(event["timestamp"].as_str().unwrap()).unwrap();
        latencies.push(at.duration_since(changed_at).unwrap_or_default().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn main() {
    let reloads = exits::env_or("BENCH_RELOADS", 50) as usize;
    let changes = exits::env_or("BENCH_CHANGES", 20) as usize;
    let modes = [
        Mode::NginxSReload,
        Mode::Graceful { close_window: "0s" },
        Mode::Graceful {
            close_window: "100ms",
        },
    ];
    println!(
        "| reloads by | keep-alive clients: failed / requests | of which on a reused connection | new connection per request: failed / requests |"
    );
    println!("|---|---|---|---|");
    for mode in &modes {
        let result = run_mode(mode, reloads);
        let reused = result.keepalive.errors.iter().filter(|f| f.reused).count();
        println!(
            "| {} | {} / {} | {} | {} / {} |",
            mode.name(),
            result.keepalive.errors.len(),
            result.keepalive.ok + result.keepalive.errors.len(),
            reused,
            result.one_shot.errors.len(),
            result.one_shot.ok + result.one_shot.errors.len(),
        );
        if let Some(first) = result.keepalive.errors.first() {
            eprintln!("{}: first keep-alive failure: {}", mode.name(), first.error);
        }
    }
    println!(
        "\n{reloads} reloads, one every {} ms, under 8 keep-alive clients (a request every 10 ms each) and one connection-per-request client.\n",
        PACE.as_millis()
    );

    println!("| debounce | config change to confirmed new generation: median | p90 | max |");
    println!("|---|---|---|---|");
    for debounce in ["500ms", "100ms"] {
        let latencies = change_to_confirmed(changes, debounce);
        println!(
            "| {debounce} | {:.0} ms | {:.0} ms | {:.0} ms |",
            exits::percentile(&latencies, 0.5),
            exits::percentile(&latencies, 0.9),
            latencies[latencies.len() - 1],
        );
    }
    println!(
        "\n{changes} changes each, written to the config file; timed from the write to the supervisor's `reload confirmed` event."
    );
}
