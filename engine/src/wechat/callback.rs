//! WeChat's callbacks to the account's server URL, handled without I/O: the caller hands in
//! the query string and the body, and gets back what to answer or the message to store.
//!
//! - `GET ?signature&timestamp&nonce&echostr` is the URL check WeChat makes when the server URL
//!   is saved: [`verify`] answers `echostr` if the signature matches.
//! - `POST ?signature&timestamp&nonce[&encrypt_type=aes&msg_signature]` carries a message:
//!   [`open`] checks the signatures, decrypts in safe mode and parses the XML.
//!
//! Whatever [`open`] returns, the HTTP answer is [`SUCCESS`] at once for a message and an error
//! status for a refusal: WeChat waits 5 s, then retries (three times), so the answer must not
//! wait for storage, and a retried message must be recognised by its
//! [`DedupKey`](super::message::DedupKey) and stored once.

use super::account::{Account, Mode};
use super::cipher::CipherError;
use super::message::{Envelope, Message, XmlError, XML_BYTES_MAX};
use super::signature::Signature;

/// What a message callback is answered with (WeChat also accepts an empty body).
pub const SUCCESS: &str = "success";
/// Longest query value kept (signatures are 40 characters, timestamps and nonces ~10).
const QUERY_VALUE_BYTES_MAX: usize = 512;

/// Why a callback was refused. None of these stores anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackError {
    /// A query parameter the mode needs is absent (or over 512 bytes).
    MissingParam(&'static str),
    /// `signature` or `msg_signature` does not match: not from WeChat, or the wrong token.
    BadSignature,
    /// The body is over `XML_BYTES_MAX` bytes.
    TooLarge,
    /// The body (or the decrypted XML) is not an acceptable message.
    Xml(XmlError),
    /// Safe mode: the ciphertext was refused (wrong key, tampered, other AppID).
    Cipher(CipherError),
}

impl std::fmt::Display for CallbackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallbackError::MissingParam(name) => write!(f, "missing query parameter {name}"),
            CallbackError::BadSignature => f.write_str("signature does not match"),
            CallbackError::TooLarge => write!(f, "body over {XML_BYTES_MAX} bytes"),
            CallbackError::Xml(e) => write!(f, "{e}"),
            CallbackError::Cipher(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CallbackError {}

impl From<XmlError> for CallbackError {
    fn from(e: XmlError) -> Self {
        CallbackError::Xml(e)
    }
}

impl From<CipherError> for CallbackError {
    fn from(e: CipherError) -> Self {
        CallbackError::Cipher(e)
    }
}

/// The query parameters WeChat puts on a callback URL, percent-decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub signature: Option<String>,
    pub timestamp: Option<String>,
    pub nonce: Option<String>,
    pub echostr: Option<String>,
    pub encrypt_type: Option<String>,
    pub msg_signature: Option<String>,
    pub openid: Option<String>,
}

impl Query {
    /// Parses `a=1&b=2` (without the `?`). Unknown parameters are ignored; a repeated one keeps
    /// its first value; values over 512 bytes or not UTF-8 after decoding are dropped.
    pub fn parse(query: &str) -> Query {
        let mut parsed = Query::default();
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match name {
                "signature" => &mut parsed.signature,
                "timestamp" => &mut parsed.timestamp,
                "nonce" => &mut parsed.nonce,
                "echostr" => &mut parsed.echostr,
                "encrypt_type" => &mut parsed.encrypt_type,
                "msg_signature" => &mut parsed.msg_signature,
                "openid" => &mut parsed.openid,
                _ => continue,
            };
            if slot.is_none() && value.len() <= 3 * QUERY_VALUE_BYTES_MAX {
                *slot = percent_decode(value).filter(|v| v.len() <= QUERY_VALUE_BYTES_MAX);
            }
        }
        parsed
    }

    /// The query string these parameters make (for the test driver).
    pub fn to_query_string(&self) -> String {
        let pairs = [
            ("signature", &self.signature),
            ("timestamp", &self.timestamp),
            ("nonce", &self.nonce),
            ("echostr", &self.echostr),
            ("encrypt_type", &self.encrypt_type),
            ("msg_signature", &self.msg_signature),
            ("openid", &self.openid),
        ];
        let mut out = String::new();
        for (name, value) in pairs {
            if let Some(value) = value {
                if !out.is_empty() {
                    out.push('&');
                }
                out.push_str(name);
                out.push('=');
                percent_encode(value, &mut out);
            }
        }
        out
    }

    fn get<'a>(value: &'a Option<String>, name: &'static str) -> Result<&'a str, CallbackError> {
        value.as_deref().ok_or(CallbackError::MissingParam(name))
    }

    fn check_signature(&self, token: &str) -> Result<(), CallbackError> {
        let signature = Query::get(&self.signature, "signature")?;
        let timestamp = Query::get(&self.timestamp, "timestamp")?;
        let nonce = Query::get(&self.nonce, "nonce")?;
        if Signature::of(&[token, timestamp, nonce]).matches(signature) {
            Ok(())
        } else {
            Err(CallbackError::BadSignature)
        }
    }
}

