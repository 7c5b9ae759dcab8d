//! The container image, checked without a container engine. The Dockerfile is parsed: its build
//! context, its stages and the contract of its runtime stage are checked, and the runtime stage
//! is run on this host as a container runtime would run it. The files its COPY instructions
//! place are mounted where they go in a private mount namespace with a read-only root, the
//! runtime directory writable; then ENTRYPOINT + CMD run verbatim, as its USER, with its ENV, as
//! PID 1 of a new PID namespace, in a network namespace of their own.

use test_support as common;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dockerfile_parser::{CopyInstruction, Dockerfile, Instruction, Stage, Stages};
use hyper::StatusCode;
use serde_json::Value;

use common::http;
use common::{Supervisor, TempDir, Traffic, code};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const SECONDS: Duration = Duration::from_secs(1);
const SIGTERM: i32 = 15;

/// The contract the Kubernetes manifests rely on.
const NGINX_PORT: u16 = 8080;
const HEALTH_PORT: u16 = 8081;
const UID: u32 = 101;
const BINARY: &str = "/usr/local/bin/nginx-graceful";
const PID_FILE: &str = "/run/nginx-graceful/nginx.pid";
const RUNTIME_DIR: &str = "/run/nginx-graceful";
/// `--build-arg BINARY=prebuilt`: the stage that takes the binary scripts/build-static.sh made.
const PREBUILT_STAGE: &str = "prebuilt";
const STATIC_BINARY: &str = "target/x86_64-unknown-linux-musl/release/nginx-graceful";

/// The pod's propagation delay in the drain test.
const DELAY: Duration = Duration::from_millis(1500);
/// A second site the drain test adds, with a download of this many seconds.
const SLOW_PORT: u16 = 8082;
const SLOW_SECS: usize = 3;

/// The PATH a container runtime gives a process when the image sets none of its own; the
/// official nginx image keeps it.
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn dockerfile() -> Dockerfile {
    let text = std::fs::read_to_string(Path::new(REPO).join("Dockerfile")).unwrap();
    Dockerfile::parse(&text).unwrap_or_else(|e| panic!("the Dockerfile does not parse: {e}"))
}

/// The arguments of the last `name` instruction in the stage (the one in force), trimmed.
fn last(stage: &Stage, name: &str) -> Option<String> {
    stage.instructions.iter().rev().find_map(|ins| match ins {
        Instruction::Misc(m) if m.instruction.content.eq_ignore_ascii_case(name) => {
            Some(m.arguments.to_string().trim().to_owned())
        }
        _ => None,
    })
}

/// ENTRYPOINT or CMD in exec form: in shell form, `sh -c` would be PID 1 and keep the signals.
fn exec_form(stage: &Stage, name: &str) -> Vec<String> {
    let array = stage.instructions.iter().rev().find_map(|ins| match (ins, name) {
        (Instruction::Entrypoint(e), "ENTRYPOINT") => Some(e.as_exec().expect("ENTRYPOINT in exec form")),
        (Instruction::Cmd(c), "CMD") => Some(c.as_exec().expect("CMD in exec form")),
        _ => None,
    });
    let array = array.unwrap_or_else(|| panic!("no {name} in the runtime stage"));
    array.as_str_vec().into_iter().map(str::to_owned).collect()
}

fn env(stage: &Stage) -> Vec<(String, String)> {
    stage
        .instructions
        .iter()
        .filter_map(|ins| match ins {
            Instruction::Env(e) => Some(e),
            _ => None,
        })
        .flat_map(|e| {
            e.vars
                .iter()
                .map(|v| (v.key.content.clone(), v.value.to_string()))
        })
        .collect()
}

/// USER as uid and gid; a bare uid takes its group from the image's /etc/passwd, where the
/// official image's nginx user (101) has group 101.
fn user(stage: &Stage) -> (u32, u32) {
    let user = last(stage, "USER").expect("a USER in the runtime stage");
    let (uid, gid) = user.split_once(':').unwrap_or((&user, &user));
    let number = |s: &str| -> u32 {
        s.parse()
            .unwrap_or_else(|_| panic!("USER {user} is not numeric: runAsNonRoot cannot check a name"))
    };
    (number(uid), number(gid))
}

