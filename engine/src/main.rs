//! The `chinwag` binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use chinwag_protocol::{token, ShopId, Uid, UidKind};
use clap::{Parser, Subcommand};

use chinwag_engine::node;
use chinwag_engine::operator::config::{Config, ServeArgs};
use chinwag_engine::operator::secret;

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
    Serve(Box<ServeArgs>),
    /// Print a login token (JWT, HS256) for a user, to try the gateway out or drive load tests.
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The gateway's secret (`--jwt-secret`, or the `jwt-secret` file in its data directory).
    #[arg(long, env = "CHINWAG_JWT_SECRET")]
    secret: String,
    /// The user, as KIND:ID (kind: buyer, wechat, agent, service).
    #[arg(long)]
    uid: Uid,
    /// The shop an agent works for (required for agents).
    #[arg(long)]
    shop: Option<u64>,
    /// How long the token is valid, in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl: u64,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(*args),
        Command::Token(args) => mint_token(args),
    }
}

fn mint_token(args: TokenArgs) -> ExitCode {
    if args.uid.kind == UidKind::Agent && args.shop.is_none() {
        eprintln!("chinwag: an agent's token needs --shop");
        return ExitCode::from(2);
    }
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = token::Claims {
        uid: args.uid,
        shop: args.shop.map(ShopId),
        exp: now_s.saturating_add(args.ttl),
    };
    println!("{}", token::mint(args.secret.as_bytes(), &claims));
    ExitCode::SUCCESS
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
