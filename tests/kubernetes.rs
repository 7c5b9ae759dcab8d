//! deploy/kubernetes: each overlay renders with kubectl's kustomize, passes the Kubernetes API
//! schemas in strict mode (kubernetes-validate), and keeps the promises a lossless drain rests
//! on. Needs kubectl (kustomize v4.1 or later) and kubernetes-validate: scripts/install-deps.sh.

use test_support as common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{TempDir, bin, code, free_port, http, nginx_path, wait_until};
use hyper::StatusCode;
use serde_json::{Value, json};

/// The schemas the manifests must pass: the oldest Kubernetes the validator knows (1.25: the
/// manifests use nothing newer) and a current one.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];

const RUNTIME_DIR: &str = "/run/nginx-graceful";
const CONF_DIR: &str = "/etc/nginx/conf.d";
const CONFIGMAP: &str = "nginx-conf";
const DRAIN_FLAG: &str = "/run/nginx-graceful/draining";

const NEEDS: &str = "deploy/kubernetes needs kubectl 1.22 or later (kustomize v4.1 or later, for \
    `replacements` and directories in `resources`) and kubernetes-validate; \
    scripts/install-deps.sh installs them or says what to install";

fn overlay(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/kubernetes/overlays")
        .join(name)
}

/// Runs `command` with `input` on stdin; panics with a hint when its program is missing.
fn run(command: &mut Command, input: &[u8]) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}. {NEEDS}"));
    // Written from a thread: a large input must not block while the child fills its stdout.
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `kubectl kustomize` of one overlay, as YAML.
fn render(name: &str) -> String {
    let dir = overlay(name);
    let output = run(Command::new("kubectl").arg("kustomize").arg(&dir), b"");
    if !output.status.success() {
        let version = Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .map(|o| text(&o.stdout))
            .unwrap_or_default();
        panic!(
            "kubectl kustomize {} failed: {}\n{version}\n{NEEDS}",
            dir.display(),
            text(&output.stderr)
        );
    }
    text(&output.stdout)
}

/// YAML documents to JSON, by the PyYAML that kubernetes-validate brings along.
fn objects(yaml: &str) -> Vec<Value> {
    let script = "import sys, json, yaml\n\
                  json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)";
    let output = run(Command::new("python3").args(["-c", script]), yaml.as_bytes());
    assert!(
        output.status.success(),
        "PyYAML: {}\n{NEEDS}",
        text(&output.stderr)
    );
    match serde_json::from_slice(&output.stdout).unwrap() {
        Value::Array(objects) => objects,
        other => panic!("not a list of objects: {other}"),
    }
}

/// kubernetes-validate in strict mode (unknown fields fail) against every version in
/// KUBERNETES_VERSIONS. `Err` holds its report. A kind it has no schema for is only a warning
/// to the tool; here it fails, so that nothing passes unchecked.
fn validate(yaml: &str, expected: &[Value]) -> Result<String, String> {
    // A file: the tool reads its input once per version, and stdin only once.
    let dir = TempDir::new("k8s-validate");
    let file = dir.0.join("objects.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut command = Command::new("python3");
    command.args(["-m", "kubernetes_validate", "--strict"]);
    for version in KUBERNETES_VERSIONS {
        command.args(["-k", version]);
    }
    let output = run(command.arg(&file), b"");
    let report = text(&output.stdout) + &text(&output.stderr);
    if report.contains("No module named kubernetes_validate") {
        panic!("{report}\n{NEEDS}");
    }
    if !output.status.success() || report.lines().any(|l| !l.starts_with("INFO ")) {
        return Err(report);
    }
    for object in expected {
        let resource = format!(
            "{}/{}",
            object["kind"].as_str().unwrap().to_lowercase(),
            object["metadata"]["name"].as_str().unwrap()
        );
        for version in KUBERNETES_VERSIONS {
            let minor = &version[..version.rfind('.').unwrap()];
            let passed = format!("passed for resource {resource} against version {minor}");
            if !report.contains(&passed) {
                return Err(format!("no `{passed}` in:\n{report}"));
            }
        }
    }
    Ok(report)
}

fn the<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected, found {}", found.len());
    found[0]
}

