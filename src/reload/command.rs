//! `nginx-graceful reload`: asks the supervisor over its control socket, or reloads directly
//! an nginx found through its pid file.

use super::{Generations, NginxErrors, ReloadReply, ReloadSettings, reload};
use crate::nginx::command::NginxCommand;
use crate::nginx::tree;
use crate::os::reaper::Reaper;

/// nginx's argv, read back from a master's process title (`nginx: master process ARGV`). nginx
/// joined the arguments with spaces; options take one argument each, except that `-g` takes
/// directives that may themselves hold spaces, so it runs to the next option.
pub fn argv_from_title(title: &str) -> Option<Vec<String>> {
    let rest = title.strip_prefix("nginx: master process ")?;
    let mut argv: Vec<String> = Vec::new();
    let mut in_directives = false;
    for token in rest.split_whitespace() {
        let option = ["-c", "-p", "-e", "-g", "-q"].contains(&token);
        if in_directives && !option {
            let last = argv.last_mut().expect("-g came first");
            last.push(' ');
            last.push_str(token);
            continue;
        }
        in_directives = false;
        if token == "-g" {
            argv.push(token.to_owned());
            argv.push(String::new());
            in_directives = true;
            continue;
        }
        argv.push(token.to_owned());
    }
    for arg in argv.iter_mut() {
        *arg = arg.trim().to_owned();
    }
    (!argv.is_empty()).then_some(argv)
}

/// `nginx-graceful reload`: through the supervisor, or directly via the pid file. The reply is
/// read as the supervisor writes it on the control socket.
pub async fn request(args: crate::cli::ReloadArgs) -> Result<i32, crate::error::Error> {
    use crate::error::exit;
    // The supervisor's reload: its config test (bounded), the close window, and its confirmation
    // (bounded by its --reload-timeout; this command's is taken for it).
    let reply_within = crate::nginx::command::CONFIG_TEST_TIMEOUT
        + args.reload.reload_close_window
        + args.reload.reload_timeout;
    let reply = match crate::surfaces::control_client::request_reload(&args.target, reply_within).await? {
        Some(reply) => reply,
        None => direct(&args).await?.to_json(),
    };
    let outcome = reply["outcome"].as_str().unwrap_or("unknown");
    let code = match outcome {
        "reloaded" => exit::OK,
        "invalid" => exit::RELOAD_INVALID,
        "refused" => exit::RELOAD_REFUSED,
        "not_running" => exit::NOT_RUNNING,
        _ => exit::RELOAD_FAILED,
    };
    match outcome {
        "reloaded" => {
            tracing::info!(workers = %reply["workers"], elapsed_ms = reply["elapsed_ms"].as_u64(), "reloaded: new workers {}", reply["workers"])
        }
        _ => tracing::error!(
            outcome,
            exit_code = code,
            "reload {outcome}: {}",
            reply["reason"].as_str().unwrap_or("")
        ),
    }
    Ok(code)
}

/// No supervisor: test with the master's own binary and arguments, SIGHUP, confirm. Without the
/// master's stderr, a rollback shows only as no new generation.
async fn direct(args: &crate::cli::ReloadArgs) -> Result<ReloadReply, crate::error::Error> {
    let target = crate::nginx::configured_pid_file::resolve(&args.target).await;
    let Some(master) = crate::nginx::pidfile::find_master(&target.pid_file)? else {
        return Ok(ReloadReply::NotRunning(format!(
            "no nginx master in {}",
            target.pid_file.display()
        )));
    };
    let pid = master.pidfd.pid();
    let mut argv = argv_from_title(&tree::title(pid)).unwrap_or_else(|| vec!["nginx".into()]);
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
        argv[0] = exe.display().to_string();
    }
    let nginx = NginxCommand::custom(argv.into_iter().map(Into::into).collect());
    let sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        .map_err(crate::error::Error::internal("installing the SIGCHLD handler"))?;
    let reaper = Reaper::start(sigchld);
    let settings = ReloadSettings {
        timeout: args.reload.reload_timeout,
        max_draining_generations: args.reload.max_draining_generations,
        generations: Generations::default(),
        close_window: args.reload.reload_close_window,
        flag: Some(crate::os::drain_flag::DrainFlag::in_dir(&args.target.runtime_dir)),
    };
    let outcome = reload(&nginx, &reaper, &master.pidfd, &NginxErrors::default(), &settings).await;
    Ok(ReloadReply::Done(outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_comes_back_from_the_title() {
        let cases: [(&str, Option<Vec<&str>>); 4] = [
            (
                "nginx: master process nginx -g daemon off;",
                Some(vec!["nginx", "-g", "daemon off;"]),
            ),
            (
                "nginx: master process /usr/sbin/nginx -e stderr -c /x/nginx.conf -g daemon off; pid /run/n.pid;",
                Some(vec![
                    "/usr/sbin/nginx",
                    "-e",
                    "stderr",
                    "-c",
                    "/x/nginx.conf",
                    "-g",
                    "daemon off; pid /run/n.pid;",
                ]),
            ),
            (
                "nginx: master process /usr/sbin/nginx",
                Some(vec!["/usr/sbin/nginx"]),
            ),
            ("nginx: worker process", None),
        ];
        for (title, expected) in cases {
            let expected = expected.map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(argv_from_title(title), expected, "{title}");
        }
    }
}
