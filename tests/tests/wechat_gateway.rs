//! The WeChat channel end to end: the real `chinwag` binary configured with an official account
//! whose API is the stand-in, customers played by the callback driver, agents by WebSocket
//! clients. A customer writes, an agent is assigned and answers, the answer reaches the
//! stand-in as WeChat expects; retries stored once; the 48-hour rule told to the agent; token
//! expiry and the API down for a while; bad input refused with the gateway unaffected; the
//! customer's user kept across a restart.

use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chinwag_engine::wechat::message::{Body, Message as WxMessage, OpenId};
use chinwag_protocol::client::{Client, Encoding};
use chinwag_protocol::{ConvId, DeviceType, HistoryRange, Msg, Seq, Target, Uid, UidKind};
use chinwag_tests::wechat::driver::Driver;
use chinwag_tests::wechat::standin::StandIn;
use chinwag_tests::{next_msg, send, Server};

const JWT: &str = "wechat-e2e-secret-of-at-least-32-bytes";
const APP_ID: &str = "wx5823bf96d3bd56c7";
const APP_SECRET: &str = "standin-secret";
const TOKEN: &str = "QDG6eK";
const AES_KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";
const SHOP: u64 = 42;

struct Setup {
    standin: StandIn,
    server: Server,
    config: tempfile::TempDir,
}

fn config_text(api_base: &str) -> String {
    format!(
        r#"
[wechat.sender]
send_backoff_first_ms = 50
send_backoff_max_ms = 200
send_attempts_max = 40
http_timeout_ms = 2000
token_failure_hold_ms = 0

[[wechat.account]]
app_id = "{APP_ID}"
app_secret = "{APP_SECRET}"
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
mode = "safe"
shop = {SHOP}
api_base = "{api_base}"
"#
    )
}

fn args(config: &tempfile::TempDir) -> Vec<String> {
    vec![
        "--jwt-secret".into(),
        JWT.into(),
        "--messages-per-s-max=1000000".into(),
        "--config".into(),
        config.path().join("chinwag.toml").display().to_string(),
    ]
}

fn start() -> Setup {
    let standin = StandIn::start(&[(APP_ID, APP_SECRET)]);
    let config = tempfile::tempdir().unwrap();
    std::fs::write(
        config.path().join("chinwag.toml"),
        config_text(&standin.url()),
    )
    .unwrap();
    let args = args(&config);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    Setup {
        standin,
        server,
        config,
    }
}

impl Setup {
    fn callback_url(&self) -> String {
        format!("http://{}/wechat/{APP_ID}", self.server.addr)
    }

    fn driver(&self) -> Driver {
        Driver::new(&self.callback_url(), APP_ID, TOKEN)
            .safe(AES_KEY)
            .customers(self.standin.customers())
    }

