//! Reloads against a real nginx: config changes on disk (ConfigMap swap, bursts), the
//! generation cap, `nginx-graceful reload` with and without a supervisor, and clients through
//! many reloads.

use test_support as common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Site, Supervisor, Traffic, code, http, reload_args};

const SECONDS: Duration = Duration::from_secs(1);

fn confirmed(supervisor: &Supervisor) -> usize {
    supervisor.log.count("\"reload\":\"confirmed\"")
}

fn body(site: &Site) -> usize {
    http::get(site.addr(), "/").unwrap().body_len
}

#[test]
fn a_configmap_symlink_swap_reloads_exactly_once() {
    let site = Site::new();
    // The layout of a ConfigMap volume: nginx.conf -> ..data/nginx.conf, ..data -> ..v1.
    let volume = site.dir.0.join("configmap");
    let config = std::fs::read_to_string(&site.config).unwrap();
    std::fs::create_dir_all(volume.join("..v1")).unwrap();
    std::fs::write(volume.join("..v1/nginx.conf"), &config).unwrap();
    std::os::unix::fs::symlink("..v1", volume.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/nginx.conf", volume.join("nginx.conf")).unwrap();
    let mut args = site.run_args(&["--reload-debounce", "300ms"]);
    let at = args.iter().position(|a| a == "-c").unwrap();
    args[at + 1] = volume.join("nginx.conf").display().to_string();
    let mut supervisor = Supervisor::start(&args);
    supervisor.wait_serving(&site);

    // The kubelet's update: a new data directory, a new link, renamed over ..data at once.
    std::fs::create_dir_all(volume.join("..v2")).unwrap();
    std::fs::write(
        volume.join("..v2/nginx.conf"),
        config.replace("\"ok\\n\"", "\"swapped\\n\""),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();

    supervisor.log.wait_for("the reload", 10 * SECONDS, |l| {
        l.contains("\"reload\":\"confirmed\"")
    });
    assert_eq!(body(&site), "swapped\n".len());
    // Anything more would come within the debounce; wait for it to be sure it does not.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(confirmed(&supervisor), 1, "{:?}", supervisor.log.lines());
    supervisor.signal(3);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}

#[test]
fn an_invalid_config_on_disk_is_not_loaded_and_the_error_names_file_and_line() {
    let site = Site::new();
    let supervisor = Supervisor::start_serving(&site, &[]);
    let config = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        config.replace("events {", "not_a_directive;\nevents {"),
    )
    .unwrap();
    let refusal = supervisor.log.wait_for("the refusal", 10 * SECONDS, |l| {
        l.contains("\"reload\":\"invalid\"")
    });
    assert!(
        refusal.contains("not_a_directive") && refusal.contains(&format!("{}:", site.config.display())),
        "{refusal}"
    );
    assert!(!supervisor.log.contains("SIGHUP sent"), "no signal was sent");
    // A reload starts nothing and stops nothing: the start-up error's advice is not its own.
    assert!(!refusal.contains("nothing was started"), "{refusal}");
    assert!(
        refusal.contains("nginx keeps serving the previous config"),
        "{refusal}"
    );
    assert_eq!(body(&site), "ok\n".len(), "the old config serves");
}

#[test]
fn touching_without_a_change_reloads_nothing_and_a_burst_reloads_at_most_twice() {
    let site = Site::new();
    let supervisor = Supervisor::start_serving(&site, &["--reload-debounce", "300ms"]);
    let config = std::fs::read_to_string(&site.config).unwrap();

    std::fs::write(&site.config, &config).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !supervisor.log.contains("SIGHUP sent"),
        "same contents, no reload"
    );

    // 100 writes in a second, each a different body; the last one must be what serves.
    for i in 0..100 {
        std::fs::write(
            &site.config,
            config.replace("\"ok\\n\"", &format!("\"burst {i:03}\\n\"")),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    common::wait_until("the last write to serve", 10 * SECONDS, || {
        body(&site) == "burst 099\n".len() && { http::get(site.addr(), "/").is_ok() }
    });
    supervisor.log.wait_for("the reload", 10 * SECONDS, |l| {
        l.contains("\"reload\":\"confirmed\"")
    });
    std::thread::sleep(Duration::from_millis(1500));
    let sighups = supervisor.log.count("SIGHUP sent");
    assert!((1..=2).contains(&sighups), "{sighups} reloads for one burst");
}

/// A connection that stays busy for `secs` on whichever worker accepted it.
fn hold_connection(site: &Site, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(site.addr()).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).unwrap();
    stream
}

/// Worker sets alive: the serving one and every retired set with a worker left.
fn worker_sets(master: i32, retired: &[Vec<i32>]) -> usize {
    let serving = nginx_graceful::reload::serving_workers(master);
    let draining = |pid: &i32| common::children_of(master).contains(pid) && !serving.contains(pid);
    !serving.is_empty() as usize + retired.iter().filter(|set| set.iter().any(draining)).count()
}

#[test]
fn the_generation_cap_holds_while_long_connections_keep_old_workers_alive() {
    let site = Site::new();
    let slow = site.slow_path(60);
    let mut supervisor = Supervisor::start_serving(&site, &["--no-watch", "--max-draining-generations", "2"]);
    let master = supervisor.master();
    let mut held = Vec::new();
    let mut retired = Vec::new();
    for round in 0..3 {
        held.push(hold_connection(&site, &slow));
        held.push(hold_connection(&site, &slow));
        retired.push(nginx_graceful::reload::serving_workers(master));
        let mut hook = Supervisor::start(&reload_args(&site));
        if round < 2 {
            assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0, "{:?}", hook.log.lines());
        } else {
            // Two old generations still drain: the third reload waits for room.
            supervisor
                .log
                .wait_for("the reload to wait", 10 * SECONDS, |l| l.contains("reload waits"));
            assert_eq!(
                worker_sets(master, &retired),
                3,
                "the cap + 1 worker sets, and no more"
            );
            // Let the oldest generation go: its connections close, the reload proceeds.
            held.drain(..2);
            assert_eq!(code(hook.wait_exit(20 * SECONDS)), 0, "{:?}", hook.log.lines());
        }
        let sets = worker_sets(master, &retired);
        assert!(sets <= 3, "{sets} worker sets after round {round}");
    }
    drop(held);
    supervisor.signal(3);
    assert_eq!(code(supervisor.wait_exit(20 * SECONDS)), 0);
}

