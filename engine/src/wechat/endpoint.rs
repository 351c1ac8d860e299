//! The callback endpoint, without I/O: an HTTP request to `/wechat/<appid>` in, the answer and
//! the message to store out; and the way back, from a `wechat:<id>` customer to a [`Reply`].
//!
//! The contract:
//! - one path per account, `/wechat/<appid>`; an unknown AppID is `404`;
//! - `GET` is the URL check: `200` with `echostr`, or `403`;
//! - `POST` is a push: `200 success` with the [`Inbound`] message to store, or a refusal —
//!   `403` (signature), `400` (XML, decryption, AppID), `413` (over `XML_BYTES_MAX`),
//!   `503` (the customer directory could not record a new customer: WeChat retries) — with
//!   nothing to store; other methods `405`;
//! - refusals are counted (`Metrics`) and logged at `info`, at most [`REFUSAL_LOGS_PER_S`] lines
//!   a second, so a flood of forged callbacks cannot flood the log;
//! - the customer becomes `wechat:<id>` through the [`Directory`], before anything is stored.
//!
//! The caller stores the [`Inbound`] as a message of `wechat:<customer>` in their conversation
//! with `shop`, with `cmid` as the client message id (so WeChat's retries are stored once), and
//! dispatches it as a buyer's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::account::Account;
use super::callback::{self, CallbackError, Query, SUCCESS};
use super::directory::Directory;
use super::message::{Body, Message, XML_BYTES_MAX};
use super::metrics::{Metrics, Refusal};
use super::sender::Reply;

/// Where account paths start on the client port.
pub const PATH_PREFIX: &str = "/wechat/";
/// Most refusal log lines per second (the rest are counted only).
pub const REFUSAL_LOGS_PER_S: u32 = 10;

/// The HTTP answer: a status and a `text/plain` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    fn new(status: u16, body: impl Into<String>) -> Answer {
        Answer {
            status,
            body: body.into(),
        }
    }
}

/// A customer's message, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub app_id: String,
    /// The conversation's shop.
    pub shop: u64,
    /// The sender: `wechat:<customer>`.
    pub customer: u64,
    /// The client message id: the push's dedup key.
    pub cmid: String,
    /// `text`, `image`, `voice`, `video`, `shortvideo`, `event`, or WeChat's other `MsgType`s.
    pub kind: String,
    /// The text; a media id for media; `Event` (and ` EventKey`) for an event; empty otherwise.
    pub body: String,
    /// `CreateTime`, seconds since the epoch.
    pub create_time: u64,
}

impl Inbound {
    fn from_message(account: &Account, customer: u64, message: Message) -> Inbound {
        let cmid = message.dedup_key().to_string();
        let (kind, body) = match message.body {
            Body::Text { content } => ("text".to_string(), content),
            Body::Media { kind, media_id } => (kind.as_str().to_string(), media_id),
            Body::Event { event, key } => (
                "event".to_string(),
                match key {
                    Some(key) if !key.is_empty() => format!("{event} {key}"),
                    _ => event,
                },
            ),
            Body::Other { kind } => (kind, String::new()),
        };
        Inbound {
            app_id: account.app_id.clone(),
            shop: account.shop,
            customer,
            cmid,
            kind,
            body,
            create_time: message.create_time,
        }
    }
}

pub struct Endpoint {
    accounts: HashMap<String, Account>,
    directory: Arc<Directory>,
    metrics: Arc<Metrics>,
    refusal_log: Mutex<(Instant, u32)>,
}

