//! WeChat's HTTP API as the sender uses it: the access token and the customer-service message.
//! Blocking calls (`ureq`), each with a timeout: only for the sender's own threads.
//!
//! - `GET {base}/cgi-bin/token?grant_type=client_credential&appid=…&secret=…` →
//!   `{"access_token":"…","expires_in":7200}` or `{"errcode":…,"errmsg":"…"}`;
//! - `POST {base}/cgi-bin/message/custom/send?access_token=…` with
//!   `{"touser":…,"msgtype":"text","text":{"content":…}[,"customservice":{"kf_account":…}]}` →
//!   `{"errcode":0,"errmsg":"ok"}` or an errcode, classified by [`classify`].

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::token::{AccessToken, TokenError};

/// Largest API answer read; WeChat's are under a hundred bytes.
const RESPONSE_BYTES_MAX: u64 = 64 * 1024;

/// What an errcode from the message API means for the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Ok,
    /// 40001, 40014, 42001: the token is invalid or expired; fetch a new one and retry.
    TokenInvalid,
    /// -1 (system busy), 45011 (per-minute API limit): retry after a pause.
    Transient,
    /// One of WeChat's rules refused the message: retrying will not deliver it.
    Refused(Rule),
}

/// The rule that refused a message, as an agent should be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// 45015: more than 48 hours since the customer last wrote (or they unfollowed).
    ReplyWindowClosed,
    /// 45047: the replies allowed per customer message are used up.
    ReplyLimitReached,
    /// 40003 (not an OpenID of this account), 43004 (the customer does not follow the account).
    Recipient,
    /// 45002 (too long), 44004 (empty), 40008 (bad message type), 47001 (malformed).
    Content,
    /// 65400-65499: the named customer-service (kf) account cannot send.
    KfAccount,
    /// 48001 (API not authorised for this account), 40164 (server IP not on the allow list),
    /// 45009 (the day's API quota is used up) and any errcode not listed here.
    Account,
}

/// Classifies a message API errcode.
pub fn classify(errcode: i64) -> Class {
    match errcode {
        0 => Class::Ok,
        40001 | 40014 | 42001 => Class::TokenInvalid,
        -1 | 45011 => Class::Transient,
        45015 => Class::Refused(Rule::ReplyWindowClosed),
        45047 => Class::Refused(Rule::ReplyLimitReached),
        40003 | 43004 => Class::Refused(Rule::Recipient),
        45002 | 44004 | 40008 | 47001 => Class::Refused(Rule::Content),
        65400..=65499 => Class::Refused(Rule::KfAccount),
        _ => Class::Refused(Rule::Account),
    }
}

/// The result of one send attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    Ok,
    TokenInvalid {
        errcode: i64,
        errmsg: String,
    },
    Transient(String),
    Refused {
        rule: Rule,
        errcode: i64,
        errmsg: String,
    },
}

/// One account's API client: a base URL and an HTTP agent with the configured timeouts.
pub struct Api {
    agent: ureq::Agent,
    base: Arc<str>,
}

#[derive(Deserialize)]
struct ErrReply {
    #[serde(default)]
    errcode: i64,
    #[serde(default)]
    errmsg: String,
}

#[derive(Deserialize)]
struct TokenReply {
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    errcode: i64,
    #[serde(default)]
    errmsg: String,
}

#[derive(Serialize)]
struct CustomSend<'a> {
    touser: &'a str,
    msgtype: &'static str,
    text: Text<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    customservice: Option<KfAccount<'a>>,
}

#[derive(Serialize)]
struct Text<'a> {
    content: &'a str,
}

#[derive(Serialize)]
struct KfAccount<'a> {
    kf_account: &'a str,
}

impl Api {
    /// `timeout` bounds each call as a whole: connect, send and the answer.
    pub fn new(base: &str, timeout: Duration) -> Api {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Api {
            agent,
            base: base.trim_end_matches('/').into(),
        }
    }

    /// Fetches an access token.
    pub fn fetch_token(&self, app_id: &str, app_secret: &str) -> Result<AccessToken, TokenError> {
        let url = format!("{}/cgi-bin/token", self.base);
        let answer = self
            .agent
            .get(&url)
            .query("grant_type", "client_credential")
            .query("appid", app_id)
            .query("secret", app_secret)
            .call();
        let body = read(answer).map_err(TokenError::Transient)?;
        let reply: TokenReply = serde_json::from_str(&body).map_err(|_| {
            TokenError::Transient(format!("not a token answer: {}", excerpt(&body)))
        })?;
        match (reply.errcode, reply.access_token, reply.expires_in) {
            (0, Some(value), Some(expires_in)) if !value.is_empty() => Ok(AccessToken {
                value: value.into(),
                expires_in: Duration::from_secs(expires_in),
            }),
            (0, _, _) => Err(TokenError::Transient(format!(
                "token answer without a token: {}",
                excerpt(&body)
            ))),
            (-1, _, _) => Err(TokenError::Transient(format!(
                "errcode -1 {}",
                reply.errmsg
            ))),
            (errcode, _, _) => Err(TokenError::Refused {
                errcode,
                errmsg: reply.errmsg,
            }),
        }
    }

