//! The image built and stopped by a real container runtime: podman builds the Dockerfile on a
//! Debian base made here (no registry needed), with the static binary of
//! scripts/build-static.sh (`--build-arg BINARY=prebuilt`), then runs it with the Kubernetes
//! manifest's settings and stops it as a runtime stops a container (`podman stop`: the image's
//! STOPSIGNAL, then SIGKILL). Skipped, with the reason, where podman is not installed.
//!
//! On this kind of machine podman runs with runc, `--network host` and explicit ulimits: the
//! container's ports are loopback ports this test chooses.

use test_support as common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::Value;

use common::http;
use common::{Supervisor, TempDir, Traffic, code};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const SECONDS: Duration = Duration::from_secs(1);

/// Debian's nginx made to look like the official image (uid 101 named nginx, /etc/nginx,
/// mime.types). Kept between runs: making it takes about half a minute. A change to the
/// recipe needs a new tag.
const BASE_IMAGE: &str = "localhost/nginx-graceful-test-base:bookworm-uid101";
const SUITE: &str = "bookworm";

/// The manifest's grace period, given to `podman stop` as its timeout before SIGKILL.
const GRACE_SECS: u32 = 30;
/// The pod's propagation delay in this test (the manifest's adapts; a fixed one keeps it short).
const DELAY: Duration = Duration::from_millis(1500);
/// A download of this many seconds in flight through the drain.
const SLOW_SECS: usize = 3;

/// Limits given explicitly: podman 4.3 cannot apply the defaults it takes from the host here.
const ULIMITS: [&str; 4] = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"];

/// `program`, killed by coreutils' timeout after `limit` (SIGTERM, then SIGKILL 10 s later):
/// a build or a mirror that hangs fails the test instead of holding it.
fn bounded(limit: Duration, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("timeout");
    command
        .args(["--kill-after=10", &format!("{}s", limit.as_secs())])
        .arg(program);
    command
}

/// podman with runc, named: crun, its other runtime, refuses a machine with hybrid cgroups.
/// Two minutes at most: the longest call, the build on a cached base, takes seconds.
fn podman_command() -> Command {
    let mut command = bounded(120 * SECONDS, "podman");
    command.args(["--runtime", "runc"]);
    command
}

/// `podman ARGS`; panics with the end of podman's output when it fails (`build` writes the
/// failing step's words to stdout).
fn podman(args: &[&str]) -> Output {
    let output = podman_command()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("podman {args:?}: {e}"));
    if !output.status.success() {
        let said = [&output.stdout, &output.stderr].map(|o| String::from_utf8_lossy(o).into_owned());
        let lines: Vec<&str> = said.iter().flat_map(|s| s.lines()).collect();
        panic!(
            "podman {args:?} failed:\n{}",
            lines[lines.len().saturating_sub(10)..].join("\n")
        );
    }
    output
}

/// Whether podman is missing, which the test's output then says.
fn skipped_without_podman() -> bool {
    let installed = podman_command()
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("skipped: podman is not installed (scripts/install-deps.sh installs it)");
    }
    !installed
}

/// The base image: made once with mmdebstrap (nginx-light, and the official image's nginx
/// user and group, 101), then imported; later runs find it in podman's storage.
fn base_image() -> &'static str {
    let exists = podman_command()
        .args(["image", "exists", BASE_IMAGE])
        .status()
        .unwrap();
    if exists.success() {
        return BASE_IMAGE;
    }
    let dir = TempDir::new("podman-base");
    let rootfs = dir.0.join("rootfs.tar");
    let started = Instant::now();
    let made = bounded(600 * SECONDS, "mmdebstrap")
        .args([
            "--variant=minbase",
            "--include=nginx-light",
            "--customize-hook=chroot \"$1\" groupadd --system --gid 101 nginx",
            "--customize-hook=chroot \"$1\" useradd --system --uid 101 --gid 101 --no-create-home \
             --home-dir /nonexistent --shell /usr/sbin/nologin nginx",
            SUITE,
        ])
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "mmdebstrap could not make the base image (scripts/install-deps.sh installs it; it \
         needs the Debian mirror): {}",
        String::from_utf8_lossy(&made.stderr).trim()
    );
    podman(&["import", rootfs.to_str().unwrap(), BASE_IMAGE]);
    eprintln!("made {BASE_IMAGE} in {:?}", started.elapsed());
    BASE_IMAGE
}

