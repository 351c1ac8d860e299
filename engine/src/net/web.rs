//! The web chat on the client port: the buyer view and the agent console (static files under
//! `engine/web/`), the JavaScript client library they import (`protocol/js/src/`), all embedded
//! in the binary, and `/dev/token`.
//!
//! `/dev/token?uid=KIND:ID[&shop=ID]` mints a login token for any user, so that a person trying
//! chinwag out can open both sides of a conversation without a backend. It answers only with
//! `--web-dev-tokens`, which the configuration refuses unless the client port listens on a
//! loopback address, and only to requests whose `Host` is a loopback name (a page from another
//! site cannot read the answer, and a DNS-rebound name is refused). In production the shop's
//! backend mints tokens with the gateway's secret and hands them to its pages.

use bytes::Bytes;
use chinwag_protocol::token::{self, Claims};
use chinwag_protocol::{ShopId, Uid, UidKind};

use super::http::{self, Request};

/// How long a token from `/dev/token` is valid; the page asks for a new one when it expires.
const DEV_TOKEN_TTL_S: u64 = 3600;

/// One embedded file.
#[derive(Debug, PartialEq, Eq)]
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

macro_rules! asset {
    ($path:literal, $type:expr, $file:literal) => {
        Asset {
            path: $path,
            content_type: $type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/", $file)),
        }
    };
}

/// Every file of the web chat, by the path it is served at.
const ASSETS: &[Asset] = &[
    asset!("/", HTML, "web/index.html"),
    asset!("/buyer", HTML, "web/buyer.html"),
    asset!("/agent", HTML, "web/agent.html"),
    asset!("/web/chat.css", CSS, "web/chat.css"),
    asset!("/web/common.js", JS, "web/common.js"),
    asset!("/web/buyer.js", JS, "web/buyer.js"),
    asset!("/web/agent.js", JS, "web/agent.js"),
    asset!("/js/index.js", JS, "../protocol/js/src/index.js"),
    asset!("/js/client.js", JS, "../protocol/js/src/client.js"),
    asset!("/js/backoff.js", JS, "../protocol/js/src/backoff.js"),
    asset!("/js/model.js", JS, "../protocol/js/src/model.js"),
    asset!("/js/json.js", JS, "../protocol/js/src/json.js"),
    asset!("/js/binary.js", JS, "../protocol/js/src/binary.js"),
    asset!(
        "/js/index.d.ts",
        "text/plain; charset=utf-8",
        "../protocol/js/src/index.d.ts"
    ),
];

/// A `/dev/token` request: its query string and whether its `Host` is a loopback name.
#[derive(Debug, PartialEq, Eq)]
pub struct TokenRequest {
    query: String,
    loopback_host: bool,
}

/// Routes the web chat's paths; `None` for every other path.
pub fn classify(request: &httparse::Request, path: &str, query: &str) -> Option<Request> {
    let method = request.method?;
    let route = if path == "/dev/token" {
        let host = request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .and_then(|h| std::str::from_utf8(h.value).ok());
        Request::DevToken(TokenRequest {
            query: query.to_owned(),
            loopback_host: host.is_some_and(is_loopback_host),
        })
    } else {
        Request::Asset(ASSETS.iter().find(|a| a.path == path)?)
    };
    if method != "GET" {
        return Some(Request::Respond(http::response(
            "405 Method Not Allowed",
            "text/plain",
            b"method not allowed\n",
        )));
    }
    Some(route)
}

/// The answer with an embedded file.
pub fn serve(asset: &Asset) -> Bytes {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\n\
         X-Content-Type-Options: nosniff\r\nContent-Security-Policy: default-src 'self'; \
         connect-src 'self' ws: wss:; img-src 'self' data:; frame-ancestors 'none'\r\n\
         Connection: close\r\n\r\n",
        asset.content_type,
        asset.body.len()
    )
    .into_bytes();
    out.extend_from_slice(asset.body);
    Bytes::from(out)
}

