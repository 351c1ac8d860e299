//! `chinwag-loadgen`: load for chinwag (and for any WebSocket echo server, to compare).
//!
//! - `echo`: many connections in a closed loop (`--window` messages in flight per connection),
//!   for messages per second and per second of the server's CPU time.
//! - `idle`: many connections that only complete the handshake, for memory per connection.
//! - `connect`: many logged-in chinwag connections held with heartbeats (`scenarios::connect`).
//! - `chat`: users chatting in direct or shop conversations, every push checked
//!   (`scenarios::chat`).
//! - `fanout`: one conversation with many members (`scenarios::fanout`).
//! - `group`: one group of many members over several processes (`scenarios::group`).
//! - `storm`: `chat` with reconnect storms and `history` catch-up (`scenarios::chat`).
//!
//! Every run is bounded in connections and time and talks only to the addresses it is given (a
//! host name or an IP address each; several, comma-separated, are the nodes of a cluster:
//! connections are spread over them in turn). Against loopback addresses it binds its
//! connections to source addresses in 127.0.0.0/8 (`--sources`), each with its own ephemeral
//! ports.

mod check;
mod client;
mod ledger;
mod procfs;
mod procs;
mod proto;
mod report;
mod scenarios;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// One group of many members made over the service port; senders post at a steady rate.
    Group(scenarios::group::GroupArgs),
    /// `chat` with reconnect storms: a share of users drops, logs in again and catches up.
    Storm(scenarios::chat::StormArgs),
}

#[derive(Args, Clone)]
pub struct Target {
    /// Server address (host:port; a host name or an IP address), or several comma-separated:
    /// connections are spread over them in turn.
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub addr: String,
    /// Request path of the WebSocket endpoint.
    #[arg(long, default_value = "/echo")]
    pub path: String,
    /// Number of connections.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Against a loopback server: source addresses 127.0.0.1 .. 127.0.0.N, used in turn (more
    /// ephemeral ports). Against any other server the kernel picks the source.
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
    // Usage errors (an unknown flag, a value that does not parse) exit 2, as clap does.
    let command = Cli::command();
    let matches = command.clone().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let settings = matches
        .subcommand()
        .and_then(|(name, sub)| Some(settings(command.find_subcommand(name)?, sub)))
        .unwrap_or_default();
    match &cli.command {
        Command::Idle(a) => idle(a),
        Command::Echo(a) => {
            let launch = Launch {
                flags: &a.run,
                uid_base: None,
                server_pids: a.target.server_pid.as_slice(),
                addr: &a.target.addr,
                valid: a.target.validate().and(a.validate()),
                settings,
            };
            run_scenario(launch, || client::echo(a))
        }
        Command::Connect(a) => run_scenario(Launch::of(&a.common, Ok(()), settings), || {
            scenarios::connect::run(a)
        }),
        Command::Chat(a) => run_scenario(Launch::of(&a.common, a.validate(), settings), || {
            scenarios::chat::run(a)
        }),
        Command::Fanout(a) => run_scenario(Launch::of(&a.common, a.validate(), settings), || {
            scenarios::fanout::run(a)
        }),
        Command::Group(a) => run_scenario(Launch::of(&a.common, a.validate(), settings), || {
            scenarios::group::run(a)
        }),
        Command::Storm(a) => {
            run_scenario(Launch::of(&a.chat.common, a.validate(), settings), || {
                scenarios::chat::storm(a)
            })
        }
    }
}

/// Flags not repeated in the report: a secret, and the plumbing of `--procs` workers.
const UNREPORTED: [&str; 3] = ["secret", "worker_of", "worker_dump"];

/// The run's settings as the report's header repeats them: the subcommand, then every flag
/// with its effective value (given or default), in the order `--help` lists them.
fn settings(command: &clap::Command, matches: &ArgMatches) -> Vec<(String, String)> {
    let mut out = vec![("subcommand".to_string(), command.get_name().to_string())];
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if UNREPORTED.contains(&id) || arg.is_hide_set() {
            continue;
        }
        let Ok(Some(values)) = matches.try_get_raw(id) else {
            continue;
        };
        let values: Vec<String> = values.map(|v| v.to_string_lossy().into_owned()).collect();
        out.push((id.replace('_', "-"), values.join(",")));
    }
    out
}

/// What [`run_scenario`] needs to know of a subcommand's flags besides the scenario itself.
struct Launch<'a> {
    flags: &'a procs::RunFlags,
    /// Passed to `--procs` workers so they share one set of users.
    uid_base: Option<u64>,
    /// The server's processes (a cluster's nodes), whose CPU time and memory are summed.
    server_pids: &'a [u32],
    /// The server, as the user named it.
    addr: &'a str,
    /// The subcommand's own check of its flags.
    valid: Result<(), String>,
    /// What the report's header repeats.
    settings: Vec<(String, String)>,
}

impl Launch<'_> {
    fn of(
        common: &scenarios::Common,
        own: Result<(), String>,
        settings: Vec<(String, String)>,
    ) -> Launch<'_> {
        Launch {
            flags: &common.run,
            uid_base: Some(common.uid_base()),
            server_pids: &common.server_pid,
            addr: &common.addr,
            valid: common.validate().and(own),
            settings,
        }
    }
}

