//! The client contract on one `/ws` session: decoding requests, login, and handing every other
//! op to the shard that owns its subject (`route`).
//!
//! A session answers `ping` and refuses what it can refuse alone (bad frames, ops before login,
//! a bad token); everything else becomes a [`Request`] posted to its owner shard, whose answer
//! comes back through the shard ([`Session::on_registered`], [`Session::on_convs_part`], or a
//! plain frame to send).

use bytes::Bytes;
use chinwag_protocol::client::Encoding;
use chinwag_protocol::{
    binary, json, token, ConvSummary, DecodeError, DecodeErrorKind, DeviceId, ErrorCode, Frame,
    LoginOk, Message, Op, ShopId, Uid,
};

use super::{CloseReason, Context, Endpoint, Phase, Session};
use crate::net::frame::{self, Opcode};
use crate::route::{self, owner_of, ws_frame, Origin, Request, Routed};
use crate::shard::mailbox::ShardMsg;

/// Close code after `kicked` (PROTOCOL.md).
pub const CLOSE_KICKED: u16 = 4001;

/// What a `convs_ok` entry costs on the wire besides its members and its last message's
/// strings, for the reply byte budget.
const CONV_OVERHEAD_BYTES: usize = 320;

/// `convs` requests one session may have waiting for their shards' parts; each holds a
/// partial list, so the number is bounded.
const CONVS_IN_FLIGHT_MAX: usize = 4;

/// A session that sent `login`: who it is, and what it waits for.
#[derive(Debug)]
pub struct LoginState {
    pub uid: Uid,
    /// The shop of an agent.
    pub shop: Option<ShopId>,
    /// The encoding of the `login`, used for pushes.
    pub encoding: Encoding,
    /// `None` until the user's owner shard has found or registered the device.
    pub device: Option<DeviceId>,
    /// The `login`'s `req`, for the `login_ok`.
    login_req: Option<u64>,
    /// `convs` requests waiting for every shard's part.
    gathers: Vec<Gather>,
}

#[derive(Debug)]
struct Gather {
    req: Option<u64>,
    encoding: Encoding,
    remaining: usize,
    convs: Vec<ConvSummary<'static>>,
}

impl Session {
    /// One complete application message from `/ws`: a text message (one JSON object, already
    /// checked to be UTF-8) or a binary message (frames of the binary codec, back to back).
    pub(super) fn on_app_message(&mut self, opcode: Opcode, payload: &[u8], ctx: &mut Context) {
        crate::ops::metrics::add(&ctx.metrics().app_messages, 1);
        if opcode == Opcode::Text {
            self.on_client_frame(json::decode_bytes(payload), Encoding::Json, ctx);
        } else {
            for frame in binary::frames(payload) {
                self.on_client_frame(frame, Encoding::Binary, ctx);
                if !matches!(self.phase, Phase::Open(Endpoint::App)) {
                    break;
                }
            }
        }
    }

    /// A message over the rate limit: refused with `rate_limited`, echoing its `req` if it has one.
    pub(super) fn on_app_rate_limited(
        &mut self,
        opcode: Opcode,
        payload: &[u8],
        ctx: &mut Context,
    ) {
        let (req, encoding) = if opcode == Opcode::Text {
            (
                json::decode_bytes(payload).map_or_else(|e| e.req, |f| f.req),
                Encoding::Json,
            )
        } else {
            let req = binary::Header::parse(payload).ok().and_then(|h| h.req);
            (req, Encoding::Binary)
        };
        self.reply(
            req,
            encoding,
            route::error(ErrorCode::RateLimited, "too many messages per second"),
            ctx,
        );
    }

    /// Refuses a login: `unauthorized` with `text`, then close 1008. The connection is done.
    fn refuse_login(
        &mut self,
        req: Option<u64>,
        encoding: Encoding,
        text: &str,
        ctx: &mut Context,
    ) {
        self.reply(
            req,
            encoding,
            route::error(ErrorCode::Unauthorized, text),
            ctx,
        );
        self.close(
            frame::CLOSE_POLICY,
            "unauthorized",
            CloseReason::Unauthorized,
            ctx,
        );
    }