/// Answers `/dev/token`: 404 unless `enabled`, 403 for a non-loopback `Host`, 400 for a bad
/// query, else 200 with `{"token":"...","uid":"...","exp":...}`.
pub fn dev_token(request: &TokenRequest, enabled: bool, secret: &[u8], now_unix_s: u64) -> Bytes {
    if !enabled {
        return http::not_found();
    }
    if !request.loopback_host {
        return http::response(
            "403 Forbidden",
            "text/plain",
            b"/dev/token answers only requests to a loopback host\n",
        );
    }
    let claims = match dev_claims(&request.query, now_unix_s + DEV_TOKEN_TTL_S) {
        Ok(claims) => claims,
        Err(why) => return http::response("400 Bad Request", "text/plain", why.as_bytes()),
    };
    let body = format!(
        "{{\"token\":\"{}\",\"uid\":\"{}\",\"exp\":{}}}\n",
        token::mint(secret, &claims),
        claims.uid,
        claims.exp
    );
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    Bytes::from(out)
}

fn dev_claims(query: &str, exp: u64) -> Result<Claims, &'static str> {
    let mut uid = None;
    let mut shop = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value).ok_or("bad percent-encoding\n")?;
        match key {
            "uid" => uid = Some(value.parse::<Uid>().map_err(|_| "uid must be KIND:ID\n")?),
            "shop" if !value.is_empty() => {
                shop = Some(ShopId(
                    value.parse().map_err(|_| "shop must be a decimal id\n")?,
                ))
            }
            _ => {}
        }
    }
    let uid = uid.ok_or("uid is missing\n")?;
    if uid.kind == UidKind::Agent && shop.is_none() {
        return Err("an agent's token needs a shop\n");
    }
    Ok(Claims { uid, shop, exp })
}

/// Decodes `%XX` escapes (a browser writes `buyer%3A1`); `None` for a bad escape or non-UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"web-test-secret-0123456789abcdef0123";

    fn request(query: &str, loopback_host: bool) -> TokenRequest {
        TokenRequest {
            query: query.into(),
            loopback_host,
        }
    }

    fn status(answer: &Bytes) -> &str {
        std::str::from_utf8(&answer[9..12]).unwrap()
    }

    #[test]
    fn dev_token_mints_a_verifiable_token_only_when_enabled_and_asked_on_loopback() {
        let ok = dev_token(&request("uid=agent%3A7&shop=42", true), true, SECRET, 1000);
        assert_eq!(status(&ok), "200");
        let text = std::str::from_utf8(&ok).unwrap();
        let token = text
            .split("\"token\":\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let claims = token::verify(SECRET, token, 1000).unwrap();
        assert_eq!(claims.uid, Uid::new(UidKind::Agent, 7));
        assert_eq!(claims.shop, Some(ShopId(42)));
        assert_eq!(claims.exp, 1000 + DEV_TOKEN_TTL_S);

        assert_eq!(
            status(&dev_token(&request("uid=buyer:1", true), false, SECRET, 0)),
            "404"
        );
        assert_eq!(
            status(&dev_token(&request("uid=buyer:1", false), true, SECRET, 0)),
            "403"
        );
        for bad in [
            "",
            "uid=agent:7",
            "uid=nobody:1",
            "uid=buyer:1&shop=x",
            "uid=buyer%3",
        ] {
            assert_eq!(
                status(&dev_token(&request(bad, true), true, SECRET, 0)),
                "400",
                "{bad}"
            );
        }
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "127.0.0.1:7000",
            "[::1]:80",
            "LOCALHOST:1",
            "127.3.2.1",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "example.com",
            "10.0.0.1:7000",
            "[2001:db8::1]:80",
            "127.0.0.1.evil.com",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn assets_are_served_with_their_type() {
        let page = ASSETS.iter().find(|a| a.path == "/buyer").unwrap();
        let answer = serve(page);
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/html"));
        assert!(text.contains(&format!("Content-Length: {}\r\n", page.body.len())));
        // Every module the pages import is embedded.
        for asset in ASSETS.iter().filter(|a| a.content_type == JS) {
            let source = std::str::from_utf8(asset.body).unwrap();
            for line in source.lines().filter(|l| l.contains(" from '")) {
                let target = line
                    .split(" from '")
                    .nth(1)
                    .unwrap()
                    .split('\'')
                    .next()
                    .unwrap();
                let dir = &asset.path[..asset.path.rfind('/').unwrap()];
                let resolved = if let Some(rest) = target.strip_prefix("./") {
                    format!("{dir}/{rest}")
                } else if let Some(rest) = target.strip_prefix("../") {
                    format!("/{rest}")
                } else {
                    target.to_string()
                };
                assert!(
                    ASSETS.iter().any(|a| a.path == resolved),
                    "{} imports {target}, which is not served",
                    asset.path
                );
            }
        }
    }
}