fn container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "one container expected");
    &containers[0]
}

/// The container's environment as the kubelet would set it (every entry here has a value).
fn env(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let value = e["value"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: an environment variable's value must be a string", e["name"]));
            (e["name"].as_str().unwrap().to_owned(), value.to_owned())
        })
        .collect()
}

fn env_var<'a>(env: &'a [(String, String)], name: &str) -> &'a str {
    env.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{name} is not set"))
}

/// The preStop hook's own run, in a container where nginx is already gone: the drain plan is
/// built from the environment and checked against the grace period first (exit 10 when it does
/// not fit), then `drain` finds that nginx has exited (its pid file names a process that is
/// gone) and exits 0. The supervisor builds its plan from the same variables with the same code.
fn prestop_hook(env: &[(String, String)]) -> (i32, String) {
    let dir = TempDir::new("k8s-plan");
    let mut exited = Command::new("true").spawn().unwrap();
    std::fs::write(dir.0.join("nginx.pid"), format!("{}\n", exited.id())).unwrap();
    exited.wait().unwrap();
    let mut hook = Command::new(bin());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("NGINX_GRACEFUL_") {
            hook.env_remove(name);
        }
    }
    hook.envs(env.iter().map(|(n, v)| (n, v)));
    hook.arg("drain")
        .arg("--runtime-dir")
        .arg(dir.0.join("run"))
        .arg("--pid-file")
        .arg(dir.0.join("nginx.pid"));
    let output = hook.output().unwrap();
    (code(output.status), text(&output.stderr))
}

/// What both overlays promise; returns the container's environment.
fn check_common(objects: &[Value]) -> Vec<(String, String)> {
    let deployment = the(objects, "Deployment");
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let nginx = container(deployment);

    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(
        nginx["lifecycle"]["preStop"],
        json!({"exec": {"command": ["nginx-graceful", "drain"]}})
    );

    // One drain budget: the kubelet's and nginx-graceful's.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let env = env(nginx);
    assert_eq!(
        env_var(&env, "NGINX_GRACEFUL_GRACE_PERIOD"),
        grace.to_string(),
        "NGINX_GRACEFUL_GRACE_PERIOD must be terminationGracePeriodSeconds"
    );
    let (status, log) = prestop_hook(&env);
    assert_eq!(status, 0, "the drain plan must fit in {grace}s:\n{log}");
    assert!(log.contains("nothing to drain"), "{log}");
    // The same run with a budget that cannot fit is refused: the check above is a real one.
    let mut tight = env.clone();
    tight.retain(|(n, _)| n != "NGINX_GRACEFUL_GRACE_PERIOD");
    tight.push(("NGINX_GRACEFUL_GRACE_PERIOD".into(), "1".into()));
    let (status, log) = prestop_hook(&tight);
    assert_eq!(status, 10, "a 1s grace period must be refused:\n{log}");
    assert!(log.contains("--grace-period"), "{log}");

    // Probes on the health port, identical in both overlays.
    let ports = nginx["ports"].as_array().unwrap();
    for (name, number) in [("http", 8080), ("health", 8081)] {
        assert!(
            ports
                .iter()
                .any(|p| p["name"] == name && p["containerPort"] == number),
            "port {name} on {number}: {ports:?}"
        );
    }
    let readiness = &nginx["readinessProbe"];
    assert_eq!(readiness["httpGet"], json!({"path": "/readyz", "port": "health"}));
    assert_eq!(readiness["periodSeconds"], 2);
    assert_eq!(
        nginx["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "health"})
    );

    // The ConfigMap: a stable name, mounted as a directory so that its updates arrive.
    let configmap = the(objects, "ConfigMap");
    assert_eq!(configmap["metadata"]["name"], CONFIGMAP, "no hash suffix");
    let default_conf = configmap["data"]["default.conf"].as_str().expect("default.conf");
    assert!(default_conf.contains("listen 8080;"), "{default_conf}");
    assert!(
        default_conf.contains("include /etc/nginx/graceful-drain.conf;"),
        "{default_conf}"
    );
    let volumes = pod["volumes"].as_array().unwrap();
    let volume_for = |path: &str| {
        let mount = nginx["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing is mounted at {path}"));
        assert!(
            mount.get("subPath").is_none(),
            "{path} must not be a subPath mount"
        );
        volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {}", mount["name"]))
    };
    assert_eq!(volume_for(CONF_DIR)["configMap"]["name"], CONFIGMAP);
    assert!(
        volume_for(RUNTIME_DIR).get("emptyDir").is_some(),
        "the runtime directory must be an emptyDir"
    );

    // Non-root, read-only, nothing more than needed.
    let security = |field: &str| {
        let own = &nginx["securityContext"][field];
        if own.is_null() {
            pod["securityContext"][field].clone()
        } else {
            own.clone()
        }
    };
    assert_eq!(security("runAsNonRoot"), true);
    assert_eq!(security("runAsUser"), 101);
    assert_eq!(security("runAsGroup"), 101);
    assert_eq!(security("seccompProfile"), json!({"type": "RuntimeDefault"}));
    assert_eq!(nginx["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(nginx["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(nginx["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    let resources = &nginx["resources"];
    for field in ["/requests/cpu", "/requests/memory", "/limits/memory"] {
        assert!(resources.pointer(field).is_some(), "resources{field}");
    }

    let service = the(objects, "Service");
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "http", "port": 80, "targetPort": "http"}])
    );
    assert_eq!(
        service["spec"]["selector"],
        spec["template"]["metadata"]["labels"]
    );
    assert_eq!(
        spec["selector"]["matchLabels"],
        spec["template"]["metadata"]["labels"]
    );
    env
}