/// The stage `name` stands for: a stage that is only `FROM ${ARG}` is the stage the ARG's
/// default names (BINARY=build), as a builder resolves it when no --build-arg is given.
fn stage_named<'a>(dockerfile: &'a Dockerfile, stages: &'a Stages<'a>, name: &str) -> &'a Stage<'a> {
    let stage = stages
        .get(name)
        .unwrap_or_else(|| panic!("COPY --from={name}: no such stage"));
    let Instruction::From(from) = stage.instructions[0] else {
        panic!("a stage starts with FROM")
    };
    let Some(arg) = from
        .image
        .content
        .strip_prefix("${")
        .and_then(|rest| rest.strip_suffix('}'))
    else {
        return stage;
    };
    assert_eq!(
        stage.instructions.len(),
        1,
        "FROM ${{{arg}}} AS {name} has no instructions of its own"
    );
    let default = dockerfile
        .get_global_arg(arg)
        .and_then(|a| a.value.as_ref())
        .unwrap_or_else(|| panic!("FROM ${{{arg}}}: no global ARG {arg} with a default"));
    stages
        .get(&default.content)
        .unwrap_or_else(|| panic!("ARG {arg}={}: no such stage", default.content))
}

fn flag<'a>(copy: &'a CopyInstruction, name: &str) -> Option<&'a str> {
    copy.flags
        .iter()
        .find(|f| f.name.content == name)
        .map(|f| f.value.content.as_str())
}

/// Each COPY of the stage with the WORKDIR in force there, against which a relative destination
/// resolves.
fn copies<'a>(stage: &Stage<'a>) -> Vec<(&'a CopyInstruction, PathBuf)> {
    let mut workdir = PathBuf::from("/");
    let mut found = Vec::new();
    for &ins in &stage.instructions {
        match ins {
            Instruction::Copy(copy) => found.push((copy, workdir.clone())),
            Instruction::Misc(m) if m.instruction.content.eq_ignore_ascii_case("WORKDIR") => {
                workdir = normalize(&workdir.join(m.arguments.to_string().trim()));
            }
            _ => {}
        }
    }
    found
}

fn workdir(stage: &Stage) -> PathBuf {
    last(stage, "WORKDIR").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

/// The runs of the stage, as the shell gets them.
fn runs(stage: &Stage) -> Vec<String> {
    stage
        .instructions
        .iter()
        .filter_map(|ins| match ins {
            Instruction::Run(r) => Some(
                r.as_shell()
                    .map_or_else(|| r.as_exec().unwrap().as_str_vec().join(" "), |s| s.to_string()),
            ),
            _ => None,
        })
        .collect()
}

/// The files a COPY from the build context places: (file in the repository, path in the image).
/// A directory source copies its contents; a destination that ends in `/`, or several sources,
/// name a directory.
fn placed(copy: &CopyInstruction, workdir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let target = &copy.destination.content;
    let dest = normalize(&workdir.join(target));
    let into_dir = target.ends_with('/') || copy.sources.len() > 1;
    let mut files = Vec::new();
    for source in &copy.sources {
        let src = Path::new(REPO).join(&source.content);
        if src.is_dir() {
            for file in files_under(&src) {
                let inside = file.strip_prefix(&src).unwrap().to_owned();
                files.push((file, dest.join(inside)));
            }
        } else if into_dir {
            files.push((src.clone(), dest.join(src.file_name().unwrap())));
        } else {
            files.push((src, dest.clone()));
        }
    }
    files
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// `.` and `..` resolved by name, as the builder resolves destinations.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            part => out.push(part),
        }
    }
    out
}

/// .dockerignore as the builder reads it: one pattern a line, `#` comments, `!` an exception,
/// `*` and `?` within a path element, `**` any number of elements; the last pattern that matches
/// a path or one of its parent directories decides.
struct DockerIgnore(Vec<(bool, Vec<String>)>);