/// scripts/build-static.sh, into this checkout's target/ where the build context has it.
fn build_static_binary() {
    let output = bounded(1200 * SECONDS, Path::new(REPO).join("scripts/build-static.sh"))
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "scripts/build-static.sh failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let path = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        path.trim(),
        "target/x86_64-unknown-linux-musl/release/nginx-graceful"
    );
}

/// What a test leaves in podman, removed even when it fails: its container (killed at once),
/// then its images' tags (their layers stay cached).
struct Podman {
    container: String,
    images: Vec<String>,
}

impl Podman {
    /// Names no other test process uses, for the test `what`.
    fn named(what: &str) -> Self {
        let id = std::process::id();
        Self {
            container: format!("nginx-graceful-test-{what}-{id}"),
            images: vec![format!("localhost/nginx-graceful-test-{what}:{id}")],
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = podman_command()
            .args(["rm", "--force", "--time", "0", "--ignore", &self.container])
            .output();
        for image in &self.images {
            let _ = podman_command().args(["rmi", "--force", image]).output();
        }
    }
}

/// The base image and the static binary, made once for the tests of this file, which run on
/// threads of their own at once.
fn prepared_base() -> &'static str {
    static BASE: OnceLock<&'static str> = OnceLock::new();
    BASE.get_or_init(|| {
        let started = Instant::now();
        let base = base_image();
        build_static_binary();
        eprintln!("base image and static binary in {:?}", started.elapsed());
        base
    })
}

/// The project's Dockerfile on `base`, with the static binary, tagged `image`.
fn build_image(base: &str, image: &str) {
    let started = Instant::now();
    let nginx_image = format!("NGINX_IMAGE={base}");
    let options = ["--network", "host", "--build-arg", "BINARY=prebuilt"];
    let target = ["--build-arg", &nginx_image, "--tag", image, REPO];
    podman(&[&["build"][..], &ULIMITS, &options, &target].concat());
    eprintln!("{image} built in {:?}", started.elapsed());
}

/// conf.d, mounted read-only as the manifest mounts its ConfigMap: the site on a loopback
/// port of the host's network, and a slow download on another.
fn conf_d(port: u16, slow_port: u16) -> TempDir {
    let dir = TempDir::new("podman-conf-d");
    std::fs::write(
        dir.0.join("default.conf"),
        format!(
            "server {{\n    listen 127.0.0.1:{port};\n    include /etc/nginx/graceful-drain.conf;\n    \
             location / {{ default_type text/plain; return 200 \"ok\\n\"; }}\n}}\n\
             server {{\n    listen 127.0.0.1:{slow_port};\n    include /etc/nginx/graceful-drain.conf;\n    \
             root /etc/nginx/conf.d/slow-site;\n    location /slow/ {{ sendfile off; limit_rate {}; }}\n}}\n",
            common::SLOW_RATE
        ),
    )
    .unwrap();
    let slow = dir.0.join("slow-site/slow");
    std::fs::create_dir_all(&slow).unwrap();
    std::fs::write(
        slow.join("download.bin"),
        vec![b'x'; SLOW_SECS * common::SLOW_RATE],
    )
    .unwrap();
    // Readable by uid 101 whatever the umask.
    for path in [dir.0.clone(), dir.0.join("slow-site"), slow.clone()] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for file in [dir.0.join("default.conf"), slow.join("download.bin")] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    dir
}

fn status_field(pid: i32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A process's pid in the container's PID namespace (the last of NSpid).
fn pid_inside(pid: i32) -> String {
    let ns_pids = status_field(pid, "NSpid");
    ns_pids.rsplit(' ').next().unwrap().to_owned()
}

/// The host's pid of the container's PID 1.
fn container_pid(container: &str) -> i32 {
    let out = podman(&["inspect", "--format", "{{.State.Pid}}", container]);
    String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
}

/// The supervisor's lines in `podman logs` (its stderr; nginx's access log is stdout).
fn logged_events(container: &str) -> Vec<Value> {
    let logs = podman(&["logs", container]);
    let stderr = String::from_utf8(logs.stderr).unwrap();
    stderr
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line in podman logs ({e}): {line}"))
        })
        .collect()
}

