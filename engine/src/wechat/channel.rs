//! The channel as a node runs it: the endpoint (customers' pushes in), the sender (agents'
//! replies out), the customer directory they share and the counters, started once for the node
//! and shared by its shards.
//!
//! The node gives it two things of its own: the data directory (for the directory's file) and
//! a callback for replies that were not delivered, which the node turns into a notice in the
//! reply's conversation. Everything else about the engine stays outside this module.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::account::WechatSection;
use super::directory::Directory;
use super::endpoint::Endpoint;
use super::message::OpenId;
use super::metrics::Metrics;
use super::sender::{Outcome, Rejected, Reply, Report, Sender, Undelivered};

/// Which stored message a reply is: its conversation and seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTag {
    pub conv: u64,
    pub seq: u64,
}

pub struct Channel {
    pub endpoint: Endpoint,
    pub metrics: Arc<Metrics>,
    sender: Sender<ReplyTag>,
}

impl Channel {
    /// Starts the channel for the accounts of `section`, or `None` when it has none.
    /// `undelivered` is called (on a sender thread) for every reply that did not reach WeChat.
    pub fn start(
        section: &WechatSection,
        data_dir: &Path,
        fsync: bool,
        undelivered: impl Fn(ReplyTag, Undelivered) + Send + Sync + 'static,
    ) -> io::Result<Option<Channel>> {
        let accounts = section.accounts().map_err(io::Error::other)?;
        if accounts.is_empty() {
            return Ok(None);
        }
        let directory = Arc::new(Directory::open(data_dir, fsync)?);
        let metrics = Arc::new(Metrics::default());
        let sender = Sender::start(
            &accounts,
            &section.sender,
            Arc::clone(&metrics),
            move |report: Report<ReplyTag>| {
                if let Outcome::Undelivered(u) = report.outcome {
                    undelivered(report.tag, u);
                }
            },
        )?;
        tracing::info!(
            accounts = accounts.len(),
            customers = directory.len(),
            "wechat channel started"
        );
        Ok(Some(Channel {
            endpoint: Endpoint::new(accounts, directory, Arc::clone(&metrics)),
            metrics,
            sender,
        }))
    }

    /// Hands an agent's reply to `wechat:<customer>` to the sender. `Err` when it cannot be
    /// queued (unknown customer, queue full, stopping): the caller tells the agent at once.
    pub fn reply(
        &self,
        customer: u64,
        content: String,
        tag: ReplyTag,
    ) -> Result<(), Box<Rejected<ReplyTag>>> {
        match self.endpoint.reply(customer, content, tag) {
            Some(reply) => self.sender.submit(reply).map_err(Box::new),
            None => {
                let reply = Reply {
                    app_id: String::new(),
                    // A placeholder: the customer is unknown, nothing is sent.
                    to: OpenId::parse("unknown").expect("a valid OpenID literal"),
                    content: String::new(),
                    kf_account: None,
                    tag,
                };
                self.metrics
                    .undelivered(super::sender::Reason::UnknownAccount);
                Err(Box::new(Rejected {
                    reply,
                    reason: super::sender::Reason::UnknownAccount,
                }))
            }
        }
    }
}
