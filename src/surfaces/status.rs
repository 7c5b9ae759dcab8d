//! `nginx-graceful status`: the nginx master, its workers by generation with their state and
//! connections, the supervisor's phase and the last reload. From a `run` supervisor over the
//! control socket, or, without one, from the pid file and /proc.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::StatusArgs;
use crate::core::quiet::DelayEnd;
use crate::duration::fmt;
use crate::error::{Error, exit};
use crate::nginx::connections;
use crate::nginx::generations::{Generations, serving_workers};
use crate::nginx::tree::ProcStat;
use crate::os::drain_flag::{DrainFlag, FlagState};
use crate::surfaces::live::Live;

pub async fn show(args: StatusArgs) -> Result<i32, Error> {
    let mut status = match crate::surfaces::control_client::request_status(&args.target).await? {
        Some(status) => status,
        None => {
            let target = args.target.clone();
            tokio::task::spawn_blocking(move || {
                let target = crate::nginx::configured_pid_file::resolve_blocking(target);
                of_pid_file(&target.pid_file, &target.runtime_dir)
            })
            .await
            .map_err(|e| Error::Internal {
                context: "reading the status",
                source: std::io::Error::other(e),
            })??
        }
    };
    // The flags are files: whoever drains, they say how far the close spread has come.
    let told = DrainFlag::in_dir(&args.target.runtime_dir).tenths_told();
    if told > 0 {
        status["keepalive_told_tenths"] = told.into();
    }
    if args.json {
        println!("{status}");
    } else {
        print!("{}", table(&status));
    }
    Ok(if status["master"].is_null() {
        exit::NOT_RUNNING
    } else {
        exit::OK
    })
}

/// What a `run` supervisor knows, for its control socket.
pub fn of_supervisor(live: &Live) -> Value {
    let mut status = match live.master() {
        Some(master) => of_master(master, &live.generations),
        None => not_running(),
    };
    status["source"] = "supervisor".into();
    status["supervisor_pid"] = std::process::id().into();
    if let Some(controller) = live.controller() {
        status["controller_pid"] = controller.into();
    }
    status["phase"] = live.phase().name().into();
    if let Some(delay) = live.propagation() {
        status["propagation"] = delay;
    }
    status["last_reload"] = live.last_reload().map_or(Value::Null, |last| last.to_json());
    status
}

/// Without a supervisor: the master named by the pid file, checked like `drain` checks it.
fn of_pid_file(pid_file: &Path, runtime_dir: &Path) -> Result<Value, Error> {
    let mut status = match crate::nginx::pidfile::find_master(pid_file)? {
        Some(master) => of_master(master.pidfd.pid(), &Generations::default()),
        None => not_running(),
    };
    status["source"] = "pid_file".into();
    status["pid_file"] = pid_file.display().to_string().into();
    // No supervisor, no phase; the drain flag says whether a `drain` has begun (a stale one,
    // whose master no longer runs, does not).
    let draining = matches!(DrainFlag::in_dir(runtime_dir).state(), FlagState::Raised(_));
    status["phase"] = if status["master"].is_null() {
        Value::Null
    } else if draining {
        "draining".into()
    } else {
        "serving".into()
    };
    Ok(status)
}

fn not_running() -> Value {
    json!({"master": null, "workers": [], "connections": 0})
}

/// The master and its workers, newest generation first (0 = serving).
fn of_master(master: i32, generations: &Generations) -> Value {
    let serving = serving_workers(master);
    let mut draining = generations.draining(master);
    draining.reverse();
    let by_generation: Vec<(usize, &str, &Vec<i32>)> = std::iter::once((0, "serving", &serving))
        .filter(|(_, _, workers)| !workers.is_empty())
        .chain(
            draining
                .iter()
                .enumerate()
                .map(|(i, workers)| (i + 1, "shutting_down", workers)),
        )
        .collect();
    let pids: Vec<i32> = by_generation
        .iter()
        .flat_map(|(_, _, w)| w.iter().copied())
        .collect();
    let counts = connections::by_process(&pids);
    let connections_of = |pid: i32| counts.iter().find(|(p, _)| *p == pid).map_or(0, |(_, n)| *n);
    let workers: Vec<Value> = by_generation
        .iter()
        .flat_map(|&(generation, state, workers)| {
            workers.iter().map(move |&pid| {
                json!({
                    "pid": pid,
                    "generation": generation,
                    "state": state,
                    "connections": connections_of(pid),
                    "uptime_ms": uptime_ms(pid),
                })
            })
        })
        .collect();
    json!({
        "master": {"pid": master, "uptime_ms": uptime_ms(master)},
        "workers": workers,
        "connections": counts.iter().map(|(_, n)| n).sum::<usize>(),
    })
}

