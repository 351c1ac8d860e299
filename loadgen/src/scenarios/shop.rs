//! Shop conversations with many agents, built through the client API.
//!
//! The engine offers no client API for group conversations yet, and a shop conversation gets
//! one agent per dispatch. But a buyer's message while every assigned agent is offline adds
//! another online agent, and assignments outlast going offline. So [`build`] adds one agent at
//! a time: agent `k` of the shop logs in (the only one online), the buyer sends, agent `k` is
//! assigned (it gets `members`), agent `k` logs out. If the server has not yet seen agent
//! `k - 1` go offline, nobody is assigned and the buyer sends again. `fanout` builds one such
//! conversation, `chat --members K` one per conversation.

use std::time::{Duration, Instant};

use chinwag_protocol::client::{Client, ClientError, Encoding};
use chinwag_protocol::{ConvId, DeviceType, Message, ShopId, Target, Uid};

use crate::scenarios::Common;

/// Attempts to get one agent assigned before the build gives up.
const ASSIGN_TRIES: usize = 50;

/// Builds the conversation of `buyer` with `shop` and every one of `agents` (agents of that
/// shop), one agent at a time, by `deadline`; returns it and its last seq. Every agent is
/// offline at the end.
pub fn build(
    common: &Common,
    buyer: Uid,
    agents: &[Uid],
    shop: ShopId,
    deadline: Instant,
) -> Result<(ConvId, u64), String> {
    // Built through the first address; in a cluster that node forwards to the owners.
    let first = common.addr.split(',').next().unwrap_or(&common.addr).trim();
    let url = format!("ws://{first}{}", common.path);
    let encoding = if common.json {
        Encoding::Json
    } else {
        Encoding::Binary
    };
    let err = |what: &str, e: ClientError| format!("building {shop}: {what}: {e}");
    let mut buyer_conn = Client::connect(&url, encoding).map_err(|e| err("connect", e))?;
    buyer_conn
        .login(&common.token(buyer), DeviceType::Web)
        .map_err(|e| err("buyer login", e))?;
    let (mut conv, mut last_seq) = (ConvId(0), 0);
    for (k, &agent) in agents.iter().enumerate() {
        let mut agent_conn = Client::connect(&url, encoding).map_err(|e| err("connect", e))?;
        agent_conn
            .login(&common.token_in_shop(agent, Some(shop)), DeviceType::Web)
            .map_err(|e| err("agent login", e))?;
        let mut assigned = false;
        for attempt in 0..ASSIGN_TRIES {
            if Instant::now() > deadline {
                return Err(format!("building {shop}: timed out after {k} agents"));
            }
            let reply = buyer_conn
                .call(Message::Send(chinwag_protocol::Send {
                    target: Target::Shop(shop),
                    cmid: format!("build-{k}-{attempt}").into(),
                    kind: "text".into(),
                    body: "build".into(),
                }))
                .map_err(|e| err("buyer send", e))?;
            if let Message::SendOk(ok) = reply.message {
                conv = ok.conv;
                last_seq = last_seq.max(ok.seq.0);
            }
            // The previous agent may not be offline yet at the server; then nobody new is
            // assigned and this agent gets no `members`: send again.
            while !assigned {
                let push = agent_conn
                    .next_push(Duration::from_millis(100))
                    .map_err(|e| err("agent push", e))?;
                match push.map(|p| p.message) {
                    Some(Message::Members(m)) => assigned = m.members.contains(&agent),
                    Some(_) => {}
                    None => break,
                }
            }
            if assigned {
                break;
            }
        }
        if !assigned {
            return Err(format!("building {shop}: agent {k} was never assigned"));
        }
        agent_conn.close().map_err(|e| err("agent close", e))?;
    }
    let _ = buyer_conn.close();
    Ok((conv, last_seq))
}
