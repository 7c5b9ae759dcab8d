//! `rehearse --topology local` end to end (real nginx-graceful pods, the load balancer and
//! kube-proxy imitation): readiness kept through the propagation delay keeps the terminated
//! pod's node serving until the load balancer has heard; readiness failing at the start drops
//! what the balancer still sends that node.

use test_support as common;

use std::process::Command;

use serde_json::Value;

const TOOLS: &str = env!("CARGO_BIN_EXE_nginx-graceful-tools");

#[test]
fn readiness_at_quit_loses_nothing_where_readiness_at_the_start_drops_the_lb_lag() {
    let dir = common::TempDir::new("rehearse-local");
    let output = Command::new(TOOLS)
        .args(["rehearse", "--topology", "local", "--json"])
        .args([
            "--lb-lag",
            "2s",
            "--propagation-lag",
            "500ms",
            "--probe-period",
            "500ms",
        ])
        .args(["--warmup", "1s", "--tail", "500ms", "--grace-period", "15s"])
        .args(["--graceful-args", "", "--graceful-args", "--unready-at start"])
        .arg("--work-dir")
        .arg(dir.0.join("work"))
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    let [at_quit, at_start] = report["rehearsals"].as_array().unwrap().as_slice() else {
        panic!("two rehearsals: {report}");
    };
    assert_eq!(at_quit["strategy"], "nginx-graceful");
    assert_eq!(at_start["strategy"], "nginx-graceful --unready-at start");

    let events = |r: &Value| -> Vec<String> {
        r["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap().to_owned())
            .collect()
    };
    for event in ["kube-proxy", "health check", "load balancer"] {
        assert!(events(at_quit).iter().any(|e| e == event), "{event}: {at_quit}");
    }
    for mode in ["close", "keep-alive"] {
        assert_eq!(at_quit["modes"][mode]["failed"], 0, "{mode}: {at_quit}");
    }
    // The node keeps getting new connections for the balancer's lag, and drops them.
    let close = &at_start["modes"]["close"];
    assert!(close["failed"].as_u64().unwrap() > 0, "{at_start}");
    assert_eq!(close["failed"], close["failures"]["reset-new"], "{at_start}");
    assert_eq!(output.status.code(), Some(1), "a failed request fails the run");
}
