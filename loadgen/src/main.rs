//! `chinwag-loadgen`: load for chinwag (and for any WebSocket echo server, to compare).
//!
//! - `echo`: many connections in a closed loop (one message in flight per connection), for
//!   messages per second and per second of the server's CPU time.
//! - `idle`: many connections that only complete the handshake, for memory per connection.
//!
//! Every run is bounded in connections and time and talks only to the address it is given,
//! from source addresses in 127.0.0.0/8.

mod client;
mod procfs;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "chinwag-loadgen",
    version,
    about = "Load generator for chinwag"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Closed-loop echo: each connection sends a message and waits for it to come back.
    Echo(EchoArgs),
    /// Open connections and hold them idle; report the server's RSS growth per connection.
    Idle(IdleArgs),
}

#[derive(Args, Clone)]
pub struct Target {
    /// Server address (host:port); must be in 127.0.0.0/8.
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub addr: SocketAddr,
    /// Request path of the WebSocket endpoint.
    #[arg(long, default_value = "/echo")]
    pub path: String,
    /// Number of connections.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Source addresses 127.0.0.1 .. 127.0.0.N, used in turn (more ephemeral ports).
    #[arg(long, default_value_t = 4)]
    pub sources: u8,
    /// The server's pid, to read its CPU time and memory from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
}

#[derive(Args)]
struct EchoArgs {
    #[command(flatten)]
    target: Target,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 32)]
    message_bytes: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2)]
    warmup_s: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    target: Target,
    /// Seconds to hold the connections open after measuring.
    #[arg(long, default_value_t = 0)]
    hold_s: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let target = match &cli.command {
        Command::Echo(a) => &a.target,
        Command::Idle(a) => &a.target,
    };
    if !matches!(target.addr.ip(), IpAddr::V4(ip) if ip.is_loopback()) || target.sources == 0 {
        eprintln!("chinwag-loadgen: --addr must be in 127.0.0.0/8 and --sources at least 1");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Echo(a) => client::echo(&a.target, a.message_bytes, a.warmup_s, a.duration_s),
        Command::Idle(a) => client::idle(&a.target, a.hold_s),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chinwag-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `i`-th source address: 127.0.0.1, 127.0.0.2, ... 127.0.0.`sources`.
pub fn source(i: usize, sources: u8) -> SocketAddr {
    let last = 1 + (i % sources as usize) as u8;
    SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), 0))
}
