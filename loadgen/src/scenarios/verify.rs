//! `chat --verify-log`: the run's last phase. Once the load has drained, every conversation it
//! used is read back with `history`, page by page from seq 1, as one of its members, from any
//! node of `--addr` that answers, and judged against the ledger of the run's sends
//! ([`crate::ledger::judge`]). A node that is down, refuses (`unavailable`: the leader of the
//! conversation's partition is moving) or does not answer within [`REPLY_TIMEOUT`] is left for
//! the next address after [`RETRY_AFTER`]; the whole phase is bounded by
//! `--verify-timeout-s`, and a conversation not read by then is a failure (the run was not
//! verified), never a pass. A conversation that every address in a row (at least two answers)
//! says does not exist (`not_found`) has no stored log: it is judged as an empty one, so
//! whatever was acknowledged in it counts as lost.
//!
//! Blocking reads, one conversation after another, with the protocol crate's client: this
//! phase measures nothing, and a login and a few pages per conversation take milliseconds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chinwag_protocol::client::{Client, ClientError, Encoding};
use chinwag_protocol::{ConvId, DeviceType, ErrorCode, History, HistoryRange, Message, Seq};

use crate::ledger::{self, Sent, Stored, Verdict};
use crate::report::Report;
use crate::scenarios::Common;

/// One conversation to read back.
pub struct ToRead {
    pub conv: ConvId,
    /// Its first seq of the load (seqs below it were stored before, by a build).
    pub first: u64,
    /// The login token of one of its members.
    pub token: String,
    /// Every send the run made to it, by cmid.
    pub sends: HashMap<String, Sent>,
}

/// How long a read waits for one reply before it tries the next address.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a read waits after a failure before it tries the next address.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Messages per `history` page.
const PAGE: u16 = chinwag_protocol::message::HISTORY_LIMIT_MAX;

/// Reads every conversation of `convs` and judges it; adds the figures (`verify_*`), the
/// violations and the failures (conversations not read within `timeout`) to `report`.
pub fn run(common: &Common, timeout: Duration, convs: Vec<ToRead>, report: &mut Report) {
    let started = Instant::now();
    let deadline = started + timeout;
    let addrs = crate::resolve_list(&common.addr).unwrap_or_default();
    let encoding = if common.json {
        Encoding::Json
    } else {
        Encoding::Binary
    };
    let mut total = Verdict::default();
    let (mut read, mut unread) = (0u64, 0u64);
    let mut retries = 0u64;
    let mut not_found = 0u64;
    for (c, to_read) in convs.iter().enumerate() {
        let reader = Reader {
            addrs: &addrs,
            path: &common.path,
            encoding,
            token: &to_read.token,
            conv: to_read.conv,
        };
        // Conversations start at different addresses, so one slow node does not hold all.
        match reader.read(c, deadline, &mut retries) {
            Ok((stored, found)) => {
                read += 1;
                not_found += u64::from(!found);
                let verdict = ledger::judge(to_read.conv.0, to_read.first, &to_read.sends, &stored);
                total.stored += verdict.stored;
                total.acked += verdict.acked;
                total.unacked_stored += verdict.unacked_stored;
                total.unacked_absent += verdict.unacked_absent;
                for v in verdict.violations {
                    report.violations.add(v);
                }
            }
            Err(e) => {
                unread += 1;
                report.fail(format!("verify-log: conversation not read: {e}"));
            }
        }
    }
    report.figure("verify_conversations", read);
    report.figure("verify_unread", unread);
    report.figure("verify_stored", total.stored);
    report.figure("verify_acked", total.acked);
    report.figure("verify_unacked_stored", total.unacked_stored);
    report.figure("verify_unacked_absent", total.unacked_absent);
    report.figure("verify_retries", retries);
    report.figure("verify_not_found", not_found);
    report.figure("verify_s", started.elapsed().as_secs_f64());
}

/// Reads one conversation's stored log.
struct Reader<'a> {
    addrs: &'a [SocketAddr],
    path: &'a str,
    encoding: Encoding,
    token: &'a str,
    conv: ConvId,
}

impl Reader<'_> {
    /// The whole stored log, from address `first_addr` (mod the count) on, trying the next
    /// address after each failure until `deadline`, and whether the conversation exists
    /// (`false`: every address in a row answered `not_found`); the last failure's cause if it
    /// could not be read.
    fn read(
        &self,
        first_addr: usize,
        deadline: Instant,
        retries: &mut u64,
    ) -> Result<(Vec<Stored>, bool), String> {
        if self.addrs.is_empty() {
            return Err("no address".into());
        }
        let mut stored: Vec<Stored> = Vec::new();
        let mut attempt = first_addr;
        let mut not_found_in_a_row = 0usize;
        loop {
            let addr = self.addrs[attempt % self.addrs.len()];
            // Pages already read are kept: the next address goes on after them.
            match self.read_from(addr, &mut stored) {
                Ok(()) => return Ok((stored, true)),
                Err(ClientError::Rejected(e)) if e.code == ErrorCode::NotFound => {
                    not_found_in_a_row += 1;
                    if not_found_in_a_row >= self.addrs.len().max(2) {
                        return Ok((stored, false));
                    }
                    *retries += 1;
                    attempt += 1;
                    std::thread::sleep(RETRY_AFTER);
                    continue;
                }
                Err(e) if Instant::now() + RETRY_AFTER >= deadline => {
                    return Err(format!("conv {}, last from {addr}: {e}", self.conv));
                }
                Err(_) => {
                    not_found_in_a_row = 0;
                    *retries += 1;
                    attempt += 1;
                    std::thread::sleep(RETRY_AFTER);
                }
            }
        }
    }

    /// Logs in at `addr` and appends the pages after the last of `stored` until a short page.
    fn read_from(&self, addr: SocketAddr, stored: &mut Vec<Stored>) -> Result<(), ClientError> {
        let url = format!("ws://{addr}{}", self.path);
        let mut client = Client::connect(&url, self.encoding)?;
        client.set_timeout(REPLY_TIMEOUT);
        client.login(self.token, DeviceType::Web)?;
        loop {
            let after = stored.last().map_or(0, |m| m.seq);
            let reply = client.call(Message::History(History {
                conv: self.conv,
                range: HistoryRange::After(Seq(after)),
                limit: PAGE,
            }))?;
            let Message::HistoryOk(page) = reply.message else {
                return Err(ClientError::Unexpected(Box::new(reply)));
            };
            let full = page.msgs.len() >= usize::from(PAGE);
            stored.extend(page.msgs.iter().map(|m| Stored {
                seq: m.seq.0,
                cmid: m.cmid.to_string(),
                digest: ledger::digest(m.body.as_bytes()),
            }));
            if !full {
                return Ok(());
            }
        }
    }
}
