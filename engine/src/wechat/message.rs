//! The XML of WeChat's message push: what a customer sent, parsed into a [`Message`] whose
//! fields cannot hold bad values, and the safe-mode envelope around it.
//!
//! The contract: the body is at most [`XML_BYTES_MAX`] bytes and [`XML_NODES_MAX`] nodes; no DTD
//! (so no entity expansion: an XML bomb is refused, not expanded); the root is `<xml>`; the
//! fields WeChat always sends (`ToUserName`, `FromUserName`, `CreateTime`, `MsgType`) are
//! required, and a `text` message needs `Content`. Other kinds are kept with their kind and
//! media id. Everything else is a typed [`XmlError`], never a panic.

use std::fmt::Write as _;

/// Largest callback body accepted, envelope or message. WeChat's own pushes are a few hundred
/// bytes (a text message's content is at most a couple of thousand characters).
pub const XML_BYTES_MAX: usize = 64 * 1024;
/// Most XML nodes (elements, text, CDATA) a callback may hold; WeChat's have a few dozen.
pub const XML_NODES_MAX: u32 = 512;
/// Longest OpenID accepted (WeChat's are 28 characters).
pub const OPEN_ID_BYTES_MAX: usize = 64;
// The longest dedup key ("wx-event-", an OpenID, "-", a u64) must fit in a client message id,
// since it is stored as the message's cmid.
const _: () = assert!(9 + OPEN_ID_BYTES_MAX + 1 + 20 <= chinwag_protocol::limits::CMID_LEN_MAX);
/// Longest media id, event name or kind kept.
const FIELD_BYTES_MAX: usize = 256;

/// Why a callback's XML was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XmlError {
    /// Over [`XML_BYTES_MAX`].
    TooLarge,
    /// Not well-formed XML, a DTD, or over [`XML_NODES_MAX`] nodes.
    Malformed(String),
    /// The root element is not `<xml>`.
    Root,
    /// A required field is missing.
    Missing(&'static str),
    /// A field is present but its value is not acceptable.
    Invalid(&'static str),
}

impl std::fmt::Display for XmlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            XmlError::TooLarge => write!(f, "XML over {XML_BYTES_MAX} bytes"),
            XmlError::Malformed(why) => write!(f, "malformed XML: {why}"),
            XmlError::Root => f.write_str("the root element is not <xml>"),
            XmlError::Missing(field) => write!(f, "missing <{field}>"),
            XmlError::Invalid(field) => write!(f, "invalid <{field}>"),
        }
    }
}

impl std::error::Error for XmlError {}

/// A customer's OpenID: unique per customer and official account. ASCII letters, digits, `-`
/// and `_`, 1..=[`OPEN_ID_BYTES_MAX`] bytes, so it can be put in a user id and a URL as is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpenId(String);

impl OpenId {
    pub fn parse(text: &str) -> Option<OpenId> {
        let ok = !text.is_empty()
            && text.len() <= OPEN_ID_BYTES_MAX
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| OpenId(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for OpenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One message a customer sent to an official account (or an event of theirs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `ToUserName`: the official account's original id (`gh_…`).
    pub to: String,
    /// `FromUserName`: the customer.
    pub from: OpenId,
    /// `CreateTime`: seconds since the Unix epoch, as WeChat stamped it.
    pub create_time: u64,
    /// `MsgId`: present on messages, absent on events.
    pub msg_id: Option<u64>,
    pub body: Body,
}

/// What a message carries, by `MsgType`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// `text`: the customer's words.
    Text { content: String },
    /// `image`, `voice`, `video`, `shortvideo`: a media id to download with the media API.
    Media { kind: MediaKind, media_id: String },
    /// `event`: subscribe, unsubscribe, menu clicks...; `EventKey` when present.
    Event { event: String, key: Option<String> },
    /// Any other kind (`location`, `link`, ...), kept by name.
    Other { kind: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Image,
    Voice,
    Video,
    ShortVideo,
}

impl MediaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Image => "image",
            MediaKind::Voice => "voice",
            MediaKind::Video => "video",
            MediaKind::ShortVideo => "shortvideo",
        }
    }
}

