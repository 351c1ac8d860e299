//! The sender: agents' replies to WeChat customers, delivered with the customer-service API on
//! threads of its own, never on a shard's loop thread.
//!
//! The contract:
//! - [`Sender::submit`] never blocks: it puts the reply on a bounded queue or hands it back
//!   (queue full, unknown account, stopping), so a shard can tell the agent at once;
//! - each account has `send_workers` threads, each with its own queue of at most
//!   `send_queue_len_max` replies; a customer's replies always go to the same thread, so they
//!   reach WeChat in the order they were submitted;
//! - a transient failure (errcode -1, HTTP 5xx, a timeout, a refused connection) is retried
//!   after a pause that doubles from `send_backoff_first_ms` up to `send_backoff_max_ms`; an
//!   invalid or expired token is dropped and the send retried with a fresh one; nothing is tried
//!   more than `send_attempts_max` times;
//! - every submitted reply gets exactly one [`Report`], through the callback given to
//!   [`Sender::start`]: delivered, or not delivered and why (WeChat's rule or the failure), so
//!   the agent can be told;
//! - [`Sender::stop`] ends the pauses at once, lets each thread finish the call it is in (at
//!   most `http_timeout_ms`), reports what is still queued as [`Reason::Stopped`] and joins the
//!   threads.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, RecvTimeoutError, TryRecvError, TrySendError};
use serde::Deserialize;

use super::account::Account;
use super::api::{Api, Rule, Sent};
use super::message::OpenId;
use super::metrics::Metrics;
use super::token::{TokenCache, TokenError};

/// The sender's limits: the `[wechat.sender]` table. Every value has a default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SenderLimits {
    /// Threads per account (a customer's replies always use the same one).
    pub send_workers: usize,
    /// Replies waiting per thread; over it, `submit` hands the reply back.
    pub send_queue_len_max: usize,
    /// Attempts per reply, the first included.
    pub send_attempts_max: u32,
    /// Pause before the first retry of a transient failure; doubled each time.
    pub send_backoff_first_ms: u64,
    /// Longest pause between two attempts.
    pub send_backoff_max_ms: u64,
    /// Bound on one API call: connect, request and answer.
    pub http_timeout_ms: u64,
    /// How long a failed token fetch is remembered before the next one is tried.
    pub token_failure_hold_ms: u64,
}

impl Default for SenderLimits {
    fn default() -> Self {
        SenderLimits {
            send_workers: 2,
            send_queue_len_max: 1024,
            send_attempts_max: 5,
            send_backoff_first_ms: 500,
            send_backoff_max_ms: 8_000,
            http_timeout_ms: 10_000,
            token_failure_hold_ms: 2_000,
        }
    }
}

/// A reply to send. `tag` is the caller's: it comes back in the [`Report`] (for example the
/// conversation, the message's seq and the agent to tell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<T> {
    pub app_id: String,
    pub to: OpenId,
    pub content: String,
    /// Send as this customer-service account instead of the account's configured one.
    pub kf_account: Option<String>,
    pub tag: T,
}

/// What happened to one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report<T> {
    pub tag: T,
    pub outcome: Outcome,
    /// Delivery attempts made (a token fetch that failed counts as one; 0 when the reply never
    /// left the queue).
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Undelivered(Undelivered),
}

/// Why a reply did not reach the customer, with WeChat's own errcode and message when there is
/// one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undelivered {
    pub reason: Reason,
    pub errcode: Option<i64>,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// 45015: more than 48 hours since the customer last wrote.
    ReplyWindowClosed,
    /// 45047: no replies left for the customer's last message.
    ReplyLimitReached,
    /// The customer cannot be reached (unfollowed, not this account's OpenID).
    Recipient,
    /// WeChat refused the content (too long, empty).
    Content,
    /// The customer-service (kf) account cannot send.
    KfAccount,
    /// The account cannot send: credentials, permissions, allow list, daily quota.
    Account,
    /// Transient failures until `send_attempts_max` was used up: WeChat unreachable or busy.
    Unreachable,
    /// The account's queue was full.
    QueueFull,
    /// No account with this app id is configured.
    UnknownAccount,
    /// The node is stopping.
    Stopped,
}

/// The `kind` of the message that tells a conversation's agents a reply did not reach the
/// customer (stored in the conversation, so an agent who is offline learns it too).
pub const NOTICE_KIND: &str = "wechat_undelivered";

impl Undelivered {
    /// The body of that message: which reply (`seq`), why (`code`, WeChat's `errcode` when it
    /// gave one) and WeChat's own words (`detail`), as JSON.
    pub fn notice(&self, seq: u64) -> String {
        serde_json::json!({
            "seq": seq,
            "code": self.reason.code(),
            "errcode": self.errcode,
            "detail": self.detail,
        })
        .to_string()
    }
}