/// The server-URL check (`GET`): the `echostr` to answer with when the signature matches.
pub fn verify(account: &Account, query: &Query) -> Result<String, CallbackError> {
    query.check_signature(&account.token)?;
    Ok(Query::get(&query.echostr, "echostr")?.to_string())
}

/// A message push (`POST`): checks the signatures, decrypts a safe-mode body and parses it.
///
/// In plain mode only a plain body is accepted; in safe mode only an encrypted one (with
/// `msg_signature`, which is what protects it); in compatible mode the encrypted part is used
/// when `encrypt_type=aes` says there is one. The plain `signature` is checked in every mode,
/// since WeChat always sends it.
pub fn open(account: &Account, query: &Query, body: &[u8]) -> Result<Message, CallbackError> {
    if body.len() > XML_BYTES_MAX {
        return Err(CallbackError::TooLarge);
    }
    query.check_signature(&account.token)?;
    let body = std::str::from_utf8(body)
        .map_err(|_| XmlError::Malformed("body is not UTF-8".to_string()))?;
    let encrypted = match account.mode {
        Mode::Plain => false,
        Mode::Safe => true,
        Mode::Compatible => query.encrypt_type.as_deref() == Some("aes"),
    };
    if !encrypted {
        return Ok(Message::parse(body)?);
    }
    let envelope = Envelope::parse(body)?;
    let msg_signature = Query::get(&query.msg_signature, "msg_signature")?;
    let timestamp = Query::get(&query.timestamp, "timestamp")?;
    let nonce = Query::get(&query.nonce, "nonce")?;
    if !Signature::of(&[&account.token, timestamp, nonce, &envelope.encrypt]).matches(msg_signature)
    {
        return Err(CallbackError::BadSignature);
    }
    let key = account.aes_key.as_ref().expect(
        "an account in safe or compatible mode has a key (checked by AccountSettings::check)",
    );
    let xml = key.decrypt(&envelope.encrypt, &account.app_id)?;
    Ok(Message::parse(&xml)?)
}

