//! Start-up: bad input is refused with one line, a documented exit code, and nothing left running.

use test_support as common;

use std::net::TcpListener;
use std::time::Duration;

use common::{Site, Supervisor, code};

const SECONDS: Duration = Duration::from_secs(1);

/// Runs to the end and returns (exit code, the error line).
fn refused(mut supervisor: Supervisor) -> (i32, String) {
    let status = supervisor.wait_exit(10 * SECONDS);
    let errors: Vec<String> = supervisor
        .log
        .events()
        .iter()
        .filter(|e| e["level"] == "ERROR")
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {:?}", supervisor.log.lines());
    (code(status), errors[0].clone())
}

fn with_command(site: &Site, extra: &[&str], command: &[&str]) -> Vec<String> {
    let mut args = site.run_args(extra);
    let at = args.iter().position(|a| a == "--").unwrap();
    args.truncate(at + 1);
    args.extend(command.iter().map(|s| s.to_string()));
    args
}

#[test]
fn a_missing_nginx_binary() {
    let site = Site::new();
    let (code, line) = refused(Supervisor::start(&with_command(
        &site,
        &[],
        &["/nonexistent/nginx", "-g", "daemon off;"],
    )));
    assert_eq!(code, 11);
    assert!(
        line.contains("/nonexistent/nginx") && line.contains("not found"),
        "{line}"
    );
    assert!(line.contains("full path"), "the line says how to fix it: {line}");
}

#[test]
fn a_config_that_fails_the_test() {
    let site = Site::build(true, "no_such_directive on;");
    let (code, line) = refused(Supervisor::start(&site.run_args(&[])));
    assert_eq!(code, 12);
    assert!(line.contains("no_such_directive"), "{line}");
    assert!(
        line.contains(&format!("{}:", site.config.display())),
        "names the file and line: {line}"
    );
    assert!(!site.serves(), "no nginx was started");
}

#[test]
fn a_budget_that_does_not_fit() {
    let site = Site::new();
    let (code, line) = refused(Supervisor::start(&site.run_args(&[
        "--grace-period",
        "5s",
        "--propagation-delay",
        "10s",
    ])));
    assert_eq!(code, 10);
    assert!(
        line.contains("--propagation-delay") && line.contains("--grace-period"),
        "{line}"
    );
}

#[test]
fn a_close_spread_longer_than_a_fixed_delay() {
    let site = Site::new();
    let (code, line) = refused(Supervisor::start(&site.run_args(&[
        "--propagation-delay",
        "1s",
        "--close-spread",
        "2s",
    ])));
    assert_eq!(code, 10);
    assert!(
        line.contains("--close-spread 2s") && line.contains("--propagation-delay 1s"),
        "{line}"
    );
}

#[test]
fn options_come_from_the_environment_too() {
    let site = Site::new();
    let env = [
        ("NGINX_GRACEFUL_GRACE_PERIOD", "5s"),
        ("NGINX_GRACEFUL_PROPAGATION_DELAY", "1m30s"),
    ];
    let (code, line) = refused(Supervisor::start_with_env(&site.run_args(&[]), &env));
    assert_eq!(code, 10);
    assert!(line.contains("propagation delay 1m 30s"), "{line}");
}

#[test]
fn an_unusable_runtime_dir() {
    let site = Site::new();
    let file = site.dir.0.join("a-file");
    std::fs::write(&file, "").unwrap();
    let mut args = site.run_args(&[]);
    let at = args.iter().position(|a| a == "--runtime-dir").unwrap();
    args[at + 1] = file.join("runtime").display().to_string();
    let (code, line) = refused(Supervisor::start(&args));
    assert_eq!(code, 13);
    assert!(line.contains("--runtime-dir"), "{line}");
}

#[test]
fn two_supervisors_cannot_share_a_runtime_dir_but_can_run_side_by_side() {
    let first_site = Site::new();
    let first = Supervisor::start(&first_site.run_args(&[]));
    first.wait_serving(&first_site);

    let mut same_dir = first_site.run_args(&[]);
    let at = same_dir.iter().position(|a| a == "--").unwrap();
    let other_site = Site::new();
    same_dir.splice(at.., other_site.nginx_command());
    let (code, line) = refused(Supervisor::start(&same_dir));
    assert_eq!(code, 13);
    assert!(line.contains("in use"), "{line}");

    let second = Supervisor::start(&other_site.run_args(&[]));
    second.wait_serving(&other_site);
    assert!(first_site.serves() && other_site.serves());
}

#[test]
fn a_health_port_in_use() {
    let site = Site::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, line) = refused(Supervisor::start(&site.run_args_with_health(&addr, &[])));
    assert_eq!(code, 14);
    assert!(line.contains(&addr) && line.contains("--health-listen"), "{line}");
    assert!(!site.serves(), "no nginx was started");
}

#[test]
fn a_malformed_duration_is_a_usage_error() {
    let site = Site::new();
    let mut supervisor = Supervisor::start(&site.run_args(&["--grace-period", "thirty"]));
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 2);
    assert!(
        supervisor.log.lines().join("\n").contains("1m30s"),
        "{:?}",
        supervisor.log.lines()
    );
}

#[test]
fn a_command_without_the_double_dash_gets_the_fix() {
    let site = Site::new();
    let mut args = site.run_args(&[]);
    args.retain(|a| a != "--");
    let mut supervisor = Supervisor::start(&args);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 2);
    let text = supervisor.log.lines().join("\n");
    assert!(
        text.contains("a COMMAND goes after `--`: nginx-graceful run [OPTIONS] -- nginx"),
        "{text}"
    );
}

#[test]
fn a_config_without_the_drain_snippet_is_pointed_out_once() {
    let site = Site::without_snippet();
    let supervisor = Supervisor::start_serving(&site, &[]);
    let warnings = supervisor.log.count("does not include the drain snippet");
    assert_eq!(warnings, 1);

    let site = Site::new();
    let supervisor = Supervisor::start_serving(&site, &[]);
    assert!(!supervisor.log.contains("drain snippet"));
}
