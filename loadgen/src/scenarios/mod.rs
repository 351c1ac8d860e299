//! Scenarios that speak the chinwag protocol (`/ws`): what they share is the command line
//! ([`Common`]) and the opening phase ([`connect_and_login`]): open connections at a target
//! rate from several source addresses and log each in with its own token.

pub mod chat;
pub mod connect;
pub mod fanout;
pub mod group;
mod rendezvous;
pub mod shop;
pub mod stamp;
pub mod verify;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chinwag_protocol::token::{self, Claims};
use chinwag_protocol::{DeviceType, Frame, Login, Message, ShopId, Uid};
use clap::Args;
use hdrhistogram::Histogram;

use crate::procs::RunFlags;
use crate::proto::{Dial, Encoding, Event, Fleet};
use crate::report::{self, Progress, Report};

/// The `req` of every connection's `login`.
pub const LOGIN_REQ: u64 = 1;

/// Flags every protocol scenario takes.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Server address (host:port; a host name or an IP address), or the nodes of a cluster as
    /// a comma-separated list: connections are spread over them in turn, and a connection
    /// whose node fails moves to the next address and catches up (docs/loadgen.md).
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub addr: String,
    /// Request path of the chinwag WebSocket endpoint.
    #[arg(long, default_value = "/ws")]
    pub path: String,
    /// Against a loopback server: source addresses 127.0.0.1 .. 127.0.0.N, used in turn (each
    /// has its own ephemeral ports). Against any other server the kernel picks the source.
    #[arg(long, default_value_t = 4)]
    pub sources: u8,
    /// Source addresses to bind instead, comma-separated (addresses of this machine).
    #[arg(long, value_delimiter = ',')]
    pub source_addrs: Vec<Ipv4Addr>,
    /// Speak JSON in text messages instead of the binary codec.
    #[arg(long)]
    pub json: bool,
    /// The gateway's JWT secret (`chinwag serve --jwt-secret`), to mint one token per user.
    #[arg(long, env = "CHINWAG_JWT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// The first account id; users are buyer:BASE, buyer:BASE+1, ... Default: derived from
    /// the clock, so every run has fresh users and fresh conversations.
    #[arg(long)]
    pub uid_base: Option<u64>,
    /// Connections opened per second.
    #[arg(long, default_value_t = 5_000)]
    pub connect_rate_per_s: u32,
    /// Seconds allowed for every connection to open and log in.
    #[arg(long, default_value_t = 60)]
    pub login_timeout_s: u64,
    /// The server's pid, to read its CPU time and memory from /proc; or several,
    /// comma-separated (a cluster's nodes): their CPU time and memory are summed.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    #[command(flatten)]
    pub run: RunFlags,
}

impl Common {
    /// Checks what clap cannot: the address resolves, and the numbers are in range.
    pub fn validate(&self) -> Result<(), String> {
        crate::resolve_list(&self.addr)?;
        if self.source_addrs.is_empty() && self.sources == 0 {
            return Err("--sources must be at least 1".into());
        }
        if self.connect_rate_per_s == 0 {
            return Err("--connect-rate-per-s must be at least 1".into());
        }
        Ok(())
    }

    /// This process's share of `total` (users or conversations); see [`RunFlags::slice`].
    pub fn slice(&self, total: usize) -> (usize, usize) {
        self.run.slice(total)
    }

    /// The first account id of this run.
    pub fn uid_base(&self) -> u64 {
        self.uid_base.unwrap_or_else(|| {
            // Millions of ids apart per second of the clock: runs a second apart never share.
            let now_s = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            (now_s % 1_000_000_000) * 1_000_000
        })
    }

    /// The fleet these flags describe.
    pub fn fleet(&self) -> std::io::Result<Fleet> {
        let addrs = crate::resolve_list(&self.addr).map_err(std::io::Error::other)?;
        let sources = if !self.source_addrs.is_empty() {
            self.source_addrs.clone()
        } else if addrs.iter().all(|a| crate::binds_sources(*a)) {
            (1..=self.sources)
                .map(|n| Ipv4Addr::new(127, 0, 0, n))
                .collect()
        } else {
            Vec::new()
        };
        Fleet::new(Dial {
            addrs,
            path: self.path.clone(),
            sources,
            encoding: if self.json {
                Encoding::Json
            } else {
                Encoding::Binary
            },
        })
    }

