//! The HTTP form of the service port's ops, on the client port (docs/backend.md, "Over
//! HTTP"): `POST /api/<op>` with the op's JSON object as the body and `Authorization: Bearer
//! <service token>`, answered with the reply's JSON object.
//!
//! There is one model: the body is read by [`json::decode_as`] into the same
//! `chinwag_protocol::Message` a binary frame decodes to, and the service connection code
//! (`shard::service`) answers it as it answers a frame of the service port; only the framing
//! differs. This module is the part without I/O: telling an API request by its head, and
//! writing a reply (or an error) as an HTTP response.
//!
//! **Keep-alive.** An HTTP/1.1 connection serves further API requests, one after another
//! (pipelined ones in order), unless the client says `Connection: close`; HTTP/1.0 gets one
//! request. The connection closes, its answer saying `Connection: close`, after a request
//! refused from its head (its body unread, the framing is lost), after
//! `api_requests_per_connection_max` requests, and when it sends no request for
//! `api_idle_timeout_ms`. Another kind of request on a kept connection (`GET /healthz`, an
//! upgrade) is answered `421 Misdirected Request` and closed: only the API is served there.
//!
//! Statuses: a reply is 200; an `error` reply gets the status of its code ([`status_of`]),
//! with the contract's `error` object as the body, so a script reads the same `code` either
//! way.

use bytes::{BufMut, Bytes, BytesMut};
use chinwag_protocol::{json, ErrorCode, Frame, Message, Op};

use super::http::{self, Request};

/// The path prefix of the API.
pub const PREFIX: &str = "/api/";

/// The longest op name quoted back in a 404 (the rest of a long path is cut).
const NAME_QUOTED_MAX: usize = 64;

/// What an API request's head says: enough to read its body and to answer it.
#[derive(Debug, PartialEq, Eq)]
pub struct ApiHead {
    /// The op the path names (a service request).
    pub op: Op,
    /// The token of an `Authorization: Bearer` header.
    pub token: Option<String>,
    /// The body's length (`Content-Length`; 0 when absent).
    pub body_len: usize,
    /// `?wait_ms=N`: how long a `subscribe` may wait for messages (at most the node's
    /// `api_wait_ms_max`, which is also the default).
    pub wait_ms: Option<u64>,
    /// The client sent `Expect: 100-continue`: it waits for `100 Continue` before the body.
    pub expect_continue: bool,
    /// The client may send another request on the connection after this one: HTTP/1.1
    /// without `Connection: close`.
    pub keep_alive: bool,
}

/// Whether `op` is served at `POST /api/<op>`: every service request but `auth` (the bearer
/// token stands for it).
pub fn is_api_op(op: Op) -> bool {
    op.is_service() && op.is_request() && op != Op::Auth
}

/// Routes `/api` and `/api/...`; `None` for every other path. A wrong method is 405, an op
/// that is not a service request 404, a body without a usable `Content-Length` 400.
pub fn classify(
    request: &httparse::Request,
    method: &str,
    path: &str,
    query: &str,
) -> Option<Request> {
    let name = match path.strip_prefix(PREFIX) {
        Some(name) => name,
        None if path == "/api" => "",
        None => return None,
    };
    if method != "POST" {
        return Some(Request::Respond(method_not_allowed()));
    }
    let Some(op) = Op::from_name(name).filter(|op| is_api_op(*op)) else {
        let mut end = name.len().min(NAME_QUOTED_MAX);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let text = format!(
            "no op named {:?} (POST /api/<op> serves the service ops of docs/backend.md)",
            &name[..end]
        );
        return Some(Request::Respond(error_response(ErrorCode::NotFound, &text)));
    };
    let Ok(body_len) = http::content_length(request) else {
        let text = "the body needs one valid Content-Length (chunked bodies are not read)";
        return Some(Request::Respond(error_response(
            ErrorCode::BadRequest,
            text,
        )));
    };
    let token = http::header(request, "authorization").and_then(|value| {
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned())
    });
    let expect_continue = http::header(request, "expect")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
    let keep_alive =
        request.version == Some(1) && !http::header_has_token(request, "connection", "close");
    let mut wait_ms = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if let Some(value) = pair.strip_prefix("wait_ms=") {
            match value.parse() {
                Ok(ms) => wait_ms = Some(ms),
                Err(_) => {
                    let text = "wait_ms must be a number of milliseconds";
                    return Some(Request::Respond(error_response(
                        ErrorCode::BadRequest,
                        text,
                    )));
                }
            }
        }
    }
    Some(Request::Api(Box::new(ApiHead {
        op,
        token,
        body_len,
        wait_ms,
        expect_continue,
        keep_alive,
    })))
}

