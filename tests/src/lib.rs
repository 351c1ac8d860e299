//! End-to-end tests: helpers that start the real `chinwag` binary on an ephemeral port with a
//! temporary data directory and talk to it as clients do.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use chinwag_protocol::client::{Client, ClientError, Encoding};
use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::{
    ConvId, DeviceType, ErrorCode, Frame, History, HistoryRange, LoginOk, Message, Msg, Send, Seq,
    Target, Uid, UidKind,
};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::WebSocket;

pub mod redis;
pub mod wechat;

/// How long any single wait in a test may take before the test fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(10);

/// How long a server may take to start: longer than [`WAIT`], because a debug build opening
/// (and prefaulting) every shard's log took up to 6.5 s on a loaded 2-core machine. A bound
/// against hanging, not a measure of speed.
pub const START_WAIT: Duration = Duration::from_secs(40);

/// The `chinwag` binary: `$CHINWAG_BIN`, or the one in the target directory of this test
/// executable, which is (re)built once per test process with the same profile. A
/// dependency on chinwag-engine does not build its binary, so without this step the tests
/// could run an old one.
pub fn binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("CHINWAG_BIN") {
                return PathBuf::from(path);
            }
            // The test executable lives in target/<profile>/deps/.
            let exe = std::env::current_exe().expect("current_exe");
            let profile_dir = exe
                .parent()
                .and_then(|deps| deps.parent())
                .expect("target/<profile>/deps");
            let target_dir = profile_dir.parent().expect("target/");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = Command::new(cargo);
            build.args([
                "build",
                "--quiet",
                "-p",
                "chinwag-engine",
                "--bin",
                "chinwag",
            ]);
            build.arg("--target-dir").arg(target_dir);
            if profile_dir.file_name().is_some_and(|p| p == "release") {
                build.arg("--release");
            }
            let status = build.status().expect("run cargo build");
            assert!(status.success(), "cargo build -p chinwag-engine failed");
            profile_dir.join("chinwag")
        })
        .clone()
}

/// A running `chinwag serve`, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// The service port (docs/backend.md).
    pub backend_addr: SocketAddr,
    pub data_dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
    /// The `--jwt-secret` (or `CHINWAG_JWT_SECRET`) it was started with, if any.
    secret: Option<String>,
}