    /// A login token for `uid`, valid for a day.
    pub fn token(&self, uid: Uid) -> String {
        self.token_in_shop(uid, None)
    }

    /// A login token for `uid` (an agent of `shop`, if given), valid for a day.
    pub fn token_in_shop(&self, uid: Uid, shop: Option<ShopId>) -> String {
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        token::mint(
            self.secret.as_bytes(),
            &Claims {
                uid,
                shop,
                exp: now_s + 86_400,
            },
        )
    }
}

/// What the opening phase measured.
pub struct Opened {
    /// Which connections are logged in.
    pub logged_in: Vec<bool>,
    /// From the first connect to the last `login_ok`.
    pub elapsed: Duration,
    /// From each connection's connect to its `login_ok`, µs.
    pub connect_to_login: Histogram<u64>,
}

impl Opened {
    /// How many connections are logged in.
    pub fn count(&self) -> usize {
        self.logged_in.iter().filter(|l| **l).count()
    }
}

/// Opens one connection per token at `--connect-rate-per-s` and logs each in; returns when all
/// are logged in or failed, or when `--login-timeout-s` has passed. Failures are counted in
/// `report` by cause; a frame other than the login reply is a violation.
pub fn connect_and_login(
    fleet: &mut Fleet,
    tokens: &[String],
    common: &Common,
    report: &mut Report,
    progress: &mut Progress,
) -> std::io::Result<Opened> {
    let n = tokens.len();
    let mut logged_in = vec![false; n];
    // A refused login is counted once, not again when the server then closes the connection.
    let mut refused = vec![false; n];
    let mut started_at = Vec::with_capacity(n);
    let mut connect_to_login = report::latency_histogram();
    let mut done = 0usize;
    let mut ok = 0usize;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(common.login_timeout_s);
    let device = DeviceType::Web;
    while done < n && Instant::now() < deadline {
        let due = ((start.elapsed().as_secs_f64() * common.connect_rate_per_s as f64) as usize + 1)
            .min(n);
        while fleet.conns.len() < due {
            started_at.push(Instant::now());
            if let Err(failure) = fleet.open() {
                report.fail(failure.cause());
                done += 1;
            }
        }
        fleet.turn(Duration::from_millis(1), |i, writer, event| match event {
            Event::Upgraded => writer.send(&Frame::with_req(
                LOGIN_REQ,
                Message::Login(Login {
                    token: tokens[i].as_str().into(),
                    device,
                }),
            )),
            Event::Frame(frame) => match (frame.req, frame.message) {
                (Some(LOGIN_REQ), Message::LoginOk(_)) if !logged_in[i] => {
                    logged_in[i] = true;
                    report::record(&mut connect_to_login, started_at[i].elapsed());
                    ok += 1;
                    done += 1;
                }
                (_, Message::Error(e)) if !logged_in[i] && !refused[i] => {
                    report.fail(format!("login refused: {}", e.code));
                    refused[i] = true;
                    done += 1;
                }
                // Membership and cursor news may come at any time; not a reply, not wrong.
                (_, Message::Members(_) | Message::MembersDelta(_) | Message::Receipt(_)) => {}
                (_, other) => report
                    .violations
                    .add(crate::check::Violation::Other(format!(
                        "connection {i}: unexpected {} while logging in",
                        other.op()
                    ))),
            },
            Event::Bad(e) => report
                .violations
                .add(crate::check::Violation::Other(format!(
                    "connection {i}: undecodable frame: {e}"
                ))),
            Event::Failed(_) if refused[i] => {}
            Event::Failed(failure) => {
                report.fail(failure.cause());
                if logged_in[i] {
                    logged_in[i] = false;
                    ok -= 1;
                } else {
                    done += 1;
                }
            }
        })?;
        progress.tick(ok, ok as u64, report.failures_total(), 0);
    }
    let timed_out = n - done;
    for _ in 0..timed_out {
        report.fail("login timed out".into());
    }
    Ok(Opened {
        logged_in,
        elapsed: start.elapsed(),
        connect_to_login,
    })
}
