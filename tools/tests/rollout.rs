//! `rehearse --rollout` end to end: a Deployment's rolling update with real nginx pods in PID
//! namespaces behind the Service imitation, and the rollouts refused before any pod starts.

use test_support as common;

use std::process::{Command, Output};

use serde_json::Value;

/// The tools binary under test.
const TOOLS: &str = env!("CARGO_BIN_EXE_nginx-graceful-tools");

fn rehearse(args: &[&str]) -> Output {
    Command::new(TOOLS).arg("rehearse").args(args).output().unwrap()
}

fn pods(rehearsal: &Value) -> &Vec<Value> {
    rehearsal["rollout"]["pods"].as_array().unwrap()
}

fn ms(pod: &Value, field: &str) -> i64 {
    pod[field].as_i64().unwrap_or_else(|| panic!("{field} of {pod}"))
}

#[test]
fn a_rollout_replaces_every_pod_in_order_and_nginx_graceful_drops_nothing_where_naive_does() {
    let dir = common::TempDir::new("rollout");
    let work = dir.0.join("work");
    // 2 replicas: maxSurge 25% rounds up to 1 and maxUnavailable 25% down to 0, so each old
    // pod goes only once a new one is ready.
    let output = rehearse(&[
        "--rollout",
        "--replicas",
        "2",
        "--compare",
        "nginx-graceful,naive",
        "--json",
        "--warmup",
        "1s",
        "--tail",
        "500ms",
        "--grace-period",
        "10s",
        "--propagation-lag",
        "1s",
        "--probe-period",
        "500ms",
        // A load the machine carries beside four pods and the test's neighbours.
        "--rate",
        "300",
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    let [graceful, naive] = report["rehearsals"].as_array().unwrap().as_slice() else {
        panic!("two rehearsals: {report}");
    };

    for rehearsal in [graceful, naive] {
        let rollout = &rehearsal["rollout"];
        assert_eq!(
            (rollout["max_surge"].as_u64(), rollout["max_unavailable"].as_u64()),
            (Some(1), Some(0))
        );
        let names: Vec<&str> = pods(rehearsal)
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["v1-a", "v1-b", "v2-a", "v2-b"], "{rehearsal}");
        let (old, new) = pods(rehearsal).split_at(2);
        for (gone, replacement) in old.iter().zip(new) {
            // The controller's order: a new pod ready, then an old one terminated; and the
            // kubelet's: terminated, then exited.
            assert!(
                ms(gone, "terminating_ms") >= ms(replacement, "ready_ms"),
                "{rehearsal}"
            );
            assert!(ms(replacement, "ready_ms") >= ms(replacement, "started_ms"));
            assert!(ms(gone, "exited_ms") >= ms(gone, "terminating_ms"));
            assert_eq!(gone["exit"], "exit 0", "{rehearsal}");
        }
        let last_exit = old.iter().map(|p| ms(p, "exited_ms")).max().unwrap();
        let last_ready = new.iter().map(|p| ms(p, "ready_ms")).max().unwrap();
        assert_eq!(rollout["total_ms"].as_i64(), Some(last_exit.max(last_ready)));
        // A surviving pod got new connections while each old pod drained.
        assert_eq!(rollout["bursts"].as_array().unwrap().len(), 2, "{rehearsal}");
    }

    for mode in ["close", "keep-alive"] {
        let modes = &graceful["modes"][mode];
        assert_eq!(modes["failed"], 0, "{mode}: {graceful}");
        assert!(modes["requests"].as_u64().unwrap() > 100, "{graceful}");
    }
    assert_eq!(graceful["rollout"]["failed_by_pod"], serde_json::json!({}));
    // Each nginx-graceful pod drained through the delay: longer than the lag.
    for old in &pods(graceful)[..2] {
        assert!(old["drain_ms"].as_i64().unwrap() >= 1000, "{graceful}");
    }

    // The naive pods lose requests, and the report says whose they were: only old pods fail.
    let failed = naive["modes"]["close"]["failed"].as_u64().unwrap();
    assert!(failed > 0, "{naive}");
    let by_pod = naive["rollout"]["failed_by_pod"].as_object().unwrap();
    assert!(
        !by_pod.is_empty() && by_pod.keys().all(|pod| pod.starts_with("v1-")),
        "{naive}"
    );
    assert_eq!(output.status.code(), Some(1), "a failed request fails the run");
    let table = report["table"].as_array().unwrap();
    assert!(
        table[0]["rollout"]["total_ms_median"].as_u64().unwrap() > 0,
        "{report}"
    );
}

#[test]
fn rollouts_that_cannot_run_are_refused_before_any_pod_starts() {
    let dir = common::TempDir::new("rollout-refused");
    let work = dir.0.join("work");
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--replicas", "0"], &["--replicas 0"]),
        (
            &["--max-surge", "0", "--max-unavailable", "0%"],
            &["--max-surge 0", "--max-unavailable 0%"],
        ),
        (
            &["--replicas", "200"],
            &["400 pod addresses", "--replicas 122 or fewer"],
        ),
        (
            &["--concurrency", "1000000000"],
            &["file descriptors", "hard limit", "--concurrency"],
        ),
        (&["--topology", "local"], &["--topology local"]),
    ];
    for (args, said) in cases {
        let mut all = vec!["--rollout", "--work-dir", work.to_str().unwrap()];
        all.extend_from_slice(args);
        let output = rehearse(&all);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        for words in said {
            assert!(stderr.contains(words), "{args:?} should name {words}: {stderr}");
        }
        assert!(!work.exists(), "{args:?}: nothing was started, nor written");
    }
}

#[test]
fn with_no_surge_each_old_pod_goes_before_its_replacement_starts() {
    let dir = common::TempDir::new("rollout-no-surge");
    let output = rehearse(&[
        "--rollout",
        "--replicas",
        "3",
        "--max-surge",
        "0",
        "--max-unavailable",
        "1",
        "--json",
        "--warmup",
        "1s",
        "--tail",
        "300ms",
        "--grace-period",
        "10s",
        "--propagation-lag",
        "500ms",
        "--probe-period",
        "300ms",
        "--rate",
        "200",
        "--work-dir",
        dir.0.join("work").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    let rehearsal = &report["rehearsals"][0];
    let (old, new) = pods(rehearsal).split_at(3);
    for (gone, replacement) in old.iter().zip(new) {
        // Never more than 3 pods counted: the replacement starts once the old one terminates.
        assert!(
            ms(replacement, "started_ms") >= ms(gone, "terminating_ms"),
            "{rehearsal}"
        );
    }
    for (next, replacement) in old[1..].iter().zip(new) {
        // Never fewer than 2 ready: the next old pod goes once the last replacement is ready.
        assert!(
            ms(next, "terminating_ms") >= ms(replacement, "ready_ms"),
            "{rehearsal}"
        );
    }
    let total = rehearsal["rollout"]["total_ms"].as_i64().unwrap();
    assert!(new.iter().all(|p| ms(p, "ready_ms") <= total), "{rehearsal}");
    assert!(old.iter().all(|p| ms(p, "exited_ms") <= total), "{rehearsal}");
    for mode in ["close", "keep-alive"] {
        assert_eq!(rehearsal["modes"][mode]["failed"], 0, "{mode}: {rehearsal}");
    }
    assert_eq!(output.status.code(), Some(0), "{stderr}");
}
