//! `chinwag-loadgen`: load for chinwag (and for any WebSocket echo server, to compare).
//!
//! - `echo`: many connections in a closed loop (`--window` messages in flight per connection),
//!   for messages per second and per second of the server's CPU time.
//! - `idle`: many connections that only complete the handshake, for memory per connection.
//! - `connect`: many logged-in chinwag connections held with heartbeats (`scenarios::connect`).
//! - `chat`: users chatting in direct or shop conversations, every push checked
//!   (`scenarios::chat`).
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
    /// Users in conversations of K members sending to each other; latency and order checked.
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
pub struct EchoArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub run: procs::RunFlags,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 32)]
    pub message_bytes: usize,
    /// Messages in flight per connection; the echoes one read brings back are answered with
    /// one write.
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup_s: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
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
    match &cli.command {
        Command::Idle(a) => idle(a),
        Command::Echo(a) => {
            let launch = Launch {
                flags: &a.run,
                uid_base: None,
                server_pid: a.target.server_pid,
                valid: a.target.validate(),
            };
            run_scenario(launch, || client::echo(a))
        }
        Command::Connect(a) => run_scenario(Launch::of(&a.common), || scenarios::connect::run(a)),
        Command::Chat(a) => run_scenario(Launch::of(&a.common), || scenarios::chat::run(a)),
        Command::Fanout(a) => run_scenario(Launch::of(&a.common), || scenarios::fanout::run(a)),
        Command::Storm(a) => run_scenario(Launch::of(&a.chat.common), || scenarios::chat::storm(a)),
    }
}

/// What [`run_scenario`] needs to know of a subcommand's flags besides the scenario itself.
struct Launch<'a> {
    flags: &'a procs::RunFlags,
    /// Passed to `--procs` workers so they share one set of users.
    uid_base: Option<u64>,
    server_pid: Option<u32>,
    /// The subcommand's own check of its flags.
    valid: Result<(), String>,
}

impl Launch<'_> {
    fn of(common: &scenarios::Common) -> Launch<'_> {
        Launch {
            flags: &common.run,
            uid_base: Some(common.uid_base()),
            server_pid: common.server_pid,
            valid: common.validate(),
        }
    }
}

/// Runs `idle`; exits 2 on bad flags, 1 if it failed.
fn idle(args: &IdleArgs) -> ExitCode {
    if let Err(e) = args.target.validate() {
        eprintln!("chinwag-loadgen: {e}");
        return ExitCode::from(2);
    }
    match client::idle(&args.target, args.hold_s) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chinwag-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

impl Target {
    /// Checks what clap cannot: the server is on the loopback network, and there is a source.
    fn validate(&self) -> Result<(), String> {
        if !matches!(self.addr.ip(), IpAddr::V4(ip) if ip.is_loopback()) || self.sources == 0 {
            return Err("--addr must be in 127.0.0.0/8 and --sources at least 1".into());
        }
        Ok(())
    }
}

/// The `i`-th source address: 127.0.0.1, 127.0.0.2, ... 127.0.0.`sources`.
pub fn source(i: usize, sources: u8) -> SocketAddr {
    let last = 1 + (i % sources as usize) as u8;
    SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), 0))
}

/// Runs a scenario (in `--procs` workers if asked) and prints its report. Exits 1 if the server broke the contract
/// (any violation) or any connection or request failed, 2 on bad flags.
fn run_scenario(launch: Launch, run: impl FnOnce() -> std::io::Result<report::Report>) -> ExitCode {
    let common = launch.flags;
    if let Err(e) = launch.valid.and(common.validate()) {
        eprintln!("chinwag-loadgen: {e}");
        return ExitCode::from(2);
    }
    let result = if common.procs > 1 {
        procs::run(common.procs, launch.uid_base, launch.server_pid)
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
