//! The WeChat channel's parts that stand on their own, over real HTTP on 127.0.0.1:
//! - the sender against the stand-in of WeChat's API: delivery, one token for many replies,
//!   expired and invalid tokens, tokens renewed before they expire, WeChat's rules (48-hour
//!   window, replies per message), transient failures and the API down for a while;
//! - the callback driver against a small server built on the engine's `wechat::callback`:
//!   plain and safe mode, WeChat's retries.
//!
//! The gateway's own callback endpoint comes with the engine's new layout (docs/wechat.md).

use std::sync::{mpsc, Arc};
use std::time::Duration;

use chinwag_engine::wechat::account::{Account, AccountSettings, Mode};
use chinwag_engine::wechat::message::{Body, Message, OpenId};
use chinwag_engine::wechat::metrics::Metrics;
use chinwag_engine::wechat::sender::{Outcome, Reason, Reply, Report, Sender, SenderLimits};
use chinwag_tests::wechat::driver::Driver;
use chinwag_tests::wechat::standin::{Endpoint, Fault, StandIn};
use chinwag_tests::WAIT;

const APP_ID: &str = "wx5823bf96d3bd56c7";
const SECRET: &str = "standin-secret";
const TOKEN: &str = "QDG6eK";
const AES_KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";

fn account(api_base: &str, secret: &str) -> Account {
    AccountSettings {
        app_id: APP_ID.into(),
        app_secret: secret.into(),
        token: TOKEN.into(),
        encoding_aes_key: Some(AES_KEY.into()),
        mode: Mode::Safe,
        api_base: api_base.into(),
        shop: 42,
        kf_account: None,
    }
    .check()
    .unwrap()
}

/// Short pauses so retries happen within a test's time.
fn fast_limits() -> SenderLimits {
    SenderLimits {
        send_backoff_first_ms: 20,
        send_backoff_max_ms: 200,
        http_timeout_ms: 2_000,
        token_failure_hold_ms: 0,
        ..SenderLimits::default()
    }
}

struct Harness {
    standin: StandIn,
    sender: Sender<u32>,
    reports: mpsc::Receiver<Report<u32>>,
    metrics: Arc<Metrics>,
}

impl Harness {
    fn start(limits: SenderLimits) -> Harness {
        Harness::start_with_secret(limits, SECRET)
    }

    fn start_with_secret(limits: SenderLimits, secret: &str) -> Harness {
        let standin = StandIn::start(&[(APP_ID, SECRET)]);
        let (tx, reports) = mpsc::channel();
        let metrics = Arc::new(Metrics::default());
        let sender = Sender::start(
            &[account(&standin.url(), secret)],
            &limits,
            metrics.clone(),
            move |report| {
                let _ = tx.send(report);
            },
        )
        .unwrap();
        Harness {
            standin,
            sender,
            reports,
            metrics,
        }
    }

    fn reply(&self, to: &str, content: &str, tag: u32) {
        self.sender
            .submit(Reply {
                app_id: APP_ID.into(),
                to: OpenId::parse(to).unwrap(),
                content: content.into(),
                kf_account: None,
                tag,
            })
            .unwrap();
    }

    fn report(&self) -> Report<u32> {
        self.reports.recv_timeout(WAIT).expect("a report")
    }

    fn undelivered(&self) -> (Reason, Option<i64>, u32) {
        match self.report() {
            Report {
                outcome: Outcome::Undelivered(u),
                attempts,
                ..
            } => (u.reason, u.errcode, attempts),
            other => panic!("expected an undelivered report, got {other:?}"),
        }
    }

    fn errcodes_answered(&self, endpoint_path: &str) -> Vec<i64> {
        self.standin
            .requests()
            .iter()
            .filter(|r| r.path == endpoint_path)
            .filter_map(|r| r.errcode)
            .collect()
    }
}

const SEND: &str = "/cgi-bin/message/custom/send";

