//! The client contract on one `/ws` session: decoding requests, login, and handing every other
//! op to the shard that owns its subject.
//!
//! A session answers `ping` and refuses what it can refuse alone (bad frames, ops before login,
//! a bad token); everything else becomes a [`BusMsg`] posted to its owner shard, whose answer
//! comes back through the shard ([`Session::on_registered`], [`Session::on_convs_part`], or a
//! plain frame to send).

use bytes::Bytes;
use chinwag_protocol::client::Encoding;
use chinwag_protocol::{
    binary, json, token, ConvSummary, DecodeError, DecodeErrorKind, DeviceId, ErrorCode, Frame,
    LoginOk, Message, Op, ShopId, Uid,
};

use super::context::Context;
use crate::bus::{self, reply_size, ws_message, BusMsg, Origin, SendRequest, SessionRef};
use crate::net::http::Endpoint;
use crate::net::ws::connection::CloseReason;
use crate::net::ws::frame::{self, Opcode};
use crate::store::StoredProfile;

/// Close code after `kicked`: in the range RFC 6455 §7.4.2 leaves to applications.
pub const CLOSE_KICKED: u16 = 4001;

/// `convs` requests one session may have waiting for their shards' parts; each holds a
/// partial list, so the number is bounded.
const CONVS_IN_FLIGHT_MAX: usize = 4;

/// A `convs` request whose parts have not all come back after this long is answered
/// `unavailable` and its slot freed: a part can be lost on the way back (the asking shard's
/// mailbox was full), and a slot must never be held for ever.
const CONVS_GATHER_TIMEOUT_MS: u64 = 10_000;

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
    /// When the login completed (Unix ms, this node's clock): an owner that re-learns the
    /// session from its announcement keeps the later of two logins of one device.
    login_ms: u64,
    /// The `login`'s `req`, for the `login_ok`.
    login_req: Option<u64>,
    /// The user's profile, from its owner shard at login and whenever a service sets it;
    /// every `send` carries it to the conversation's owner.
    pub profile: Option<Box<StoredProfile>>,
    /// `convs` requests waiting for every shard's part.
    gathers: Vec<Gather>,
    /// The token of the next `convs` request: parts are matched by it, not by the client's
    /// `req`, which a client may repeat or leave out.
    next_gather_token: u64,
}

#[derive(Debug)]
struct Gather {
    /// Names this request among the session's; never reused within a session.
    token: u64,
    req: Option<u64>,
    encoding: Encoding,
    /// Partitions whose part has not come back.
    remaining: usize,
    /// A shard could not answer (its mailbox was full): the reply is `unavailable`.
    failed: bool,
    /// When it was asked (the shard's clock), for [`CONVS_GATHER_TIMEOUT_MS`].
    started_ms: u64,
    convs: Vec<ConvSummary<'static>>,
}

/// What the application layer may do with the connection it serves (the session implements
/// it; so could a test).
pub trait Link {
    /// Queues an encoded server message (closing the connection if its queue is full).
    fn send(&mut self, ws_message: Bytes, ctx: &mut Context);
    /// Starts the close handshake with `code`.
    fn close(&mut self, code: u16, reason: &str, why: CloseReason, ctx: &mut Context);
    /// The address other shards use for this connection.
    fn session_ref(&self, ctx: &Context) -> SessionRef;
    /// The endpoint of the open WebSocket, if it is still open.
    fn endpoint(&self) -> Option<Endpoint>;
}

/// The application protocol of one `/ws` session: who logged in, and the `convs` requests
/// waiting for their parts. It acts through the [`Link`] it is given (send, close), so it
/// holds no socket and no queue of its own.
#[derive(Debug, Default)]
pub struct App {
    /// Who the session is, once it sent `login` (boxed: most of a session's life is idle, and
    /// an idle session should stay small).
    login: Option<Box<LoginState>>,
}

