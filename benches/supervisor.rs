//! What the supervisor costs, against the init processes people use today, in one run:
//!
//! - exit latency: from the exit of the last nginx process to the exit of the supervisor;
//! - memory: the supervisor's resident set while nginx serves;
//! - idle cost: CPU time and context switches (wake-ups) of the supervisor while nginx serves
//!   and nothing happens.
//!
//! `cargo bench --bench supervisor`; BENCH_REPEATS (default 20) and BENCH_IDLE_SECS (default 60)
//! change the effort. BENCH_SUPERVISORS=NAME=PATH,... measures those nginx-graceful binaries
//! (builds of one commit or of two, glibc or static) instead of the one cargo built;
//! scripts/bench-supervisor.sh gives it the release builds a pod runs. tini and dumb-init
//! have a row either way: "not installed" when they are missing.

use test_support as common;
use test_support::exits;

use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Site, descendants_of};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

struct Contender {
    name: String,
    /// The program: a path, or a name to find on PATH (the peers, which may be missing).
    program: String,
    argv: Argv,
}

/// The command line of a contender for a site, with a free port for our health listener.
type Argv = Box<dyn Fn(&Site, u16) -> Vec<String>>;

fn ours(binary: &str, site: &Site, health_port: u16) -> Vec<String> {
    // A short delay, as every real drain has one: what the supervisor tears down when a drain
    // starts (its inotify watches, about 10 ms in the kernel) overlaps it, as in production.
    let mut args: Vec<String> = [binary, "run", "--propagation-delay", "100ms"]
        .map(String::from)
        .to_vec();
    args.extend(["--health-listen".into(), format!("127.0.0.1:{health_port}")]);
    args.extend(["--runtime-dir".into(), site.runtime.display().to_string()]);
    args.extend(site.nginx_command());
    args
}

fn tini(site: &Site, _: u16) -> Vec<String> {
    let mut args = vec!["tini".to_owned()];
    args.extend(site.nginx_command());
    args
}

fn dumb_init(site: &Site, _: u16) -> Vec<String> {
    let mut args = vec!["dumb-init".to_owned()];
    args.extend(site.nginx_command().into_iter().skip(1));
    args
}

fn start(contender: &Contender, site: &Site) -> Child {
    let argv = (contender.argv)(site, common::free_port());
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the contender");
    let pid = child.id() as i32;
    common::wait_until("nginx to serve", Duration::from_secs(10), || {
        site.serves() && descendants_of(pid).len() >= 3
    });
    child
}

/// SIGTERM, then the time from the last nginx exit to the supervisor's exit, in ms.
fn exit_latency(contender: &Contender) -> f64 {
    let site = Site::new();
    let mut child = start(contender, &site);
    let supervisor = child.id() as i32;
    let nginx: Vec<OwnedFd> = descendants_of(supervisor)
        .into_iter()
        .filter_map(exits::pidfd)
        .collect();
    let lag = exits::lag_after_last(
        nginx,
        || {
            let own = exits::pidfd(supervisor).unwrap();
            kill(Pid::from_raw(supervisor), Signal::SIGTERM).unwrap();
            own
        },
        Duration::from_secs(10),
    );
    child.wait().unwrap();
    lag
}

fn status_field(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// User + system CPU time in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().collect();
    rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap()
}

/// Context switches of every thread of the process: each is a wake-up.
fn switches(pid: i32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(|tid| {
            let status =
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
            let field = |name: &str| -> u64 {
                status
                    .lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                    .unwrap_or(0)
            };
            field("voluntary_ctxt_switches:") + field("nonvoluntary_ctxt_switches:")
        })
        .sum()
}

struct Idle {
    rss_kib: u64,
    cpu_ms: u64,
    wakeups: u64,
}

fn idle(contender: &Contender, seconds: u64) -> Idle {
    let site = Site::new();
    let mut child = start(contender, &site);
    let pid = child.id() as i32;
    // Settle: start-up work (nginx -T, the first probe, hashing the config off-thread) is not
    // idle cost, and tokio retires its blocking threads 10 s after their last task.
    std::thread::sleep(Duration::from_secs(12));
    let (cpu0, sw0) = (cpu_ticks(pid), switches(pid));
    std::thread::sleep(Duration::from_secs(seconds));
    let (cpu1, sw1) = (cpu_ticks(pid), switches(pid));
    let rss_kib = status_field(pid, "VmRSS:");
    let tick_ms = 1000
        / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .unwrap()
            .unwrap() as u64;
    let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    child.wait().unwrap();
    Idle {
        rss_kib,
        cpu_ms: (cpu1 - cpu0) * tick_ms,
        wakeups: sw1.saturating_sub(sw0),
    }
}

/// The program's path, when it is installed.
fn installed(program: &str) -> Option<String> {
    let found = Command::new("sh")
        .args(["-c", "command -v \"$0\"", program])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    (found.status.success() && !path.is_empty()).then_some(path)
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let repeats = exits::env_or("BENCH_REPEATS", 20) as usize;
    let idle_secs = exits::env_or("BENCH_IDLE_SECS", 60);
    let supervisors = std::env::var("BENCH_SUPERVISORS")
        .unwrap_or_else(|_| format!("nginx-graceful run={}", common::bin()));
    let mut contenders: Vec<Contender> = supervisors
        .split(',')
        .map(|entry| {
            let (name, binary) = entry.split_once('=').expect("BENCH_SUPERVISORS: NAME=PATH,...");
            let program = binary.to_owned();
            let binary = binary.to_owned();
            Contender {
                name: name.to_owned(),
                program,
                argv: Box::new(move |site, port| ours(&binary, site, port)),
            }
        })
        .collect();
    contenders.push(Contender {
        name: "tini".into(),
        program: "tini".into(),
        argv: Box::new(tini),
    });
    contenders.push(Contender {
        name: "dumb-init".into(),
        program: "dumb-init".into(),
        argv: Box::new(dumb_init),
    });

    println!(
        "| supervisor | binary | exit latency median | p90 | max | RSS serving | CPU over {idle_secs} s idle | wake-ups over {idle_secs} s idle |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for contender in &contenders {
        let Some(path) = installed(&contender.program) else {
            println!(
                "| {} | not installed (apt-get install {}) | | | | | | |",
                contender.name, contender.program
            );
            continue;
        };
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        let mut latencies: Vec<f64> = (0..repeats).map(|_| exit_latency(contender)).collect();
        latencies.sort_by(f64::total_cmp);
        let idle = idle(contender, idle_secs);
        println!(
            "| {} | {:.2} MB | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} MiB | {} ms | {} |",
            contender.name,
            size as f64 / 1e6,
            exits::percentile(&latencies, 0.5),
            exits::percentile(&latencies, 0.9),
            latencies.last().unwrap(),
            idle.rss_kib as f64 / 1024.0,
            idle.cpu_ms,
            idle.wakeups,
        );
    }
    println!(
        "\n{repeats} exits each; nginx 1.22 with 2 workers; tini and dumb-init forward SIGTERM (nginx's fast shutdown), nginx-graceful drains with --propagation-delay 100ms."
    );
}
