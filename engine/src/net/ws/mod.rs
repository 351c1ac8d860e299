//! The WebSocket protocol (RFC 6455).

pub mod frame;