/// Runs `reloads` reloads through `nginx-graceful reload`, one after the other; returns when each
/// began and ended, as this test saw it (its window of the supervisor's reload is inside).
fn reload_times(site: &Site, reloads: usize) -> Vec<(Instant, Instant)> {
    (0..reloads)
        .map(|_| {
            let began = Instant::now();
            let mut hook = Supervisor::start(&reload_args(site));
            assert_eq!(code(hook.wait_exit(15 * SECONDS)), 0, "{:?}", hook.log.lines());
            (began, Instant::now())
        })
        .collect()
}

/// Asserts that in each reload the keep-alive clients were told to close at least `clients`
/// times: the close window opened before each SIGHUP, not once in a while.
#[track_caller]
fn assert_told_to_close_in_each(
    reloads: &[(Instant, Instant)],
    report: &common::traffic::TrafficReport,
    clients: usize,
) {
    let closes = &report.keepalive.closes;
    for (i, (began, ended)) in reloads.iter().enumerate() {
        let within = closes.iter().filter(|at| *at >= began && *at <= ended).count();
        assert!(
            within >= clients,
            "reload {i}: {within} responses told a keep-alive client to close ({} over all {} reloads)",
            closes.len(),
            reloads.len()
        );
    }
}

#[test]
fn clients_see_no_failure_through_twenty_reloads() {
    let site = Site::new();
    // The default close window (100 ms).
    let mut supervisor = Supervisor::start_serving(&site, &["--no-watch"]);
    // Keep-alive clients that reuse their connections back to back: the ones a reload's old
    // workers reset when nothing tells them to close first.
    let traffic = Traffic::to(site.addr())
        .keepalive(4)
        .pause(Duration::from_millis(1))
        .one_shot()
        .limit(60 * SECONDS)
        .start();
    traffic.wait_served(100);
    let reloads = reload_times(&site, 20);
    let report = traffic.finish();
    report.assert_no_failures();
    assert!(report.one_shot.ok > 20, "{:?}", report.one_shot.ok);
    assert!(report.keepalive.ok > 200, "{:?}", report.keepalive.ok);
    assert_told_to_close_in_each(&reloads, &report, 4);
    assert_eq!(confirmed(&supervisor), 20);
    supervisor.signal(3);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}

