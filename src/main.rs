//! The binary: parse the command line, run, and turn the outcome into one exit code.

use clap::Parser;
use nginx_graceful::cli::{Cli, Command, LogFormat};
use nginx_graceful::error::exit;
use nginx_graceful::surfaces::status;
use nginx_graceful::{drain_hook, logging, reload, supervisor};

fn main() {
    let cli = Cli::parse();
    logging::init(cli.log.log_format == LogFormat::Json, cli.log.log_level);
    // One thread: the supervisor waits on signals and pidfds, and a second thread would only
    // add memory and wake-ups.
    let mut builder = tokio::runtime::Builder::new_current_thread();
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("nginx-graceful: cannot start the async runtime: {err}");
            std::process::exit(exit::INTERNAL);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => supervisor::run(args).await,
            Command::Drain(args) => drain_hook::drain(args).await,
            Command::Reload(args) => reload::request(args).await,
            Command::Status(args) => status::show(args).await,
        }
    });
    let code = match result {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(exit_code = err.exit_code(), "{err}");
            err.exit_code()
        }
    };
    // Exit without dropping the runtime: tasks still parked on sockets have nothing left to do.
    std::process::exit(code);
}
