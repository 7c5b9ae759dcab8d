//! The preStop hook against the recipes in use today, in one run: how long after the last nginx
//! process exits does the hook return? A hook that returns early lets the kubelet's SIGTERM cut
//! what is left; one that returns late eats the grace period.
//!
//! `cargo bench --bench prestop`; BENCH_REPEATS (default 10) changes the effort. The shell
//! recipe sleeps 3 s first, as written in the wild, so each of its runs takes over 3 s.

use test_support as common;
use test_support::exits;

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Site;

struct Recipe {
    name: &'static str,
    command: fn(&Site, i32) -> Command,
}

fn ours(site: &Site, _master: i32) -> Command {
    let mut command = Command::new(common::bin());
    command
        .args(["drain", "--propagation-delay", "0s", "--runtime-dir"])
        .arg(&site.runtime);
    command.arg("--pid-file").arg(site.pid_file());
    command
}

fn shell_wait_loop(site: &Site, master: i32) -> Command {
    let script = format!(
        "sleep 3; nginx -c {} -s quit; while [ -d /proc/{master} ]; do sleep 0.1; done",
        site.config.display()
    );
    let mut command = Command::new("sh");
    command.args(["-c", &script]);
    command
}

fn quit_only(site: &Site, _master: i32) -> Command {
    let mut command = Command::new("nginx");
    command.arg("-c").arg(&site.config).args(["-s", "quit"]);
    command
}

fn run_once(recipe: &Recipe) -> f64 {
    let site = Site::new();
    let nginx = site.start_daemon();
    // The daemon's master is ours to reap (we are its subreaper), as a container's init would
    // reap it at once: a zombie master would keep `/proc/$PID` and the shell loop alive.
    let master = nix::unistd::Pid::from_raw(nginx.master);
    let reaper = std::thread::spawn(move || nix::sys::wait::waitpid(master, None));
    let pids: Vec<i32> = std::iter::once(nginx.master)
        .chain(common::children_of(nginx.master))
        .collect();
    let fds: Vec<OwnedFd> = pids.into_iter().filter_map(exits::pidfd).collect();
    let mut hook = None;
    let lag = exits::lag_after_last(
        fds,
        || {
            let child = (recipe.command)(&site, nginx.master)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let fd = exits::pidfd(child.id() as i32).unwrap();
            hook = Some(child);
            fd
        },
        Duration::from_secs(20),
    );
    let mut hook = hook.unwrap();
    hook.wait().unwrap();
    reaper.join().unwrap().unwrap();
    lag
}

fn main() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let repeats = exits::env_or("BENCH_REPEATS", 10) as usize;
    let recipes = [
        Recipe {
            name: "nginx-graceful drain",
            command: ours,
        },
        Recipe {
            name: "sleep 3; nginx -s quit; while [ -d /proc/$PID ]; do sleep 0.1; done",
            command: shell_wait_loop,
        },
        Recipe {
            name: "nginx -s quit",
            command: quit_only,
        },
    ];
    println!("| preStop hook | returns after the last nginx exit: median | p90 | min | max |");
    println!("|---|---|---|---|---|");
    for recipe in &recipes {
        let mut lags: Vec<f64> = (0..repeats).map(|_| run_once(recipe)).collect();
        lags.sort_by(f64::total_cmp);
        println!(
            "| `{}` | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            recipe.name,
            exits::percentile(&lags, 0.5),
            exits::percentile(&lags, 0.9),
            lags[0],
            lags[lags.len() - 1],
        );
    }
    println!(
        "\n{repeats} runs each against nginx 1.22 with 2 workers, started as a daemon; a negative time means the hook returned while nginx was still running."
    );
}