    /// Sends one text message with the customer-service API.
    pub fn send_text(
        &self,
        token: &str,
        to: &str,
        content: &str,
        kf_account: Option<&str>,
    ) -> Sent {
        let url = format!("{}/cgi-bin/message/custom/send", self.base);
        let payload = CustomSend {
            touser: to,
            msgtype: "text",
            text: Text { content },
            customservice: kf_account.map(|kf_account| KfAccount { kf_account }),
        };
        let json = serde_json::to_string(&payload).expect("plain strings always serialise");
        let answer = self
            .agent
            .post(&url)
            .query("access_token", token)
            .header("Content-Type", "application/json; charset=utf-8")
            .send(json.as_str());
        let body = match read(answer) {
            Ok(body) => body,
            Err(why) => return Sent::Transient(why),
        };
        let Ok(reply) = serde_json::from_str::<ErrReply>(&body) else {
            return Sent::Transient(format!("not an API answer: {}", excerpt(&body)));
        };
        match classify(reply.errcode) {
            Class::Ok => Sent::Ok,
            Class::TokenInvalid => Sent::TokenInvalid {
                errcode: reply.errcode,
                errmsg: reply.errmsg,
            },
            Class::Transient => {
                Sent::Transient(format!("errcode {} {}", reply.errcode, reply.errmsg))
            }
            Class::Refused(rule) => Sent::Refused {
                rule,
                errcode: reply.errcode,
                errmsg: reply.errmsg,
            },
        }
    }
}

/// The body of a 2xx answer; anything else (a 5xx, a timeout, a refused connection, an answer
/// over 64 KiB) is a transient failure described in a sentence.
fn read(answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<String, String> {
    let mut response = answer.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(format!("HTTP {status}"));
    }
    response
        .body_mut()
        .with_config()
        .limit(RESPONSE_BYTES_MAX)
        .read_to_string()
        .map_err(|e| e.to_string())
}

/// The start of an unexpected answer, for a log line.
fn excerpt(body: &str) -> &str {
    let mut end = body.len().min(120);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    &body[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_documented_errcodes() {
        assert_eq!(classify(0), Class::Ok);
        for code in [40001, 40014, 42001] {
            assert_eq!(classify(code), Class::TokenInvalid, "{code}");
        }
        assert_eq!(classify(-1), Class::Transient);
        assert_eq!(classify(45011), Class::Transient);
        assert_eq!(classify(45015), Class::Refused(Rule::ReplyWindowClosed));
        assert_eq!(classify(45047), Class::Refused(Rule::ReplyLimitReached));
        assert_eq!(classify(43004), Class::Refused(Rule::Recipient));
        assert_eq!(classify(45002), Class::Refused(Rule::Content));
        assert_eq!(classify(65401), Class::Refused(Rule::KfAccount));
        assert_eq!(classify(48001), Class::Refused(Rule::Account));
        assert_eq!(classify(99999), Class::Refused(Rule::Account));
    }

    #[test]
    fn payload_is_wechats_json() {
        let payload = CustomSend {
            touser: "OPENID",
            msgtype: "text",
            text: Text {
                content: "你好 \"x\"",
            },
            customservice: Some(KfAccount {
                kf_account: "kf2001@gh_1",
            }),
        };
        // Non-ASCII stays UTF-8 (WeChat shows \u escapes literally in some clients).
        assert_eq!(
            serde_json::to_string(&payload).unwrap(),
            r#"{"touser":"OPENID","msgtype":"text","text":{"content":"你好 \"x\""},"customservice":{"kf_account":"kf2001@gh_1"}}"#
        );
    }

    #[test]
    fn unreachable_api_is_transient() {
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        let api = Api::new("http://127.0.0.1:1", Duration::from_secs(2));
        assert!(matches!(
            api.fetch_token("wx1", "s"),
            Err(TokenError::Transient(_))
        ));
        assert!(matches!(
            api.send_text("t", "o", "hi", None),
            Sent::Transient(_)
        ));
    }

    #[test]
    fn excerpt_respects_char_boundaries() {
        let text = "é".repeat(100);
        assert!(excerpt(&text).len() <= 120);
    }
}