impl Server {
    /// Starts `chinwag serve` with `args` on 127.0.0.1:0 (2 shards unless `args` say otherwise).
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_in(tempfile::tempdir().expect("tempdir"), args, env)
    }

    /// Starts `chinwag serve` on an existing data directory (a restart).
    pub fn start_in(data_dir: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(binary());
        command.arg("serve").arg("--data-dir").arg(data_dir.path());
        if !args.iter().any(|a| a.starts_with("--listen")) {
            command.arg("--listen=127.0.0.1:0");
        }
        if !args.iter().any(|a| a.starts_with("--backend-listen")) {
            command.arg("--backend-listen=127.0.0.1:0");
        }
        if !args.iter().any(|a| a.starts_with("--shards")) {
            command.arg("--shards=2");
        }
        command.args(args);
        let secret = jwt_secret(args, env);
        // The tests' own environment must not leak settings into the server.
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("CHINWAG_")) {
            command.env_remove(key);
        }
        command.envs(env.iter().copied());
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn chinwag");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let lines = Arc::clone(&log);
        // Keeps reading stderr for the server's whole life, so its logging never blocks.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let addr = if line.contains("listening") {
                    field(&line, " addr=").zip(field(&line, "backend_addr="))
                } else {
                    None
                };
                // The line is in the log before the test learns the address, so a test that
                // reads the log once the server started finds the `listening` line in it.
                lines.lock().unwrap().push(line);
                if let Some(addr) = addr {
                    let _ = addr_tx.send(addr);
                }
            }
        });
        let (addr, backend_addr) = match addr_rx.recv_timeout(START_WAIT) {
            Ok((addr, backend_addr)) => (
                addr.parse().expect("bound address"),
                backend_addr.parse().expect("bound service address"),
            ),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Server {
            child,
            addr,
            backend_addr,
            data_dir,
            log,
            secret,
        }
    }

    /// Waits for the process to exit (after a signal) and hands back its data directory.
    pub fn into_data_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.wait();
        let fresh = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.data_dir, fresh)
    }

    /// The WebSocket URL of the client contract.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A plain TCP connection to the client port, with read and write timeouts.
    pub fn tcp(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        stream
    }

    /// A WebSocket client on `path` (e.g. "/echo").
    pub fn ws(&self, path: &str) -> WebSocket<TcpStream> {
        self.try_ws(path)
            .unwrap_or_else(|e| panic!("handshake on {path}: {e}"))
    }

    pub fn try_ws(&self, path: &str) -> Result<WebSocket<TcpStream>, String> {
        let url = format!("ws://{}{path}", self.addr);
        let stream = TcpStream::connect(self.addr).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        tungstenite::client(url.as_str(), stream)
            .map(|(ws, _)| ws)
            .map_err(|e| e.to_string())
    }

    /// A raw WebSocket on `path`: the handshake done by hand, the stream left for raw frames.
    pub fn raw_ws(&self, path: &str) -> TcpStream {
        let mut stream = self.tcp();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .unwrap();
        let head = read_head(&mut stream);
        assert!(head.starts_with("HTTP/1.1 101"), "no upgrade: {head}");
        stream
    }

    /// `GET path`; returns the status code and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut stream = self.tcp();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        parse_response(&response)
    }

    /// `POST path` on the client port with a JSON `body` and, if given, `Authorization:
    /// Bearer token`, as curl sends it (the HTTP form of the service ops, docs/backend.md);
    /// returns the status code and body, read by its `Content-Length` (the server may keep
    /// the connection for another request).
    pub fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
        let mut stream = self.tcp();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n{auth}\r\n{body}",
            body.len()
        )
        .unwrap();
        let response = read_response(&mut stream);
        (response.status, response.body)
    }

    /// `POST /api/<op>` (`op` may carry a query) with `body` and a bearer `token`: the status,
    /// and the body read as a message of the contract (its JSON mapping).
    pub fn api(&self, op: &str, token: &str, body: &str) -> (u16, Message<'static>) {
        let (status, text) = self.post(&format!("/api/{op}"), Some(token), body);
        let frame = chinwag_protocol::json::decode(text.trim_end())
            .unwrap_or_else(|e| panic!("{op}: the body {text:?} is no message: {e}"));
        assert_eq!(frame.req, None, "an HTTP answer carries no req: {text}");
        (status, frame.message.into_owned())
    }

    /// The `--jwt-secret` the server was started with; fails the test if it was given
    /// otherwise (a file), since the harness then cannot sign tokens for it.
    pub fn secret(&self) -> &str {
        self.secret
            .as_deref()
            .expect("the server was started without --jwt-secret or CHINWAG_JWT_SECRET")
    }

    /// A login token for `uid`, signed with the server's secret, valid for ten minutes.
    pub fn token(&self, uid: Uid) -> String {
        mint_token(self.secret(), uid)
    }

    /// A client logged in as `uid` from a web device over JSON; fails the test unless the
    /// login is accepted.
    pub fn login(&self, uid: Uid) -> Client {
        self.login_as(uid, None, DeviceType::Web, Encoding::Json).0
    }

    /// A client logged in as `uid` from `device` over `encoding`, with the `shop` claim in its
    /// token if given (an agent's has it), and its `login_ok`; fails the test unless the login
    /// is accepted.
    pub fn login_as(
        &self,
        uid: Uid,
        shop: Option<u64>,
        device: DeviceType,
        encoding: Encoding,
    ) -> (Client, LoginOk) {
        let mut client = Client::connect(&self.ws_url(), encoding).expect("connect");
        let token = mint_token_in_shop(self.secret(), uid, shop);
        let ok = client.login(&token, device).expect("login accepted");
        (client, ok)
    }

    /// A service-port connection, authenticated as `service:1`.
    pub fn service(&self) -> ServiceClient {
        service_client(self, self.secret())
    }

    /// Runs `chinwag backend <args>` against the service port as `service:1`; returns whether
    /// it succeeded and what it printed.
    pub fn backend(&self, args: &[&str]) -> (bool, String) {
        let output = Command::new(binary())
            .arg("backend")
            .arg("--addr")
            .arg(self.backend_addr.to_string())
            .env(
                "CHINWAG_SERVICE_TOKEN",
                self.token(Uid::new(UidKind::Service, 1)),
            )
            .args(args)
            .output()
            .expect("run chinwag backend");
        (
            output.status.success(),
            String::from_utf8(output.stdout).expect("UTF-8 output"),
        )
    }

    /// The sum over shards of every sample of `name` whose labels contain `labels`
    /// (e.g. `metric("chinwag_connections_closed_total", "reason=\"idle_timeout\"")`).
    pub fn metric(&self, name: &str, labels: &str) -> u64 {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200);
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter(|l| l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Waits until `metric(name, labels)` reaches `at_least`; returns the last value seen.
    pub fn wait_metric(&self, name: &str, labels: &str, at_least: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.metric(name, labels);
            if value >= at_least || Instant::now() > deadline {
                return value;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we spawned and own; it touches no memory of ours.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill");
    }

    /// Waits for the process to exit (at most `WAIT`).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JWT secret `args` (`--jwt-secret X` or `--jwt-secret=X`) or else `env` give a server.
fn jwt_secret(args: &[&str], env: &[(&str, &str)]) -> Option<String> {
    let flag = args.iter().enumerate().find_map(|(i, arg)| {
        if *arg == "--jwt-secret" {
            args.get(i + 1).copied()
        } else {
            arg.strip_prefix("--jwt-secret=")
        }
    });
    flag.or_else(|| {
        env.iter()
            .find(|(key, _)| *key == "CHINWAG_JWT_SECRET")
            .map(|(_, value)| *value)
    })
    .map(str::to_string)
}

fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(key)? + key.len();
    Some(line[start..].split_whitespace().next()?.to_string())
}

/// Reads an HTTP response head byte by byte (so no frame bytes after it are consumed).
pub fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// One HTTP response read from a connection that may stay open.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    /// Whether the server said it closes the connection after this response.
    pub fn closes(&self) -> bool {
        self.head
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n")
    }
}