impl App {
    /// One complete application message from `/ws`: a text message (one JSON object, already
    /// checked to be UTF-8) or a binary message (frames of the binary codec, back to back).
    pub fn on_message(
        &mut self,
        opcode: Opcode,
        payload: &[u8],
        session: &mut impl Link,
        ctx: &mut Context,
    ) {
        crate::operator::metrics::add(&ctx.metrics().app_messages, 1);
        if opcode == Opcode::Text {
            self.on_request(json::decode_bytes(payload), Encoding::Json, session, ctx);
        } else {
            for frame in binary::frames(payload) {
                self.on_request(frame, Encoding::Binary, session, ctx);
                if session.endpoint() != Some(Endpoint::App) {
                    break;
                }
            }
        }
    }

    /// A message over the rate limit: refused with `rate_limited`, echoing its `req` if it has one.
    pub fn on_rate_limited(
        &mut self,
        opcode: Opcode,
        payload: &[u8],
        session: &mut impl Link,
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
        reply(
            session,
            req,
            encoding,
            bus::error(ErrorCode::RateLimited, "too many messages per second"),
            ctx,
        );
    }

    fn on_request(
        &mut self,
        decoded: Result<Frame<'_>, DecodeError>,
        encoding: Encoding,
        session: &mut impl Link,
        ctx: &mut Context,
    ) {
        let frame = match decoded {
            Ok(frame) => frame,
            // Every failed login is refused alike, whatever is wrong with it (a token that is
            // too long or not a string included): `unauthorized`, then close 1008.
            Err(e) if e.op == Some(Op::Login) && !self.is_logged_in() => {
                return refuse_login(session, e.req, encoding, &e.to_string(), ctx);
            }
            Err(e) => {
                let code = match e.kind {
                    DecodeErrorKind::UnknownOp(_) if !self.is_logged_in() => ErrorCode::NotLoggedIn,
                    _ => e.code(),
                };
                reply(
                    session,
                    e.req,
                    encoding,
                    bus::error(code, &e.to_string()),
                    ctx,
                );
                return;
            }
        };
        let req = frame.req;
        ctx.metrics().request(frame.message.op());
        match frame.message {
            Message::Ping => reply(session, req, encoding, Message::Pong, ctx),
            Message::Login(login) => {
                if self.login.is_some() {
                    let error = bus::error(ErrorCode::BadRequest, "already logged in");
                    return reply(session, req, encoding, error, ctx);
                }
                let now_s = ctx.unix_ms / 1000;
                let claims = match token::verify(&ctx.node.jwt_secret, &login.token, now_s) {
                    Ok(claims) => claims,
                    Err(e) => return refuse_login(session, req, encoding, &e.to_string(), ctx),
                };
                let uid = claims.uid;
                self.login = Some(Box::new(LoginState {
                    uid,
                    shop: claims
                        .shop
                        .filter(|_| uid.kind == chinwag_protocol::UidKind::Agent),
                    encoding,
                    device: None,
                    login_ms: 0,
                    login_req: req,
                    profile: None,
                    gathers: Vec::new(),
                    next_gather_token: 0,
                }));
                let request = BusMsg::Register {
                    session: session.session_ref(ctx),
                    uid,
                    device_type: login.device,
                };
                if ctx.post_to_owner(request).is_err() {
                    // The node that owns the user's partition is down (only in a cluster).
                    let text = "the node that owns this user is down; try again";
                    self.login = None;
                    let error = bus::error(ErrorCode::Unavailable, text);
                    reply(session, req, encoding, error, ctx);
                }
            }
            message => {
                let Some(origin) = self.origin(req, encoding, session, ctx) else {
                    let error = bus::error(ErrorCode::NotLoggedIn, "log in first");
                    return reply(session, req, encoding, error, ctx);
                };
                let request = match message {
                    Message::Send(send) => BusMsg::Send(Box::new(SendRequest {
                        origin,
                        target: send.target,
                        cmid: send.cmid.into_owned(),
                        kind: send.kind.into_owned(),
                        body: send.body.into_owned(),
                        profile: self
                            .login
                            .as_ref()
                            .and_then(|l| l.profile.as_deref().cloned()),
                        profile_pending: false,
                    })),
                    Message::Read(cursor) => BusMsg::Read {
                        origin: Box::new(origin),
                        cursor,
                    },
                    Message::Resolve(conv) => BusMsg::Resolve {
                        origin: Box::new(origin),
                        conv,
                    },
                    Message::History(history) => BusMsg::History {
                        origin: Box::new(origin),
                        history,
                    },
                    Message::Convs => {
                        let Some(login) = self.login.as_mut() else {
                            return;
                        };
                        expire_gathers(login, session, ctx);
                        if login.gathers.len() >= CONVS_IN_FLIGHT_MAX {
                            let error = origin
                                .error(ErrorCode::RateLimited, "too many convs requests in flight");
                            return session.send(error, ctx);
                        }
                        let token = login.next_gather_token;
                        login.next_gather_token += 1;
                        // Every partition of the cluster answers once: each shard here for
                        // its own, each other node for its own (its shards answer).
                        let parts = ctx.post.office().gather_parts();
                        if parts.asked == 0 {
                            // Every node that serves a partition is down.
                            let error = origin.error(
                                ErrorCode::Unavailable,
                                "no node serving conversations is up; try again",
                            );
                            return session.send(error, ctx);
                        }
                        login.gathers.push(Gather {
                            token,
                            req,
                            encoding,
                            remaining: parts.asked,
                            failed: false,
                            started_ms: ctx.now_ms,
                            convs: Vec::new(),
                        });
                        for (to, partitions) in parts.parts {
                            let request = BusMsg::Convs {
                                origin: Box::new(origin),
                                token,
                                partitions,
                            };
                            ctx.post.send_later(to, request);
                        }
                        return;
                    }
                    other => {
                        let op = other.op();
                        let text = if op.is_service() {
                            format!("{op} is a service op: use the service port (docs/backend.md)")
                        } else {
                            format!("{op} is not a request")
                        };
                        return reply(
                            session,
                            req,
                            encoding,
                            bus::error(ErrorCode::BadRequest, &text),
                            ctx,
                        );
                    }
                };
                if let Err(unrouted) = ctx.post_to_owner(request) {
                    // A conversation id naming a partition that does not exist, or in a
                    // cluster one whose node is down.
                    let error = origin.error(unrouted.code, unrouted.text);
                    session.send(error, ctx);
                }
            }
        }
    }

