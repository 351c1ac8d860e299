//! A `redis-server` of a test's own: on a free port of 127.0.0.1, in a temporary directory,
//! stopped (SIGKILL) when dropped. `.ci/run` installs `redis-server` when the machine lacks it;
//! a test that cannot find it fails with a message that says so, it never passes without Redis.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::WAIT;

/// A running `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// Writes every change to an append-only file, so that a restart brings the data back.
    persistent: bool,
}

/// A port of 127.0.0.1 nothing listens on right now (bound, then released), for a server a
/// test starts on a fixed port (a node it restarts, Redis).
///
/// Taken below the kernel's ephemeral range (32768 and up here, `ip_local_port_range`), in
/// turn from a start that differs per process: a port the kernel picks for a `:0` listener or
/// an outgoing connection of another test can then never be the one a node is restarted on
/// ("another chinwag node on this host serves port"), and two test processes rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000; // up to 31999, below the ephemeral range
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port of 127.0.0.1 in {FIRST}..{}", FIRST + SPAN)
}

impl RedisServer {
    /// Runs `chinwag cluster --cluster URL ARGS` against this Redis; fails the test if it
    /// fails, else returns what it printed.
    pub fn cluster_cli(&self, args: &[&str]) -> String {
        let out = Command::new(crate::binary())
            .args(["cluster", "--cluster", &self.url()])
            .args(args)
            .output()
            .expect("run chinwag cluster");
        assert!(
            out.status.success(),
            "chinwag cluster {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A Redis that keeps nothing on disk (`--save '' --appendonly no`).
    pub fn start() -> RedisServer {
        RedisServer::start_with(false)
    }

    /// A Redis that writes every change to its append-only file before answering, for tests
    /// that restart it and need its data back.
    pub fn start_persistent() -> RedisServer {
        RedisServer::start_with(true)
    }

    fn start_with(persistent: bool) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            persistent,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path());
        if self.persistent {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): install it (apt-get install redis-server; .ci/run does)")
            });
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(mut c) = self.try_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn try_connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        let c = client.get_connection_with_timeout(Duration::from_secs(1))?;
        c.set_read_timeout(Some(WAIT))?;
        c.set_write_timeout(Some(WAIT))?;
        Ok(c)
    }

    /// A connection for the test to look and change things with.
    pub fn connection(&self) -> redis::Connection {
        self.try_connection()
            .expect("connect to the test's redis-server")
    }

    /// Kills the server (SIGKILL): nodes see a Redis that stopped answering.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy in front of a Redis that can silence subscriptions: while `silence` is on, it
/// drops everything Redis sends on connections that sent `SUBSCRIBE`, and forwards the rest.
/// Such a subscription looks open and delivers nothing — what a failover or a lost proxy
/// connection does to a subscriber, which only a probe finds.
pub struct SilencingProxy {
    pub port: u16,
    pub silence: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SilencingProxy {
    /// A proxy on a free port of 127.0.0.1 to `redis`'s port.
    pub fn start(redis: &RedisServer) -> SilencingProxy {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let upstream = format!("127.0.0.1:{}", redis.port);
        let silence = Arc::new(AtomicBool::new(false));
        let switch = Arc::clone(&silence);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let subscriber = Arc::new(AtomicBool::new(false));
                pump(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    Arc::clone(&subscriber),
                    None,
                );
                pump(server, client, subscriber, Some(Arc::clone(&switch)));
            }
        });
        SilencingProxy { port, silence }
    }

    /// `redis://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// Copies `from` to `to` on a thread of its own until either side closes. Client to server
/// (`silence` is `None`): marks the connection a subscriber when it sends SUBSCRIBE. Server to
/// client: drops the bytes of a subscriber while `silence` is on.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    subscriber: std::sync::Arc<std::sync::atomic::AtomicBool>,
    silence: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering::Relaxed;
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let bytes = &buffer[..n];
            match &silence {
                None => {
                    if bytes
                        .windows(9)
                        .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
                    {
                        subscriber.store(true, Relaxed);
                    }
                }
                Some(silence) => {
                    if silence.load(Relaxed) && subscriber.load(Relaxed) {
                        continue;
                    }
                }
            }
            if to.write_all(bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}
