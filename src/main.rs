//! The binary: parse the command line, run, and turn the outcome into one exit code.

use nginx_graceful::cli::{Cli, Command, LogFormat};
use nginx_graceful::error::run_and_exit;
use nginx_graceful::surfaces::status;
use nginx_graceful::{drain_hook, logging, reload, supervisor};

fn main() {
    let cli = Cli::parse_or_exit();
    let source = match &cli.command {
        Command::Run(_) => "supervisor",
        Command::Drain(_) => "drain",
        Command::PostStart(_) => "post-start",
        Command::Reload(_) => "reload",
        Command::Status(_) => "status",
    };
    logging::init(cli.log.log_format == LogFormat::Json, cli.log.log_level, source);
    // One thread: the supervisor waits on signals and pidfds, and a second thread would only
    // add memory and wake-ups.
    run_and_exit("nginx-graceful", async move {
        match cli.command {
            Command::Run(args) => supervisor::run(args).await,
            Command::Drain(args) => drain_hook::drain(args).await,
            Command::PostStart(args) => drain_hook::post_start(args).await,
            Command::Reload(args) => reload::request(args).await,
            Command::Status(args) => status::show(args).await,
        }
    })
}
