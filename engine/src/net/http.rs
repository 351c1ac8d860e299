//! The HTTP/1.1 side of the client port: parsing one request head, telling what it asks for, and the
//! fixed responses the gateway gives. Every plain HTTP answer closes the connection
//! (`Connection: close`); only a WebSocket upgrade keeps it, and an API request, whose
//! connection then serves further API requests (net::api, "Keep-alive").

use bytes::Bytes;

use super::{api, web};

/// The longest request head the gateway reads; a longer one gets 431.
pub const HEAD_BYTES_MAX: usize = 8 * 1024;
/// Headers parsed per request; a request with more is refused like an overlong head.
const HEADERS_MAX: usize = 32;

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// A WebSocket upgrade; `key` is the client's `Sec-WebSocket-Key`.
    Upgrade {
        endpoint: Endpoint,
        key: String,
    },
    /// `GET` or (`head`) `HEAD /healthz`.
    Healthz {
        head: bool,
    },
    Metrics,
    /// A file of the web chat.
    Asset(&'static web::Asset),
    /// `/dev/token`, answered only with `--web-dev-tokens`.
    DevToken(web::TokenRequest),
    /// A WeChat callback to `/wechat/<appid>` (when the node serves WeChat accounts), with
    /// its body.
    Wechat(Box<WechatRequest>),
    /// `POST /api/<op>`, the HTTP form of a service op (docs/backend.md): its head only; the
    /// connection is handed to the service-connection code, which reads the body.
    Api(Box<api::ApiHead>),
    /// A plain HTTP answer chosen while parsing (404, 400, 405, 426).
    Respond(Bytes),
}

/// A request to a WeChat account's server URL.
#[derive(Debug, PartialEq, Eq)]
pub struct WechatRequest {
    pub method: String,
    /// The path, `/wechat/<appid>`.
    pub path: String,
    /// The query string, without `?`.
    pub query: String,
    /// The body (empty when it was over [`WECHAT_BODY_BYTES_MAX`]).
    pub body: Vec<u8>,
    /// The announced body was over [`WECHAT_BODY_BYTES_MAX`]: it is not read, the answer is 413.
    pub body_too_large: bool,
}

/// The largest body of a WeChat callback the gateway reads (the channel's XML limit).
pub const WECHAT_BODY_BYTES_MAX: usize = crate::wechat::message::XML_BYTES_MAX;

/// The WebSocket endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws`: the application protocol.
    App,
    /// `/echo`: every message back unchanged (only with `--enable-echo`).
    Echo,
}

/// The outcome of looking at the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// A complete head of `head_len` bytes.
    Complete { request: Request, head_len: usize },
}

/// Parses a request head from `buf` and tells what it asks for. Errors are answers, not `Err`: a malformed
/// or overlong head yields `Request::Respond` with 400 or 431. A WeChat callback (with
/// `wechat`) is complete only with its body: `head_len` then counts the body too.
pub fn parse(buf: &[u8], enable_echo: bool, wechat: bool) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < HEAD_BYTES_MAX => return Parsed::Partial,
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Complete {
                request: Request::Respond(too_large()),
                head_len: buf.len(),
            }
        }
        Err(_) => {
            return Parsed::Complete {
                request: Request::Respond(bad_request()),
                head_len: buf.len(),
            }
        }
    };
    if head_len > HEAD_BYTES_MAX {
        return Parsed::Complete {
            request: Request::Respond(too_large()),
            head_len,
        };
    }
    let mut classified = classify(&request, enable_echo, wechat);
    if let Request::Wechat(callback) = &mut classified {
        let body_len = match content_length(&request) {
            Ok(len) => len,
            Err(answer) => {
                return Parsed::Complete {
                    request: Request::Respond(answer),
                    head_len,
                }
            }
        };
        if body_len > WECHAT_BODY_BYTES_MAX {
            callback.body_too_large = true;
        } else if buf.len() < head_len + body_len {
            return Parsed::Partial;
        } else {
            callback.body = buf[head_len..head_len + body_len].to_vec();
            return Parsed::Complete {
                request: classified,
                head_len: head_len + body_len,
            };
        }
    }
    Parsed::Complete {
        request: classified,
        head_len,
    }
}

/// The bytes still missing from the request that starts `buf`, when its head is complete and
/// announces a body (a WeChat callback being read); 1 otherwise (read on, carefully).
pub fn missing_bytes(buf: &[u8]) -> usize {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => match content_length(&request) {
            Ok(len) => (head_len + len.min(WECHAT_BODY_BYTES_MAX))
                .saturating_sub(buf.len())
                .max(1),
            Err(_) => 1,
        },
        _ => 1,
    }
}

/// The value of the first header called `name` (in any case), if it is UTF-8.
pub(crate) fn header<'b>(request: &httparse::Request<'_, 'b>, name: &str) -> Option<&'b str> {
    request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

/// Whether a header called `name` lists `token` (comma-separated, in any case), as
/// `Connection` and `Upgrade` do; every header of that name counts.
pub(crate) fn header_has_token(request: &httparse::Request, name: &str, token: &str) -> bool {
    request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|value| value.split(','))
        .any(|listed| listed.trim().eq_ignore_ascii_case(token))
}