    fn on_client_frame(
        &mut self,
        decoded: Result<Frame<'_>, DecodeError>,
        encoding: Encoding,
        ctx: &mut Context,
    ) {
        let frame = match decoded {
            Ok(frame) => frame,
            // Every failed login is refused alike, whatever is wrong with it (a token that is
            // too long or not a string included): `unauthorized`, then close 1008.
            Err(e) if e.op == Some(Op::Login) && !self.is_logged_in() => {
                return self.refuse_login(e.req, encoding, &e.to_string(), ctx);
            }
            Err(e) => {
                let code = match e.kind {
                    DecodeErrorKind::UnknownOp(_) if !self.is_logged_in() => ErrorCode::NotLoggedIn,
                    _ => e.code(),
                };
                self.reply(e.req, encoding, route::error(code, &e.to_string()), ctx);
                return;
            }
        };
        let req = frame.req;
        match frame.message {
            Message::Ping => self.reply(req, encoding, Message::Pong, ctx),
            Message::Login(login) => {
                if self.login.is_some() {
                    let error = route::error(ErrorCode::BadRequest, "already logged in");
                    return self.reply(req, encoding, error, ctx);
                }
                let now_s = ctx.unix_ms / 1000;
                let claims = match token::verify(&ctx.node.jwt_secret, &login.token, now_s) {
                    Ok(claims) => claims,
                    Err(e) => return self.refuse_login(req, encoding, &e.to_string(), ctx),
                };
                let uid = claims.uid;
                self.login = Some(Box::new(LoginState {
                    uid,
                    shop: claims
                        .shop
                        .filter(|_| uid.kind == chinwag_protocol::UidKind::Agent),
                    encoding,
                    device: None,
                    login_req: req,
                    gathers: Vec::new(),
                }));
                let request = Request::Register {
                    session: self.session_ref(ctx.shard_id as u32),
                    uid,
                    device_type: login.device,
                };
                ctx.post(owner_of(&uid, ctx.shards()), request);
            }
            message => {
                let Some(origin) = self.origin(req, encoding, ctx) else {
                    let error = route::error(ErrorCode::NotLoggedIn, "log in first");
                    return self.reply(req, encoding, error, ctx);
                };
                let request = match message {
                    Message::Send(send) => Request::Send {
                        origin,
                        target: send.target,
                        cmid: send.cmid.into_owned(),
                        kind: send.kind.into_owned(),
                        body: send.body.into_owned(),
                    },
                    Message::Read(cursor) => Request::Read { origin, cursor },
                    Message::Resolve(conv) => Request::Resolve { origin, conv },
                    Message::History(history) => Request::History { origin, history },
                    Message::Convs => {
                        let shards = ctx.shards();
                        if self
                            .login
                            .as_ref()
                            .is_some_and(|l| l.gathers.len() >= CONVS_IN_FLIGHT_MAX)
                        {
                            let error = origin
                                .error(ErrorCode::RateLimited, "too many convs requests in flight");
                            return self.send(error, ctx);
                        }
                        if let Some(login) = self.login.as_mut() {
                            login.gathers.push(Gather {
                                req,
                                encoding,
                                remaining: shards,
                                convs: Vec::new(),
                            });
                        }
                        for shard in 0..shards {
                            ctx.post(shard, Request::Convs { origin });
                        }
                        return;
                    }
                    other => {
                        let text = format!("{} is not a request", other.op());
                        return self.reply(
                            req,
                            encoding,
                            route::error(ErrorCode::BadRequest, &text),
                            ctx,
                        );
                    }
                };
                let owner = request.owner(ctx.shards());
                if owner >= ctx.shards() {
                    // A conversation id naming a shard this node does not have.
                    let error = origin.error(ErrorCode::NotFound, "no such conversation");
                    return self.send(error, ctx);
                }
                ctx.post(owner, request);
            }
        }
    }

