//! A stand-in for WeChat's API on 127.0.0.1, over real HTTP, behaving as WeChat's
//! documentation says, for the sender's tests and the local demo.
//!
//! - `GET /cgi-bin/token?grant_type=client_credential&appid=&secret=` issues a token valid for
//!   `token_expires_in` (7,200 s unless set); issuing one cuts the account's older tokens to at
//!   most 5 more minutes, as WeChat does. Errors: 40002 (grant_type), 40013 (appid), 40125
//!   (secret).
//! - `POST /cgi-bin/message/custom/send?access_token=` takes `{"touser","msgtype":"text",
//!   "text":{"content"}[,"customservice":{"kf_account"}]}`. Errors: 41001 (no token), 40001
//!   (unknown token), 42001 (expired token), 47001 (not JSON), 40008 (not text), 44004 (empty
//!   content), 45002 (content over `content_bytes_max`, 2,048 bytes unless set: an assumption,
//!   WeChat does not publish the figure), 40003 (a customer who never wrote to this account),
//!   45015 (the customer last wrote more than 48 hours ago), 45047 (the replies allowed per
//!   customer message, 5 since June 2023, are used up).
//! - The customers' side: [`StandIn::customer_wrote`] is WeChat seeing a customer's message (the
//!   test driver calls it), which opens the 48-hour window and resets the reply allowance.
//! - Faults on demand: [`StandIn::inject`] makes the next call to an endpoint answer an errcode,
//!   an HTTP status, hang, or drop the connection; [`StandIn::set_down`] closes the port
//!   (connections refused) until it is opened again on the same port.
//! - Everything received is recorded ([`StandIn::requests`], [`StandIn::delivered`]).
//! - Two paths of its own, not WeChat's, let another process (the demo's driver) play the
//!   customers' side: `POST /standin/customer_wrote?appid=&openid=` and `GET /standin/delivered`
//!   (the accepted messages as JSON).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// WeChat's documented token lifetime.
pub const TOKEN_EXPIRES_IN: Duration = Duration::from_secs(7200);
/// How long an older token stays valid once a new one is issued.
const TOKEN_OVERLAP: Duration = Duration::from_secs(300);
/// The customer-service window after a customer's message.
pub const REPLY_WINDOW: Duration = Duration::from_secs(48 * 3600);
/// Replies allowed per customer message (WeChat's rule since June 2023).
pub const REPLIES_PER_MESSAGE: u32 = 5;
const HEAD_BYTES_MAX: usize = 16 * 1024;
const BODY_BYTES_MAX: usize = 1024 * 1024;

/// Which API endpoint a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Token,
    Send,
}

/// What the next call to an endpoint gets instead of the normal answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 200 with `{"errcode":…,"errmsg":…}`.
    Errcode(i64, String),
    /// This HTTP status with a short text body.
    Status(u16),
    /// Reads the request, then waits this long and closes without answering.
    Hang(Duration),
    /// Closes the connection without reading or answering.
    Drop,
}

/// One HTTP request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
    /// The errcode answered (None for faults that are not errcodes).
    pub errcode: Option<i64>,
}

/// One customer-service message the stand-in accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub app_id: String,
    pub touser: String,
    pub content: String,
    pub kf_account: Option<String>,
}

struct Issued {
    app_id: String,
    expires_at: Instant,
}

struct Customer {
    last_message: Instant,
    replies_left: u32,
}

struct State {
    secrets: HashMap<String, String>,
    tokens: HashMap<String, Issued>,
    token_expires_in: Duration,
    content_bytes_max: usize,
    customers: HashMap<(String, String), Customer>,
    faults: VecDeque<(Endpoint, Fault)>,
    requests: Vec<Request>,
    delivered: Vec<Delivered>,
    issued: u64,
}

struct Shared {
    state: Mutex<State>,
    down: AtomicBool,
    stop: AtomicBool,
}