/// The HTTP status line text of an `error` with `code`.
pub fn status_of(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest => "400 Bad Request",
        ErrorCode::Unauthorized | ErrorCode::NotLoggedIn => "401 Unauthorized",
        ErrorCode::NotMember => "403 Forbidden",
        ErrorCode::NotFound => "404 Not Found",
        ErrorCode::TooLarge => "413 Payload Too Large",
        ErrorCode::RateLimited => "429 Too Many Requests",
        ErrorCode::Unavailable => "503 Service Unavailable",
        ErrorCode::Internal => "500 Internal Server Error",
    }
}

/// The HTTP response carrying `message` (a reply, or an `error`) as its JSON object; with
/// `keep_alive`, the connection stays open for the client's next request.
pub fn response(message: Message<'_>, keep_alive: bool) -> Bytes {
    let (status, extra) = match &message {
        Message::Error(error) => (
            status_of(error.code),
            match error.code {
                ErrorCode::Unauthorized => "WWW-Authenticate: Bearer\r\n",
                _ => "",
            },
        ),
        _ => ("200 OK", ""),
    };
    let mut body = BytesMut::new();
    json::encode(&Frame::new(message), &mut body);
    body.put_u8(b'\n');
    with_body(status, extra, &body, keep_alive)
}

/// An `error` answer with `code` and `text`, closing the connection.
pub fn error_response(code: ErrorCode, text: &str) -> Bytes {
    response(crate::bus::error(code, text), false)
}

/// `421`: a request other than `POST /api/<op>` on a connection kept alive for the API,
/// which serves nothing else; the client may send it again on a new connection.
pub fn misdirected() -> Bytes {
    let mut body = BytesMut::new();
    let text = "this connection serves POST /api/<op> only: send other requests on a new one";
    json::encode(
        &Frame::new(crate::bus::error(ErrorCode::BadRequest, text)),
        &mut body,
    );
    body.put_u8(b'\n');
    with_body("421 Misdirected Request", "", &body, false)
}

/// `405`: the API takes only `POST`.
fn method_not_allowed() -> Bytes {
    let mut body = BytesMut::new();
    let error = crate::bus::error(ErrorCode::BadRequest, "the API takes POST only");
    json::encode(&Frame::new(error), &mut body);
    body.put_u8(b'\n');
    with_body("405 Method Not Allowed", "Allow: POST\r\n", &body, false)
}

/// `100 Continue`, for a client that waits for it before sending its body.
pub fn continue_100() -> Bytes {
    Bytes::from_static(b"HTTP/1.1 100 Continue\r\n\r\n")
}