impl Endpoint {
    pub fn new(
        accounts: Vec<Account>,
        directory: Arc<Directory>,
        metrics: Arc<Metrics>,
    ) -> Endpoint {
        Endpoint {
            accounts: accounts
                .into_iter()
                .map(|a| (a.app_id.clone(), a))
                .collect(),
            directory,
            metrics,
            refusal_log: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Whether `path` (without the query) is one of this endpoint's.
    pub fn handles(path: &str) -> bool {
        path.starts_with(PATH_PREFIX)
    }

    /// Handles one request: `method`, `path` (`/wechat/<appid>`), the raw query string (without
    /// `?`) and the body. The caller must not read a body over `XML_BYTES_MAX` bytes: it
    /// answers [`Endpoint::too_large`] instead.
    pub fn handle(
        &self,
        method: &str,
        path: &str,
        query: &str,
        body: &[u8],
    ) -> (Answer, Option<Inbound>) {
        let app_id = path.strip_prefix(PATH_PREFIX).unwrap_or("");
        let Some(account) = self.accounts.get(app_id) else {
            return (
                self.refuse(Refusal::UnknownAccount, app_id, "no such account"),
                None,
            );
        };
        let query = Query::parse(query);
        match method {
            "GET" => match callback::verify(account, &query) {
                Ok(echostr) => {
                    self.metrics.verified();
                    (Answer::new(200, echostr), None)
                }
                Err(e) => (self.refuse_callback(app_id, &e), None),
            },
            "POST" => match callback::open(account, &query, body) {
                Ok(message) => match self.directory.assign(&account.app_id, &message.from) {
                    Ok(customer) => {
                        self.metrics.accepted();
                        (
                            Answer::new(200, SUCCESS),
                            Some(Inbound::from_message(account, customer, message)),
                        )
                    }
                    Err(e) => (
                        self.refuse(Refusal::Directory, app_id, &e.to_string()),
                        None,
                    ),
                },
                Err(e) => (self.refuse_callback(app_id, &e), None),
            },
            _ => (self.refuse(Refusal::Method, app_id, method), None),
        }
    }

    /// The answer to a body over `XML_BYTES_MAX`, given without reading it.
    pub fn too_large(&self, path: &str) -> Answer {
        let app_id = path.strip_prefix(PATH_PREFIX).unwrap_or("");
        self.refuse(
            Refusal::TooLarge,
            app_id,
            &format!("body over {XML_BYTES_MAX} bytes"),
        )
    }

    /// The reply to send for an agent's message to `wechat:<customer>`; `None` when the
    /// directory does not know the customer.
    pub fn reply<T>(&self, customer: u64, content: String, tag: T) -> Option<Reply<T>> {
        let known = self.directory.customer(customer)?;
        Some(Reply {
            app_id: known.app_id.to_string(),
            to: known.open_id,
            content,
            kf_account: None,
            tag,
        })
    }

    fn refuse_callback(&self, app_id: &str, error: &CallbackError) -> Answer {
        let refusal = match error {
            CallbackError::MissingParam(_) | CallbackError::BadSignature => Refusal::Signature,
            CallbackError::TooLarge => Refusal::TooLarge,
            CallbackError::Xml(_) => Refusal::Xml,
            CallbackError::Cipher(_) => Refusal::Cipher,
        };
        self.refuse(refusal, app_id, &error.to_string())
    }

    fn refuse(&self, refusal: Refusal, app_id: &str, detail: &str) -> Answer {
        self.metrics.refused(refusal);
        if self.may_log() {
            // The app id comes from the URL: shown with escapes, cut to a sane length.
            let shown: String = app_id.chars().take(64).collect();
            tracing::info!(app_id = ?shown, refusal = refusal.label(), detail, "wechat callback refused");
        }
        let status = match refusal {
            Refusal::UnknownAccount => 404,
            Refusal::Method => 405,
            Refusal::TooLarge => 413,
            Refusal::Signature => 403,
            Refusal::Xml | Refusal::Cipher => 400,
            Refusal::Directory => 503,
        };
        Answer::new(status, refusal.label())
    }

    fn may_log(&self) -> bool {
        let mut window = self.refusal_log.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(window.0).as_secs() >= 1 {
            *window = (now, 0);
        }
        window.1 += 1;
        window.1 <= REFUSAL_LOGS_PER_S
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::account::{AccountSettings, Mode};
    use crate::wechat::message::OpenId;
    use crate::wechat::signature::Signature;

    const APP_ID: &str = "wx5823bf96d3bd56c7";
    const TOKEN: &str = "QDG6eK";

    fn endpoint(dir: &std::path::Path) -> Endpoint {
        let account = AccountSettings {
            app_id: APP_ID.into(),
            app_secret: "s".into(),
            token: TOKEN.into(),
            encoding_aes_key: Some("jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C".into()),
            mode: Mode::Safe,
            api_base: "http://127.0.0.1:1".into(),
            shop: 42,
            kf_account: None,
        }
        .check()
        .unwrap();
        let directory = Arc::new(Directory::open(dir, false).unwrap());
        Endpoint::new(vec![account], directory, Arc::new(Metrics::default()))
    }

    fn safe_push(xml: &str) -> (String, Vec<u8>) {
        let key =
            crate::wechat::cipher::AesKey::parse("jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C")
                .unwrap();
        let encrypt = key.encrypt(xml, APP_ID);
        let query = Query {
            signature: Some(Signature::of(&[TOKEN, "1700000000", "n1"]).to_string()),
            timestamp: Some("1700000000".into()),
            nonce: Some("n1".into()),
            encrypt_type: Some("aes".into()),
            msg_signature: Some(Signature::of(&[TOKEN, "1700000000", "n1", &encrypt]).to_string()),
            ..Query::default()
        };
        let body = crate::wechat::message::Envelope { to: None, encrypt }.to_xml();
        (query.to_query_string(), body.into_bytes())
    }

    fn text(from: &str, content: &str, msg_id: u64) -> String {
        Message {
            to: "gh_1".into(),
            from: OpenId::parse(from).unwrap(),
            create_time: 1700000000,
            msg_id: Some(msg_id),
            body: Body::Text {
                content: content.into(),
            },
        }
        .to_xml()
    }

    #[test]
    fn a_push_becomes_an_inbound_message_of_a_wechat_user() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = endpoint(dir.path());
        let (query, body) = safe_push(&text("oA", "在吗", 5));
        let (answer, inbound) =
            endpoint.handle("POST", "/wechat/wx5823bf96d3bd56c7", &query, &body);
        assert_eq!(answer, Answer::new(200, "success"));
        let inbound = inbound.unwrap();
        assert_eq!(
            inbound,
            Inbound {
                app_id: APP_ID.into(),
                shop: 42,
                customer: 1,
                cmid: "wx-msg-5".into(),
                kind: "text".into(),
                body: "在吗".into(),
                create_time: 1700000000,
            }
        );
        // A retry of the same push: the same customer and cmid (stored once by the cmid).
        let (_, again) = endpoint.handle("POST", "/wechat/wx5823bf96d3bd56c7", &query, &body);
        assert_eq!(again.unwrap(), inbound);
        // Another customer gets another id; the way back finds the OpenID.
        let (query, body) = safe_push(&text("oB", "hi", 6));
        let (_, other) = endpoint.handle("POST", "/wechat/wx5823bf96d3bd56c7", &query, &body);
        assert_eq!(other.unwrap().customer, 2);
        let reply = endpoint.reply(1, "您好".into(), 7u32).unwrap();
        assert_eq!(
            (reply.app_id.as_str(), reply.to.as_str(), reply.tag),
            (APP_ID, "oA", 7)
        );
        assert!(endpoint.reply(99, "x".into(), 0u32).is_none());
        assert_eq!(endpoint.metrics.accepted_count(), 3);
    }

    #[test]
    fn refusals_have_their_status_and_store_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = endpoint(dir.path());
        let path = "/wechat/wx5823bf96d3bd56c7";
        let (query, body) = safe_push(&text("oA", "x", 1));
        assert_eq!(
            endpoint
                .handle("POST", "/wechat/wxnobody", &query, &body)
                .0
                .status,
            404
        );
        assert_eq!(endpoint.handle("PUT", path, &query, &body).0.status, 405);
        let forged = query.replace("signature=", "signature=0");
        assert_eq!(endpoint.handle("POST", path, &forged, &body).0.status, 403);
        assert_eq!(
            endpoint
                .handle("POST", path, &query, b"<xml><Encrypt>AAAA</Encrypt></xml>")
                .0
                .status,
            403
        );
        assert_eq!(
            endpoint.handle("POST", path, &query, b"not xml").0.status,
            400
        );
        assert_eq!(
            endpoint
                .handle("POST", path, &query, &vec![b' '; XML_BYTES_MAX + 1])
                .0
                .status,
            413
        );
        assert_eq!(endpoint.too_large(path).status, 413);
        for (status, inbound) in [
            endpoint.handle("POST", path, &forged, &body),
            endpoint.handle("POST", path, &query, b"not xml"),
        ] {
            assert!(status.status >= 400 && inbound.is_none());
        }
        assert!(
            endpoint.directory.is_empty(),
            "no customer recorded by a refused push"
        );
        assert_eq!(endpoint.metrics.refused_count(Refusal::Signature), 3);
        assert_eq!(endpoint.metrics.refused_count(Refusal::TooLarge), 2);
    }

    #[test]
    fn url_check_answers_echostr() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = endpoint(dir.path());
        let signature = Signature::of(&[TOKEN, "1", "2"]);
        let query = format!("signature={signature}&timestamp=1&nonce=2&echostr=hello123");
        assert_eq!(
            endpoint
                .handle("GET", "/wechat/wx5823bf96d3bd56c7", &query, b"")
                .0,
            Answer::new(200, "hello123")
        );
        let bad = "signature=00&timestamp=1&nonce=2&echostr=hello123";
        assert_eq!(
            endpoint
                .handle("GET", "/wechat/wx5823bf96d3bd56c7", bad, b"")
                .0
                .status,
            403
        );
    }