/// Renders, validates and checks one overlay; returns its objects.
fn checked(name: &str) -> Vec<Value> {
    let yaml = render(name);
    let objects = objects(&yaml);
    if let Err(report) = validate(&yaml, &objects) {
        panic!("overlay {name} does not validate:\n{report}");
    }
    check_common(&objects);
    objects
}

#[test]
fn supervisor_overlay_runs_the_image_entrypoint_and_drains_in_prestop() {
    let objects = checked("supervisor");
    let nginx = container(the(&objects, "Deployment"));
    // The image's ENTRYPOINT (nginx-graceful run --) and CMD (nginx) stay as they are.
    assert!(nginx.get("command").is_none(), "{}", nginx["command"]);
    assert!(nginx.get("args").is_none(), "{}", nginx["args"]);
    let data = the(&objects, "ConfigMap")["data"].as_object().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["default.conf"]);
}

#[test]
fn prestop_only_overlay_runs_nginx_as_pid1_and_serves_the_probes_itself() {
    let objects = checked("prestop-only");
    let nginx = container(the(&objects, "Deployment"));
    assert_eq!(nginx["command"], json!(["nginx", "-g", "daemon off;"]));
    assert!(nginx.get("args").is_none(), "{}", nginx["args"]);
    // The patch adds postStart beside the base's preStop, not in its place.
    assert_eq!(
        nginx["lifecycle"]["postStart"]["exec"]["command"],
        json!(["nginx-graceful", "post-start"])
    );
    assert_eq!(
        nginx["lifecycle"]["preStop"]["exec"]["command"],
        json!(["nginx-graceful", "drain"])
    );
    let data = &the(&objects, "ConfigMap")["data"];
    let default_conf = data["default.conf"].as_str().expect("default.conf from the base");
    let health_conf = data["health.conf"].as_str().expect("health.conf");
    serve_probes(default_conf, health_conf);
}

