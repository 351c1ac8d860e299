//! The WebSocket protocol (RFC 6455): the wire format of one frame ([`frame`]) and one
//! connection's state machine ([`connection`]), both without I/O.

pub mod connection;
pub mod frame;
