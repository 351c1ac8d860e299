//! The HTTP/1.1 side of the client port: parsing one request head, telling what it asks for, and the
//! fixed responses the gateway gives. Every plain HTTP answer closes the connection
//! (`Connection: close`); only a WebSocket upgrade keeps it.

use bytes::Bytes;

use super::web;

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
    /// A plain HTTP answer chosen while parsing (404, 400, 405, 426).
    Respond(Bytes),
}

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
/// or overlong head yields `Request::Respond` with 400 or 431.
pub fn parse(buf: &[u8], enable_echo: bool) -> Parsed {
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
    Parsed::Complete {
        request: classify(&request, enable_echo),
        head_len,
    }
}

fn classify(request: &httparse::Request, enable_echo: bool) -> Request {
    // httparse only completes with both present.
    let (Some(method), Some(path)) = (request.method, request.path) else {
        return Request::Respond(bad_request());
    };
    // The query string plays no part in choosing the endpoint (only /dev/token reads it).
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    if let Some(request) = web::classify(request, path, query) {
        return request;
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
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Request::Respond(upgrade_required());
    }
    if header("sec-websocket-version").map(str::trim) != Some("13") {
        return Request::Respond(upgrade_required());
    }
    // The key is 16 random bytes in base64 (RFC 6455 §4.1): 24 characters.
    match header("sec-websocket-key").map(str::trim) {
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
        match parse(req.as_bytes(), enable_echo) {
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
        assert_eq!(parse(&UPGRADE.as_bytes()[..30], false), Parsed::Partial);
        let long = format!("GET /ws HTTP/1.1\r\nX: {}\r\n", "a".repeat(HEAD_BYTES_MAX));
        match parse(long.as_bytes(), false) {
            Parsed::Complete { request, .. } => assert_eq!(status(request), "HTTP/1.1 431"),
            Parsed::Partial => panic!("an overlong head must be refused"),
        }
        match parse(b"\x16\x03\x01garbage\r\n\r\n", false) {
            Parsed::Complete { request, .. } => assert_eq!(status(request), "HTTP/1.1 400"),
            Parsed::Partial => panic!("garbage must be refused"),
        }
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let answer = switching_protocols("dGhlIHNhbXBsZSBub25jZQ==");
        let text = std::str::from_utf8(&answer).unwrap();
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }
}