#[test]
fn delivers_a_reply_as_wechat_expects() {
    let h = Harness::start(fast_limits());
    h.standin.customer_wrote(APP_ID, "oCustomer1");
    h.reply("oCustomer1", "您好，有什么可以帮您？", 1);
    let report = h.report();
    assert_eq!(
        (report.tag, report.outcome, report.attempts),
        (1, Outcome::Delivered, 1)
    );
    let delivered = h.standin.delivered();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].touser, "oCustomer1");
    assert_eq!(delivered[0].content, "您好，有什么可以帮您？");
    assert_eq!(delivered[0].kf_account, None);
    // The body is the documented JSON, UTF-8 as is.
    let send = h
        .standin
        .requests()
        .into_iter()
        .find(|r| r.path == SEND)
        .unwrap();
    assert!(
        send.query.starts_with("access_token=TOKEN_"),
        "{}",
        send.query
    );
    let json: serde_json::Value = serde_json::from_str(&send.body).unwrap();
    assert_eq!(json["msgtype"], "text");
    assert!(send.body.contains("您好"), "{}", send.body);
}

#[test]
fn kf_account_is_sent_when_named() {
    let h = Harness::start(fast_limits());
    h.standin.customer_wrote(APP_ID, "oC");
    h.sender
        .submit(Reply {
            app_id: APP_ID.into(),
            to: OpenId::parse("oC").unwrap(),
            content: "hi".into(),
            kf_account: Some("kf2001@gh_1".into()),
            tag: 1,
        })
        .unwrap();
    assert_eq!(h.report().outcome, Outcome::Delivered);
    assert_eq!(
        h.standin.delivered()[0].kf_account.as_deref(),
        Some("kf2001@gh_1")
    );
}

#[test]
fn many_replies_share_one_token_and_keep_each_customers_order() {
    let h = Harness::start(SenderLimits {
        send_workers: 4,
        ..fast_limits()
    });
    let customers = ["oA", "oB", "oC", "oD"];
    for customer in customers {
        h.standin.customer_wrote(APP_ID, customer);
    }
    let mut tag = 0;
    for n in 0..5 {
        for customer in customers {
            h.reply(customer, &format!("{customer} {n}"), tag);
            tag += 1;
        }
    }
    for _ in 0..tag {
        assert_eq!(h.report().outcome, Outcome::Delivered);
    }
    assert_eq!(
        h.standin.tokens_issued(),
        1,
        "one token fetch for every thread"
    );
    let delivered = h.standin.delivered();
    for customer in customers {
        let theirs: Vec<String> = delivered
            .iter()
            .filter(|d| d.touser == customer)
            .map(|d| d.content.clone())
            .collect();
        let expected: Vec<String> = (0..5).map(|n| format!("{customer} {n}")).collect();
        assert_eq!(theirs, expected);
    }
}

#[test]
fn expired_token_is_fetched_again() {
    let h = Harness::start(fast_limits());
    h.standin.customer_wrote(APP_ID, "oC");
    h.reply("oC", "one", 1);
    assert_eq!(h.report().outcome, Outcome::Delivered);
    h.standin.expire_tokens();
    h.reply("oC", "two", 2);
    let report = h.report();
    assert_eq!((report.outcome, report.attempts), (Outcome::Delivered, 2));
    assert_eq!(h.standin.tokens_issued(), 2);
    assert_eq!(h.errcodes_answered(SEND), vec![0, 42001, 0]);
}

#[test]
fn invalid_token_errcodes_are_fetched_again() {
    for errcode in [40001, 40014] {
        let h = Harness::start(fast_limits());
        h.standin.customer_wrote(APP_ID, "oC");
        h.standin.inject(
            Endpoint::Send,
            Fault::Errcode(errcode, "invalid credential".into()),
        );
        h.reply("oC", "hi", 1);
        assert_eq!(h.report().outcome, Outcome::Delivered, "errcode {errcode}");
        assert_eq!(h.standin.tokens_issued(), 2, "errcode {errcode}");
    }
}

