//! The binary: parse the command line, run, and turn the outcome into one exit code.

use clap::Parser;
use nginx_graceful::cli::{Cli, Command};
use nginx_graceful::error::exit;
use nginx_graceful::{logging, prestop, rehearse, reload, soak, status, supervisor};

fn main() {
    let cli = Cli::parse();
    logging::init(&cli.log);
    // One thread: the supervisor waits on signals and pidfds, and a second thread would only
    // add memory and wake-ups. (soak's load makes threads of its own.)
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
            Command::Drain(args) => prestop::drain(args).await,
            Command::Reload(args) => reload::command(args).await,
            Command::Soak(args) => soak::command(args).await,
            Command::Status(args) => status::command(args).await,
            Command::Rehearse(args) => rehearse::command(args).await,
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