/// What makes a push unique across WeChat's retries: the `MsgId` of a message; for an event
/// (which has none), its sender and `CreateTime`, as WeChat's documentation advises.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DedupKey {
    MsgId(u64),
    Event { from: OpenId, create_time: u64 },
}

impl std::fmt::Display for DedupKey {
    /// A compact string form, usable as a client message id (`cmid`) for idempotent storage.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DedupKey::MsgId(id) => write!(f, "wx-msg-{id}"),
            DedupKey::Event { from, create_time } => write!(f, "wx-event-{from}-{create_time}"),
        }
    }
}

impl Message {
    /// Parses a message push (the plain body, or the XML decrypted from a safe-mode envelope).
    pub fn parse(xml: &str) -> Result<Message, XmlError> {
        let doc = parse_document(xml)?;
        let root = doc.root_element();
        let to = required(&root, "ToUserName")?;
        let from = OpenId::parse(required(&root, "FromUserName")?)
            .ok_or(XmlError::Invalid("FromUserName"))?;
        let create_time = required(&root, "CreateTime")?
            .trim()
            .parse()
            .map_err(|_| XmlError::Invalid("CreateTime"))?;
        let msg_type = required(&root, "MsgType")?.trim();
        let msg_id = match field(&root, "MsgId").or_else(|| field(&root, "MsgID")) {
            Some(id) => Some(id.trim().parse().map_err(|_| XmlError::Invalid("MsgId"))?),
            None => None,
        };
        let body = match msg_type {
            "text" => Body::Text {
                content: required(&root, "Content")?.to_string(),
            },
            "image" | "voice" | "video" | "shortvideo" => Body::Media {
                kind: match msg_type {
                    "image" => MediaKind::Image,
                    "voice" => MediaKind::Voice,
                    "video" => MediaKind::Video,
                    _ => MediaKind::ShortVideo,
                },
                media_id: bounded(required(&root, "MediaId")?, "MediaId")?,
            },
            "event" => Body::Event {
                event: bounded(required(&root, "Event")?, "Event")?,
                key: field(&root, "EventKey")
                    .map(|key| bounded(key, "EventKey"))
                    .transpose()?,
            },
            kind => Body::Other {
                kind: bounded(kind, "MsgType")?,
            },
        };
        if msg_id.is_none() && !matches!(body, Body::Event { .. }) {
            return Err(XmlError::Missing("MsgId"));
        }
        Ok(Message {
            to: bounded(to, "ToUserName")?,
            from,
            create_time,
            msg_id,
            body,
        })
    }

    pub fn dedup_key(&self) -> DedupKey {
        match self.msg_id {
            Some(id) => DedupKey::MsgId(id),
            None => DedupKey::Event {
                from: self.from.clone(),
                create_time: self.create_time,
            },
        }
    }

    /// The message as WeChat pushes it (used by the test driver and to build safe-mode bodies).
    pub fn to_xml(&self) -> String {
        let mut xml = String::from("<xml>");
        push_cdata(&mut xml, "ToUserName", &self.to);
        push_cdata(&mut xml, "FromUserName", self.from.as_str());
        let _ = write!(xml, "<CreateTime>{}</CreateTime>", self.create_time);
        match &self.body {
            Body::Text { content } => {
                push_cdata(&mut xml, "MsgType", "text");
                push_cdata(&mut xml, "Content", content);
            }
            Body::Media { kind, media_id } => {
                push_cdata(&mut xml, "MsgType", kind.as_str());
                push_cdata(&mut xml, "MediaId", media_id);
            }
            Body::Event { event, key } => {
                push_cdata(&mut xml, "MsgType", "event");
                push_cdata(&mut xml, "Event", event);
                if let Some(key) = key {
                    push_cdata(&mut xml, "EventKey", key);
                }
            }
            Body::Other { kind } => push_cdata(&mut xml, "MsgType", kind),
        }
        if let Some(id) = self.msg_id {
            let _ = write!(xml, "<MsgId>{id}</MsgId>");
        }
        xml.push_str("</xml>");
        xml
    }
}

/// A safe-mode body: the account it is for and the encrypted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// `ToUserName`, when present (the account's original id).
    pub to: Option<String>,
    /// `Encrypt`: Base64 ciphertext (see `cipher`).
    pub encrypt: String,
}