/// Reads one HTTP response: its head, then as many body bytes as its `Content-Length` says;
/// fails the test if the connection ends first.
pub fn read_response(stream: &mut TcpStream) -> HttpResponse {
    let head = read_head(stream);
    assert!(
        head.ends_with("\r\n\r\n"),
        "no whole response head: {head:?}"
    );
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, value)| {
            value.trim().parse().expect("a Content-Length")
        });
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("the whole body");
    HttpResponse {
        status: parse_response(&head).0,
        head,
        body: String::from_utf8(body).expect("a UTF-8 body"),
    }
}

pub fn parse_response(response: &str) -> (u16, String) {
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Writes one masked client frame: `first` is the FIN/RSV/opcode byte.
pub fn write_frame(stream: &mut TcpStream, first: u8, payload: &[u8]) {
    stream
        .write_all(&encode_frame(first, payload))
        .expect("write frame");
}

pub fn encode_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads one server frame; returns (first byte, payload), or None at EOF or error.
pub fn read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).ok()?;
    assert_eq!(head[1] & 0x80, 0, "server frames are never masked");
    let len = match head[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).ok()?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).ok()?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).ok()?;
    Some((head[0], payload))
}

/// Reads frames until a close frame; returns its code (None if the stream ended without one).
pub fn read_close_code(stream: &mut TcpStream) -> Option<u16> {
    loop {
        let (first, payload) = read_frame(stream)?;
        if first & 0x0F == 0x8 {
            return Some(if payload.len() >= 2 {
                u16::from_be_bytes([payload[0], payload[1]])
            } else {
                1005
            });
        }
    }
}

