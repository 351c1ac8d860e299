//! WeChat's side of the WeChat channel, for tests and the local demo: a stand-in for its API
//! (`standin`) and a driver that posts customers' messages as its servers do (`driver`).

pub mod driver;
pub mod standin;