impl Envelope {
    pub fn parse(xml: &str) -> Result<Envelope, XmlError> {
        let doc = parse_document(xml)?;
        let root = doc.root_element();
        Ok(Envelope {
            to: field(&root, "ToUserName").map(str::to_string),
            encrypt: required(&root, "Encrypt")?.trim().to_string(),
        })
    }

    pub fn to_xml(&self) -> String {
        let mut xml = String::from("<xml>");
        if let Some(to) = &self.to {
            push_cdata(&mut xml, "ToUserName", to);
        }
        push_cdata(&mut xml, "Encrypt", &self.encrypt);
        xml.push_str("</xml>");
        xml
    }
}

fn parse_document(xml: &str) -> Result<roxmltree::Document<'_>, XmlError> {
    if xml.len() > XML_BYTES_MAX {
        return Err(XmlError::TooLarge);
    }
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: XML_NODES_MAX,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(xml, options)
        .map_err(|e| XmlError::Malformed(e.to_string()))?;
    if doc.root_element().tag_name().name() != "xml" {
        return Err(XmlError::Root);
    }
    Ok(doc)
}

/// The text of the root's first child element named `name` (CDATA and text joined by the
/// parser). An element with no text is `Some("")`.
fn field<'a>(root: &roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    root.children()
        .find(|n| n.is_element() && n.tag_name().name() == name)
        .map(|n| n.text().unwrap_or(""))
}

fn required<'a>(root: &roxmltree::Node<'a, '_>, name: &'static str) -> Result<&'a str, XmlError> {
    field(root, name).ok_or(XmlError::Missing(name))
}

fn bounded(text: &str, name: &'static str) -> Result<String, XmlError> {
    if text.len() > FIELD_BYTES_MAX {
        return Err(XmlError::Invalid(name));
    }
    Ok(text.to_string())
}

