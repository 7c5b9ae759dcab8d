//! Bad input and faults: each is refused or survived with one line that names the cause and the
//! fix, and nothing is left behind.

use std::time::Duration;

use test_support as common;

// One module per surface under attack, beside the start-up refusals below.
mod control_socket;
mod drain_engine;
mod listeners;
mod prestop_hook;
mod supervisor;

/// Runs `nginx-graceful run ARGS -- nginx -g 'daemon off;'` to be refused.
fn run(args: &[&str]) -> (i32, String) {
    let mut argv: Vec<&str> = args.to_vec();
    argv.extend(["--", "nginx", "-g", "daemon off;"]);
    run_command(&argv)
}

/// Runs `nginx-graceful run ARGS` to be refused: returns its exit code and what it logged. A
/// supervisor that starts instead fails the test after 10 s, and is cleaned up with whatever it
/// started.
fn run_command(args: &[&str]) -> (i32, String) {
    let dir = common::TempDir::new("faults");
    let runtime = dir.0.join("runtime").display().to_string();
    let mut argv: Vec<String> = ["run", "--health-listen", "off", "--runtime-dir", &runtime]
        .map(String::from)
        .to_vec();
    argv.extend(args.iter().map(|a| a.to_string()));
    let mut supervisor = common::Supervisor::start(&argv);
    let status = supervisor.wait_exit(Duration::from_secs(10));
    (common::code(status), supervisor.log.lines().join("\n"))
}

#[test]
fn an_absurd_duration_is_a_usage_error_not_a_crash() {
    // It used to overflow the drain's arithmetic on instants: a panic, exit 134.
    for flag in ["--grace-period", "--propagation-delay", "--reload-timeout"] {
        let (code, stderr) = run(&[flag, "584542046090y"]);
        assert_eq!(code, 2, "{flag}: {stderr}");
        assert!(stderr.contains("longer than 1day"), "{flag}: {stderr}");
    }
}

#[test]
fn a_watch_on_a_path_that_does_not_exist_is_refused_at_start() {
    // It used to turn off every watch with one warning, and the supervisor served on.
    let (code, stderr) = run(&["--watch", "/nonexistent/conf.d"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/nonexistent/conf.d does not exist"), "{stderr}");
    assert!(!stderr.contains("nginx started"), "nothing may start: {stderr}");
}

#[test]
fn an_nginx_that_would_go_to_the_background_is_refused_with_the_fix() {
    // It used to exit 0 within 50 ms, reporting nginx's end, while nginx ran on as a daemon.
    let site = common::Site::new();
    let config = site.config.display().to_string();
    let (code, log) = run_command(&["--", "nginx", "-e", "stderr", "-c", &config]);
    assert_eq!(code, 11, "{log}");
    assert!(log.contains("-g 'daemon off;'"), "{log}");
    assert!(!log.contains("nginx started"), "nothing may start: {log}");
    assert!(!site.serves(), "no nginx answers on the site's port");
}
