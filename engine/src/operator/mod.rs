//! The operator's surface: configuration, metrics, the token secret.

pub mod config;
pub mod metrics;
pub mod secret;
