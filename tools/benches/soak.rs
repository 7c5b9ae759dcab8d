//! Is `soak` ever the bottleneck? Its keep-alive rate against the bundled nginx on loopback,
//! beside `wrk -t2 -c32` on the same machine in the same run, rounds alternating; and the CPU
//! each load generator spends per request (rusage of the finished child).
//!
//! `cargo bench --bench soak`; BENCH_ROUNDS (default 5) and BENCH_SECS (default 5) change the
//! effort. Needs wrk (apt-get install wrk).

use test_support as common;
use test_support::exits;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Supervisor, TempDir, free_port, wait_until};

/// CPU time (user, system) of every child waited for so far, in ms.
fn children_cpu_ms() -> (f64, f64) {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
    (ms(usage.user_time()), ms(usage.system_time()))
}

/// One run of a load generator: requests per second, and user and system CPU µs per request.
struct Run {
    rate: f64,
    user_us: f64,
    system_us: f64,
}

/// Runs a load generator to its end: (requests per second, CPU µs per request).
fn measure(argv: &[String], parse: fn(&str) -> Option<(f64, f64)>) -> Run {
    let (user0, system0) = children_cpu_ms();
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let (user1, system1) = children_cpu_ms();
    let text = String::from_utf8_lossy(&output.stdout);
    let (requests, secs) =
        parse(&text).unwrap_or_else(|| panic!("cannot read the output of {argv:?}:\n{text}"));
    Run {
        rate: requests / secs,
        user_us: (user1 - user0) * 1e3 / requests,
        system_us: (system1 - system0) * 1e3 / requests,
    }
}

/// wrk's "N requests in 5.00s".
fn wrk_output(text: &str) -> Option<(f64, f64)> {
    let line = text.lines().find(|l| l.contains(" requests in "))?;
    let mut words = line.split_whitespace();
    let requests = words.next()?.parse().ok()?;
    let secs = words
        .nth(2)?
        .trim_end_matches(',')
        .trim_end_matches('s')
        .parse()
        .ok()?;
    Some((requests, secs))
}

fn soak_output(text: &str) -> Option<(f64, f64)> {
    let report: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    assert_eq!(report["failed"], 0, "soak saw failures: {report}");
    Some((report["requests"].as_f64()?, report["elapsed_s"].as_f64()?))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    exits::percentile(values, 0.5)
}

fn main() {
    let rounds = exits::env_or("BENCH_ROUNDS", 5);
    let secs = exits::env_or("BENCH_SECS", 5);
    let runtime = TempDir::new("bench-soak");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut supervisor = Supervisor::start(
        &[
            "run",
            "--listen",
            &addr,
            "--health-listen",
            "off",
            "--propagation-delay",
            "0s",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(["--runtime-dir".into(), runtime.0.display().to_string()])
        .collect::<Vec<_>>(),
    );
    wait_until("nginx to serve", Duration::from_secs(10), || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    let url = format!("http://{addr}/");
    let wrk: Vec<String> = ["wrk", "-t2", "-c32", &format!("-d{secs}s"), &url]
        .map(String::from)
        .into();
    let soak: Vec<String> = [
        env!("CARGO_BIN_EXE_nginx-graceful-tools"),
        "soak",
        "--url",
        &url,
        "-c",
        "32",
        "--duration",
        &format!("{secs}s"),
        "--json",
    ]
    .map(String::from)
    .into();

    let (mut wrk_runs, mut soak_runs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate who goes first, so that drift over the run weighs on both alike.
        for first in [round % 2 == 0, round % 2 != 0] {
            if first {
                wrk_runs.push(measure(&wrk, wrk_output));
            } else {
                soak_runs.push(measure(&soak, soak_output));
            }
        }
    }
    supervisor.signal(15); // SIGTERM
    supervisor.wait_exit(Duration::from_secs(10));

    println!(
        "| load generator (32 keep-alive connections, {secs} s, {rounds} rounds) | requests/s median | user CPU per request | system CPU per request |"
    );
    println!("|---|---|---|---|");
    let mut rates = Vec::new();
    for (name, runs) in [
        ("wrk -t2 -c32", &wrk_runs),
        ("nginx-graceful-tools soak -c 32", &soak_runs),
    ] {
        let column = |f: fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let rate = column(|r| r.rate);
        rates.push(rate);
        println!(
            "| {name} | {rate:.0} | {:.1} µs | {:.1} µs |",
            column(|r| r.user_us),
            column(|r| r.system_us)
        );
    }
    println!("\nsoak / wrk: {:.2}", rates[1] / rates[0]);
}