#[test]
fn token_is_renewed_before_it_expires() {
    let h = Harness::start(fast_limits());
    // Tokens that live 2 s are renewed after 1.8 s (90% of their life).
    h.standin.set_token_expires_in(Duration::from_secs(2));
    h.standin.customer_wrote(APP_ID, "oC");
    h.reply("oC", "one", 1);
    assert_eq!(h.report().outcome, Outcome::Delivered);
    std::thread::sleep(Duration::from_millis(1900));
    h.reply("oC", "two", 2);
    assert_eq!(h.report().outcome, Outcome::Delivered);
    assert_eq!(h.standin.tokens_issued(), 2);
    // The stale token was never sent: WeChat never had to answer 42001.
    assert_eq!(h.errcodes_answered(SEND), vec![0, 0]);
}

#[test]
fn forty_eight_hour_window_is_reported_not_retried() {
    let h = Harness::start(fast_limits());
    h.standin.customer_wrote(APP_ID, "oC");
    h.standin
        .age_customer(APP_ID, "oC", Duration::from_secs(48 * 3600 + 1));
    h.reply("oC", "too late", 1);
    assert_eq!(h.undelivered(), (Reason::ReplyWindowClosed, Some(45015), 1));
    assert_eq!(Reason::ReplyWindowClosed.code(), "wechat_window_closed");
    assert!(h.standin.delivered().is_empty());
    // A new message from the customer opens the window again.
    h.standin.customer_wrote(APP_ID, "oC");
    h.reply("oC", "now", 2);
    assert_eq!(h.report().outcome, Outcome::Delivered);
    let mut metrics = String::new();
    h.metrics.render(&mut metrics);
    assert!(
        metrics.contains("chinwag_wechat_replies_total{result=\"wechat_window_closed\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("chinwag_wechat_replies_total{result=\"delivered\"} 1\n"),
        "{metrics}"
    );
}

#[test]
fn reply_count_limit_is_reported() {
    let h = Harness::start(fast_limits());
    h.standin.customer_wrote(APP_ID, "oC");
    for tag in 0..6 {
        h.reply("oC", &format!("reply {tag}"), tag);
    }
    for _ in 0..5 {
        assert_eq!(h.report().outcome, Outcome::Delivered);
    }
    assert_eq!(h.undelivered(), (Reason::ReplyLimitReached, Some(45047), 1));
}

#[test]
fn customer_who_never_wrote_is_refused() {
    let h = Harness::start(fast_limits());
    h.reply("oStranger", "hello?", 1);
    assert_eq!(h.undelivered(), (Reason::Recipient, Some(40003), 1));
}

#[test]
fn transient_failures_are_retried() {
    let h = Harness::start(fast_limits());
    h.standin.customer_wrote(APP_ID, "oC");
    h.standin
        .inject(Endpoint::Send, Fault::Errcode(-1, "system error".into()));
    h.standin.inject(Endpoint::Send, Fault::Status(503));
    h.standin.inject(Endpoint::Send, Fault::Drop);
    h.reply("oC", "persistent", 1);
    let report = h.report();
    assert_eq!((report.outcome, report.attempts), (Outcome::Delivered, 4));
    assert_eq!(h.standin.delivered().len(), 1);
}

#[test]
fn a_call_that_hangs_times_out_and_is_retried() {
    let h = Harness::start(SenderLimits {
        http_timeout_ms: 300,
        ..fast_limits()
    });
    h.standin.customer_wrote(APP_ID, "oC");
    h.standin
        .inject(Endpoint::Send, Fault::Hang(Duration::from_secs(3)));
    h.reply("oC", "patient", 1);
    let report = h.report();
    assert_eq!((report.outcome, report.attempts), (Outcome::Delivered, 2));
}

#[test]
fn gives_up_after_the_attempts() {
    let h = Harness::start(SenderLimits {
        send_attempts_max: 3,
        ..fast_limits()
    });
    h.standin.customer_wrote(APP_ID, "oC");
    for _ in 0..3 {
        h.standin
            .inject(Endpoint::Send, Fault::Errcode(-1, "system error".into()));
    }
    h.reply("oC", "never", 1);
    assert_eq!(h.undelivered(), (Reason::Unreachable, None, 3));
    assert!(h.standin.delivered().is_empty());
    assert_eq!(h.errcodes_answered(SEND), vec![-1, -1, -1]);
}

#[test]
fn stand_in_down_for_a_while() {
    let h = Harness::start(SenderLimits {
        send_attempts_max: 20,
        send_backoff_first_ms: 50,
        send_backoff_max_ms: 200,
        ..fast_limits()
    });
    h.standin.customer_wrote(APP_ID, "oC");
    h.standin.set_down(true);
    h.reply("oC", "while down", 1);
    // Give the sender time to fail at least once against the closed port.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        h.reports.try_recv().is_err(),
        "no report while WeChat is unreachable"
    );
    h.standin.set_down(false);
    let report = h.report();
    assert_eq!(report.outcome, Outcome::Delivered);
    assert!(report.attempts > 1, "{report:?}");
    assert_eq!(h.standin.delivered()[0].content, "while down");
}