/// How long the process has run, from its start time in /proc.
fn uptime_ms(pid: i32) -> Option<u64> {
    let started_ticks = ProcStat::read(pid)?.start_time;
    let boot_uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let started = started_ticks as f64 / procfs::ticks_per_second() as f64;
    Some(((boot_uptime - started).max(0.0) * 1000.0) as u64)
}

/// The readable form.
pub fn table(status: &Value) -> String {
    let mut out = String::new();
    let source = match status["source"].as_str() {
        Some("supervisor") => format!("the supervisor (pid {})", status["supervisor_pid"]),
        _ => format!("the pid file {}", status["pid_file"].as_str().unwrap_or("?")),
    };
    out.push_str(&format!("{:<13}{source}\n", "from"));
    if let Some(pid) = status["controller_pid"].as_i64() {
        out.push_str(&format!("{:<13}pid {pid} (starts nginx itself)\n", "controller"));
    }
    if let Some(phase) = status["phase"].as_str() {
        out.push_str(&format!("{:<13}{phase}\n", "phase"));
    }
    if let Some(told) = status["keepalive_told_tenths"].as_u64() {
        out.push_str(&format!(
            "{:<13}told to close on {told} connections in 10\n",
            "keep-alive"
        ));
    }
    if let Some(delay) = propagation(&status["propagation"]) {
        out.push_str(&format!("{:<13}{delay}\n", "propagation"));
    }
    match status["master"]["pid"].as_i64() {
        Some(pid) => out.push_str(&format!(
            "{:<13}pid {pid}, up {}\n",
            "master",
            age(&status["master"]["uptime_ms"])
        )),
        None => out.push_str(&format!("{:<13}not running\n", "master")),
    }
    out.push_str(&format!("{:<13}{}\n", "connections", status["connections"]));
    if status["source"] == "supervisor" {
        out.push_str(&format!(
            "{:<13}{}\n",
            "last reload",
            last_reload(&status["last_reload"])
        ));
    }
    let workers = status["workers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if !workers.is_empty() {
        out.push_str(&format!(
            "\n{:<12}{:<15}{:>8}{:>13}  {}\n",
            "GENERATION", "STATE", "PID", "CONNECTIONS", "UP"
        ));
        for worker in workers {
            let generation = match worker["generation"].as_u64() {
                Some(0) => "current".to_owned(),
                Some(n) => format!("old {n}"),
                None => "?".to_owned(),
            };
            out.push_str(&format!(
                "{:<12}{:<15}{:>8}{:>13}  {}\n",
                generation,
                worker["state"].as_str().unwrap_or("?").replace('_', " "),
                // A JSON value ignores the width: padded as text.
                worker["pid"].to_string(),
                worker["connections"].to_string(),
                age(&worker["uptime_ms"]),
            ));
        }
    }
    out
}

/// The propagation delay's state as words: how it ended, or where it stands.
fn propagation(state: &Value) -> Option<String> {
    if let Some(end) = DelayEnd::from_json(state) {
        return Some(format!("ended: {}", end.words()));
    }
    let ms = |field: &str| state[field].as_u64().map(|n| fmt(Duration::from_millis(n)));
    let arrivals = state["arrivals"].as_u64()?;
    let quiet = match (ms("quiet_for_ms"), ms("quiet_needed_ms")) {
        (Some(quiet), Some(needed)) => format!("none for {quiet} of the {needed} needed"),
        (Some(quiet), None) => format!("none for {quiet}, too few to know how long is quiet"),
        (None, _) => "too few to know how long is quiet".to_owned(),
    };
    let ceiling = ms("ceiling_in_ms").unwrap_or_else(|| "?".into());
    Some(format!(
        "waiting for new connections to stop: {arrivals} so far, {quiet}; the ceiling in {ceiling}"
    ))
}