impl Reason {
    /// Every reason, in the order of the metrics' labels; the index is also the reason's code on
    /// the node links (`cluster::wire`), so new reasons go at the end.
    pub const ALL: [Reason; 10] = [
        Reason::ReplyWindowClosed,
        Reason::ReplyLimitReached,
        Reason::Recipient,
        Reason::Content,
        Reason::KfAccount,
        Reason::Account,
        Reason::Unreachable,
        Reason::QueueFull,
        Reason::UnknownAccount,
        Reason::Stopped,
    ];

    /// A stable name for the reason, for an error or push to the agent and for metrics.
    pub fn code(self) -> &'static str {
        match self {
            Reason::ReplyWindowClosed => "wechat_window_closed",
            Reason::ReplyLimitReached => "wechat_reply_limit",
            Reason::Recipient => "wechat_recipient",
            Reason::Content => "wechat_content",
            Reason::KfAccount => "wechat_kf_account",
            Reason::Account => "wechat_account",
            Reason::Unreachable => "wechat_unreachable",
            Reason::QueueFull => "wechat_queue_full",
            Reason::UnknownAccount => "wechat_unknown_account",
            Reason::Stopped => "wechat_stopped",
        }
    }
}

impl From<Rule> for Reason {
    fn from(rule: Rule) -> Reason {
        match rule {
            Rule::ReplyWindowClosed => Reason::ReplyWindowClosed,
            Rule::ReplyLimitReached => Reason::ReplyLimitReached,
            Rule::Recipient => Reason::Recipient,
            Rule::Content => Reason::Content,
            Rule::KfAccount => Reason::KfAccount,
            Rule::Account => Reason::Account,
        }
    }
}

/// A reply `submit` could not queue, handed back with the reason.
#[derive(Debug)]
pub struct Rejected<T> {
    pub reply: Reply<T>,
    pub reason: Reason,
}

type Sink<T> = Arc<dyn Fn(Report<T>) + Send + Sync>;

struct Lane<T> {
    app_id: String,
    queues: Vec<channel::Sender<Reply<T>>>,
}

/// The running sender. Dropping it stops it as [`Sender::stop`] does.
pub struct Sender<T: Send + 'static> {
    metrics: Arc<Metrics>,
    lanes: Vec<Lane<T>>,
    /// Never sent on: dropping it wakes every pause and tells the workers to stop.
    stop: Option<channel::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl<T: Send + 'static> Sender<T> {
    /// Starts the worker threads for `accounts`; `sink` receives every reply's [`Report`] (on
    /// a worker thread: it should hand the report on, not work on it).
    pub fn start(
        accounts: &[Account],
        limits: &SenderLimits,
        metrics: Arc<Metrics>,
        sink: impl Fn(Report<T>) + Send + Sync + 'static,
    ) -> std::io::Result<Sender<T>> {
        let sink: Sink<T> = Arc::new(sink);
        let (stop, stopped) = channel::bounded::<()>(0);
        let mut sender = Sender {
            metrics: Arc::clone(&metrics),
            lanes: Vec::with_capacity(accounts.len()),
            stop: Some(stop),
            threads: Vec::new(),
        };
        for account in accounts {
            let tokens = Arc::new(TokenCache::new(Duration::from_millis(
                limits.token_failure_hold_ms,
            )));
            let mut queues = Vec::new();
            for index in 0..limits.send_workers.max(1) {
                let (queue, jobs) = channel::bounded(limits.send_queue_len_max.max(1));
                let worker = Worker {
                    account: account.clone(),
                    api: Api::new(
                        &account.api_base,
                        Duration::from_millis(limits.http_timeout_ms),
                    ),
                    tokens: Arc::clone(&tokens),
                    limits: limits.clone(),
                    stopped: stopped.clone(),
                    sink: Arc::clone(&sink),
                    metrics: Arc::clone(&metrics),
                };
                let thread = std::thread::Builder::new()
                    .name(format!("wechat-{}-{index}", account.app_id))
                    .spawn(move || worker.run(jobs))?;
                queues.push(queue);
                sender.threads.push(thread);
            }
            sender.lanes.push(Lane {
                app_id: account.app_id.clone(),
                queues,
            });
        }
        Ok(sender)
    }

    /// Queues `reply` without blocking, or hands it back.
    pub fn submit(&self, reply: Reply<T>) -> Result<(), Rejected<T>> {
        let result = self.enqueue(reply);
        if let Err(rejected) = &result {
            self.metrics.undelivered(rejected.reason);
        }
        result
    }

    fn enqueue(&self, reply: Reply<T>) -> Result<(), Rejected<T>> {
        let Some(lane) = self.lanes.iter().find(|l| l.app_id == reply.app_id) else {
            return Err(Rejected {
                reply,
                reason: Reason::UnknownAccount,
            });
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        reply.to.hash(&mut hasher);
        let index = (hasher.finish() % lane.queues.len() as u64) as usize;
        lane.queues[index].try_send(reply).map_err(|e| match e {
            TrySendError::Full(reply) => Rejected {
                reply,
                reason: Reason::QueueFull,
            },
            TrySendError::Disconnected(reply) => Rejected {
                reply,
                reason: Reason::Stopped,
            },
        })
    }

    /// Stops the workers (see the module docs) and waits for them.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.stop = None;
        self.lanes.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl<T: Send + 'static> Drop for Sender<T> {
    fn drop(&mut self) {
        self.shut_down();
    }
}

