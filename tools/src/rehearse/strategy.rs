//! What a pod runs, in the kubelet's terms (entrypoint, preStop hook, stop signal): this
//! project's way, and the recipes in use today, so that one rehearsal can compare them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use nix::sys::signal::Signal;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Preset {
    /// `nginx-graceful run` as the entrypoint, `nginx-graceful drain` as preStop.
    NginxGraceful,
    /// nginx as PID 1; the kubelet's SIGTERM is nginx's fast shutdown.
    Naive,
    /// nginx as PID 1 with SIGQUIT as the stop signal, like the official nginx image.
    StopsignalQuit,
    /// preStop `nginx -s quit`, which returns at once; SIGTERM follows.
    PrestopQuit,
    /// preStop `sleep 3; nginx -s quit; while [ -d /proc/$PID ]; do sleep 0.1; done`.
    PrestopSleepQuitWait,
    /// `tini -- nginx`: a correct PID 1 that forwards SIGTERM to nginx.
    Tini,
    /// --entrypoint, --prestop and --stop-signal from the command line, where @NGINX@ (a word of
    /// its own) is the nginx command, and @CONFIG@, @PID_FILE@ and @POD_DIR@ are the pod's.
    Custom,
}

impl Preset {
    /// Every preset that needs nothing from the command line, in the order a comparison shows.
    pub const COMPARED: [Preset; 6] = [
        Preset::NginxGraceful,
        Preset::Naive,
        Preset::StopsignalQuit,
        Preset::PrestopQuit,
        Preset::PrestopSleepQuitWait,
        Preset::Tini,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::NginxGraceful => "nginx-graceful",
            Preset::Naive => "naive",
            Preset::StopsignalQuit => "stopsignal-quit",
            Preset::PrestopQuit => "prestop-quit",
            Preset::PrestopSleepQuitWait => "prestop-sleep-quit-wait",
            Preset::Tini => "tini",
            Preset::Custom => "custom",
        }
    }
}

/// One row of a comparison: a preset, and for nginx-graceful the flags its `run` gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    pub preset: Preset,
    pub graceful_args: Vec<String>,
    /// The preset's name, followed by the flags when there are any, so that rows differ.
    pub name: &'static str,
    /// The directory of its pods' files, one per variant.
    pub dir: String,
}

/// Each preset once, but nginx-graceful once per `--graceful-args` value (split as a shell
/// would), in the order given.
pub fn variants(presets: &[Preset], graceful_args: &[String]) -> Result<Vec<Variant>, String> {
    if !graceful_args.is_empty() && !presets.contains(&Preset::NginxGraceful) {
        return Err(
            "--graceful-args is for the nginx-graceful strategy: add it to --compare, or leave the flag out"
                .into(),
        );
    }
    let mut variants = Vec::new();
    for &preset in presets {
        let flag_sets = match preset {
            Preset::NginxGraceful if !graceful_args.is_empty() => graceful_args.to_vec(),
            _ => vec![String::new()],
        };
        for (k, flags) in flag_sets.iter().enumerate() {
            let args = shell_words::split(flags).map_err(|e| {
                format!("cannot split --graceful-args `{flags}`: {e}: quote it as a shell would")
            })?;
            let name = match args.is_empty() {
                true => preset.name().to_owned(),
                false => format!("{} {}", preset.name(), shell_words::join(&args)),
            };
            let dir = match k {
                0 => preset.name().to_owned(),
                _ => format!("{}-{}", preset.name(), k + 1),
            };
            variants.push(Variant {
                preset,
                graceful_args: args,
                // A few per run, each alive to its end: leaked, as every report takes a
                // `&'static str` name.
                name: Box::leak(name.into_boxed_str()),
                dir,
            });
        }
    }
    Ok(variants)
}

/// One pod's files and addresses, which every strategy's commands refer to.
#[derive(Debug, Clone)]
pub struct PodFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub pid_file: PathBuf,
    /// Where nginx-graceful serves /healthz and /readyz in this pod.
    pub health: SocketAddr,
    /// The nginx command in the foreground, as every strategy starts it.
    pub nginx: Vec<String>,
    /// The nginx binary alone, for `nginx -s quit`.
    pub nginx_bin: String,
    /// The `-g` directives the nginx command passes, repeated by `nginx -s quit`.
    pub nginx_globals: String,
}