fn age(ms: &Value) -> String {
    ms.as_u64()
        .map_or("?".to_owned(), |ms| fmt(Duration::from_millis(ms - ms % 1000)))
}

fn last_reload(reload: &Value) -> String {
    let Some(outcome) = reload["outcome"].as_str() else {
        return "none since start".to_owned();
    };
    let ago = reload["finished_unix_ms"].as_u64().map(|at| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        fmt(Duration::from_millis(now.saturating_sub(at) / 1000 * 1000))
    });
    let took = reload["took_ms"].as_u64().map(Duration::from_millis).map(fmt);
    let mut line = format!(
        "{outcome} {} ago, took {}",
        ago.unwrap_or_default(),
        took.unwrap_or_default()
    );
    if let Some(reason) = reload["reason"].as_str() {
        line.push_str(&format!(": {reason}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_groups_workers_by_generation() {
        let status = json!({
            "source": "supervisor", "supervisor_pid": 1, "phase": "serving",
            "master": {"pid": 7, "uptime_ms": 3_723_400},
            "connections": 12,
            "last_reload": {"outcome": "invalid", "reason": "unknown directive \"lisen\"", "took_ms": 31},
            "workers": [
                {"pid": 30, "generation": 0, "state": "serving", "connections": 9, "uptime_ms": 62_000},
                {"pid": 20, "generation": 1, "state": "shutting_down", "connections": 3, "uptime_ms": 3_700_000},
            ],
        });
        let table = table(&status);
        assert!(table.contains("phase        serving\n"), "{table}");
        assert!(table.contains("master       pid 7, up 1h 2m 3s\n"), "{table}");
        assert!(
            table.contains("last reload  invalid  ago, took 31ms: unknown directive \"lisen\"\n"),
            "{table}"
        );
        let rows: Vec<Vec<&str>> = table
            .lines()
            .skip_while(|l| !l.starts_with("GENERATION"))
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0], ["current", "serving", "30", "9", "1m", "2s"]);
        assert_eq!(
            rows[1],
            ["old", "1", "shutting", "down", "20", "3", "1h", "1m", "40s"]
        );
    }

    #[test]
    fn the_propagation_delay_reads_as_words_while_it_runs_and_once_it_ended() {
        let waiting = json!({"state": "waiting", "arrivals": 41, "quiet_for_ms": 120,
            "quiet_needed_ms": 300, "ceiling_in_ms": 16_200});
        assert_eq!(
            propagation(&waiting).unwrap(),
            "waiting for new connections to stop: 41 so far, none for 120ms of the 300ms needed; the ceiling in 16s 200ms"
        );
        let ended = json!({"state": "ended", "ended": "quiet", "lasted_ms": 1312, "arrivals": 58,
            "quiet_for_ms": 301, "quiet_needed_ms": 300});
        assert_eq!(
            propagation(&ended).unwrap(),
            "ended: quiet after 1s 312ms (58 bursts of new connections, the last 301ms before)"
        );
        assert_eq!(propagation(&Value::Null), None);
        let status = json!({"source": "supervisor", "phase": "propagation_delay", "propagation": waiting,
            "keepalive_told_tenths": 4});
        let table = table(&status);
        assert!(table.contains("propagation  waiting for"), "{table}");
        assert!(
            table.contains("keep-alive   told to close on 4 connections in 10\n"),
            "{table}"
        );
    }

    #[test]
    fn no_master_reads_as_not_running() {
        let mut status = not_running();
        status["source"] = "pid_file".into();
        status["pid_file"] = "/run/nginx.pid".into();
        let table = table(&status);
        assert!(table.contains("master       not running\n"), "{table}");
        assert!(!table.contains("GENERATION"), "{table}");
    }
}
