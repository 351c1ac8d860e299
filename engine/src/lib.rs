//! The chinwag gateway.

pub mod dispatch;
