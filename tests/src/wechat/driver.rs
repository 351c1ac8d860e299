//! A driver that plays WeChat's side of the callbacks: it posts customers' messages to an
//! account's server URL, signed (and encrypted in safe mode) as WeChat does, and retries as
//! WeChat does when no answer comes within `wait` (5 s) — `retries` more times (3).
//!
//! The signing and the encryption use the engine's `wechat` module, whose values are checked
//! against WeChat's and wechatpy's published vectors in its unit tests.

use std::time::Duration;

use chinwag_engine::wechat::account::Mode;
use chinwag_engine::wechat::callback::Query;
use chinwag_engine::wechat::cipher::AesKey;
use chinwag_engine::wechat::message::{Envelope, Message};
use chinwag_engine::wechat::signature::Signature;

use super::standin::Customers;

/// WeChat's wait for an answer before it retries.
pub const WECHAT_WAIT: Duration = Duration::from_secs(5);
/// WeChat's retries after the first attempt.
pub const WECHAT_RETRIES: u32 = 3;

pub struct Driver {
    /// The account's server URL (e.g. `http://127.0.0.1:7000/wechat/wx…`).
    pub url: String,
    pub app_id: String,
    pub token: String,
    /// Safe or compatible mode: encrypt bodies with this key.
    pub aes_key: Option<AesKey>,
    pub mode: Mode,
    pub wait: Duration,
    pub retries: u32,
    /// When set, every delivered message also opens the customer's reply window there.
    pub customers: Option<Customers>,
}

/// What happened to one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Requests made (1 + retries used).
    pub attempts: u32,
    /// The last answer's status, if any answer came.
    pub status: Option<u16>,
    pub body: String,
}

impl Driver {
    pub fn new(url: &str, app_id: &str, token: &str) -> Driver {
        Driver {
            url: url.to_string(),
            app_id: app_id.to_string(),
            token: token.to_string(),
            aes_key: None,
            mode: Mode::Plain,
            wait: WECHAT_WAIT,
            retries: WECHAT_RETRIES,
            customers: None,
        }
    }

    /// Safe mode with this EncodingAESKey.
    pub fn safe(mut self, encoding_aes_key: &str) -> Driver {
        self.aes_key = Some(AesKey::parse(encoding_aes_key).expect("a valid EncodingAESKey"));
        self.mode = Mode::Safe;
        self
    }

    pub fn wait(mut self, wait: Duration) -> Driver {
        self.wait = wait;
        self
    }

    pub fn customers(mut self, customers: Customers) -> Driver {
        self.customers = Some(customers);
        self
    }

    fn agent(&self) -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_global(Some(self.wait))
            .http_status_as_error(false)
            .build()
            .new_agent()
    }

    fn signed(&self, timestamp: &str, nonce: &str) -> Query {
        Query {
            signature: Some(Signature::of(&[&self.token, timestamp, nonce]).to_string()),
            timestamp: Some(timestamp.to_string()),
            nonce: Some(nonce.to_string()),
            ..Query::default()
        }
    }

    /// The server-URL check WeChat makes when the URL is saved: `(status, body)`.
    pub fn verify_url(&self, echostr: &str) -> (u16, String) {
        let mut query = self.signed("1700000000", "verify");
        query.echostr = Some(echostr.to_string());
        let url = format!("{}?{}", self.url, query.to_query_string());
        match self.agent().get(&url).call() {
            Ok(mut response) => (
                response.status().as_u16(),
                response.body_mut().read_to_string().unwrap_or_default(),
            ),
            Err(e) => (0, e.to_string()),
        }
    }

    /// The query string and body WeChat would post for `message`.
    pub fn request(&self, message: &Message) -> (String, String) {
        let timestamp = message.create_time.to_string();
        let nonce = format!(
            "{}",
            message.msg_id.unwrap_or(message.create_time) % 1_000_000_007
        );
        let mut query = self.signed(&timestamp, &nonce);
        let xml = message.to_xml();
        let body = match (&self.aes_key, self.mode) {
            (Some(key), Mode::Safe | Mode::Compatible) => {
                let encrypt = key.encrypt(&xml, &self.app_id);
                query.encrypt_type = Some("aes".to_string());
                query.msg_signature =
                    Some(Signature::of(&[&self.token, &timestamp, &nonce, &encrypt]).to_string());
                Envelope {
                    to: Some(message.to.clone()),
                    encrypt,
                }
                .to_xml()
            }
            _ => xml,
        };
        query.openid = Some(message.from.to_string());
        (query.to_query_string(), body)
    }

    /// Posts `message` as WeChat does: retried while no 2xx answer comes within `wait`.
    pub fn post(&self, message: &Message) -> Delivery {
        let (query, body) = self.request(message);
        let mut delivery = Delivery {
            attempts: 0,
            status: None,
            body: String::new(),
        };
        for _ in 0..=self.retries {
            delivery.attempts += 1;
            let (status, text) = self.post_raw(&query, body.as_bytes());
            delivery.status = (status != 0).then_some(status);
            delivery.body = text;
            if (200..300).contains(&status) {
                if let Some(customers) = &self.customers {
                    customers.wrote(&self.app_id, message.from.as_str());
                }
                break;
            }
        }
        delivery
    }

    /// One request, no retry: `(status, body)`, status 0 when no answer came in time.
    pub fn post_raw(&self, query: &str, body: &[u8]) -> (u16, String) {
        let url = format!("{}?{}", self.url, query);
        let answer = self
            .agent()
            .post(&url)
            .header("Content-Type", "text/xml")
            .send(body);
        match answer {
            Ok(mut response) => (
                response.status().as_u16(),
                response.body_mut().read_to_string().unwrap_or_default(),
            ),
            Err(e) => (0, e.to_string()),
        }
    }
}