/// Reads messages until the server's close frame; returns its code.
pub fn ws_close_code(ws: &mut WebSocket<TcpStream>) -> Option<u16> {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(frame)) => {
                // Send the close reply tungstenite queued, completing the handshake.
                let _ = ws.flush();
                return frame.map(|f| u16::from(f.code));
            }
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

pub fn close_code(code: u16) -> CloseCode {
    CloseCode::from(code)
}

/// The uid of buyer `id`.
pub fn buyer(id: u64) -> Uid {
    Uid::new(UidKind::Buyer, id)
}

/// The uid of agent `id`.
pub fn agent(id: u64) -> Uid {
    Uid::new(UidKind::Agent, id)
}

/// The next frame `client` receives (a push, or a reply, in arrival order); fails the test if
/// none comes within [`WAIT`].
pub fn push(client: &mut Client) -> Message<'static> {
    client
        .next_push(WAIT)
        .expect("connection open")
        .expect("a push within the timeout")
        .message
}

/// The next `msg` push `client` receives, skipping other pushes (members, receipts); fails the
/// test if none comes within [`WAIT`].
pub fn next_msg(client: &mut Client) -> Msg<'static> {
    loop {
        match push(client) {
            Message::Msg(push) => return push.msg,
            _ => continue,
        }
    }
}

/// Sends a text message; fails the test unless it is stored. Its conversation and seq.
pub fn send(client: &mut Client, target: Target, cmid: &str, body: &str) -> (ConvId, Seq) {
    let reply = client
        .call(Message::Send(Send {
            target,
            cmid: cmid.into(),
            kind: "text".into(),
            body: body.into(),
        }))
        .expect("send accepted");
    match reply.message {
        Message::SendOk(ok) => (ok.conv, ok.seq),
        other => panic!("expected send_ok, got {other:?}"),
    }
}

/// A page of `conv`'s history; fails the test unless it is answered.
pub fn history(
    client: &mut Client,
    conv: ConvId,
    range: HistoryRange,
    limit: u16,
) -> Vec<Msg<'static>> {
    let reply = client
        .call(Message::History(History { conv, range, limit }))
        .expect("history answered");
    match reply.message {
        Message::HistoryOk(ok) => ok.msgs,
        other => panic!("expected history_ok, got {other:?}"),
    }
}

/// The error code of a request's reply; fails the test unless the request was refused.
pub fn rejected(reply: Result<Frame<'static>, ClientError>) -> ErrorCode {
    match reply {
        Err(ClientError::Rejected(e)) => e.code,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// A service-port connection to `server`, authenticated as `service:1` with a token signed
/// with `secret` ([`Server::service`] when the server was started with the secret).
pub fn service_client(server: &Server, secret: &str) -> ServiceClient {
    let token = mint_token(secret, Uid::new(UidKind::Service, 1));
    ServiceClient::connect(&server.backend_addr.to_string(), &token).expect("service connects")
}

/// A login token for `uid`, signed with `secret`, valid for ten minutes.
pub fn mint_token(secret: &str, uid: Uid) -> String {
    mint_token_in_shop(secret, uid, None)
}

/// A login token for `uid` with the `shop` claim (an agent's token names the shop it works
/// for), signed with `secret`, valid for ten minutes.
pub fn mint_token_in_shop(secret: &str, uid: Uid, shop: Option<u64>) -> String {
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    chinwag_protocol::token::mint(
        secret.as_bytes(),
        &chinwag_protocol::token::Claims {
            uid,
            shop: shop.map(chinwag_protocol::ShopId),
            exp: now_s + 600,
        },
    )
}