#[test]
fn a_reload_during_a_drain_is_refused() {
    let site = Site::new();
    let supervisor = Supervisor::start_serving(&site, &["--propagation-delay", "5s"]);
    supervisor.signal(15);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    let mut hook = Supervisor::start(&reload_args(&site));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 22, "{:?}", hook.log.lines());
    assert!(hook.log.contains("a drain has begun"));
}

#[test]
fn without_a_supervisor_reload_tests_signals_and_confirms() {
    let site = Site::new();
    let nginx = site.start_daemon();
    let before = common::children_of(nginx.master);
    let config = std::fs::read_to_string(&site.config).unwrap();

    std::fs::write(&site.config, config.replace("events {", "oops;\nevents {")).unwrap();
    let mut hook = Supervisor::start(&reload_args(&site));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 20, "{:?}", hook.log.lines());
    assert_eq!(common::children_of(nginx.master), before, "nothing was signalled");

    std::fs::write(&site.config, config.replace("\"ok\\n\"", "\"direct\\n\"")).unwrap();
    let mut hook = Supervisor::start(&reload_args(&site));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0, "{:?}", hook.log.lines());
    assert_eq!(body(&site), "direct\n".len());
    assert!(Path::new(&nginx.log).exists());
}

#[test]
fn without_a_pid_file_reload_finds_the_nginx_whose_pid_file_nginx_t_names() {
    let site = Site::new();
    let _nginx = site.start_daemon();
    let (_nginx_dir, path) = site.path_with_its_nginx();
    let config = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(&site.config, config.replace("\"ok\\n\"", "\"found\\n\"")).unwrap();
    let runtime = site.runtime.display().to_string();
    let args = ["--log-format", "json", "reload", "--runtime-dir", &runtime];
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let mut hook = Supervisor::start_with_env(&args, &[("PATH", &path)]);
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0, "{:?}", hook.log.lines());
    assert_eq!(body(&site), "found\n".len());
}

#[test]
fn with_a_close_window_keepalive_clients_are_told_to_close_before_each_reload() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &["--no-watch", "--reload-close-window", "200ms"]);
    let traffic = Traffic::to(site.addr())
        .keepalive(4)
        .pause(Duration::from_millis(10))
        .limit(4 * SECONDS)
        .start();
    traffic.wait_served(40);
    let reloads = reload_times(&site, 5);
    assert!(
        !site.runtime.join("draining").exists(),
        "the flag is lowered after each reload"
    );
    // The clients go on until their 4 s are up: nothing closes their connections any more.
    let report = traffic.finish();
    report.assert_no_failures();
    // Each of the five reloads told the clients to close, not one in five.
    assert_told_to_close_in_each(&reloads, &report, 4);
    supervisor.signal(3);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}

#[test]
fn an_editor_save_by_rename_reloads_once() {
    let site = Site::new();
    let supervisor = Supervisor::start_serving(&site, &["--reload-debounce", "300ms"]);
    let config = std::fs::read_to_string(&site.config).unwrap();
    // What vim and most editors do: write a new file beside the old one, rename it over.
    let temp = site.dir.0.join(".nginx.conf.tmp");
    std::fs::write(&temp, config.replace("\"ok\\n\"", "\"renamed\\n\"")).unwrap();
    std::fs::rename(&temp, &site.config).unwrap();
    supervisor.log.wait_for("the reload", 10 * SECONDS, |l| {
        l.contains("\"reload\":\"confirmed\"")
    });
    assert_eq!(body(&site), "renamed\n".len());
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(confirmed(&supervisor), 1);
}