impl State {
    fn customer_wrote(&mut self, app_id: &str, open_id: &str) {
        self.customers.insert(
            (app_id.to_string(), open_id.to_string()),
            Customer {
                last_message: Instant::now(),
                replies_left: REPLIES_PER_MESSAGE,
            },
        );
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running stand-in; stopped when dropped.
pub struct StandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A handle on the stand-in's customer side, for the callback driver.
#[derive(Clone)]
pub struct Customers(Arc<Shared>);

impl Customers {
    pub fn wrote(&self, app_id: &str, open_id: &str) {
        self.0.lock().customer_wrote(app_id, open_id);
    }
}

impl StandIn {
    /// Starts a stand-in on 127.0.0.1 (a free port) that knows these (app id, app secret) pairs.
    pub fn start(apps: &[(&str, &str)]) -> StandIn {
        StandIn::start_on("127.0.0.1:0", apps)
    }

    /// Starts on a given address (the demo's fixed port).
    pub fn start_on(addr: &str, apps: &[(&str, &str)]) -> StandIn {
        let listener = TcpListener::bind(addr).expect("bind the stand-in");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                secrets: apps
                    .iter()
                    .map(|(id, secret)| (id.to_string(), secret.to_string()))
                    .collect(),
                tokens: HashMap::new(),
                token_expires_in: TOKEN_EXPIRES_IN,
                content_bytes_max: 2048,
                customers: HashMap::new(),
                faults: VecDeque::new(),
                requests: Vec::new(),
                delivered: Vec::new(),
                issued: 0,
            }),
            down: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("wechat-standin".into())
            .spawn(move || accept_loop(listener, addr, accept_shared))
            .expect("spawn the stand-in");
        StandIn {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// The API base URL to configure (`api_base`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn customers(&self) -> Customers {
        Customers(Arc::clone(&self.shared))
    }

    /// WeChat saw a message from this customer: the 48-hour window opens, 5 replies allowed.
    pub fn customer_wrote(&self, app_id: &str, open_id: &str) {
        self.customers().wrote(app_id, open_id);
    }

    /// Moves the customer's last message `by` into the past (48 hours pass in an instant).
    pub fn age_customer(&self, app_id: &str, open_id: &str, by: Duration) {
        let mut state = self.shared.lock();
        if let Some(customer) = state
            .customers
            .get_mut(&(app_id.to_string(), open_id.to_string()))
        {
            customer.last_message = customer
                .last_message
                .checked_sub(by)
                .expect("an instant that far back");
        }
    }

    /// Tokens issued from now on are valid this long.
    pub fn set_token_expires_in(&self, expires_in: Duration) {
        self.shared.lock().token_expires_in = expires_in;
    }

    /// Every token issued so far expires now (the next use answers 42001).
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for issued in self.shared.lock().tokens.values_mut() {
            issued.expires_at = now;
        }
    }

    /// The next call to `endpoint` gets `fault` (faults queue up in order).
    pub fn inject(&self, endpoint: Endpoint, fault: Fault) {
        self.shared.lock().faults.push_back((endpoint, fault));
    }

    /// Closes the port (connections refused) or opens it again on the same port.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        // Wait until the accept loop has acted on it, so the caller's next step sees it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let refused =
                TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err();
            if refused == down {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "the stand-in did not go {}",
            if down { "down" } else { "up" }
        );
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    pub fn delivered(&self) -> Vec<Delivered> {
        self.shared.lock().delivered.clone()
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.shared.lock().issued
    }