    fn agent(&self, id: u64) -> Client {
        let uid = chinwag_tests::agent(id);
        let shop = Some(SHOP);
        self.server
            .login_as(uid, shop, DeviceType::Web, Encoding::Json)
            .0
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn text(from: &str, content: &str, msg_id: u64) -> WxMessage {
    WxMessage {
        to: "gh_shop42".into(),
        from: OpenId::parse(from).unwrap(),
        create_time: now_s(),
        msg_id: Some(msg_id),
        body: Body::Text {
            content: content.into(),
        },
    }
}

/// An agent's answer in `conv`: its seq.
fn reply(agent: &mut Client, conv: ConvId, cmid: &str, body: &str) -> Seq {
    send(agent, Target::Conv(conv), cmid, body).1
}

/// The newest page of `conv`'s history.
fn history(client: &mut Client, conv: ConvId) -> Vec<Msg<'static>> {
    chinwag_tests::history(client, conv, HistoryRange::Newest, 50)
}

#[test]
fn a_customer_writes_an_agent_answers_and_the_answer_reaches_wechat() {
    let s = start();
    let driver = s.driver();
    assert_eq!(
        driver.verify_url("5837397749236262829"),
        (200, "5837397749236262829".into()),
        "the server URL check"
    );
    let mut agent = s.agent(1);
    let delivery = driver.post(&text("oCustomer1", "在吗？我的订单还没发货", 1001));
    assert_eq!(
        (delivery.attempts, delivery.status, delivery.body.as_str()),
        (1, Some(200), "success")
    );
    // The agent is assigned (a `members` push) and gets the message from a wechat user.
    let m = next_msg(&mut agent);
    assert_eq!(m.from, Uid::new(UidKind::Wechat, 1));
    assert_eq!(
        (m.kind.as_ref(), m.body.as_ref()),
        ("text", "在吗？我的订单还没发货")
    );
    assert_eq!(m.cmid, "wx-msg-1001");

    let seq = reply(&mut agent, m.conv, "a-1", "您好，今天发货");
    assert_eq!(seq, Seq(2));
    let delivered = s.standin.wait_delivered(1);
    assert_eq!(delivered.len(), 1, "{:?}", s.standin.requests());
    assert_eq!(
        (delivered[0].touser.as_str(), delivered[0].content.as_str()),
        ("oCustomer1", "您好，今天发货")
    );
    // Counted.
    assert!(
        s.server
            .metric("chinwag_wechat_callbacks_total", "result=\"accepted\"")
            >= 1
    );
    s.server
        .wait_metric("chinwag_wechat_replies_total", "result=\"delivered\"", 1);
}

#[test]
fn wechat_retries_are_stored_once() {
    let s = start();
    let driver = s.driver();
    let mut agent = s.agent(1);
    let message = text("oCustomer2", "hello", 2002);
    // WeChat's retries are the same push again (here: the same request, three times).
    let (query, body) = driver.request(&message);
    for _ in 0..3 {
        assert_eq!(driver.post_raw(&query, body.as_bytes()).0, 200);
    }
    let m = next_msg(&mut agent);
    assert_eq!(m.body, "hello");
    // A later message is the next push: the retries were not stored.
    driver.post(&text("oCustomer2", "still there?", 2003));
    let next = next_msg(&mut agent);
    assert_eq!((next.body.as_ref(), next.seq), ("still there?", Seq(2)));
    let stored = history(&mut agent, m.conv);
    assert_eq!(stored.len(), 2, "{stored:?}");
}

#[test]
fn a_reply_after_48_hours_is_refused_and_the_agent_told() {
    let s = start();
    let driver = s.driver();
    let mut agent = s.agent(1);
    driver.post(&text("oCustomer3", "hi", 3001));
    let m = next_msg(&mut agent);
    s.standin
        .age_customer(APP_ID, "oCustomer3", Duration::from_secs(48 * 3600 + 60));
    let seq = reply(&mut agent, m.conv, "a-late", "sorry for the wait");
    // The notice arrives as a message of the conversation, from the system.
    let notice = next_msg(&mut agent);
    assert_eq!(notice.from, Uid::new(UidKind::Service, 0));
    assert_eq!(notice.kind, "wechat_undelivered");
    let body: serde_json::Value = serde_json::from_str(&notice.body).unwrap();
    assert_eq!(body["seq"], seq.0);
    assert_eq!(body["code"], "wechat_window_closed");
    assert_eq!(body["errcode"], 45015);
    assert!(s.standin.delivered().is_empty());
    // It stays in the conversation for whoever reads it later.
    assert!(history(&mut agent, m.conv)
        .iter()
        .any(|h| h.kind == "wechat_undelivered"));
}

#[test]
fn expired_tokens_and_an_api_down_for_a_while() {
    let s = start();
    let driver = s.driver();
    let mut agent = s.agent(1);
    driver.post(&text("oCustomer4", "hi", 4001));
    let conv = next_msg(&mut agent).conv;
    reply(&mut agent, conv, "a-1", "one");
    assert_eq!(s.standin.wait_delivered(1).len(), 1);
    // WeChat expires the token: the sender fetches another and the reply goes through.
    s.standin.expire_tokens();
    reply(&mut agent, conv, "a-2", "two");
    assert_eq!(s.standin.wait_delivered(2).len(), 2);
    assert_eq!(s.standin.tokens_issued(), 2);
    // WeChat's API is unreachable for a while: the reply waits and is retried.
    s.standin.set_down(true);
    reply(&mut agent, conv, "a-3", "three");
    std::thread::sleep(Duration::from_millis(400));
    s.standin.set_down(false);
    let delivered = s.standin.wait_delivered(3);
    assert_eq!(
        delivered
            .iter()
            .map(|d| d.content.as_str())
            .collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
}

/// Sends raw bytes to the client port and returns the status of the answer.
fn raw_status(s: &Setup, request: &[u8]) -> u16 {
    let mut stream = s.server.tcp();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn bad_input_is_refused_nothing_is_stored_and_the_gateway_carries_on() {
    let s = start();
    let mut agent = s.agent(1);
    let message = text("oCustomer5", "forged", 5001);

    // A wrong token: the signatures do not match.
    let forged = Driver::new(&s.callback_url(), APP_ID, "wrongToken").safe(AES_KEY);
    let (query, body) = forged.request(&message);
    assert_eq!(forged.post_raw(&query, body.as_bytes()).0, 403);
    // A wrong AES key (signed correctly): decryption fails.
    let wrong_key = Driver::new(&s.callback_url(), APP_ID, TOKEN)
        .safe("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG");
    let (query, body) = wrong_key.request(&message);
    assert_eq!(wrong_key.post_raw(&query, body.as_bytes()).0, 400);
    // Encrypted for another AppID.
    let mut other_app = Driver::new(&s.callback_url(), APP_ID, TOKEN).safe(AES_KEY);
    other_app.app_id = "wxother".into();
    let (query, body) = other_app.request(&message);
    assert_eq!(other_app.post_raw(&query, body.as_bytes()).0, 400);
    // Malformed XML, correctly signed.
    let driver = s.driver();
    let (query, _) = driver.request(&message);
    assert_eq!(driver.post_raw(&query, b"<xml><Encrypt>").0, 400);
    assert_eq!(driver.post_raw(&query, b"not xml at all").0, 400);
    // A body over the limit: refused from its Content-Length, before it is read.
    let huge = format!(
        "POST /wechat/{APP_ID}?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n"
    );
    assert_eq!(raw_status(&s, huge.as_bytes()), 413);
    // An entity-expansion bomb in the body.
    let bomb = "<?xml version=\"1.0\"?><!DOCTYPE xml [<!ENTITY a \"aaaaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;&a;&a;&a;&a;\">]><xml><Encrypt>&b;</Encrypt></xml>";
    assert_eq!(driver.post_raw(&query, bomb.as_bytes()).0, 400);
    // An unknown account.
    let unknown = Driver::new(
        &format!("http://{}/wechat/wxnobody", s.server.addr),
        "wxnobody",
        TOKEN,
    );
    assert_eq!(unknown.post_raw(&query, body.as_bytes()).0, 404);
    // A flood of forged pushes.
    for n in 0..200 {
        let (query, body) = forged.request(&text("oFlood", "x", 6000 + n));
        assert_eq!(forged.post_raw(&query, body.as_bytes()).0, 403);
    }
    assert!(
        s.server
            .metric("chinwag_wechat_callbacks_total", "result=\"signature\"")
            >= 201
    );

    // Nothing was stored, nobody was pushed anything, and no customer was recorded.
    assert!(agent
        .next_push(Duration::from_millis(300))
        .expect("push")
        .is_none());
    let customers = std::fs::read_to_string(s.server.data_dir.path().join("wechat-customers"))
        .unwrap_or_default();
    assert!(customers.is_empty(), "{customers}");
    // The gateway carries on: health, and a genuine push.
    assert_eq!(s.server.get("/healthz").0, 200);
    driver.post(&text("oCustomer5", "genuine", 5002));
    assert_eq!(next_msg(&mut agent).body, "genuine");
}

#[test]
fn the_customers_user_survives_a_restart() {
    let s = start();
    let driver = s.driver();
    let mut agent = s.agent(1);
    driver.post(&text("oLoyal", "before", 7001));
    let first = next_msg(&mut agent);
    drop(agent);
    let Setup {
        standin,
        server,
        config,
    } = s;
    server.signal(libc::SIGTERM);
    let data = server.into_data_dir();
    let args = args(&config);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_in(data, &args, &[]);
    let s = Setup {
        standin,
        server,
        config,
    };
    let mut agent = s.agent(1);
    s.driver().post(&text("oLoyal", "after", 7002));
    let second = next_msg(&mut agent);
    assert_eq!(second.from, first.from, "the same wechat user");
    assert_eq!(
        (second.conv, second.seq),
        (first.conv, Seq(2)),
        "the same conversation"
    );
}