    /// The user's owner shard found or registered the device: the login completes.
    /// Returns the login to record in the shard's routing table, if it completed.
    pub fn on_registered(
        &mut self,
        device: Option<DeviceId>,
        profile: Option<Box<StoredProfile>>,
        session: &mut impl Link,
        ctx: &mut Context,
    ) -> bool {
        let Some(login) = self.login.as_mut() else {
            return false;
        };
        login.profile = profile;
        let (req, encoding) = (login.login_req, login.encoding);
        let Some(device) = device else {
            self.login = None;
            let error = bus::error(ErrorCode::Unavailable, "the device could not be registered");
            reply(session, req, encoding, error, ctx);
            return false;
        };
        login.device = Some(device);
        login.login_ms = ctx.unix_ms;
        let ok = Message::LoginOk(LoginOk {
            uid: login.uid,
            device_id: device,
            node_id: ctx.node.node_id,
            ts: ctx.unix_ms,
        });
        reply(session, req, encoding, ok, ctx);
        true
    }

    /// One shard's part of the `convs` request `token`, covering `partitions` partitions
    /// (`None`: that shard could not answer); the reply goes out when every partition is
    /// covered.
    pub fn on_convs_part(
        &mut self,
        token: u64,
        partitions: u16,
        convs: Option<Vec<ConvSummary<'static>>>,
        session: &mut impl Link,
        ctx: &mut Context,
    ) {
        let Some(login) = self.login.as_mut() else {
            return;
        };
        // A part of a request that timed out finds no gather: it is dropped.
        let Some(at) = login.gathers.iter().position(|g| g.token == token) else {
            return;
        };
        let gather = &mut login.gathers[at];
        match convs {
            Some(convs) if !gather.failed => gather.convs.extend(convs),
            _ => {
                gather.failed = true;
                gather.convs = Vec::new();
            }
        }
        gather.remaining = gather.remaining.saturating_sub(usize::from(partitions));
        if gather.remaining > 0 {
            return;
        }
        let mut gather = login.gathers.remove(at);
        if gather.failed {
            let error = bus::error(ErrorCode::Unavailable, "a shard is overloaded; try again");
            return reply(session, gather.req, gather.encoding, error, ctx);
        }
        // Most recently active first, as a conversation list shows them.
        gather
            .convs
            .sort_by_key(|c| std::cmp::Reverse((c.last.as_ref().map_or(0, |m| m.ts), c.conv)));
        // The list must fit the connection's send queue, or asking for it would get the client
        // disconnected. Past half the queue, the least recently active conversations are
        // listed without their `last` message (null, as for an empty one); `history` has it.
        let mut budget = ctx.node.config.reply_bytes_max();
        for conv in &mut gather.convs {
            let size = reply_size::conv_bytes(conv);
            if size > budget {
                conv.last = None;
            }
            budget = budget.saturating_sub(size);
        }
        reply(
            session,
            gather.req,
            gather.encoding,
            Message::ConvsOk(gather.convs),
            ctx,
        );
    }

