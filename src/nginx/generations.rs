//! nginx's worker generations: which workers serve, which were told to quit and still drain,
//! and the wait that keeps reloads from stacking more of them than allowed.

use super::pidfd::Processes;
use super::tree::{self, ProcessTable};

const SERVING: &str = "nginx: worker process";
const SHUTTING_DOWN: &str = "nginx: worker process is shutting down";

/// Workers started within this many clock ticks (10 ms each) of each other belong to one
/// generation: a master forks all its workers within a millisecond or two.
const SAME_GENERATION_TICKS: u64 = 2;
/// The workers of `master` that serve (not shutting down), read from /proc.
pub fn serving_workers(master: i32) -> Vec<i32> {
    let Ok(table) = ProcessTable::read() else {
        return Vec::new();
    };
    let mut workers: Vec<i32> = table
        .children(master)
        .map(|s| s.pid)
        .filter(|&pid| tree::title(pid) == SERVING)
        .collect();
    workers.sort_unstable();
    workers
}

/// Whether a serving worker runs anywhere below `root`: the master, or a wrapper that stays the
/// master's parent. A master starts its workers only after binding every listening socket.
pub fn serves_beneath(root: i32) -> bool {
    ProcessTable::read().is_ok_and(|table| {
        table
            .descendants(root)
            .iter()
            .any(|s| tree::title(s.pid) == SERVING)
    })
}

/// The worker sets each reload retired, so the ones still draining can be counted exactly.
/// Without that history (`reload` without a supervisor) they are told apart by start time.
#[derive(Debug, Clone, Default)]
pub struct Generations {
    retired: std::sync::Arc<std::sync::Mutex<Vec<Vec<i32>>>>,
}

impl Generations {
    pub fn retire(&self, workers: Vec<i32>) {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(workers);
    }

    /// Old generations still draining: each a set of workers told to quit and still running.
    pub fn draining(&self, master: i32) -> Vec<Vec<i32>> {
        let shutting_down = shutting_down(master);
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        if retired.is_empty() {
            return by_start_time(shutting_down);
        }
        for generation in retired.iter_mut() {
            generation.retain(|pid| shutting_down.iter().any(|(_, p)| p == pid));
        }
        retired.retain(|generation| !generation.is_empty());
        // Workers retired by someone else (`nginx -s reload`, a reload that timed out) count too.
        let unknown: Vec<(u64, i32)> = shutting_down
            .into_iter()
            .filter(|(_, pid)| !retired.iter().flatten().any(|p| p == pid))
            .collect();
        let mut draining = retired.clone();
        draining.extend(by_start_time(unknown));
        draining
    }
}

/// Workers of `master` told to quit and still running, with their start times.
fn shutting_down(master: i32) -> Vec<(u64, i32)> {
    let Ok(table) = ProcessTable::read() else {
        return Vec::new();
    };
    let mut workers: Vec<(u64, i32)> = table
        .children(master)
        .filter(|s| tree::title(s.pid) == SHUTTING_DOWN)
        .map(|s| (s.start_time, s.pid))
        .collect();
    workers.sort_unstable();
    workers
}

/// Groups workers by start time: one master forks a generation within a millisecond or two.
fn by_start_time(workers: Vec<(u64, i32)>) -> Vec<Vec<i32>> {
    let mut generations: Vec<Vec<i32>> = Vec::new();
    let mut last_start = None;
    for (start, pid) in workers {
        match (last_start, generations.last_mut()) {
            (Some(last), Some(generation)) if start - last <= SAME_GENERATION_TICKS => generation.push(pid),
            _ => generations.push(vec![pid]),
        }
        last_start = Some(start);
    }
    generations
}

/// Waits while `cap` old generations are still draining, so reloads never stack more worker
/// sets than that; woken by the exit of one of their workers, not by a timer.
pub async fn wait_for_room(master: i32, cap: usize, generations: &Generations) {
    let mut reported = false;
    loop {
        let draining = generations.draining(master);
        if draining.len() < cap.max(1) {
            return;
        }
        if !std::mem::replace(&mut reported, true) {
            tracing::info!(
                draining_generations = draining.len(),
                cap,
                "reload waits: old worker generations are still draining connections (--max-draining-generations)"
            );
        }
        let mut workers = Processes::default();
        for pid in draining.iter().flatten() {
            if let Some(stat) = tree::ProcStat::read(*pid) {
                workers.track(&stat);
            }
        }
        if workers.next_exit().await.is_none() {
            return;
        }
    }
}