/// The rendered config under a real nginx, paths and ports moved into a temporary directory:
/// it loads, /healthz answers 200, and /readyz follows the drain flag.
fn serve_probes(default_conf: &str, health_conf: &str) {
    let dir = TempDir::new("k8s-nginx");
    let d = dir.0.display().to_string();
    let flag = dir.0.join("draining");
    let (site_port, health_port) = (free_port(), free_port());
    for (conf, needle) in [
        (default_conf, "listen 8080;"),
        (health_conf, "listen 8081;"),
        (health_conf, DRAIN_FLAG),
    ] {
        assert!(conf.contains(needle), "no `{needle}` in:\n{conf}");
    }
    // The snippet is included by the site's server, not loaded beside it: no .conf name.
    let snippet = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/nginx-conf/graceful-drain.conf"
    ))
    .unwrap()
    .replace(DRAIN_FLAG, &flag.display().to_string());
    std::fs::write(dir.0.join("graceful-drain.snippet"), snippet).unwrap();
    let default_conf = default_conf
        .replace("listen 8080;", &format!("listen 127.0.0.1:{site_port};"))
        .replace(
            "/etc/nginx/graceful-drain.conf",
            &format!("{d}/graceful-drain.snippet"),
        );
    let health_conf = health_conf
        .replace("listen 8081;", &format!("listen 127.0.0.1:{health_port};"))
        .replace(DRAIN_FLAG, &flag.display().to_string());
    std::fs::write(dir.0.join("default.conf"), default_conf).unwrap();
    std::fs::write(dir.0.join("health.conf"), health_conf).unwrap();
    // As the image's nginx.conf: the ConfigMap's files inside http {}.
    let config = format!(
        "worker_processes 1;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/cb; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    include {d}/*.conf;
}}
"
    );
    std::fs::write(dir.0.join("nginx.main"), config).unwrap();

    let nginx = Nginx(
        Command::new(nginx_path())
            .args(["-e", "stderr", "-c"])
            .arg(dir.0.join("nginx.main"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let health = std::net::SocketAddr::from(([127, 0, 0, 1], health_port));
    wait_until("nginx serving the probes", Duration::from_secs(5), || {
        http::get(health, "/healthz").is_ok()
    });
    let status = |path: &str| http::get(health, path).map(|r| r.status).unwrap();
    assert_eq!(status("/healthz"), StatusCode::OK);
    assert_eq!(status("/readyz"), StatusCode::OK);
    std::fs::write(&flag, "").unwrap();
    assert_eq!(status("/readyz"), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        status("/healthz"),
        StatusCode::OK,
        "a drain is no reason to restart"
    );
    std::fs::remove_file(&flag).unwrap();
    assert_eq!(status("/readyz"), StatusCode::OK);
    let site = std::net::SocketAddr::from(([127, 0, 0, 1], site_port));
    assert!(http::get(site, "/").is_ok(), "the site's server answers");
    drop(nginx);
}

/// nginx in the foreground, stopped (master and workers) when dropped.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// The validator must reject what the API server would: otherwise the overlay checks above
/// could pass on a validator that checks nothing.
#[test]
fn the_validator_rejects_a_broken_deployment() {
    let yaml = render("supervisor");
    let objects = objects(&yaml);
    let deployment = the(&objects, "Deployment");
    let as_yaml = |object: &Value| serde_json::to_string(object).unwrap();
    validate(&as_yaml(deployment), std::slice::from_ref(deployment))
        .expect("the rendered Deployment alone validates");

    let mut wrong_type = deployment.clone();
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!("thirty");
    let report = validate(&as_yaml(&wrong_type), std::slice::from_ref(&wrong_type))
        .expect_err("a grace period of \"thirty\" must be rejected");
    assert!(report.contains("'thirty' is not of type"), "{report}");

    // preStop beside lifecycle instead of inside it: a schema check that allows unknown fields
    // (the tool without --strict) lets it through, and the pod would run without its drain.
    let mut unknown_field = deployment.clone();
    let nginx = &mut unknown_field["spec"]["template"]["spec"]["containers"][0];
    let hook = nginx["lifecycle"]["preStop"].take();
    nginx.as_object_mut().unwrap().remove("lifecycle");
    nginx["preStop"] = hook;
    let report = validate(&as_yaml(&unknown_field), std::slice::from_ref(&unknown_field))
        .expect_err("an unknown field must be rejected");
    assert!(report.contains("'preStop' was unexpected"), "{report}");
}