    /// The device logged in on another connection, or a service kicked it (`by_service`):
    /// `kicked`, then close with 4001.
    pub fn kick(&mut self, by_service: bool, session: &mut impl Link, ctx: &mut Context) {
        let encoding = self.login.as_ref().map_or(Encoding::Json, |l| l.encoding);
        let reason = if by_service {
            "kicked by a service"
        } else {
            "logged in on another connection"
        };
        let kicked = Message::Kicked(reason.into());
        reply(session, None, encoding, kicked, ctx);
        session.close(CLOSE_KICKED, "kicked", CloseReason::Kicked, ctx);
    }

    /// The session's login, once complete: (uid, device, shop, encoding).
    /// A service set this user's profile: later `send`s carry it (an older one, arriving
    /// late, is ignored).
    pub fn on_own_profile(&mut self, profile: Box<StoredProfile>) {
        if let Some(login) = self.login.as_mut() {
            if !login
                .profile
                .as_ref()
                .is_some_and(|held| held.version >= profile.version)
            {
                login.profile = Some(profile);
            }
        }
    }

    /// The profile of the logged-in user, as the session knows it.
    pub fn own_profile(&self) -> Option<&StoredProfile> {
        self.login.as_ref()?.profile.as_deref()
    }

    pub fn logged_in(&self) -> Option<(Uid, DeviceId, Option<ShopId>, Encoding)> {
        let login = self.login.as_ref()?;
        Some((login.uid, login.device?, login.shop, login.encoding))
    }

    /// When the login completed (Unix ms, this node's clock), once it has.
    pub fn login_ms(&self) -> Option<u64> {
        let login = self.login.as_ref()?;
        login.device.map(|_| login.login_ms)
    }

    fn is_logged_in(&self) -> bool {
        self.login.as_ref().is_some_and(|l| l.device.is_some())
    }

    fn origin(
        &self,
        req: Option<u64>,
        encoding: Encoding,
        session: &impl Link,
        ctx: &Context,
    ) -> Option<Origin> {
        let (uid, device, _, _) = self.logged_in()?;
        Some(Origin {
            session: session.session_ref(ctx),
            uid,
            device,
            encoding,
            req,
            service: false,
            received: std::time::Instant::now(),
        })
    }
}