fn with_body(status: &str, extra_headers: &str, body: &[u8], keep_alive: bool) -> Bytes {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\n{extra_headers}Connection: {connection}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::http::{parse, Parsed};

    fn request_of(text: &str) -> Request {
        match parse(text.as_bytes(), false, false) {
            Parsed::Complete { request, head_len } => {
                assert_eq!(
                    head_len,
                    text.len(),
                    "the head only: the body is read later"
                );
                request
            }
            Parsed::Partial => panic!("partial"),
        }
    }

    fn answer(request: Request) -> String {
        match request {
            Request::Respond(bytes) => String::from_utf8(bytes.to_vec()).unwrap(),
            other => panic!("not an answer: {other:?}"),
        }
    }

    #[test]
    fn api_heads_name_a_service_op_and_carry_the_bearer_token() {
        let head = "POST /api/send_as?wait_ms=5 HTTP/1.1\r\nHost: x\r\n\
                    Authorization: Bearer  abc.def.ghi \r\nContent-Length: 12\r\n\r\n";
        assert_eq!(
            request_of(head),
            Request::Api(Box::new(ApiHead {
                op: Op::SendAs,
                token: Some("abc.def.ghi".into()),
                body_len: 12,
                wait_ms: Some(5),
                expect_continue: false,
                keep_alive: true,
            }))
        );
        let bare = "POST /api/subscribe HTTP/1.1\r\nExpect: 100-continue\r\n\r\n";
        let Request::Api(head) = request_of(bare) else {
            panic!("an API request")
        };
        assert_eq!((head.token, head.body_len), (None, 0));
        assert!(head.expect_continue);
    }

    #[test]
    fn http_1_1_keeps_the_connection_unless_the_client_says_close() {
        let keep_alive = |head: &str| match request_of(head) {
            Request::Api(head) => head.keep_alive,
            other => panic!("not an API request: {other:?}"),
        };
        assert!(keep_alive("POST /api/kick HTTP/1.1\r\n\r\n"));
        assert!(keep_alive(
            "POST /api/kick HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(!keep_alive(
            "POST /api/kick HTTP/1.1\r\nConnection: close\r\n\r\n"
        ));
        assert!(!keep_alive(
            "POST /api/kick HTTP/1.1\r\nconnection: TE, Close\r\n\r\n"
        ));
        assert!(!keep_alive("POST /api/kick HTTP/1.0\r\n\r\n"));
        assert!(!keep_alive(
            "POST /api/kick HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        ));
        let kept = String::from_utf8(response(Message::KickOk(1), true).to_vec()).unwrap();
        assert!(kept.contains("\r\nConnection: keep-alive\r\n"), "{kept}");
        let closed = String::from_utf8(response(Message::KickOk(1), false).to_vec()).unwrap();
        assert!(closed.contains("\r\nConnection: close\r\n"), "{closed}");
        let other = String::from_utf8(misdirected().to_vec()).unwrap();
        assert!(other.starts_with("HTTP/1.1 421 "), "{other}");
        assert!(other.contains("\r\nConnection: close\r\n"), "{other}");
    }

    #[test]
    fn wrong_methods_ops_and_lengths_are_answered_with_the_contract_error() {
        let get = answer(request_of("GET /api/kick HTTP/1.1\r\n\r\n"));
        assert!(get.starts_with("HTTP/1.1 405 "), "{get}");
        assert!(get.contains("Allow: POST\r\n"), "{get}");
        assert!(
            get.ends_with("\"code\":\"bad_request\",\"message\":\"the API takes POST only\"}\n"),
            "{get}"
        );
        for op in ["nope", "send", "auth", "send_as_ok", ""] {
            let text = answer(request_of(&format!("POST /api/{op} HTTP/1.1\r\n\r\n")));
            assert!(text.starts_with("HTTP/1.1 404 "), "{op}: {text}");
            assert!(text.contains("\"code\":\"not_found\""), "{op}: {text}");
        }
        let long = "x".repeat(1000);
        let text = answer(request_of(&format!("POST /api/{long} HTTP/1.1\r\n\r\n")));
        assert!(text.len() < 600, "a long name is not echoed whole: {text}");
        let chunked = "POST /api/kick HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(answer(request_of(chunked)).starts_with("HTTP/1.1 400 "));
        let bad_wait = "POST /api/subscribe?wait_ms=soon HTTP/1.1\r\n\r\n";
        assert!(answer(request_of(bad_wait)).starts_with("HTTP/1.1 400 "));
        // Other paths are not the API's.
        assert!(answer(request_of("POST /apix HTTP/1.1\r\n\r\n")).starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn replies_are_200_and_errors_get_the_status_of_their_code() {
        let ok = String::from_utf8(response(Message::KickOk(2), false).to_vec()).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.ends_with("\r\n\r\n{\"op\":\"kick_ok\",\"count\":2}\n"),
            "{ok}"
        );
        let length = ok.split("Content-Length: ").nth(1).unwrap();
        let length: usize = length[..length.find('\r').unwrap()].parse().unwrap();
        assert_eq!(length, ok.len() - ok.find("\r\n\r\n").unwrap() - 4);
        for code in ErrorCode::ALL {
            let text = String::from_utf8(error_response(code, "why").to_vec()).unwrap();
            assert!(text.starts_with(&format!("HTTP/1.1 {}\r\n", status_of(code))));
            assert!(text.contains(&format!("\"code\":\"{code}\"")), "{text}");
            assert_eq!(
                text.contains("WWW-Authenticate: Bearer"),
                code == ErrorCode::Unauthorized
            );
        }
    }
}