impl DockerIgnore {
    fn load() -> Self {
        let text = std::fs::read_to_string(Path::new(REPO).join(".dockerignore")).unwrap();
        let patterns = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|line| {
                assert!(
                    !line.contains(['[', '\\']),
                    "{line}: character classes and escapes are not read here"
                );
                let (exception, pattern) = match line.strip_prefix('!') {
                    Some(rest) => (true, rest.trim()),
                    None => (false, line),
                };
                let parts = pattern
                    .split('/')
                    .filter(|p| !p.is_empty() && *p != ".")
                    .map(str::to_owned)
                    .collect();
                (exception, parts)
            })
            .collect();
        Self(patterns)
    }

    /// Whether the builder leaves `path` (relative to the context) out of the context.
    fn excludes(&self, path: &Path) -> bool {
        let parts: Vec<&str> = path.iter().map(|p| p.to_str().unwrap()).collect();
        let mut excluded = false;
        for (exception, pattern) in &self.0 {
            if (1..=parts.len()).any(|n| elements_match(pattern, &parts[..n])) {
                excluded = !exception;
            }
        }
        excluded
    }
}

fn elements_match(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| elements_match(rest, &path[skip..]))
        }
        Some((first, rest)) => {
            !path.is_empty() && glob(first.as_bytes(), path[0].as_bytes()) && elements_match(rest, &path[1..])
        }
    }
}

fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (None, _) => name.is_empty(),
        (Some((b'*', rest)), _) => (0..=name.len()).any(|skip| glob(rest, &name[skip..])),
        (Some((b'?', rest)), Some((_, name_rest))) => glob(rest, name_rest),
        (Some((p, rest)), Some((n, name_rest))) => p == n && glob(rest, name_rest),
        (Some(_), None) => false,
    }
}

#[test]
fn every_copy_has_its_sources_in_the_build_context_and_copies_from_an_earlier_stage() {
    let dockerfile = dockerfile();
    let stages = dockerfile.stages();
    let ignore = DockerIgnore::load();
    // The matcher reads the file as intended: the big directories stay out, the sources in.
    assert!(ignore.excludes(Path::new("target/debug/nginx-graceful")));
    assert!(ignore.excludes(Path::new(".git/HEAD")));
    assert!(!ignore.excludes(Path::new("src/main.rs")));

    let mut from_context = 0;
    for stage in stages.iter() {
        for (copy, _) in copies(stage) {
            if let Some(from) = flag(copy, "from") {
                let source = stages
                    .get(from)
                    .unwrap_or_else(|| panic!("COPY --from={from}: no such stage"));
                assert!(
                    source.index < stage.index,
                    "COPY --from={from} in stage {}: a stage defined earlier",
                    stage.index
                );
                continue;
            }
            for source in &copy.sources {
                let source = &source.content;
                assert!(
                    !source.contains(['*', '?', '[']),
                    "{source}: wildcards are not checked here"
                );
                let path = Path::new(REPO).join(source);
                if stage.name.as_deref() == Some(PREBUILT_STAGE) && !path.exists() {
                    // Made by scripts/build-static.sh: it must reach the context once made.
                    let inside = Path::new(source);
                    assert!(
                        !ignore.excludes(inside),
                        "COPY {source}: .dockerignore leaves it out"
                    );
                    continue;
                }
                assert!(path.exists(), "COPY {source}: not in the repository");
                let files = if path.is_dir() {
                    files_under(&path)
                } else {
                    vec![path]
                };
                for file in files {
                    let inside = file.strip_prefix(REPO).unwrap();
                    assert!(
                        !ignore.excludes(inside),
                        "COPY {source}: .dockerignore leaves {} out of the build context",
                        inside.display()
                    );
                    from_context += 1;
                }
            }
        }
    }
    assert!(from_context > 10, "{from_context} files copied from the context");
}

