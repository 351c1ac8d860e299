//! chinwag's wire contract (`PROTOCOL.md`): ids, the typed message model, its binary and JSON
//! encodings, login tokens, and a small blocking client.
//!
//! This crate is sans-I/O except for [`client`]: it turns bytes into typed messages and back,
//! takes time from its caller, and never touches a socket or the clock.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod ids;

pub use ids::{ConvId, DeviceId, DeviceType, NodeId, NodeType, Seq, ShopId, Uid, UidKind};