/// Appends `<tag><![CDATA[text]]></tag>`; a `]]>` inside the text is split across two CDATA
/// sections, so any text round-trips.
fn push_cdata(xml: &mut String, tag: &str, text: &str) {
    let _ = write!(
        xml,
        "<{tag}><![CDATA[{}]]></{tag}>",
        text.replace("]]>", "]]]]><![CDATA[>")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    // A text push as WeChat's documentation shows it.
    const TEXT: &str = "<xml>\n  <ToUserName><![CDATA[toUser]]></ToUserName>\n  <FromUserName><![CDATA[fromUser]]></FromUserName>\n  <CreateTime>1348831860</CreateTime>\n  <MsgType><![CDATA[text]]></MsgType>\n  <Content><![CDATA[this is a test]]></Content>\n  <MsgId>1234567890123456</MsgId>\n</xml>";

    #[test]
    fn parses_documented_text_message() {
        let message = Message::parse(TEXT).unwrap();
        assert_eq!(message.to, "toUser");
        assert_eq!(message.from.as_str(), "fromUser");
        assert_eq!(message.create_time, 1348831860);
        assert_eq!(message.msg_id, Some(1234567890123456));
        assert_eq!(
            message.body,
            Body::Text {
                content: "this is a test".into()
            }
        );
        assert_eq!(message.dedup_key(), DedupKey::MsgId(1234567890123456));
        assert_eq!(message.dedup_key().to_string(), "wx-msg-1234567890123456");
    }

    #[test]
    fn parses_image_and_event_and_other_kinds() {
        let image = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[o1]]></FromUserName><CreateTime>1</CreateTime><MsgType><![CDATA[image]]></MsgType><PicUrl><![CDATA[http://x/y]]></PicUrl><MediaId><![CDATA[media_id]]></MediaId><MsgId>7</MsgId></xml>";
        assert_eq!(
            Message::parse(image).unwrap().body,
            Body::Media {
                kind: MediaKind::Image,
                media_id: "media_id".into()
            }
        );
        let event = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[o1]]></FromUserName><CreateTime>123</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe]]></Event></xml>";
        let event = Message::parse(event).unwrap();
        assert_eq!(
            event.body,
            Body::Event {
                event: "subscribe".into(),
                key: None
            }
        );
        assert_eq!(event.dedup_key().to_string(), "wx-event-o1-123");
        let location = "<xml><ToUserName>gh_1</ToUserName><FromUserName>o1</FromUserName><CreateTime>1</CreateTime><MsgType>location</MsgType><Location_X>23.1</Location_X><MsgId>8</MsgId></xml>";
        assert_eq!(
            Message::parse(location).unwrap().body,
            Body::Other {
                kind: "location".into()
            }
        );
    }

    #[test]
    fn longest_dedup_key_fits_a_cmid() {
        let key = DedupKey::Event {
            from: OpenId::parse(&"o".repeat(OPEN_ID_BYTES_MAX)).unwrap(),
            create_time: u64::MAX,
        };
        assert!(key.to_string().len() <= chinwag_protocol::limits::CMID_LEN_MAX);
        assert!(OpenId::parse(&"o".repeat(OPEN_ID_BYTES_MAX + 1)).is_none());
    }

    #[test]
    fn round_trips_through_to_xml() {
        let message = Message {
            to: "gh_abc".into(),
            from: OpenId::parse("oABC-123_x").unwrap(),
            create_time: 1700000000,
            msg_id: Some(42),
            body: Body::Text {
                content: "a ]]> b <c> & 你好".into(),
            },
        };
        assert_eq!(Message::parse(&message.to_xml()).unwrap(), message);
        let envelope = Envelope {
            to: Some("gh_abc".into()),
            encrypt: "QUJD".into(),
        };
        assert_eq!(Envelope::parse(&envelope.to_xml()).unwrap(), envelope);
    }

    #[test]
    fn refuses_bad_input_with_typed_errors() {
        assert!(matches!(
            Message::parse("not xml"),
            Err(XmlError::Malformed(_))
        ));
        assert_eq!(Message::parse("<root/>"), Err(XmlError::Root));
        assert_eq!(
            Message::parse("<xml><ToUserName>a</ToUserName></xml>"),
            Err(XmlError::Missing("FromUserName"))
        );
        let bad_time = TEXT.replace("1348831860", "soon");
        assert_eq!(
            Message::parse(&bad_time),
            Err(XmlError::Invalid("CreateTime"))
        );
        let bad_id = TEXT.replace("1234567890123456", "x");
        assert_eq!(Message::parse(&bad_id), Err(XmlError::Invalid("MsgId")));
        let no_id = TEXT.replace("<MsgId>1234567890123456</MsgId>", "");
        assert_eq!(Message::parse(&no_id), Err(XmlError::Missing("MsgId")));
        let bad_from = TEXT.replace("fromUser", "from user/..");
        assert_eq!(
            Message::parse(&bad_from),
            Err(XmlError::Invalid("FromUserName"))
        );
        let no_content = TEXT.replace("<Content><![CDATA[this is a test]]></Content>", "");
        assert_eq!(
            Message::parse(&no_content),
            Err(XmlError::Missing("Content"))
        );
    }

    #[test]
    fn refuses_huge_xml() {
        let huge = TEXT.replace("this is a test", &"x".repeat(XML_BYTES_MAX));
        assert_eq!(Message::parse(&huge), Err(XmlError::TooLarge));
        let many_nodes = format!("<xml>{}</xml>", "<a/>".repeat(XML_NODES_MAX as usize + 1));
        assert!(matches!(
            Message::parse(&many_nodes),
            Err(XmlError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_entity_expansion() {
        let bomb = "<?xml version=\"1.0\"?><!DOCTYPE xml [<!ENTITY a \"aaaaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;\">]><xml><ToUserName>&b;</ToUserName></xml>";
        assert!(matches!(Message::parse(bomb), Err(XmlError::Malformed(_))));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in ".{0,400}") {
            let _ = Message::parse(&text);
            let _ = Envelope::parse(&text);
            let wrapped = format!("<xml><ToUserName>{text}</ToUserName><FromUserName>o</FromUserName><CreateTime>1</CreateTime><MsgType>text</MsgType><Content>{text}</Content><MsgId>1</MsgId></xml>");
            let _ = Message::parse(&wrapped);
        }
    }
}