struct Worker<T> {
    account: Account,
    api: Api,
    tokens: Arc<TokenCache>,
    limits: SenderLimits,
    stopped: channel::Receiver<()>,
    sink: Sink<T>,
    metrics: Arc<Metrics>,
}

impl<T> Worker<T> {
    fn run(self, jobs: channel::Receiver<Reply<T>>) {
        loop {
            channel::select! {
                recv(jobs) -> job => match job {
                    Ok(reply) => {
                        let (outcome, attempts) = self.deliver(&reply);
                        self.report(reply.tag, outcome, attempts);
                    }
                    Err(_) => return,
                },
                recv(self.stopped) -> _ => {
                    loop {
                        match jobs.try_recv() {
                            Ok(reply) => self.report(reply.tag, undelivered(Reason::Stopped, None, "the node is stopping"), 0),
                            Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
                        }
                    }
                }
            }
        }
    }

    fn report(&self, tag: T, outcome: Outcome, attempts: u32) {
        match &outcome {
            Outcome::Delivered => self.metrics.delivered(),
            Outcome::Undelivered(u) => self.metrics.undelivered(u.reason),
        }
        if let Outcome::Undelivered(u) = &outcome {
            tracing::info!(app_id = %self.account.app_id, reason = u.reason.code(), errcode = ?u.errcode, detail = %u.detail, attempts, "wechat reply not delivered");
        }
        (self.sink)(Report {
            tag,
            outcome,
            attempts,
        });
    }

    /// Tries `reply` until it is delivered, refused, or out of attempts. Returns the outcome and
    /// the attempts made.
    fn deliver(&self, reply: &Reply<T>) -> (Outcome, u32) {
        let kf_account = reply
            .kf_account
            .as_deref()
            .or(self.account.kf_account.as_deref());
        let mut backoff = Duration::from_millis(self.limits.send_backoff_first_ms);
        let backoff_max = Duration::from_millis(self.limits.send_backoff_max_ms);
        let mut last_failure = String::new();
        let attempts_max = self.limits.send_attempts_max.max(1);
        // After a transient failure the next attempt waits; after an invalid token it does not
        // (a fresh token is worth trying at once).
        let mut pause_next = false;
        for attempt in 1..=attempts_max {
            if std::mem::replace(&mut pause_next, true) && !self.pause(&mut backoff, backoff_max) {
                return (
                    undelivered(Reason::Stopped, None, "the node is stopping"),
                    attempt - 1,
                );
            }
            let token = match self.tokens.get(Instant::now(), || {
                self.api
                    .fetch_token(&self.account.app_id, &self.account.app_secret)
            }) {
                Ok(token) => token,
                Err(TokenError::Refused { errcode, errmsg }) => {
                    return (
                        undelivered(
                            Reason::Account,
                            Some(errcode),
                            &format!("access token refused: {errmsg}"),
                        ),
                        attempt,
                    );
                }
                Err(TokenError::Transient(why)) => {
                    last_failure = format!("access token: {why}");
                    continue;
                }
            };
            match self
                .api
                .send_text(&token, reply.to.as_str(), &reply.content, kf_account)
            {
                Sent::Ok => return (Outcome::Delivered, attempt),
                Sent::TokenInvalid { errcode, errmsg } => {
                    self.tokens.invalidate(&token);
                    last_failure = format!("errcode {errcode} {errmsg}");
                    pause_next = false;
                }
                Sent::Transient(why) => last_failure = why,
                Sent::Refused {
                    rule,
                    errcode,
                    errmsg,
                } => {
                    return (undelivered(rule.into(), Some(errcode), &errmsg), attempt);
                }
            }
        }
        (
            undelivered(Reason::Unreachable, None, &last_failure),
            attempts_max,
        )
    }

    /// Waits `backoff` (then doubles it, up to `max`). Returns `false` if the sender is stopping.
    fn pause(&self, backoff: &mut Duration, max: Duration) -> bool {
        let wait = *backoff;
        *backoff = (*backoff * 2).min(max).max(Duration::from_millis(1));
        match self.stopped.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => true,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => false,
        }
    }
}