#[test]
fn wrong_secret_is_reported_at_once() {
    let h = Harness::start_with_secret(fast_limits(), "wrong-secret");
    h.standin.customer_wrote(APP_ID, "oC");
    h.reply("oC", "hi", 1);
    assert_eq!(h.undelivered(), (Reason::Account, Some(40125), 1));
    assert_eq!(h.standin.tokens_issued(), 0);
}

/// A minimal account server URL built on `wechat::callback`, as the gateway's endpoint will be:
/// answers the URL check, opens pushes, records them; the first `slow` pushes are answered
/// after `delay` (to make the driver retry).
mod callback_server {
    use super::*;
    use chinwag_engine::wechat::callback::{self, Query, SUCCESS};
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    pub struct Server {
        pub url: String,
        pub opened: Arc<Mutex<Vec<Message>>>,
        pub refused: Arc<Mutex<Vec<String>>>,
    }

    pub fn start(account: Account, slow: usize, delay: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/wechat/{}",
            listener.local_addr().unwrap(),
            account.app_id
        );
        let opened = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let (opened2, refused2) = (opened.clone(), refused.clone());
        let account = Arc::new(account);
        let slow = Arc::new(Mutex::new(slow));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (account, opened, refused, slow) = (
                    account.clone(),
                    opened2.clone(),
                    refused2.clone(),
                    slow.clone(),
                );
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    let (head, body) = loop {
                        let n = stream.read(&mut chunk).unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        let length: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + length {
                            break (head, buf[end + 4..end + 4 + length].to_vec());
                        }
                    };
                    let target = head.split(' ').nth(1).unwrap_or("");
                    let query = Query::parse(target.split_once('?').map_or("", |(_, q)| q));
                    let (status, text) = if head.starts_with("GET") {
                        match callback::verify(&account, &query) {
                            Ok(echostr) => (200, echostr),
                            Err(e) => (403, e.to_string()),
                        }
                    } else {
                        match callback::open(&account, &query, &body) {
                            Ok(message) => {
                                opened.lock().unwrap().push(message);
                                let mut slow = slow.lock().unwrap();
                                if *slow > 0 {
                                    *slow -= 1;
                                    drop(slow);
                                    std::thread::sleep(delay);
                                }
                                (200, SUCCESS.to_string())
                            }
                            Err(e) => {
                                refused.lock().unwrap().push(e.to_string());
                                (400, e.to_string())
                            }
                        }
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                        text.len()
                    );
                });
            }
        });
        Server {
            url,
            opened,
            refused,
        }
    }
}