#[test]
fn the_build_stage_copies_every_file_cargo_reads() {
    let dockerfile = dockerfile();
    let stages = dockerfile.stages();
    let runtime = stages.iter().last().unwrap();
    let (binary, build) = copies(runtime)
        .into_iter()
        .find_map(|(copy, _)| {
            let stage = stage_named(&dockerfile, &stages, flag(copy, "from")?);
            Some((copy.sources[0].content.clone(), stage))
        })
        .expect("the runtime stage copies the binary from a build stage");

    let mut in_build = BTreeSet::new();
    for (copy, workdir) in copies(build) {
        assert!(
            flag(copy, "from").is_none(),
            "the build stage copies from the context only"
        );
        in_build.extend(placed(copy, &workdir).into_iter().map(|(_, dest)| dest));
    }
    let root = workdir(build);
    for file in ["Cargo.toml", "Cargo.lock"] {
        assert!(
            in_build.contains(&root.join(file)),
            "{file} in {}",
            root.display()
        );
    }

    // Every target cargo resolves before it builds, in every member of the workspace: the
    // libraries, the binaries and the benches (cargo refuses to start when one has no file).
    let metadata = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(Path::new(REPO).join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        metadata.status.success(),
        "{}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let metadata: Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let mut targets = 0;
    let packages = metadata["packages"].as_array().unwrap();
    assert!(packages.len() >= 3, "the workspace's members: {}", packages.len());
    for package in packages {
        let manifest = Path::new(package["manifest_path"].as_str().unwrap());
        let inside = manifest.strip_prefix(REPO).unwrap();
        assert!(
            in_build.contains(&root.join(inside)),
            "{} is not copied into the build stage: cargo cannot load the workspace",
            inside.display()
        );
    }
    let all_targets = packages.iter().flat_map(|p| p["targets"].as_array().unwrap());
    for target in all_targets {
        let kinds = target["kind"].as_array().unwrap();
        if !kinds
            .iter()
            .any(|k| ["lib", "bin", "bench", "custom-build"].contains(&k.as_str().unwrap()))
        {
            continue;
        }
        let source = Path::new(target["src_path"].as_str().unwrap());
        let inside = source.strip_prefix(REPO).unwrap();
        assert!(
            in_build.contains(&root.join(inside)),
            "{kinds:?} target {}: {} is not copied into the build stage",
            target["name"],
            inside.display()
        );
        targets += 1;
    }
    assert!(targets >= 3, "{targets} targets");

    // And every file the sources embed (include_str!, include_bytes!), resolved from the
    // source file's place in the build stage.
    let mut embedded = 0;
    for (copy, workdir) in copies(build) {
        for (file, dest) in placed(copy, &workdir) {
            if file.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            for mac in ["include_str!(\"", "include_bytes!(\""] {
                for (at, _) in text.match_indices(mac) {
                    let rest = &text[at + mac.len()..];
                    let name = &rest[..rest.find('"').unwrap()];
                    let needed = normalize(&dest.parent().unwrap().join(name));
                    assert!(
                        in_build.contains(&needed),
                        "{} embeds {name}: {} is not in the build stage",
                        file.display(),
                        needed.display()
                    );
                    embedded += 1;
                }
            }
        }
    }
    assert!(embedded >= 3, "{embedded} embedded files");

    let build_runs = runs(build).join("\n");
    assert!(
        build_runs.contains("cargo build --release --locked -p nginx-graceful"),
        "a release build of the supervisor alone, with the lock file: {build_runs}"
    );
    assert!(
        !build_runs.contains("gcc"),
        "the supervisor compiles no C: {build_runs}"
    );
    assert!(
        build_runs.contains(&binary),
        "the build stage makes {binary}, the file the runtime stage copies: {build_runs}"
    );
}

#[test]
fn build_arg_binary_prebuilt_takes_the_static_binary_of_build_static_sh() {
    let dockerfile = dockerfile();
    let stages = dockerfile.stages();
    let runtime = stages.iter().last().unwrap();
    let (from, binary) = copies(runtime)
        .into_iter()
        .find_map(|(copy, _)| Some((flag(copy, "from")?, copy.sources[0].content.clone())))
        .expect("the runtime stage copies the binary from a stage");
    assert_eq!(
        stage_named(&dockerfile, &stages, from).name.as_deref(),
        Some("build")
    );

    let prebuilt = stages.get(PREBUILT_STAGE).expect("a stage named prebuilt");
    let placed: Vec<_> = copies(prebuilt)
        .into_iter()
        .flat_map(|(copy, workdir)| placed(copy, &workdir))
        .collect();
    let script = std::fs::read_to_string(Path::new(REPO).join("scripts/build-static.sh")).unwrap();
    assert!(
        script.contains("x86_64-unknown-linux-musl")
            && STATIC_BINARY.contains("x86_64-unknown-linux-musl/release/"),
        "{STATIC_BINARY}: where scripts/build-static.sh builds"
    );
    assert_eq!(
        placed,
        [(Path::new(REPO).join(STATIC_BINARY), PathBuf::from(&binary))],
        "the prebuilt stage puts scripts/build-static.sh's binary where the runtime stage takes it"
    );
    assert!(!DockerIgnore::load().excludes(Path::new(STATIC_BINARY)));
}

#[test]
fn the_runtime_stage_keeps_the_contract_the_manifests_rely_on() {
    let dockerfile = dockerfile();
    let stages = dockerfile.stages();
    let runtime = stages.iter().last().unwrap();

    assert_eq!(exec_form(runtime, "ENTRYPOINT"), ["nginx-graceful", "run", "--"]);
    assert_eq!(exec_form(runtime, "CMD"), ["nginx", "-g", "daemon off;"]);
    assert_eq!(last(runtime, "STOPSIGNAL").as_deref(), Some("SIGTERM"));
    assert_eq!(user(runtime), (UID, UID));
    let exposed = last(runtime, "EXPOSE").expect("EXPOSE");
    let exposed: Vec<&str> = exposed.split_whitespace().collect();
    for port in [NGINX_PORT, HEALTH_PORT] {
        assert!(
            exposed.contains(&port.to_string().as_str()),
            "EXPOSE {port}: {exposed:?}"
        );
    }

    // The official image by default, replaceable with --build-arg NGINX_IMAGE.
    let Instruction::From(from) = runtime.instructions[0] else {
        panic!("a stage starts with FROM")
    };
    assert_eq!(from.image.content, "${NGINX_IMAGE}");
    let default = dockerfile
        .get_global_arg("NGINX_IMAGE")
        .expect("a global ARG NGINX_IMAGE");
    assert_eq!(
        default.value.as_ref().map(|v| v.content.as_str()),
        Some("nginx:stable")
    );

    let env = env(runtime);
    assert!(
        env.contains(&("NGINX_GRACEFUL_PID_FILE".into(), PID_FILE.into())),
        "{env:?}"
    );
    // The snippet tests <runtime-dir>/draining with the default directory.
    assert!(
        env.iter()
            .all(|(k, v)| k != "NGINX_GRACEFUL_RUNTIME_DIR" || v == RUNTIME_DIR),
        "{env:?}"
    );
    assert!(
        runs(runtime)
            .iter()
            .any(|r| r.contains(&format!("install -d -o {UID} -g {UID} -m 755 {RUNTIME_DIR}"))),
        "the image has {RUNTIME_DIR}, owned by its user: {:?}",
        runs(runtime)
    );

    let destinations: Vec<PathBuf> = copies(runtime)
        .into_iter()
        .flat_map(|(copy, workdir)| match flag(copy, "from") {
            Some(_) => vec![normalize(&workdir.join(&copy.destination.content))],
            None => placed(copy, &workdir).into_iter().map(|(_, dest)| dest).collect(),
        })
        .collect();
    for path in [
        BINARY,
        "/etc/nginx/nginx.conf",
        "/etc/nginx/conf.d/default.conf",
        "/etc/nginx/graceful-drain.conf",
    ] {
        assert!(
            destinations.contains(&PathBuf::from(path)),
            "{path} in the image: {destinations:?}"
        );
    }
}

/// A network namespace, entered by threads of this process to reach what listens in it.
struct NetNs(File);

impl NetNs {
    fn of(pid: i32) -> Self {
        Self(File::open(format!("/proc/{pid}/ns/net")).unwrap())
    }

    /// Runs `f` on a thread inside the namespace; threads it starts are inside too.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.0.try_clone().unwrap();
        let thread = std::thread::spawn(move || {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// The fields of a /proc/PID/status line, like `Uid:` or `NSpid:`.
fn status_field(pid: i32, name: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
    line.split_whitespace().map(str::to_owned).collect()
}

/// What the container runtime does before it starts the image's process. Arguments: the
/// directory to mount on /etc/nginx, the binary, the uid and gid, then ENTRYPOINT + CMD.
const SETUP: &str = r#"set -eu
etc=$1 bin=$2 uid=$3 gid=$4
shift 4
# /etc/nginx as the image has it, read-only like a ConfigMap.
mount --bind "$etc" /etc/nginx
mount -o remount,bind,ro /etc/nginx
# The binary at the path the image has it (a bind mount needs a file to cover).
if [ ! -e /usr/local/bin/nginx-graceful ]; then
    mount -t tmpfs -o mode=755 tmpfs /usr/local/bin
    : > /usr/local/bin/nginx-graceful
fi
mount --bind "$bin" /usr/local/bin/nginx-graceful
# A /run of our own with the image's runtime directory, owned by its user; the host's /run is
# not touched. The rest of the root filesystem is read-only, as with readOnlyRootFilesystem and
# an emptyDir on the runtime directory.
mount -t tmpfs -o mode=755 tmpfs /run
install -d -o "$uid" -g "$gid" -m 755 /run/nginx-graceful
mount -o remount,bind,ro /
ip link set lo up
# A container runtime hands the container's stdout to its user (runc chowns its stdio), so
# that nginx, opening /dev/stdout for its access log as that user, can.
exec 1>&2
chown "$uid:$gid" /proc/self/fd/1
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"
"#;

#[test]
fn the_image_runs_as_its_user_serves_and_drains_without_a_failed_request() {
    let dockerfile = dockerfile();
    let stages = dockerfile.stages();
    let runtime = stages.iter().last().unwrap();
    let (uid, gid) = user(runtime);
    let mut argv = exec_form(runtime, "ENTRYPOINT");
    argv.extend(exec_form(runtime, "CMD"));

    // /etc/nginx as the image has it: what the base image has and the image's nginx.conf
    // includes (mime.types; Debian's nginx ships it too), then every COPY from the context.
    let etc = TempDir::new("image-etc");
    std::fs::copy("/etc/nginx/mime.types", etc.0.join("mime.types")).unwrap();
    for (copy, workdir) in copies(runtime) {
        if flag(copy, "from").is_some() {
            // The build stage's binary: this test's build of it.
            assert_eq!(copy.destination.content, BINARY);
            continue;
        }
        for (file, dest) in placed(copy, &workdir) {
            let inside = dest
                .strip_prefix("/etc/nginx")
                .unwrap_or_else(|_| panic!("{}: only /etc/nginx is laid out here", dest.display()));
            let target = etc.0.join(inside);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::copy(&file, &target).unwrap();
        }
    }
    // A second site beside the image's, as a ConfigMap on /etc/nginx/conf.d adds one: a
    // download slow enough to be in flight across SIGQUIT (without sendfile, the rate holds
    // from the first second, as on the tests' own sites).
    std::fs::write(
        etc.0.join("conf.d/slow.conf"),
        format!(
            "server {{\n    listen {SLOW_PORT};\n    include /etc/nginx/graceful-drain.conf;\n    \
             root /etc/nginx/slow-site;\n    location /slow/ {{ sendfile off; limit_rate {}; }}\n}}\n",
            common::SLOW_RATE
        ),
    )
    .unwrap();
    std::fs::create_dir_all(etc.0.join("slow-site/slow")).unwrap();
    std::fs::write(
        etc.0.join("slow-site/slow/download.bin"),
        vec![b'x'; SLOW_SECS * common::SLOW_RATE],
    )
    .unwrap();
    // Readable by the image's user whatever this checkout's umask was.
    for file in files_under(&etc.0) {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut dir = file.parent().unwrap();
        while dir.starts_with(&etc.0) {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            dir = dir.parent().unwrap();
        }
    }

    let mut command = Command::new("unshare");
    command
        .args([
            "--mount",
            "--propagation=private",
            "--pid",
            "--fork",
            "--mount-proc",
            "--net",
            "--kill-child=SIGKILL",
            "sh",
            "-c",
            SETUP,
            "sh",
        ])
        .arg(&etc.0)
        .arg(common::bin())
        .args([uid.to_string(), gid.to_string()])
        .args(&argv)
        .env_clear()
        .env("PATH", CONTAINER_PATH)
        .envs(env(runtime))
        // The pod's env: JSON logs to read events from, a short delay to keep the test short
        // (the endpoint removal half a second into it, a second before SIGQUIT).
        .env("NGINX_GRACEFUL_LOG_FORMAT", "json")
        .env("NGINX_GRACEFUL_PROPAGATION_DELAY", "1500ms");
    let mut supervisor = Supervisor::spawn_command(&mut command);
    let started = supervisor.log.wait_phase("starting", 10 * SECONDS);
    assert_eq!(started["role"], "Pid1", "{started}");
    // unshare's one child: the shell that became setpriv and then the ENTRYPOINT.
    let below_unshare = common::children_of(supervisor.pid);
    assert_eq!(below_unshare.len(), 1, "{below_unshare:?}");
    supervisor.pid = below_unshare[0];
    assert_eq!(status_field(supervisor.pid, "NSpid").last().unwrap(), "1");
    let netns = NetNs::of(supervisor.pid);

    supervisor.log.wait_phase("serving", 10 * SECONDS);
    let nginx = std::net::SocketAddr::from(([127, 0, 0, 1], NGINX_PORT));
    let health = std::net::SocketAddr::from(([127, 0, 0, 1], HEALTH_PORT));
    netns.run(move || {
        common::wait_until("nginx to answer HTTP", 10 * SECONDS, || {
            http::get(nginx, "/").is_ok_and(|r| r.status == StatusCode::OK)
        })
    });
    let (healthz, readyz) = netns.run(move || (http::get(health, "/healthz"), http::get(health, "/readyz")));
    assert_eq!(healthz.unwrap().status, StatusCode::OK);
    assert_eq!(readyz.unwrap().status, StatusCode::OK);

    // Everything runs as the image's user: the supervisor, the master and its workers.
    let master = supervisor.master();
    common::wait_until("the workers", 5 * SECONDS, || {
        !common::children_of(master).is_empty()
    });
    let nginx_pids: Vec<i32> = [master].into_iter().chain(common::children_of(master)).collect();
    for &pid in [supervisor.pid].iter().chain(&nginx_pids) {
        let ids = [status_field(pid, "Uid"), status_field(pid, "Gid")];
        assert_eq!(
            ids,
            [vec![uid.to_string(); 4], vec![gid.to_string(); 4]],
            "{pid} ({:?})",
            common::comm(pid)
        );
    }
    // nginx wrote its pid where the image's ENV tells `drain` and `reload` to look.
    let pid_file = std::fs::read_to_string(format!("/proc/{}/root{PID_FILE}", supervisor.pid))
        .unwrap_or_else(|e| panic!("{PID_FILE}, the image's NGINX_GRACEFUL_PID_FILE: {e}"));
    assert_eq!(
        pid_file.trim(),
        status_field(master, "NSpid").last().unwrap().as_str()
    );

    // Started inside the pod's network namespace: their threads stay in it.
    let slow_site = std::net::SocketAddr::from(([127, 0, 0, 1], SLOW_PORT));
    let traffic = netns.run(move || {
        Traffic::to(nginx)
            .keepalive(8)
            .one_shot()
            .slow_from(slow_site, "/slow/download.bin")
            .start()
    });
    traffic.wait_served(100);
    traffic.wait_slow_in_flight();

    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("unready", 2 * SECONDS);
    // Terminating but serving until nginx quits (--unready-at quit, the default).
    let readyz = netns.run(move || http::get(health, "/readyz"));
    assert_eq!(readyz.unwrap().status, StatusCode::OK);
    // The endpoint removal reaches the Service within the propagation delay.
    traffic.remove_endpoint_once_unready(&supervisor.log, DELAY);
    let status = supervisor.wait_exit(15 * SECONDS);
    let took = signalled.elapsed();

    assert_eq!(code(status), 0, "{:?}", supervisor.log.lines());
    assert_eq!(supervisor.log.phases(), common::DRAIN_PHASES);
    let slowest = SLOW_SECS as u32 * SECONDS;
    supervisor.log.assert_drain_under_load(DELAY, slowest);
    assert!(
        took >= DELAY && took <= DELAY + slowest + SECONDS,
        "from SIGTERM to the exit of PID 1: {took:?}"
    );
    assert!(common::all_exited(&nginx_pids), "nginx outlived the supervisor");

    let report = traffic.finish();
    report.assert_drained_whole(&supervisor.log, SLOW_SECS);
    let (one_shot, clients) = (&report.one_shot, &report.keepalive);
    assert!(one_shot.ok > 20, "connection-per-request client: {one_shot:?}");
    assert!(clients.ok > 100, "{clients:?}");
    // The snippet at the image's path saw the drain flag in the default runtime directory.
    assert!(
        clients.told_to_close >= 8,
        "every client was told to close: {clients:?}"
    );
    assert_eq!(clients.moved, 8, "every client left the pod: {clients:?}");
    // The access log reached stdout.
    assert!(
        supervisor.log.contains("\"GET / HTTP/1.1\" 200"),
        "no access log line on stdout"
    );
}
