//! The tools' binary: parse the command line, run, and turn the outcome into one exit code.

use clap::Parser;
use nginx_graceful::error::run_and_exit;
use nginx_graceful_tools::cli::{Cli, Command};
use nginx_graceful_tools::{rehearse, soak};

fn main() {
    let cli = Cli::parse();
    nginx_graceful::logging::init(false, tracing::Level::INFO, "tools");
    // soak's load makes threads of its own; this one waits for it and for the pods.
    run_and_exit("nginx-graceful-tools", async move {
        match cli.command {
            Command::Soak(args) => soak::run(args).await,
            Command::Rehearse(args) => rehearse::run(*args).await,
        }
    })
}
