//! `chinwag-loadgen`: load for chinwag (and for any WebSocket echo server, to compare).
//!
//! - `echo`: many connections in a closed loop (one message in flight per connection), for
//!   messages per second and per second of the server's CPU time.
//! - `idle`: many connections that only complete the handshake, for memory per connection.
//! - `connect`: many logged-in chinwag connections held with heartbeats (`scenarios::connect`).
//! - `chat`: users chatting in direct conversations, every push checked (`scenarios::chat`).
//! - `fanout`: one conversation with many members (`scenarios::fanout`).
//! - `storm`: `chat` with reconnect storms and `history` catch-up (`scenarios::chat`).
//!
//! Every run is bounded in connections and time and talks only to the address it is given,
//! from source addresses in 127.0.0.0/8.

mod check;
mod client;
mod procfs;
mod procs;
mod proto;
mod report;
mod scenarios;

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
    /// Open chinwag connections at a rate, log each in, hold them with heartbeats.
    Connect(scenarios::connect::ConnectArgs),
    /// Users in direct conversations sending to each other; latency and order checked.
    Chat(scenarios::chat::ChatArgs),
    /// One conversation with many members (a shop conversation with many agents).
    Fanout(scenarios::fanout::FanoutArgs),
    /// `chat` with reconnect storms: a share of users drops, logs in again and catches up.
    Storm(scenarios::chat::StormArgs),
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
    /// Messages in flight per connection; the echoes one read brings back are answered with
    /// one write.
    #[arg(long, default_value_t = 1)]
    window: usize,
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
        Command::Connect(a) => return run_scenario(&a.common, || scenarios::connect::run(a)),
        Command::Chat(a) => return run_scenario(&a.common, || scenarios::chat::run(a)),
        Command::Fanout(a) => return run_scenario(&a.common, || scenarios::fanout::run(a)),
        Command::Storm(a) => return run_scenario(&a.chat.common, || scenarios::chat::storm(a)),
    };
    if !matches!(target.addr.ip(), IpAddr::V4(ip) if ip.is_loopback()) || target.sources == 0 {
        eprintln!("chinwag-loadgen: --addr must be in 127.0.0.0/8 and --sources at least 1");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Echo(a) => {
            // The whole run's CPU (connecting included), so a reader can tell whether the
            // load generator was the limit.
            let cpu_start_s = report::own_cpu_s();
            let result = client::echo(
                &a.target,
                a.message_bytes,
                a.window,
                a.warmup_s,
                a.duration_s,
            );
            println!("loadgen_cpu_s: {:.2}", report::own_cpu_s() - cpu_start_s);
            result
        }
        Command::Idle(a) => client::idle(&a.target, a.hold_s),
        Command::Connect(_) | Command::Chat(_) | Command::Fanout(_) | Command::Storm(_) => {
            unreachable!("returned above")
        }
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

/// Runs a protocol scenario and prints its report. Exits 1 if the server broke the contract
/// (any violation) or any connection or request failed, 2 on bad flags.
fn run_scenario(
    common: &scenarios::Common,
    run: impl FnOnce() -> std::io::Result<report::Report>,
) -> ExitCode {
    if let Err(e) = common.validate() {
        eprintln!("chinwag-loadgen: {e}");
        return ExitCode::from(2);
    }
    let result = if common.procs > 1 {
        procs::run(common.procs, common.uid_base())
    } else {
        run()
    };
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("chinwag-loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &common.worker_dump {
        if let Err(e) = procs::dump(&report, path) {
            eprintln!("chinwag-loadgen: writing the worker report: {e}");
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    let files = (
        common.json_out.as_deref(),
        common.hgrm_out.as_deref(),
        common.plot.as_deref(),
    );
    if let Err(e) = report.emit(files.0, files.1, files.2) {
        eprintln!("chinwag-loadgen: writing the report: {e}");
        return ExitCode::FAILURE;
    }
    if report.violations.count > 0 || report.failures_total() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
