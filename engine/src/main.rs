//! The `chinwag` binary.

mod backend_cli;
mod cluster_cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use chinwag_protocol::{token, ShopId, Uid, UidKind};
use clap::{Parser, Subcommand};

use chinwag_engine::node;
use chinwag_engine::operator::config::{self, Config, ServeArgs};
use chinwag_engine::operator::data_dir::DataDir;
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
    /// Make one request on a node's service port (docs/backend.md) and print the reply as JSON.
    Backend(backend_cli::BackendArgs),
    /// Create a cluster in Redis, or show one (docs/cluster.md).
    Cluster(cluster_cli::ClusterArgs),
}

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("key").required(true).args(["secret", "secret_file", "data_dir"]))]
struct TokenArgs {
    /// The gateway's secret (its `--jwt-secret`). Visible to other local users on the command
    /// line: prefer --secret-file, --data-dir or CHINWAG_JWT_SECRET.
    #[arg(long, env = "CHINWAG_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// A file holding the gateway's secret (its `--jwt-secret-file`).
    #[arg(long, value_name = "FILE")]
    secret_file: Option<std::path::PathBuf>,
    /// The gateway's data directory: reads the secret it generated there (without locking it).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
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
        Command::Backend(args) => backend_cli::run(args),
        Command::Cluster(args) => cluster_cli::run(args),
    }
}

fn mint_token(args: TokenArgs) -> ExitCode {
    if args.uid.kind == UidKind::Agent && args.shop.is_none() {
        eprintln!("chinwag: an agent's token needs --shop");
        return ExitCode::from(2);
    }
    let key = match (&args.secret, &args.secret_file, &args.data_dir) {
        (Some(secret), _, _) => secret::check(secret, "--secret").map(|()| secret.clone()),
        (None, Some(file), _) => secret::read_file(file),
        (None, None, Some(dir)) => secret::read_stored(dir),
        (None, None, None) => Err("give --secret, --secret-file or --data-dir".into()),
    };
    let key = match key {
        Ok(key) => key,
        Err(e) => {
            eprintln!("chinwag: {e}");
            return ExitCode::from(2);
        }
    };
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = token::Claims {
        uid: args.uid,
        shop: args.shop.map(ShopId),
        exp: now_s.saturating_add(args.ttl),
    };
    println!("{}", token::mint(key.as_bytes(), &claims));
    ExitCode::SUCCESS
}

/// A start error: printed on stderr whatever `--log-level` says (a node that cannot start must
/// say why even with logging off), then the exit code: 2 for what the operator must fix in the
/// configuration or the environment it names, 1 for a failure at run time.
fn fatal(error: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("chinwag: {error}");
    ExitCode::from(code)
}

fn serve(args: ServeArgs) -> ExitCode {
    let mut config = match Config::load(args, std::env::vars()) {
        Ok(config) => config,
        Err(e) => return fatal(e, 2),
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&config.log_level) {
        Ok(filter) => filter,
        Err(e) => return fatal(format!("log_level: {e}"), 2),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    for name in config::unknown_env_vars(std::env::vars()) {
        tracing::warn!(variable = %name, "unknown CHINWAG_* variable ignored: it names no setting");
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %config.data_dir.display(),
        config = %config.redacted(),
        "starting"
    );
    // Taken before anything in the directory is read or written, held until the process ends.
    let data_dir = match DataDir::open(&config.data_dir) {
        Ok(dir) => dir,
        Err(e) => return fatal(e, 2),
    };
    let jwt_secret = match secret::jwt_secret(
        config.jwt_secret.as_deref(),
        config.jwt_secret_file.as_deref(),
        data_dir.path(),
    ) {
        Ok(secret) => secret,
        Err(e) => return fatal(e, 2),
    };
    config.partitions = match data_dir.partition_count(config.partitions) {
        Ok(count) => count,
        Err(e) => return fatal(e, 2),
    };
    if config.shards == 0 {
        config.shards = std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    match node::serve(config, data_dir, jwt_secret.into_bytes()) {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        // A port held by another node or program is the operator's to fix, like a bad
        // setting.
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => fatal(e, 2),
        // A cluster's refusal to let this node join (docs/cluster.md).
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => fatal(e, 2),
        Err(e) => fatal(format!("serve failed: {e}"), 1),
    }
}