fn undelivered(reason: Reason, errcode: Option<i64>, detail: &str) -> Outcome {
    Outcome::Undelivered(Undelivered {
        reason,
        errcode,
        detail: detail.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::account::{AccountSettings, Mode};

    fn account(api_base: &str) -> Account {
        AccountSettings {
            app_id: "wx1".into(),
            app_secret: "s".into(),
            token: "token".into(),
            encoding_aes_key: None,
            mode: Mode::Plain,
            api_base: api_base.into(),
            shop: 1,
            kf_account: None,
        }
        .check()
        .unwrap()
    }

    fn reply(app_id: &str, tag: u32) -> Reply<u32> {
        Reply {
            app_id: app_id.into(),
            to: OpenId::parse("o1").unwrap(),
            content: "hi".into(),
            kf_account: None,
            tag,
        }
    }

    #[test]
    fn notice_names_the_reply_and_the_reason() {
        let undelivered = Undelivered {
            reason: Reason::ReplyWindowClosed,
            errcode: Some(45015),
            detail: "response out of time limit".into(),
        };
        let notice: serde_json::Value = serde_json::from_str(&undelivered.notice(17)).unwrap();
        assert_eq!(
            notice,
            serde_json::json!({"seq": 17, "code": "wechat_window_closed", "errcode": 45015, "detail": "response out of time limit"})
        );
    }

    #[test]
    fn unknown_account_is_handed_back() {
        let sender = Sender::start(
            &[account("http://127.0.0.1:1")],
            &SenderLimits::default(),
            Arc::default(),
            |_: Report<u32>| {},
        )
        .unwrap();
        let rejected = sender.submit(reply("wx-other", 1)).unwrap_err();
        assert_eq!(rejected.reason, Reason::UnknownAccount);
        assert_eq!(rejected.reply.tag, 1);
    }

    /// A sender for account `wx1`, whose API nobody serves, reporting on the channel returned.
    fn unreachable_sender(
        limits: &SenderLimits,
    ) -> (Sender<u32>, std::sync::mpsc::Receiver<Report<u32>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let sender = Sender::start(
            &[account("http://127.0.0.1:1")],
            limits,
            Arc::default(),
            move |r| tx.send(r).unwrap(),
        )
        .unwrap();
        (sender, rx)
    }

    #[test]
    fn unreachable_api_gives_up_after_the_attempts() {
        let (sender, rx) = unreachable_sender(&SenderLimits {
            send_attempts_max: 3,
            send_backoff_first_ms: 1,
            token_failure_hold_ms: 0,
            ..SenderLimits::default()
        });
        sender.submit(reply("wx1", 7)).unwrap();
        let report = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(report.tag, 7);
        match report.outcome {
            Outcome::Undelivered(u) => {
                assert_eq!(u.reason, Reason::Unreachable);
                assert!(u.detail.contains("access token"), "{}", u.detail);
            }
            Outcome::Delivered => panic!("delivered to nowhere"),
        }
        assert_eq!(report.attempts, 3);
    }

    #[test]
    fn stop_reports_what_is_queued() {
        let (sender, rx) = unreachable_sender(&SenderLimits {
            send_workers: 1,
            send_attempts_max: 1000,
            send_backoff_first_ms: 60_000,
            ..SenderLimits::default()
        });
        for tag in 0..5 {
            sender.submit(reply("wx1", tag)).unwrap();
        }
        // The first reply is now in a one-minute pause; stopping must not wait for it.
        sender.stop();
        let mut tags: Vec<u32> = rx
            .try_iter()
            .map(|r| {
                assert!(
                    matches!(&r.outcome, Outcome::Undelivered(u) if u.reason == Reason::Stopped),
                    "{r:?}"
                );
                r.tag
            })
            .collect();
        tags.sort_unstable();
        assert_eq!(tags, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn full_queue_hands_the_reply_back() {
        let limits = SenderLimits {
            send_workers: 1,
            send_queue_len_max: 2,
            send_attempts_max: 1000,
            send_backoff_first_ms: 60_000,
            ..SenderLimits::default()
        };
        let sender = Sender::start(
            &[account("http://127.0.0.1:1")],
            &limits,
            Arc::default(),
            |_: Report<u32>| {},
        )
        .unwrap();
        // One reply is taken by the worker (pausing), two fill the queue; then it is full.
        let mut rejected = None;
        for tag in 0..10 {
            if let Err(r) = sender.submit(reply("wx1", tag)) {
                rejected = Some(r);
                break;
            }
        }
        let rejected = rejected.expect("the queue filled up");
        assert_eq!(rejected.reason, Reason::QueueFull);
        assert!(rejected.reply.tag <= 3);
    }
}