/// The request's `Content-Length` (0 when absent); a chunked or malformed body is a 400.
pub(crate) fn content_length(request: &httparse::Request) -> Result<usize, Bytes> {
    let mut length = None;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad_request());
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value).map_err(|_| bad_request())?;
            let value: usize = value.trim().parse().map_err(|_| bad_request())?;
            if length.is_some_and(|l| l != value) {
                return Err(bad_request());
            }
            length = Some(value);
        }
    }
    Ok(length.unwrap_or(0))
}

fn classify(request: &httparse::Request, enable_echo: bool, wechat: bool) -> Request {
    // httparse only completes with both present.
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Request::Respond(bad_request());
    };
    // The query string plays no part in choosing the endpoint (only /dev/token and WeChat
    // callbacks read it).
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if let Some(request) = web::classify(request, path, query) {
        return request;
    }
    if let Some(request) = api::classify(request, method, path, query) {
        return request;
    }
    if wechat && crate::wechat::endpoint::Endpoint::handles(path) {
        return Request::Wechat(Box::new(WechatRequest {
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            body: Vec::new(),
            body_too_large: false,
        }));
    }
    let endpoint = match path {
        "/ws" => Endpoint::App,
        "/echo" if enable_echo => Endpoint::Echo,
        // Load balancers probe with HEAD as often as with GET.
        "/healthz" if method == "HEAD" => return Request::Healthz { head: true },
        "/healthz" | "/metrics" if method != "GET" => return Request::Respond(not_allowed()),
        "/healthz" => return Request::Healthz { head: false },
        "/metrics" => return Request::Metrics,
        _ => return Request::Respond(not_found()),
    };
    if method != "GET" || request.version != Some(1) {
        return Request::Respond(bad_request());
    }
    if !header_has_token(request, "upgrade", "websocket")
        || !header_has_token(request, "connection", "upgrade")
    {
        return Request::Respond(upgrade_required());
    }
    if header(request, "sec-websocket-version").map(str::trim) != Some("13") {
        return Request::Respond(upgrade_required());
    }
    // The key is 16 random bytes in base64 (RFC 6455 §4.1): 24 characters.
    match header(request, "sec-websocket-key").map(str::trim) {
        Some(key) if key.len() == 24 => Request::Upgrade {
            endpoint,
            key: key.to_owned(),
        },
        _ => Request::Respond(bad_request()),
    }
}

/// The 101 answer that completes a WebSocket handshake. No extension and no subprotocol is
/// offered.
pub fn switching_protocols(key: &str) -> Bytes {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    Bytes::from(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    ))
}

/// A complete response with a body; the connection closes after it.
pub fn response(status: &str, content_type: &str, body: &[u8]) -> Bytes {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// The answer to a `HEAD` request: `answer`'s head, without its body (its `Content-Length`
/// stays, as RFC 9110 §9.3.2 allows).
pub fn head_only(answer: Bytes) -> Bytes {
    let head_len = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |at| at + 4);
    answer.slice(..head_len)
}

/// `503`: the node is draining (after SIGTERM) and takes no new WebSocket.
pub fn draining() -> Bytes {
    response("503 Service Unavailable", "text/plain", b"draining\n")
}

/// The status line text for the codes the WeChat endpoint answers with.
pub fn status_line(status: u16) -> &'static str {
    match status {
        200 => "200 OK",
        400 => "400 Bad Request",
        403 => "403 Forbidden",
        404 => "404 Not Found",
        405 => "405 Method Not Allowed",
        413 => "413 Payload Too Large",
        503 => "503 Service Unavailable",
        _ => "500 Internal Server Error",
    }
}

pub fn not_found() -> Bytes {
    response("404 Not Found", "text/plain", b"not found\n")
}

pub fn bad_request() -> Bytes {
    response("400 Bad Request", "text/plain", b"bad request\n")
}

fn not_allowed() -> Bytes {
    response(
        "405 Method Not Allowed",
        "text/plain",
        b"method not allowed\n",
    )
}

fn too_large() -> Bytes {
    response(
        "431 Request Header Fields Too Large",
        "text/plain",
        b"request head too large\n",
    )
}

