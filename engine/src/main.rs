//! The `chinwag` binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use chinwag_engine::node;
use chinwag_engine::ops::config::{Config, ServeArgs};
use chinwag_engine::ops::secret;

#[derive(Parser)]
#[command(
    name = "chinwag",
    version,
    about = "An instant-messaging WebSocket gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a node: WebSocket and HTTP on the client port.
    Serve(ServeArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match Config::load(args, std::env::vars()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("chinwag: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&config.log_level) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("chinwag: log_level: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    // Resolved now so a bad data directory fails at start, not at the first login.
    if let Err(e) = secret::jwt_secret(config.jwt_secret.as_deref(), &config.data_dir) {
        tracing::error!(data_dir = %config.data_dir.display(), error = %e, "cannot set up the JWT secret");
        return ExitCode::FAILURE;
    }
    match node::serve(config) {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "serve failed");
            ExitCode::FAILURE
        }
    }
}
