//! The tools' binary: parse the command line, run, and turn the outcome into one exit code.

use clap::Parser;
use nginx_graceful_tools::cli::{Cli, Command};
use nginx_graceful_tools::error::exit;
use nginx_graceful_tools::{rehearse, soak};

fn main() {
    let cli = Cli::parse();
    nginx_graceful::logging::init(false, tracing::Level::INFO);
    // soak's load makes threads of its own; this one waits for it and for the pods.
    let mut builder = tokio::runtime::Builder::new_current_thread();
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("nginx-graceful-tools: cannot start the async runtime: {err}");
            std::process::exit(exit::INTERNAL);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Soak(args) => soak::run(args).await,
            Command::Rehearse(args) => rehearse::run(args).await,
        }
    });
    let code = match result {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(exit_code = err.exit_code(), "{err}");
            err.exit_code()
        }
    };
    std::process::exit(code);
}
