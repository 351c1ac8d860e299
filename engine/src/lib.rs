//! The chinwag gateway.

pub mod dispatch;
pub mod store;