/// Refuses a login: `unauthorized` with `text`, then close 1008. The connection is done.
fn refuse_login(
    session: &mut impl Link,
    req: Option<u64>,
    encoding: Encoding,
    text: &str,
    ctx: &mut Context,
) {
    reply(
        session,
        req,
        encoding,
        bus::error(ErrorCode::Unauthorized, text),
        ctx,
    );
    session.close(
        frame::CLOSE_POLICY,
        "unauthorized",
        CloseReason::Unauthorized,
        ctx,
    );
}

/// Sends `message` as the answer to the request `req`, in `encoding`.
fn reply(
    session: &mut impl Link,
    req: Option<u64>,
    encoding: Encoding,
    message: Message<'_>,
    ctx: &mut Context,
) {
    session.send(ws_message(&Frame { req, message }, encoding), ctx);
}

/// Answers `unavailable` to the `convs` requests of `login` asked more than
/// [`CONVS_GATHER_TIMEOUT_MS`] ago and frees their slots (a part of theirs was lost).
fn expire_gathers(login: &mut LoginState, session: &mut impl Link, ctx: &mut Context) {
    let now_ms = ctx.now_ms;
    let expired = |g: &Gather| now_ms.saturating_sub(g.started_ms) >= CONVS_GATHER_TIMEOUT_MS;
    while let Some(at) = login.gathers.iter().position(expired) {
        let gather = login.gathers.remove(at);
        let error = bus::error(ErrorCode::Unavailable, "the convs request timed out");
        reply(session, gather.req, gather.encoding, error, ctx);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chinwag_protocol::token::{self, Claims};
    use chinwag_protocol::{ConvId, ConvSummary, ConvType, DeviceId, Seq, UidKind};

    use super::*;
    use crate::bus::mailbox::Mailbox;
    use crate::bus::post::{Post, PostOffice, To};
    use crate::net::ws::connection::WsLimits;
    use crate::net::ws::frame::Opcode;
    use crate::operator::config::Config;
    use crate::operator::NodeState;

    const SECRET: &[u8] = b"a test secret of thirty-two bytes!";
    const SHARDS: usize = 2;

    /// A link that records what the app layer did with it.
    #[derive(Default)]
    struct Recorder {
        sent: Vec<String>,
        closed: Option<(u16, CloseReason)>,
    }

    impl Link for Recorder {
        fn send(&mut self, ws_message: Bytes, _ctx: &mut Context) {
            let header_len = match ws_message[1] & 0x7f {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            let text = String::from_utf8_lossy(&ws_message[header_len..]);
            self.sent.push(text.into_owned());
        }

        fn close(&mut self, code: u16, _reason: &str, why: CloseReason, _ctx: &mut Context) {
            self.closed = Some((code, why));
        }

        fn session_ref(&self, ctx: &Context) -> SessionRef {
            ctx.session_ref(3, 1)
        }

        fn endpoint(&self) -> Option<Endpoint> {
            self.closed.is_none().then_some(Endpoint::App)
        }
    }

    /// A shard's context with no sockets: shard 0 of two, mailboxes that nobody drains.
    fn context() -> (Context, Vec<mio::Poll>) {
        let polls: Vec<mio::Poll> = (0..SHARDS).map(|_| mio::Poll::new().unwrap()).collect();
        let mailboxes = polls
            .iter()
            .map(|poll| Mailbox::new(16, mio::Waker::new(poll.registry(), mio::Token(0)).unwrap()))
            .collect();
        let config = Config::default();
        let ws_limits: WsLimits = crate::shard::context::ws_limits(&config);
        let ctx = Context {
            shard_id: 0,
            node: Arc::new(NodeState::new(
                config,
                SECRET.to_vec(),
                Arc::new(crate::bus::PartitionMap::single_node(256, SHARDS)),
                None,
            )),
            post: Post::new(
                0,
                Arc::new(PostOffice::new(
                    mailboxes,
                    Arc::new(crate::bus::PartitionMap::single_node(256, SHARDS)),
                )),
            ),
            ws_limits,
            now_ms: 0,
            unix_ms: 1_700_000_000_000,
            dirty: Vec::new(),
            read_again: Vec::new(),
            held: Default::default(),
            handover: None,
            api_requests_open: 0,
        };
        (ctx, polls)
    }

    fn text(app: &mut App, link: &mut Recorder, ctx: &mut Context, json: &str) {
        app.on_message(Opcode::Text, json.as_bytes(), link, ctx);
    }

    fn login(app: &mut App, link: &mut Recorder, ctx: &mut Context, uid: Uid) {
        let claims = Claims {
            uid,
            shop: None,
            exp: ctx.unix_ms / 1000 + 60,
        };
        let token = token::mint(SECRET, &claims);
        let request = format!(r#"{{"op":"login","req":1,"token":"{token}","device":"web"}}"#);
        text(app, link, ctx, &request);
    }

    #[test]
    fn requests_before_login_are_refused_and_a_bad_token_closes_with_1008() {
        let (mut ctx, _polls) = context();
        let (mut app, mut link) = (App::default(), Recorder::default());
        text(&mut app, &mut link, &mut ctx, r#"{"op":"convs","req":2}"#);
        assert!(
            link.sent[0].contains(r#""code":"not_logged_in""#),
            "{:?}",
            link.sent
        );
        text(&mut app, &mut link, &mut ctx, r#"{"op":"ping","req":3}"#);
        assert!(
            link.sent[1].contains(r#""op":"pong""#),
            "ping needs no login"
        );
        assert!(ctx.post.is_empty(), "nothing reaches an owner");

        let bad = r#"{"op":"login","req":4,"token":"not.a.token","device":"web"}"#;
        text(&mut app, &mut link, &mut ctx, bad);
        assert!(
            link.sent[2].contains(r#""code":"unauthorized""#),
            "{:?}",
            link.sent
        );
        assert_eq!(link.closed, Some((1008, CloseReason::Unauthorized)));
    }

    #[test]
    fn a_login_registers_with_the_users_owner_and_completes_when_it_answers() {
        let (mut ctx, _polls) = context();
        let (mut app, mut link) = (App::default(), Recorder::default());
        let uid = Uid::new(UidKind::Buyer, 42);
        login(&mut app, &mut link, &mut ctx, uid);
        let posted = ctx.post.take();
        assert_eq!(posted.len(), 1);
        let (
            shard,
            BusMsg::Register {
                session, uid: who, ..
            },
        ) = &posted[0]
        else {
            panic!("expected a Register, got {posted:?}");
        };
        let owner = ctx.partitions().shard_of(&uid).unwrap();
        assert_eq!((*shard, *who), (To::Shard(owner), uid));
        assert_eq!(*session, link.session_ref(&ctx));
        assert!(link.sent.is_empty(), "login_ok waits for the owner");
        assert!(app.logged_in().is_none());

        let device = DeviceId::from_u64(7).unwrap();
        assert!(app.on_registered(Some(device), None, &mut link, &mut ctx));
        assert!(
            link.sent[0].contains(r#""op":"login_ok","req":1"#),
            "{:?}",
            link.sent
        );
        assert_eq!(app.logged_in().map(|l| (l.0, l.1)), Some((uid, device)));
    }

    #[test]
    fn convs_gathers_every_shards_part_most_recent_first() {
        let (mut ctx, _polls) = context();
        let (mut app, mut link) = (App::default(), Recorder::default());
        let uid = Uid::new(UidKind::Buyer, 1);
        login(&mut app, &mut link, &mut ctx, uid);
        app.on_registered(DeviceId::from_u64(7).ok(), None, &mut link, &mut ctx);
        ctx.post.take();

        text(&mut app, &mut link, &mut ctx, r#"{"op":"convs","req":9}"#);
        let asked = ctx.post.take();
        let shards: Vec<To> = asked.iter().map(|(shard, _)| *shard).collect();
        assert_eq!(
            shards,
            [To::Shard(0), To::Shard(1)],
            "every shard is asked for its part"
        );
        let token = token_of(&asked[0].1);

        let summary = |conv: u64, ts: Option<u64>| ConvSummary {
            conv: ConvId(conv),
            conv_type: ConvType::Direct,
            members: vec![uid],
            member_count: 1,
            last_seq: Seq(1),
            read_seq: Seq(0),
            unread: 1,
            last: ts.map(|ts| chinwag_protocol::Msg {
                conv: ConvId(conv),
                seq: Seq(1),
                from: uid,
                ts,
                kind: "text".into(),
                body: "hi".into(),
                cmid: "c".into(),
            }),
            profile: Default::default(),
            profiles: Vec::new(),
        };
        app.on_convs_part(
            token,
            128,
            Some(vec![summary(256, Some(5))]),
            &mut link,
            &mut ctx,
        );
        assert_eq!(link.sent.len(), 1, "no reply until every shard answered");
        app.on_convs_part(
            token,
            128,
            Some(vec![summary(257, Some(9))]),
            &mut link,
            &mut ctx,
        );
        let reply = &link.sent[1];
        assert!(reply.starts_with(r#"{"op":"convs_ok","req":9"#), "{reply}");
        let first = reply.find(r#""conv":"257""#).unwrap();
        let second = reply.find(r#""conv":"256""#).unwrap();
        assert!(first < second, "most recently active first: {reply}");
    }

    fn token_of(msg: &BusMsg) -> u64 {
        match msg {
            BusMsg::Convs { token, .. } => *token,
            other => panic!("expected a Convs, got {other:?}"),
        }
    }

    fn summary_of(uid: Uid, conv: u64) -> ConvSummary<'static> {
        ConvSummary {
            conv: ConvId(conv),
            conv_type: ConvType::Direct,
            members: vec![uid],
            member_count: 1,
            last_seq: Seq(0),
            read_seq: Seq(0),
            unread: 0,
            last: None,
            profile: Default::default(),
            profiles: Vec::new(),
        }
    }

    fn logged_in(ctx: &mut Context) -> (App, Recorder, Uid) {
        let (mut app, mut link) = (App::default(), Recorder::default());
        let uid = Uid::new(UidKind::Buyer, 1);
        login(&mut app, &mut link, ctx, uid);
        app.on_registered(DeviceId::from_u64(7).ok(), None, &mut link, ctx);
        ctx.post.take();
        (app, link, uid)
    }

    /// Parts were matched by the client's `req`: two `convs` with the same `req` in flight
    /// took each other's parts.
    #[test]
    fn two_convs_with_the_same_req_in_flight_keep_their_parts_apart() {
        let (mut ctx, _polls) = context();
        let (mut app, mut link, uid) = logged_in(&mut ctx);
        text(&mut app, &mut link, &mut ctx, r#"{"op":"convs","req":5}"#);
        let first = token_of(&ctx.post.take()[0].1);
        text(&mut app, &mut link, &mut ctx, r#"{"op":"convs","req":5}"#);
        let second = token_of(&ctx.post.take()[0].1);
        assert_ne!(first, second);

        // The second request's parts come back first.
        for conv in [0x201, 0x202] {
            let part = Some(vec![summary_of(uid, conv)]);
            app.on_convs_part(second, 128, part, &mut link, &mut ctx);
        }
        assert_eq!(link.sent.len(), 2, "{:?}", link.sent);
        let reply = &link.sent[1];
        assert!(reply.contains(r#""conv":"513""#) && reply.contains(r#""conv":"514""#));
        for conv in [0x101, 0x102] {
            let part = Some(vec![summary_of(uid, conv)]);
            app.on_convs_part(first, 128, part, &mut link, &mut ctx);
        }
        let reply = &link.sent[2];
        assert!(
            reply.contains(r#""conv":"257""#) && reply.contains(r#""conv":"258""#),
            "{reply}"
        );
        assert!(!reply.contains(r#""conv":"513""#), "{reply}");
    }

    /// A `convs` whose part could not be posted (the shard's mailbox full) kept its slot for
    /// ever; after four, the session got `rate_limited` for every `convs`.
    #[test]
    fn a_convs_refused_by_a_full_mailbox_is_answered_unavailable_and_frees_its_slot() {
        let (mut ctx, _polls) = context();
        let (mut app, mut link, uid) = logged_in(&mut ctx);
        let metrics = crate::operator::metrics::ShardMetrics::default();
        // Nobody drains shard 1's mailbox in this test: fill it.
        for _ in 0..16 {
            let filler = BusMsg::AgentOffline {
                shop: ShopId(1),
                agent: uid,
            };
            assert!(ctx.post.send(To::Shard(1), filler, &metrics).is_none());
        }
        for round in 0..2 * CONVS_IN_FLIGHT_MAX {
            text(&mut app, &mut link, &mut ctx, r#"{"op":"convs","req":3}"#);
            for (shard, msg) in ctx.post.take() {
                let token = token_of(&msg);
                let back = ctx.post.send(shard, msg, &metrics);
                match back {
                    Some(BusMsg::ConvsPart {
                        token: t,
                        convs,
                        partitions,
                        ..
                    }) => {
                        assert_eq!((shard, t, convs.is_none()), (To::Shard(1), token, true));
                        app.on_convs_part(token, partitions, None, &mut link, &mut ctx);
                    }
                    // This shard's own part.
                    Some(BusMsg::Convs { partitions, .. }) => {
                        assert_eq!(shard, To::Shard(0));
                        app.on_convs_part(token, partitions, Some(Vec::new()), &mut link, &mut ctx);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            let last = link.sent.last().unwrap();
            assert!(
                last.contains(r#""code":"unavailable""#) && last.contains(r#""req":3"#),
                "round {round}: {last}"
            );
        }
        assert_eq!(
            link.sent.len(),
            1 + 2 * CONVS_IN_FLIGHT_MAX,
            "one answer each"
        );
    }

    /// A part lost on its way back (the asking shard's mailbox was full) must not hold its
    /// slot for ever either: past the timeout the request is answered `unavailable`.
    #[test]
    fn a_convs_whose_part_never_comes_back_times_out_and_frees_its_slot() {
        let (mut ctx, _polls) = context();
        let (mut app, mut link, _uid) = logged_in(&mut ctx);
        for req in 0..CONVS_IN_FLIGHT_MAX {
            let request = format!(r#"{{"op":"convs","req":{req}}}"#);
            text(&mut app, &mut link, &mut ctx, &request);
        }
        ctx.post.take();
        text(&mut app, &mut link, &mut ctx, r#"{"op":"convs","req":50}"#);
        assert!(link
            .sent
            .last()
            .unwrap()
            .contains(r#""code":"rate_limited""#));
        assert!(ctx.post.take().is_empty());

        ctx.now_ms += CONVS_GATHER_TIMEOUT_MS;
        let sent_before = link.sent.len();
        text(&mut app, &mut link, &mut ctx, r#"{"op":"convs","req":51}"#);
        let timed_out = &link.sent[sent_before..];
        assert_eq!(timed_out.len(), CONVS_IN_FLIGHT_MAX, "{timed_out:?}");
        assert!(timed_out
            .iter()
            .all(|t| t.contains(r#""code":"unavailable""#)));
        assert_eq!(ctx.post.take().len(), SHARDS, "the new request is asked");
    }
}
