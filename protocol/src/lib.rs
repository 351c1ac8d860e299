//! chinwag's wire contract (`PROTOCOL.md`): ids, the typed message model, its binary and JSON
//! encodings, login tokens, and a small blocking client.
//!
//! Everything but [`client`] is sans-I/O: it turns bytes into typed messages and back, takes
//! time from its caller, and never touches a socket or the clock.
//!
//! One message, two encodings:
//!
//! ```
//! use bytes::BytesMut;
//! use chinwag_protocol::{binary, json, ConvId, Frame, Message, Send, Target};
//!
//! let send = Frame::with_req(7, Message::Send(Send {
//!     target: Target::Conv(ConvId(42)),
//!     cmid: "c-1".into(),
//!     kind: "text".into(),
//!     body: "hello".into(),
//! }));
//!
//! let mut text = BytesMut::new();
//! json::encode(&send, &mut text);
//! assert_eq!(
//!     &text[..],
//!     br#"{"op":"send","req":7,"conv":"42","cmid":"c-1","kind":"text","body":"hello"}"#
//! );
//! assert_eq!(json::decode_bytes(&text).unwrap(), send);
//!
//! let mut wire = BytesMut::new();
//! binary::encode(&send, &mut wire).unwrap();
//! assert_eq!(wire.len(), 16 + 1 + 8 + 2 + 3 + 2 + 4 + 4 + 5);
//! assert_eq!(binary::decode(&wire).unwrap(), send);
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod binary;
pub mod client;
pub mod ids;
pub mod json;
pub mod limits;
pub mod message;
pub mod service;
pub mod token;

pub use ids::{
    ConvId, DeviceId, DeviceIdGenerator, DeviceType, NodeId, NodeType, Seq, ShopId, Uid, UidKind,
};
pub use message::{
    AgentRow, AgentStats, AgentStatsOk, AuthOk, ConvInfo, ConvSummary, ConvType, Cursor,
    DecodeError, DecodeErrorKind, ErrorCode, ErrorReply, Frame, GroupCreate, GroupMembers, History,
    HistoryOk, HistoryRange, Kick, Login, LoginOk, Members, MembersDelta, Message, Msg, MsgPush,
    Notify, NotifyUsers, Online, Op, Profile, ProfileOf, Receipt, Send, SendAs, SendOk, StatsRow,
    StreamBatch, StreamChange, StreamEvent, Subject, Target, UserProfile,
};