fn text_message(from: &str, content: &str, msg_id: u64) -> Message {
    Message {
        to: "gh_shop".into(),
        from: OpenId::parse(from).unwrap(),
        create_time: 1_700_000_000,
        msg_id: Some(msg_id),
        body: Body::Text {
            content: content.into(),
        },
    }
}

#[test]
fn driver_posts_plain_and_safe_callbacks_the_module_opens() {
    for mode in [Mode::Plain, Mode::Safe] {
        let mut account = account("http://127.0.0.1:1", SECRET);
        account.mode = mode;
        let server = callback_server::start(account, 0, Duration::ZERO);
        let mut driver = Driver::new(&server.url, APP_ID, TOKEN);
        if mode == Mode::Safe {
            driver = driver.safe(AES_KEY);
        }
        assert_eq!(
            driver.verify_url("5837397749236262829"),
            (200, "5837397749236262829".into())
        );
        let sent = text_message("oCustomer1", "在吗？<b>&", 7001);
        let delivery = driver.post(&sent);
        assert_eq!(
            (delivery.attempts, delivery.status, delivery.body.as_str()),
            (1, Some(200), "success")
        );
        assert_eq!(server.opened.lock().unwrap().as_slice(), [sent]);
        // The same push signed with another token is refused and not opened.
        let forged = Driver::new(&server.url, APP_ID, "wrongToken");
        let forged = if mode == Mode::Safe {
            forged.safe(AES_KEY)
        } else {
            forged
        };
        let delivery = forged.post(&text_message("oCustomer1", "forged", 7002));
        assert_eq!(delivery.status, Some(400));
        assert_eq!(server.opened.lock().unwrap().len(), 1);
        assert_eq!(
            server.refused.lock().unwrap().len(),
            4,
            "refused on every one of WeChat's tries"
        );
    }
}

#[test]
fn driver_retries_like_wechat_when_no_answer_comes_in_time() {
    // The first two answers come after 3 s, past the driver's 1 s; the third has that whole
    // second (a loaded machine once took more than 200 ms).
    let server = callback_server::start(
        account("http://127.0.0.1:1", SECRET),
        2,
        Duration::from_millis(3000),
    );
    let standin = StandIn::start(&[(APP_ID, SECRET)]);
    let driver = Driver::new(&server.url, APP_ID, TOKEN)
        .safe(AES_KEY)
        .wait(Duration::from_millis(1000))
        .customers(standin.customers());
    let delivery = driver.post(&text_message("oCustomer1", "hello", 9001));
    assert_eq!((delivery.attempts, delivery.status), (3, Some(200)));
    // The endpoint saw the push three times, each with the same dedup key: storing by that key
    // stores it once.
    let opened = server.opened.lock().unwrap().clone();
    assert_eq!(opened.len(), 3);
    assert!(opened
        .iter()
        .all(|m| m.dedup_key() == opened[0].dedup_key()));
    // The customer's message opened the reply window at the stand-in.
    let (tx, rx) = mpsc::channel();
    let sender = Sender::start(
        &[account(&standin.url(), SECRET)],
        &fast_limits(),
        Default::default(),
        move |r| {
            let _ = tx.send(r);
        },
    )
    .unwrap();
    sender
        .submit(Reply {
            app_id: APP_ID.into(),
            to: OpenId::parse("oCustomer1").unwrap(),
            content: "hi!".into(),
            kf_account: None,
            tag: 0u32,
        })
        .unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap().outcome, Outcome::Delivered);
}

#[test]
fn driver_gives_up_after_wechats_retries() {
    let server = callback_server::start(
        account("http://127.0.0.1:1", SECRET),
        10,
        Duration::from_millis(500),
    );
    let driver = Driver::new(&server.url, APP_ID, TOKEN)
        .safe(AES_KEY)
        .wait(Duration::from_millis(100));
    let delivery = driver.post(&text_message("oCustomer1", "anyone?", 9002));
    assert_eq!((delivery.attempts, delivery.status), (4, None));
}
