//! The web chat on the client port: its pages and scripts are served from the binary, and
//! `/dev/token` answers only with `--web-dev-tokens`, only to a loopback `Host`, with tokens the
//! gateway accepts.

use std::io::{Read, Write};

use chinwag_tests::{parse_response, Server};
use tungstenite::Message;

fn get_with_host(server: &Server, path: &str, host: &str) -> (u16, String) {
    let mut stream = server.tcp();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    parse_response(&response)
}

#[test]
fn pages_and_library_are_served() {
    let server = Server::start(&[]);
    for (path, needle) in [
        ("/", "chinwag web chat"),
        ("/buyer", "/web/buyer.js"),
        ("/agent", "/web/agent.js"),
        ("/web/common.js", "from '/js/index.js'"),
        ("/js/index.js", "export { Client"),
        ("/js/client.js", "export class Client"),
    ] {
        let (status, body) = server.get(path);
        assert_eq!(status, 200, "{path}");
        assert!(body.contains(needle), "{path} lacks {needle}");
    }
    assert_eq!(server.get("/web/nope.js").0, 404);
    // Off by default.
    assert_eq!(server.get("/dev/token?uid=buyer:1").0, 404);
}

#[test]
fn dev_tokens_log_in_when_enabled() {
    let server = Server::start(&["--web-dev-tokens"]);
    let host = server.addr.to_string();
    assert_eq!(
        get_with_host(&server, "/dev/token?uid=buyer:1", "shop.example").0,
        403
    );
    assert_eq!(
        get_with_host(&server, "/dev/token?uid=agent:7", &host).0,
        400
    );
    let (status, body) = get_with_host(&server, "/dev/token?uid=agent%3A7&shop=42", &host);
    assert_eq!(status, 200, "{body}");
    let token = body
        .split("\"token\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let mut ws = server.ws("/ws");
    ws.send(Message::text(format!(
        r#"{{"op":"login","req":1,"token":"{token}","device":"web"}}"#
    )))
    .unwrap();
    let reply = ws.read().unwrap().into_text().unwrap();
    assert!(reply.contains(r#""op":"login_ok""#), "{reply}");
    assert!(reply.contains(r#""uid":"agent:7""#), "{reply}");
}

#[test]
fn dev_tokens_are_refused_on_a_public_address() {
    let out = std::process::Command::new(chinwag_tests::binary())
        .args(["serve", "--listen=0.0.0.0:0", "--web-dev-tokens"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}