/// Decodes `%XX` escapes and `+` (a space, as in a form-encoded query). `None` when an escape
/// is malformed or the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Encodes everything but unreserved characters (RFC 3986).
fn percent_encode(text: &str, out: &mut String) {
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::account::AccountSettings;
    use crate::wechat::message::Body;

    fn account(mode: Mode) -> Account {
        // WeChat's safe-mode sample account.
        AccountSettings {
            app_id: "wx5823bf96d3bd56c7".into(),
            app_secret: "secret".into(),
            token: "QDG6eK".into(),
            encoding_aes_key: Some("jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C".into()),
            mode,
            api_base: "http://127.0.0.1:1".into(),
            shop: 42,
            kf_account: None,
        }
        .check()
        .unwrap()
    }

    fn signed(token: &str, timestamp: &str, nonce: &str) -> Query {
        Query {
            signature: Some(Signature::of(&[token, timestamp, nonce]).to_string()),
            timestamp: Some(timestamp.into()),
            nonce: Some(nonce.into()),
            ..Query::default()
        }
    }

    const TEXT: &str = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[oCustomer1]]></FromUserName><CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hello]]></Content><MsgId>99</MsgId></xml>";

    #[test]
    fn verifies_the_server_url_check() {
        let account = account(Mode::Plain);
        let mut query = signed("QDG6eK", "1409659813", "1372623149");
        query.echostr = Some("5837397749236262829".into());
        assert_eq!(verify(&account, &query).unwrap(), "5837397749236262829");
        query.nonce = Some("1372623148".into());
        assert_eq!(verify(&account, &query), Err(CallbackError::BadSignature));
        let unsigned = Query::parse("timestamp=1&nonce=2&echostr=3");
        assert_eq!(
            verify(&account, &unsigned),
            Err(CallbackError::MissingParam("signature"))
        );
    }

    #[test]
    fn opens_plain_messages() {
        let account = account(Mode::Plain);
        let query = signed("QDG6eK", "1700000000", "123");
        let message = open(&account, &query, TEXT.as_bytes()).unwrap();
        assert_eq!(
            message.body,
            Body::Text {
                content: "hello".into()
            }
        );
        let forged = signed("other", "1700000000", "123");
        assert_eq!(
            open(&account, &forged, TEXT.as_bytes()),
            Err(CallbackError::BadSignature)
        );
    }

    #[test]
    fn opens_wechat_sample_safe_mode_callback() {
        // WeChat's sample request: its msg_signature, timestamp, nonce and body.
        let account = account(Mode::Safe);
        let body = "<xml><ToUserName><![CDATA[wx5823bf96d3bd56c7]]></ToUserName><Encrypt><![CDATA[RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3QczcdCUpj911L3vg3W/sYYvuJTs3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLjvd4Xgpue06DOdnLxAUHzM6+kDZ+HMZfJYuR+LtwGc2hgf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMnvw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGUcallcrw8V2t9EL4EhzJWrQUax5wLVMNS0+rUPA3k22Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KDYA5Pl/T8Z1ptDAVe0lXdQ2YoyyH2uyPIGHBZZIs2pDBS8R07+qN+E7Q==]]></Encrypt></xml>";
        let mut query = signed("QDG6eK", "1409659813", "1372623149");
        query.encrypt_type = Some("aes".into());
        query.msg_signature = Some("477715d11cdb4164915debcba66cb864d751f3e6".into());
        // The sample's XML is an enterprise-account message (it names an AgentID): it decrypts
        // and passes every check above the message layer; whatever it lacks is an Xml error.
        match open(&account, &query, body.as_bytes()) {
            Ok(_) | Err(CallbackError::Xml(_)) => {}
            Err(e) => panic!("sample refused before parsing: {e}"),
        }
        query.msg_signature = Some("577715d11cdb4164915debcba66cb864d751f3e6".into());
        assert_eq!(
            open(&account, &query, body.as_bytes()),
            Err(CallbackError::BadSignature)
        );
    }

    fn sealed(account: &Account, xml: &str, timestamp: &str, nonce: &str) -> (Query, String) {
        let encrypt = account
            .aes_key
            .as_ref()
            .unwrap()
            .encrypt(xml, &account.app_id);
        let mut query = signed(&account.token, timestamp, nonce);
        query.encrypt_type = Some("aes".into());
        query.msg_signature =
            Some(Signature::of(&[&account.token, timestamp, nonce, &encrypt]).to_string());
        let body = Envelope {
            to: Some("gh_1".into()),
            encrypt,
        }
        .to_xml();
        (query, body)
    }

    #[test]
    fn opens_safe_and_compatible_messages() {
        for mode in [Mode::Safe, Mode::Compatible] {
            let account = account(mode);
            let (query, body) = sealed(&account, TEXT, "1700000000", "777");
            let message = open(&account, &query, body.as_bytes()).unwrap();
            assert_eq!(message.msg_id, Some(99));
        }
        // Compatible mode without encrypt_type reads the plain body.
        let compatible = account(Mode::Compatible);
        assert!(open(&compatible, &signed("QDG6eK", "1", "2"), TEXT.as_bytes()).is_ok());
    }

    #[test]
    fn refuses_bad_safe_mode_input() {
        let account = account(Mode::Safe);
        // A plain body in safe mode.
        let query = signed("QDG6eK", "1", "2");
        assert_eq!(
            open(&account, &query, TEXT.as_bytes()),
            Err(CallbackError::Xml(XmlError::Missing("Encrypt")))
        );
        // Encrypted for another AppID (but correctly signed).
        let mut other = account.clone();
        other.app_id = "wxother".into();
        let (query, body) = sealed(&other, TEXT, "1", "2");
        assert_eq!(
            open(&account, &query, body.as_bytes()),
            Err(CallbackError::Cipher(CipherError::AppId))
        );
        // A tampered ciphertext, re-signed so only decryption can catch it.
        let (mut query, body) = sealed(&account, TEXT, "1", "2");
        let envelope = Envelope::parse(&body).unwrap();
        let mut bytes = envelope.encrypt.into_bytes();
        bytes[10] = if bytes[10] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        query.msg_signature = Some(Signature::of(&["QDG6eK", "1", "2", &tampered]).to_string());
        let body = Envelope {
            to: None,
            encrypt: tampered,
        }
        .to_xml();
        assert!(open(&account, &query, body.as_bytes()).is_err());
        // msg_signature missing.
        let (mut query, body) = sealed(&account, TEXT, "1", "2");
        query.msg_signature = None;
        assert_eq!(
            open(&account, &query, body.as_bytes()),
            Err(CallbackError::MissingParam("msg_signature"))
        );
        // Too large, before anything is parsed.
        let huge = vec![b'x'; XML_BYTES_MAX + 1];
        assert_eq!(open(&account, &query, &huge), Err(CallbackError::TooLarge));
        // Not UTF-8.
        assert!(matches!(
            open(&account, &signed("QDG6eK", "1", "2"), &[0xff, 0xfe]),
            Err(CallbackError::Xml(XmlError::Malformed(_)))
        ));
    }

    #[test]
    fn parses_and_writes_query_strings() {
        let query = Query::parse(
            "signature=ab&timestamp=1&nonce=n%20x&echostr=a%2Bb+c&unknown=1&signature=zz",
        );
        assert_eq!(query.signature.as_deref(), Some("ab"));
        assert_eq!(query.nonce.as_deref(), Some("n x"));
        assert_eq!(query.echostr.as_deref(), Some("a+b c"));
        assert_eq!(Query::parse(&query.to_query_string()), query);
        // Malformed escapes and oversized values are dropped, not fatal.
        let bad = Query::parse(&format!("nonce=%zz&timestamp={}", "1".repeat(600)));
        assert_eq!(bad.nonce, None);
        assert_eq!(bad.timestamp, None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(query in ".{0,200}", body in proptest::collection::vec(0u8..=255, 0..300)) {
            let parsed = Query::parse(&query);
            for mode in [Mode::Plain, Mode::Compatible, Mode::Safe] {
                let _ = open(&account(mode), &parsed, &body);
                let _ = verify(&account(mode), &parsed);
            }
        }
    }
}