fn upgrade_required() -> Bytes {
    let body = b"websocket upgrade required\n";
    Bytes::from(
        [
            format!(
                "HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n\
                 Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
            body,
        ]
        .concat(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    fn request_of(req: &str, enable_echo: bool) -> Request {
        match parse(req.as_bytes(), enable_echo, false) {
            Parsed::Complete { request, head_len } => {
                assert_eq!(head_len, req.len());
                request
            }
            Parsed::Partial => panic!("partial"),
        }
    }

    fn status(request: Request) -> String {
        match request {
            Request::Respond(b) => String::from_utf8_lossy(&b[..12]).into_owned(),
            other => panic!("not a response: {other:?}"),
        }
    }

    #[test]
    fn head_of_healthz_answers_without_a_body() {
        assert_eq!(
            request_of("HEAD /healthz HTTP/1.1\r\n\r\n", false),
            Request::Healthz { head: true }
        );
        let answer = head_only(draining());
        assert!(answer.starts_with(b"HTTP/1.1 503"));
        assert!(answer.ends_with(b"Content-Length: 9\r\nConnection: close\r\n\r\n"));
    }

    #[test]
    fn classifies_upgrades_and_plain_requests() {
        assert_eq!(
            request_of(UPGRADE, false),
            Request::Upgrade {
                endpoint: Endpoint::App,
                key: "dGhlIHNhbXBsZSBub25jZQ==".into()
            }
        );
        let echo = UPGRADE.replace("/ws", "/echo");
        assert!(matches!(
            request_of(&echo, true),
            Request::Upgrade {
                endpoint: Endpoint::Echo,
                ..
            }
        ));
        assert_eq!(status(request_of(&echo, false)), "HTTP/1.1 404");
        assert_eq!(
            request_of("GET /healthz HTTP/1.1\r\n\r\n", false),
            Request::Healthz { head: false }
        );
        assert_eq!(
            request_of("GET /metrics?x=1 HTTP/1.1\r\n\r\n", false),
            Request::Metrics
        );
        assert_eq!(
            status(request_of("GET /nope HTTP/1.1\r\n\r\n", false)),
            "HTTP/1.1 404"
        );
        assert_eq!(
            status(request_of("GET /ws HTTP/1.1\r\n\r\n", false)),
            "HTTP/1.1 426"
        );
        let no_key = UPGRADE.replace("Sec-WebSocket-Key", "X-Key");
        assert_eq!(status(request_of(&no_key, false)), "HTTP/1.1 400");
    }

    #[test]
    fn partial_and_overlong_heads() {
        assert_eq!(
            parse(&UPGRADE.as_bytes()[..30], false, false),
            Parsed::Partial
        );
        let long = format!("GET /ws HTTP/1.1\r\nX: {}\r\n", "a".repeat(HEAD_BYTES_MAX));
        match parse(long.as_bytes(), false, false) {
            Parsed::Complete { request, .. } => assert_eq!(status(request), "HTTP/1.1 431"),
            Parsed::Partial => panic!("an overlong head must be refused"),
        }
        match parse(b"\x16\x03\x01garbage\r\n\r\n", false, false) {
            Parsed::Complete { request, .. } => assert_eq!(status(request), "HTTP/1.1 400"),
            Parsed::Partial => panic!("garbage must be refused"),
        }
    }

    #[test]
    fn wechat_callbacks_are_complete_with_their_body() {
        let request = "POST /wechat/wx1?signature=s&nonce=n HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n<xml/>!";
        // Without WeChat accounts the path is unknown.
        assert_eq!(
            status(request_of("GET /wechat/wx1 HTTP/1.1\r\n\r\n", false)),
            "HTTP/1.1 404"
        );
        let head = request.len() - 7;
        for cut in [10, head, head + 3] {
            assert_eq!(
                parse(&request.as_bytes()[..cut], false, true),
                Parsed::Partial,
                "cut {cut}"
            );
            assert_eq!(
                missing_bytes(&request.as_bytes()[..cut]),
                if cut >= head { request.len() - cut } else { 1 }
            );
        }
        match parse(format!("{request}GET /next").as_bytes(), false, true) {
            Parsed::Complete {
                request: Request::Wechat(callback),
                head_len,
            } => {
                assert_eq!(head_len, request.len(), "the body is part of the request");
                assert_eq!(callback.method, "POST");
                assert_eq!(callback.path, "/wechat/wx1");
                assert_eq!(callback.query, "signature=s&nonce=n");
                assert_eq!(callback.body, b"<xml/>!");
                assert!(!callback.body_too_large);
            }
            other => panic!("{other:?}"),
        }
        let huge = format!(
            "POST /wechat/wx1 HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            WECHAT_BODY_BYTES_MAX + 1
        );
        match parse(huge.as_bytes(), false, true) {
            Parsed::Complete {
                request: Request::Wechat(callback),
                head_len,
            } => {
                assert!(callback.body_too_large && callback.body.is_empty());
                assert_eq!(head_len, huge.len(), "the body is not waited for");
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "POST /wechat/wx1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /wechat/wx1 HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            "POST /wechat/wx1 HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ] {
            match parse(bad.as_bytes(), false, true) {
                Parsed::Complete { request, .. } => assert_eq!(status(request), "HTTP/1.1 400"),
                Parsed::Partial => panic!("{bad}"),
            }
        }
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let answer = switching_protocols("dGhlIHNhbXBsZSBub25jZQ==");
        let text = std::str::from_utf8(&answer).unwrap();
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }
}