    /// Waits until `count` messages were delivered (or 10 s pass) and returns them.
    pub fn wait_delivered(&self, count: usize) -> Vec<Delivered> {
        let deadline = Instant::now() + crate::WAIT;
        loop {
            let delivered = self.delivered();
            if delivered.len() >= count || Instant::now() > deadline {
                return delivered;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, addr: SocketAddr, shared: Arc<Shared>) {
    let mut listener = Some(listener);
    if let Some(l) = &listener {
        l.set_nonblocking(true).expect("nonblocking listener");
    }
    while !shared.stop.load(Ordering::SeqCst) {
        let down = shared.down.load(Ordering::SeqCst);
        if down && listener.is_some() {
            listener = None;
        } else if !down && listener.is_none() {
            // Rust's TcpListener sets SO_REUSEADDR, so the same port binds again at once.
            if let Ok(l) = TcpListener::bind(addr) {
                l.set_nonblocking(true).expect("nonblocking listener");
                listener = Some(l);
            }
        }
        let accepted = listener.as_ref().map(|l| l.accept());
        match accepted {
            Some(Ok((stream, _))) => {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || serve(stream, &shared));
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Some((method, target, body)) = read_request(&mut stream) else {
        return;
    };
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let endpoint = match path {
        "/cgi-bin/token" => Some(Endpoint::Token),
        "/cgi-bin/message/custom/send" => Some(Endpoint::Send),
        "/standin/customer_wrote" | "/standin/delivered" => {
            let answer = control(shared, path, query);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
            return;
        }
        _ => None,
    };
    let fault = endpoint.and_then(|endpoint| {
        let mut state = shared.lock();
        let at = state.faults.iter().position(|(e, _)| *e == endpoint)?;
        state.faults.remove(at).map(|(_, fault)| fault)
    });
    let mut record = Request {
        method: method.clone(),
        path: path.to_string(),
        query: query.to_string(),
        body: String::from_utf8_lossy(&body).into_owned(),
        errcode: None,
    };
    let answer = match (fault, endpoint) {
        (Some(Fault::Drop), _) => None,
        (Some(Fault::Hang(d)), _) => {
            shared.lock().requests.push(record);
            std::thread::sleep(d);
            return;
        }
        (Some(Fault::Status(status)), _) => Some((status, "server error".to_string())),
        (Some(Fault::Errcode(code, msg)), _) => Some((200, errcode(code, &msg))),
        (None, Some(Endpoint::Token)) if method == "GET" => Some((200, token(shared, query))),
        (None, Some(Endpoint::Send)) if method == "POST" => Some((200, send(shared, query, &body))),
        (None, Some(_)) => Some((405, "method not allowed".to_string())),
        (None, None) => Some((404, "not found".to_string())),
    };
    if let Some((_, body)) = &answer {
        record.errcode = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("errcode").and_then(|c| c.as_i64()));
    }
    shared.lock().requests.push(record);
    if let Some((status, body)) = answer {
        let content_type = if status == 200 {
            "application/json; encoding=utf-8"
        } else {
            "text/plain"
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

fn read_request(stream: &mut TcpStream) -> Option<(String, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > HEAD_BYTES_MAX {
            return None;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    request.parse(&buf[..head_end]).ok()?;
    let method = request.method?.to_string();
    let target = request.path?.to_string();
    let length = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(0);
    if length > BODY_BYTES_MAX {
        return None;
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Some((method, target, body))
}

fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then_some(v)
    })
}

fn errcode(code: i64, msg: &str) -> String {
    serde_json::json!({ "errcode": code, "errmsg": msg }).to_string()
}

fn token(shared: &Shared, query: &str) -> String {
    if query_value(query, "grant_type") != Some("client_credential") {
        return errcode(40002, "invalid grant_type");
    }
    let app_id = query_value(query, "appid").unwrap_or("");
    let secret = query_value(query, "secret").unwrap_or("");
    let mut state = shared.lock();
    match state.secrets.get(app_id) {
        None => return errcode(40013, "invalid appid"),
        Some(expected) if expected != secret => return errcode(40125, "invalid appsecret"),
        Some(_) => {}
    }
    let now = Instant::now();
    for issued in state.tokens.values_mut().filter(|t| t.app_id == app_id) {
        issued.expires_at = issued.expires_at.min(now + TOKEN_OVERLAP);
    }
    state.issued += 1;
    let value = format!("TOKEN_{app_id}_{}", state.issued);
    let expires_in = state.token_expires_in;
    state.tokens.insert(
        value.clone(),
        Issued {
            app_id: app_id.to_string(),
            expires_at: now + expires_in,
        },
    );
    serde_json::json!({ "access_token": value, "expires_in": expires_in.as_secs() }).to_string()
}

fn send(shared: &Shared, query: &str, body: &[u8]) -> String {
    let Some(token) = query_value(query, "access_token").filter(|t| !t.is_empty()) else {
        return errcode(41001, "access_token missing");
    };
    let mut state = shared.lock();
    let app_id = match state.tokens.get(token) {
        None => {
            return errcode(
                40001,
                "invalid credential, access_token is invalid or not latest",
            )
        }
        Some(issued) if Instant::now() >= issued.expires_at => {
            return errcode(42001, "access_token expired")
        }
        Some(issued) => issued.app_id.clone(),
    };
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return errcode(47001, "data format error");
    };
    if json.get("msgtype").and_then(|v| v.as_str()) != Some("text") {
        return errcode(40008, "invalid message type");
    }
    let touser = json
        .get("touser")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let content = json
        .pointer("/text/content")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    if content.is_empty() {
        return errcode(44004, "empty content");
    }
    if content.len() > state.content_bytes_max {
        return errcode(45002, "content size out of limit");
    }
    let Some(customer) = state.customers.get_mut(&(app_id.clone(), touser.clone())) else {
        return errcode(40003, "invalid openid");
    };
    if customer.last_message.elapsed() > REPLY_WINDOW {
        return errcode(
            45015,
            "response out of time limit or subscription is canceled",
        );
    }
    if customer.replies_left == 0 {
        return errcode(45047, "out of response count limit");
    }
    customer.replies_left -= 1;
    let kf_account = json
        .pointer("/customservice/kf_account")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    state.delivered.push(Delivered {
        app_id,
        touser,
        content,
        kf_account,
    });
    errcode(0, "ok")
}

/// The stand-in's own control paths (not WeChat's API).
fn control(shared: &Shared, path: &str, query: &str) -> String {
    if path == "/standin/customer_wrote" {
        let app_id = query_value(query, "appid").unwrap_or("");
        let open_id = query_value(query, "openid").unwrap_or("");
        shared.lock().customer_wrote(app_id, open_id);
        return errcode(0, "ok");
    }
    let state = shared.lock();
    let delivered: Vec<serde_json::Value> = state
        .delivered
        .iter()
        .map(|d| serde_json::json!({ "appid": d.app_id, "touser": d.touser, "content": d.content, "kf_account": d.kf_account }))
        .collect();
    serde_json::Value::from(delivered).to_string()
}