    #[test]
    fn events_and_media_keep_their_kind() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = endpoint(dir.path());
        let event = "<xml><ToUserName>gh_1</ToUserName><FromUserName>oA</FromUserName><CreateTime>123</CreateTime><MsgType>event</MsgType><Event>CLICK</Event><EventKey>V1001</EventKey></xml>";
        let (query, body) = safe_push(event);
        let inbound = endpoint
            .handle("POST", "/wechat/wx5823bf96d3bd56c7", &query, &body)
            .1
            .unwrap();
        assert_eq!(
            (
                inbound.kind.as_str(),
                inbound.body.as_str(),
                inbound.cmid.as_str()
            ),
            ("event", "CLICK V1001", "wx-event-oA-123")
        );
        let image = "<xml><ToUserName>gh_1</ToUserName><FromUserName>oA</FromUserName><CreateTime>124</CreateTime><MsgType>image</MsgType><MediaId>m1</MediaId><MsgId>9</MsgId></xml>";
        let (query, body) = safe_push(image);
        let inbound = endpoint
            .handle("POST", "/wechat/wx5823bf96d3bd56c7", &query, &body)
            .1
            .unwrap();
        assert_eq!(
            (inbound.kind.as_str(), inbound.body.as_str()),
            ("image", "m1")
        );
    }
}