/// The commands from --entrypoint, --prestop and --stop-signal.
#[derive(Debug, Clone, Default)]
pub struct Custom {
    pub entrypoint: Vec<String>,
    pub pre_stop: Option<Vec<String>>,
    pub stop_signal: Option<Signal>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strategy {
    pub name: &'static str,
    pub entrypoint: Vec<String>,
    /// Runs inside the pod's namespaces, as `kubectl exec` would, and is waited for.
    pub pre_stop: Option<Vec<String>>,
    pub stop_signal: Signal,
}

/// The commands of `preset` for the pod described by `pod`; `graceful` is this binary, and
/// `graceful_args` more flags for its `run`.
pub fn strategy(
    preset: Preset,
    pod: &PodFiles,
    graceful: &str,
    graceful_args: &[String],
    grace: Duration,
    custom: &Custom,
) -> Strategy {
    let grace = format!("{}ms", grace.as_millis());
    let dir = pod.dir.to_string_lossy().into_owned();
    let pid_file = pod.pid_file.to_string_lossy().into_owned();
    let config = pod.config.to_string_lossy().into_owned();
    let quit: Vec<String> = vec![
        pod.nginx_bin.clone(),
        "-c".into(),
        config.clone(),
        "-g".into(),
        pod.nginx_globals.clone(),
        "-s".into(),
        "quit".into(),
    ];
    let (entrypoint, pre_stop, stop_signal) = match preset {
        Preset::NginxGraceful => {
            let mut run: Vec<String> = [graceful, "run", "--runtime-dir", &dir, "--grace-period", &grace]
                .map(String::from)
                .into();
            run.extend(["--health-listen".into(), pod.health.to_string()]);
            run.extend(graceful_args.iter().cloned());
            run.push("--".into());
            run.extend(pod.nginx.iter().cloned());
            let drain = [
                graceful,
                "drain",
                "--runtime-dir",
                &dir,
                "--pid-file",
                &pid_file,
                "--grace-period",
                &grace,
            ]
            .map(String::from)
            .into();
            (run, Some(drain), Signal::SIGTERM)
        }
        Preset::Naive => (pod.nginx.clone(), None, Signal::SIGTERM),
        Preset::StopsignalQuit => (pod.nginx.clone(), None, Signal::SIGQUIT),
        Preset::PrestopQuit => (pod.nginx.clone(), Some(quit), Signal::SIGTERM),
        Preset::PrestopSleepQuitWait => {
            let quit = shell_words::join(&quit);
            let script = format!(
                "PID=$(cat {}); sleep 3; {quit}; while [ -d /proc/$PID ]; do sleep 0.1; done",
                shell_words::quote(&pid_file)
            );
            (
                pod.nginx.clone(),
                Some(vec!["sh".into(), "-c".into(), script]),
                Signal::SIGTERM,
            )
        }
        Preset::Tini => {
            let mut tini = vec!["tini".to_owned(), "--".to_owned()];
            tini.extend(pod.nginx.iter().cloned());
            (tini, None, Signal::SIGTERM)
        }
        Preset::Custom => {
            // `@NGINX@` alone becomes the whole nginx command; the others are filled in anywhere.
            let fill = |argv: &Vec<String>| -> Vec<String> {
                argv.iter()
                    .flat_map(|arg| match arg.as_str() {
                        "@NGINX@" => pod.nginx.clone(),
                        _ => vec![
                            arg.replace("@CONFIG@", &config)
                                .replace("@POD_DIR@", &dir)
                                .replace("@PID_FILE@", &pid_file),
                        ],
                    })
                    .collect()
            };
            (
                fill(&custom.entrypoint),
                custom.pre_stop.as_ref().map(fill),
                custom.stop_signal.unwrap_or(Signal::SIGTERM),
            )
        }
    };
    Strategy {
        name: preset.name(),
        entrypoint,
        pre_stop,
        stop_signal,
    }
}

/// A signal by name (`SIGTERM`, `TERM`) or number (`15`).
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let s = s.trim();
    if let Ok(number) = s.parse::<i32>() {
        return Signal::try_from(number).map_err(|_| format!("{number} is not a signal number"));
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    name.parse()
        .map_err(|_| format!("`{s}` is not a signal name like SIGTERM or QUIT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodFiles {
        PodFiles {
            dir: "/r/pod-a".into(),
            config: "/r/pod-a/nginx.conf".into(),
            pid_file: "/r/pod-a/nginx.pid".into(),
            health: "127.0.0.11:9001".parse().unwrap(),
            nginx: ["nginx", "-c", "/r/pod-a/nginx.conf", "-g", "daemon off;"]
                .map(String::from)
                .into(),
            nginx_bin: "nginx".into(),
            nginx_globals: "daemon off;".into(),
        }
    }

    fn of(preset: Preset) -> Strategy {
        strategy(
            preset,
            &pod(),
            "/bin/ng",
            &[],
            Duration::from_secs(30),
            &Custom::default(),
        )
    }

    #[test]
    fn nginx_graceful_supervises_nginx_and_drains_in_the_hook() {
        let s = of(Preset::NginxGraceful);
        assert_eq!(
            s.entrypoint.join(" "),
            "/bin/ng run --runtime-dir /r/pod-a --grace-period 30000ms --health-listen 127.0.0.11:9001 \
             -- nginx -c /r/pod-a/nginx.conf -g daemon off;"
        );
        assert_eq!(
            s.pre_stop.unwrap().join(" "),
            "/bin/ng drain --runtime-dir /r/pod-a --pid-file /r/pod-a/nginx.pid --grace-period 30000ms"
        );
        assert_eq!(s.stop_signal, Signal::SIGTERM);
    }

    #[test]
    fn graceful_args_go_to_run_before_the_nginx_command() {
        let args = ["--unready-at", "start"].map(String::from);
        let s = strategy(
            Preset::NginxGraceful,
            &pod(),
            "/bin/ng",
            &args,
            Duration::from_secs(30),
            &Custom::default(),
        );
        assert_eq!(
            s.entrypoint.join(" "),
            "/bin/ng run --runtime-dir /r/pod-a --grace-period 30000ms --health-listen 127.0.0.11:9001 \
             --unready-at start -- nginx -c /r/pod-a/nginx.conf -g daemon off;"
        );
        assert!(
            !s.pre_stop.unwrap().contains(&args[0]),
            "the drain asks run, which has them"
        );
    }

    #[test]
    fn each_graceful_args_value_is_a_row_named_by_its_flags() {
        let presets = [Preset::NginxGraceful, Preset::Naive];
        let flags = ["", "--unready-at start", "--propagation-delay 5s"].map(String::from);
        let rows = variants(&presets, &flags).unwrap();
        let names: Vec<(&str, &str, Vec<String>)> = rows
            .iter()
            .map(|v| (v.name, v.dir.as_str(), v.graceful_args.clone()))
            .collect();
        let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            names,
            [
                ("nginx-graceful", "nginx-graceful", vec![]),
                (
                    "nginx-graceful --unready-at start",
                    "nginx-graceful-2",
                    words("--unready-at start")
                ),
                (
                    "nginx-graceful --propagation-delay 5s",
                    "nginx-graceful-3",
                    words("--propagation-delay 5s")
                ),
                ("naive", "naive", vec![]),
            ]
        );
        let plain = variants(&presets, &[]).unwrap();
        assert_eq!(
            plain.iter().map(|v| v.name).collect::<Vec<_>>(),
            ["nginx-graceful", "naive"]
        );
        assert!(
            variants(&[Preset::Naive], &flags)
                .unwrap_err()
                .contains("--compare")
        );
        assert!(
            variants(&presets, &["'open".into()])
                .unwrap_err()
                .contains("cannot split")
        );
    }

    #[test]
    fn the_recipes_are_what_people_write() {
        let naive = of(Preset::Naive);
        assert_eq!(
            (naive.entrypoint[0].as_str(), naive.pre_stop, naive.stop_signal),
            ("nginx", None, Signal::SIGTERM)
        );
        assert_eq!(of(Preset::StopsignalQuit).stop_signal, Signal::SIGQUIT);
        assert_eq!(
            of(Preset::PrestopQuit).pre_stop.unwrap().join(" "),
            "nginx -c /r/pod-a/nginx.conf -g daemon off; -s quit"
        );
        let script = of(Preset::PrestopSleepQuitWait).pre_stop.unwrap();
        assert_eq!(
            script[2],
            "PID=$(cat /r/pod-a/nginx.pid); sleep 3; nginx -c /r/pod-a/nginx.conf -g 'daemon off;' -s quit; \
             while [ -d /proc/$PID ]; do sleep 0.1; done"
        );
        assert_eq!(of(Preset::Tini).entrypoint[..3], ["tini", "--", "nginx"]);
    }

    #[test]
    fn custom_commands_get_the_pod_filled_in() {
        let custom = Custom {
            entrypoint: ["dumb-init", "@NGINX@"].map(String::from).into(),
            pre_stop: Some(
                ["sh", "-c", "kill -QUIT $(cat @PID_FILE@)"]
                    .map(String::from)
                    .into(),
            ),
            stop_signal: Some(Signal::SIGINT),
        };
        let s = strategy(Preset::Custom, &pod(), "ng", &[], Duration::from_secs(5), &custom);
        assert_eq!(
            s.entrypoint,
            [
                "dumb-init",
                "nginx",
                "-c",
                "/r/pod-a/nginx.conf",
                "-g",
                "daemon off;"
            ]
        );
        assert_eq!(s.pre_stop.unwrap()[2], "kill -QUIT $(cat /r/pod-a/nginx.pid)");
        assert_eq!(s.stop_signal, Signal::SIGINT);
    }

    #[test]
    fn signals_read_by_name_or_number() {
        assert_eq!(parse_signal("SIGQUIT"), Ok(Signal::SIGQUIT));
        assert_eq!(parse_signal("term"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("9"), Ok(Signal::SIGKILL));
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("99").is_err());
    }
}