    /// The user's owner shard found or registered the device: the login completes.
    /// Returns the login to record in the shard's routing table, if it completed.
    pub fn on_registered(&mut self, device: Option<DeviceId>, ctx: &mut Context) -> bool {
        let Some(login) = self.login.as_mut() else {
            return false;
        };
        let (req, encoding) = (login.login_req, login.encoding);
        let Some(device) = device else {
            self.login = None;
            let error = route::error(ErrorCode::Unavailable, "the device could not be registered");
            self.reply(req, encoding, error, ctx);
            return false;
        };
        login.device = Some(device);
        let ok = Message::LoginOk(LoginOk {
            uid: login.uid,
            device_id: device,
            node_id: ctx.node.node_id,
            ts: ctx.unix_ms,
        });
        self.reply(req, encoding, ok, ctx);
        true
    }

    /// One shard's part of a `convs` reply; the reply goes out when every shard has answered.
    pub fn on_convs_part(
        &mut self,
        req: Option<u64>,
        convs: Vec<ConvSummary<'static>>,
        ctx: &mut Context,
    ) {
        let Some(login) = self.login.as_mut() else {
            return;
        };
        let Some(at) = login.gathers.iter().position(|g| g.req == req) else {
            return;
        };
        let gather = &mut login.gathers[at];
        gather.convs.extend(convs);
        gather.remaining -= 1;
        if gather.remaining > 0 {
            return;
        }
        let mut gather = login.gathers.remove(at);
        // Most recently active first, as a conversation list shows them.
        gather
            .convs
            .sort_by_key(|c| std::cmp::Reverse((c.last.as_ref().map_or(0, |m| m.ts), c.conv)));
        // The list must fit the connection's send queue, or asking for it would get the client
        // disconnected. Past half the queue, the least recently active conversations are
        // listed without their `last` message (null, as for an empty one); `history` has it.
        let mut budget = ctx.limits.send_queue_bytes_max / 2;
        for conv in &mut gather.convs {
            let size = CONV_OVERHEAD_BYTES
                + conv.members.len() * 24
                + conv
                    .last
                    .as_ref()
                    .map_or(0, |m| m.body.len() + m.kind.len() + m.cmid.len());
            if size > budget {
                conv.last = None;
            }
            budget = budget.saturating_sub(size);
        }
        self.reply(
            gather.req,
            gather.encoding,
            Message::ConvsOk(gather.convs),
            ctx,
        );
    }

    /// The device logged in on another connection: `kicked`, then close with 4001.
    pub fn kick(&mut self, ctx: &mut Context) {
        let encoding = self.login.as_ref().map_or(Encoding::Json, |l| l.encoding);
        let kicked = Message::Kicked("logged in on another connection".into());
        self.reply(None, encoding, kicked, ctx);
        self.close(CLOSE_KICKED, "kicked", CloseReason::Kicked, ctx);
    }

    /// The session's login, once complete: (uid, device, shop, encoding).
    pub fn logged_in(&self) -> Option<(Uid, DeviceId, Option<ShopId>, Encoding)> {
        let login = self.login.as_ref()?;
        Some((login.uid, login.device?, login.shop, login.encoding))
    }

    fn is_logged_in(&self) -> bool {
        self.login.as_ref().is_some_and(|l| l.device.is_some())
    }

    fn origin(&self, req: Option<u64>, encoding: Encoding, ctx: &Context) -> Option<Origin> {
        let (uid, device, shop, _) = self.logged_in()?;
        Some(Origin {
            session: self.session_ref(ctx.shard_id as u32),
            uid,
            device,
            shop,
            encoding,
            req,
        })
    }

    fn reply(
        &mut self,
        req: Option<u64>,
        encoding: Encoding,
        message: Message<'_>,
        ctx: &mut Context,
    ) {
        let frame: Bytes = ws_frame(&Frame { req, message }, encoding);
        self.send(frame, ctx);
    }
}

impl Context {
    /// Hands `request` to shard `shard` (this one included) at the end of the read phase.
    pub fn post(&mut self, shard: usize, request: Request) {
        self.outgoing
            .push((shard, ShardMsg::Routed(Routed::Request(Box::new(request)))));
    }

    /// The node's shard count.
    pub fn shards(&self) -> usize {
        self.node.mailboxes.len()
    }
}