/// Runs `idle`; exits 2 on bad flags, 1 if it failed.
fn idle(args: &IdleArgs) -> ExitCode {
    if let Err(e) = args.target.validate() {
        eprintln!("chinwag-loadgen: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = probe(&args.target.addr) {
        eprintln!("chinwag-loadgen: {e}");
        return ExitCode::FAILURE;
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
    /// Checks what clap cannot: the addresses resolve, and there is a source.
    fn validate(&self) -> Result<(), String> {
        resolve_list(&self.addr)?;
        if self.sources == 0 {
            return Err("--sources must be at least 1".into());
        }
        Ok(())
    }

    /// The servers' addresses (validated before any run starts).
    pub fn socket_addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        resolve_list(&self.addr).map_err(std::io::Error::other)
    }
}

impl EchoArgs {
    /// Checks what clap cannot.
    fn validate(&self) -> Result<(), String> {
        if self.window == 0 || self.message_bytes == 0 {
            return Err("echo needs --window >= 1 and --message-bytes >= 1".into());
        }
        Ok(())
    }
}

/// Resolves `--addr` (`host:port`, a host name or an IP address); an IPv4 address is preferred
/// when a name has both, since the source addresses are IPv4.
pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("--addr {addr}: {e} (expected HOST:PORT)"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("--addr {addr}: the name has no address"))
}

/// Resolves a comma-separated list of `--addr`s (one or more, each as [`resolve`] takes it).
pub fn resolve_list(addrs: &str) -> Result<Vec<SocketAddr>, String> {
    let list: Vec<&str> = addrs.split(',').map(str::trim).collect();
    if list.iter().any(|a| a.is_empty()) {
        return Err(format!("--addr {addrs}: an empty address in the list"));
    }
    list.into_iter().map(resolve).collect()
}

/// Whether connections to `target` are bound to source addresses in 127.0.0.0/8: only a
/// loopback server can be reached from them.
pub fn binds_sources(target: SocketAddr) -> bool {
    matches!(target.ip(), IpAddr::V4(ip) if ip.is_loopback())
}

/// The `i`-th source address: 127.0.0.1, 127.0.0.2, ... 127.0.0.`sources`.
pub fn source(i: usize, sources: u8) -> SocketAddr {
    let last = 1 + (i % sources as usize) as u8;
    SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), 0))
}

/// One TCP connect to each server before a run, so that a wrong address or a closed port ends
/// the run at once with the cause instead of after every connection's timeout. Every address
/// of a list must answer at the start (a typo in one would otherwise look like a dead node).
fn probe(addrs: &str) -> Result<(), String> {
    for target in resolve_list(addrs)? {
        if let Err(e) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
            return Err(format!(
                "cannot connect to {target} (of --addr {addrs}): {e}; is the server running \
                 and listening there?"
            ));
        }
    }
    Ok(())
}

/// Runs a scenario (in `--procs` workers if asked) and prints its report. Exits 1 if the server
/// cannot be reached, broke the contract (any violation) or any connection or request failed;
/// 2 on bad flags.
fn run_scenario(launch: Launch, run: impl FnOnce() -> std::io::Result<report::Report>) -> ExitCode {
    let common = launch.flags;
    if let Err(e) = launch.valid.and(common.validate()) {
        eprintln!("chinwag-loadgen: {e}");
        return ExitCode::from(2);
    }
    // Workers are started only after the parent's probe succeeded.
    if common.worker_of.is_none() {
        if let Err(e) = probe(launch.addr) {
            eprintln!("chinwag-loadgen: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = if common.procs > 1 {
        procs::run(common.procs, launch.uid_base, launch.server_pids)
    } else {
        run()
    };
    let mut report = match result {
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
    report.settings = launch.settings;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_takes_host_names_and_prefers_ipv4() {
        let addr = resolve("localhost:7000").unwrap();
        assert!(addr.is_ipv4(), "{addr}");
        assert_eq!(addr.port(), 7000);
        assert_eq!(
            resolve("127.0.0.2:1").unwrap(),
            "127.0.0.2:1".parse().unwrap()
        );
        assert!(resolve("127.0.0.1").is_err(), "a port is required");
        assert!(
            resolve("127.0.0.1:70000").is_err(),
            "the port is out of range"
        );
    }

    #[test]
    fn addr_takes_a_comma_separated_list_of_nodes() {
        let addrs = resolve_list("127.0.0.1:7001, 127.0.0.1:7002,localhost:7003").unwrap();
        assert_eq!(addrs.len(), 3);
        assert_eq!(addrs[1], "127.0.0.1:7002".parse().unwrap());
        assert!(addrs[2].is_ipv4());
        assert_eq!(resolve_list("127.0.0.1:7000").unwrap().len(), 1);
        assert!(resolve_list("127.0.0.1:7001,").is_err(), "an empty entry");
        assert!(
            resolve_list("127.0.0.1:7001,127.0.0.1").is_err(),
            "a port is required"
        );
    }

    #[test]
    fn only_a_loopback_server_gets_loopback_sources() {
        assert!(binds_sources("127.0.0.1:7000".parse().unwrap()));
        assert!(binds_sources("127.9.0.1:7000".parse().unwrap()));
        assert!(!binds_sources("10.0.0.1:7000".parse().unwrap()));
        assert!(!binds_sources("[::1]:7000".parse().unwrap()));
    }
}