#[test]
fn podman_builds_the_image_and_stops_it_without_a_failed_request() {
    if skipped_without_podman() {
        return;
    }
    let podman_state = Podman::named("stop");
    let (container, image) = (podman_state.container.as_str(), podman_state.images[0].as_str());
    build_image(prepared_base(), image);

    let (port, slow_port, health_port) = (common::free_port(), common::free_port(), common::free_port());
    let conf = conf_d(port, slow_port);
    let volume = format!("{}:/etc/nginx/conf.d:ro", conf.0.display());
    let health_listen = format!("NGINX_GRACEFUL_HEALTH_LISTEN=127.0.0.1:{health_port}");
    let grace = format!("NGINX_GRACEFUL_GRACE_PERIOD={GRACE_SECS}");
    let delay = format!("NGINX_GRACEFUL_PROPAGATION_DELAY={}ms", DELAY.as_millis());
    let mut run = podman_command();
    run.args(["run", "--name", container, "--network", "host"])
        .args(ULIMITS)
        // deploy/kubernetes: runAsUser and runAsGroup 101, readOnlyRootFilesystem, every
        // capability dropped, allowPrivilegeEscalation false, the runtime directory a volume
        // of its own. runc gives a tmpfs over a directory of the image that directory's mode
        // and root's ownership: U hands it to the container's user, as an emptyDir's 777 would.
        .args(["--user", "101:101", "--read-only", "--read-only-tmpfs=false"])
        .args(["--tmpfs", "/run/nginx-graceful:rw,U"])
        .args(["--cap-drop", "ALL", "--security-opt", "no-new-privileges"])
        .args(["--volume", &volume])
        .args(["--env", "NGINX_GRACEFUL_LOG_FORMAT=json", "--env", &health_listen])
        .args(["--env", &grace, "--env", &delay])
        .arg(image);
    // Attached: the container's stderr, the supervisor's log, arrives as it is written.
    let mut supervisor = Supervisor::spawn_command(&mut run);
    supervisor.log.wait_phase("serving", 30 * SECONDS);

    let nginx = SocketAddr::from(([127, 0, 0, 1], port));
    let health = SocketAddr::from(([127, 0, 0, 1], health_port));
    common::wait_until("nginx to answer HTTP", 10 * SECONDS, || {
        http::get(nginx, "/").is_ok_and(|r| r.status == StatusCode::OK)
    });
    assert_eq!(http::get(health, "/readyz").unwrap().status, StatusCode::OK);

    // The supervisor is PID 1 of the container, as uid 101 with no capability and no way to
    // gain one, on a read-only root.
    let pid1 = container_pid(container);
    assert_eq!(pid_inside(pid1), "1");
    assert_eq!(status_field(pid1, "Uid"), "101 101 101 101");
    assert_eq!(status_field(pid1, "Gid"), "101 101 101 101");
    assert_eq!(status_field(pid1, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid1, "NoNewPrivs"), "1");
    let mounts = std::fs::read_to_string(format!("/proc/{pid1}/mountinfo")).unwrap();
    let root = mounts.lines().find(|l| l.split(' ').nth(4) == Some("/")).unwrap();
    assert!(
        root.split(' ').nth(5).unwrap().split(',').any(|o| o == "ro"),
        "{root}"
    );
    // nginx wrote its pid where the image's NGINX_GRACEFUL_PID_FILE says.
    let master = supervisor_master(pid1);
    let pid_file =
        std::fs::read_to_string(format!("/proc/{pid1}/root/run/nginx-graceful/nginx.pid")).unwrap();
    assert_eq!(pid_file.trim(), pid_inside(master));

    let slow_site = SocketAddr::from(([127, 0, 0, 1], slow_port));
    let traffic = Traffic::to(nginx)
        .keepalive(8)
        .one_shot()
        .slow_from(slow_site, "/slow/download.bin")
        .start();
    traffic.wait_served(100);
    traffic.wait_slow_in_flight();

    let stopped_at = Instant::now();
    let stop_container = container.to_owned();
    let stop = std::thread::spawn(move || {
        podman_command()
            .args(["stop", "--time", &GRACE_SECS.to_string(), &stop_container])
            .output()
            .unwrap()
    });
    supervisor.log.wait_phase("unready", 5 * SECONDS);
    // Terminating but serving until nginx quits (--unready-at quit, the default).
    assert_eq!(http::get(health, "/readyz").unwrap().status, StatusCode::OK);
    traffic.remove_endpoint_once_unready(&supervisor.log, DELAY);
    let status = supervisor.wait_exit((GRACE_SECS + 10) * SECONDS);
    let stop = stop.join().unwrap();
    let took = stopped_at.elapsed();
    assert!(
        stop.status.success(),
        "podman stop: {}",
        String::from_utf8_lossy(&stop.stderr).trim()
    );
    eprintln!("podman stop took {took:?}");

    // Exit 0 from the supervisor itself, not 137 from the SIGKILL after the timeout.
    assert_eq!(code(status), 0, "{:?}", supervisor.log.lines());
    let exit_code = podman(&["inspect", "--format", "{{.State.ExitCode}}", container]);
    assert_eq!(String::from_utf8(exit_code.stdout).unwrap().trim(), "0");
    let slowest = SLOW_SECS as u32 * SECONDS;
    assert!(
        took >= DELAY && took < DELAY + slowest + 5 * SECONDS,
        "from podman stop to the container's exit: {took:?}"
    );

    let report = traffic.finish();
    report.assert_drained_whole(&supervisor.log, SLOW_SECS);
    let (one_shot, clients) = (&report.one_shot, &report.keepalive);
    assert!(one_shot.ok > 20, "connection-per-request client: {one_shot:?}");
    assert!(
        clients.told_to_close >= 8,
        "every client was told to close: {clients:?}"
    );
    assert_eq!(clients.moved, 8, "every client left the pod: {clients:?}");

    // What an operator reads afterwards: the whole drain, one JSON object a line.
    let events = logged_events(container);
    let phases: Vec<&str> = events.iter().filter_map(|e| e["phase"].as_str()).collect();
    assert_eq!(phases, common::DRAIN_PHASES);
    let summary = events
        .iter()
        .find(|e| e["outcome"].is_string())
        .expect("the drain's summary in podman logs");
    assert_eq!(summary["outcome"], "clean", "{summary}");
    assert_eq!(summary["exit_code"], 0, "{summary}");
}

/// The nginx master: PID 1's child that runs nginx.
fn supervisor_master(pid1: i32) -> i32 {
    let mut master = None;
    common::wait_until("the nginx master", 10 * SECONDS, || {
        master = common::children_of(pid1)
            .into_iter()
            .find(|&pid| common::comm(pid).as_deref() == Some("nginx"));
        master.is_some()
    });
    master.unwrap()
}

#[test]
fn the_dockerfile_builds_on_a_base_whose_user_is_not_root() {
    if skipped_without_podman() {
        return;
    }
    // nginxinc/nginx-unprivileged's way: the base image ends with USER 101.
    let mut podman_state = Podman::named("unprivileged");
    let unprivileged = format!(
        "localhost/nginx-graceful-test-unprivileged-base:{}",
        std::process::id()
    );
    podman_state.images.push(unprivileged.clone());
    let context = TempDir::new("podman-unprivileged");
    std::fs::write(
        context.0.join("Containerfile"),
        format!("FROM {}\nUSER 101\n", prepared_base()),
    )
    .unwrap();
    podman(&[
        "build",
        "--network",
        "host",
        "--tag",
        &unprivileged,
        context.0.to_str().unwrap(),
    ]);

    let image = &podman_state.images[0];
    build_image(&unprivileged, image);
    let user = podman(&["image", "inspect", "--format", "{{.Config.User}}", image]);
    assert_eq!(String::from_utf8(user.stdout).unwrap().trim(), "101:101");
}
