//! What the owner's unit tests share: an owner on a fresh log in a temporary directory, logins,
//! and the messages a turn gives, with their WebSocket messages read back as text.

use std::path::Path;
use std::sync::{Arc, Mutex};

use chinwag_protocol::client::Encoding;
use chinwag_protocol::{DeviceId, DeviceIdGenerator, DeviceType, NodeType, Uid, UidKind};

use super::{partition_dir, LogSetup, Owner};
use chinwag_protocol::{ConvInfo, Message};

use crate::bus::{BusMsg, GroupOp, GroupRequest, Origin, PartitionId, PartitionMap, SessionRef};
use crate::store::{Store, StoreConfig};

/// The shard the owner under test is.
pub const OWNER_SHARD: usize = 0;
/// The node's shards in the tests: the owner and one more, so "to every shard" shows.
pub const SHARDS: usize = 2;
/// The shard holding every test session.
pub const SESSION_SHARD: u16 = 1;

/// An owner on a fresh log, fed messages one turn at a time.
pub struct Harness {
    pub owner: Owner,
    dir: tempfile::TempDir,
    next_slot: u32,
    pub now_ms: u64,
    /// The shard's cmid budget (`cmid_window_entries_max` of its logs).
    cmids: usize,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_reply_bytes_max(1 << 20)
    }

    /// An owner whose replies (history pages) may use `reply_bytes_max` bytes.
    pub fn with_reply_bytes_max(reply_bytes_max: usize) -> Harness {
        Harness::with(reply_bytes_max, crate::store::CMID_WINDOW_ENTRIES_DEFAULT)
    }

    /// An owner whose partitions remember `cmids` cmids together (the shard's budget).
    pub fn with_cmid_budget(cmids: usize) -> Harness {
        Harness::with(1 << 20, cmids)
    }

    fn with(reply_bytes_max: usize, cmids: usize) -> Harness {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let owner = open(dir.path(), reply_bytes_max, cmids);
        Harness {
            owner,
            dir,
            next_slot: 0,
            now_ms: 1_700_000_000_000,
            cmids,
        }
    }

    /// Drops the owner and opens its log again, as a restart does.
    pub fn restart(&mut self) {
        self.owner = open(self.dir.path(), 1 << 20, self.cmids);
    }

    /// The log's directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// A session slot nobody used yet.
    pub fn new_session(&mut self) -> SessionRef {
        self.next_slot += 1;
        SessionRef {
            node: 0,
            shard: SESSION_SHARD,
            slot: self.next_slot,
            generation: 1,
        }
    }

    /// Hands `msg` to the owner and commits the turn; returns what went out.
    pub fn turn(&mut self, msg: BusMsg) -> Vec<(usize, BusMsg)> {
        self.now_ms += 1;
        self.owner.handle(msg, self.now_ms);
        self.commit()
    }

    /// Commits the turn; returns what went out, by the shard it reaches.
    pub fn commit(&mut self) -> Vec<(usize, BusMsg)> {
        by_shard(self.owner.commit(), &self.owner.map)
    }

    /// Logs `uid` in on a new session with a web device; returns the origin of its requests.
    pub fn login(&mut self, uid: Uid) -> Origin {
        let session = self.new_session();
        let out = self.turn(BusMsg::Register {
            session,
            uid,
            device_type: DeviceType::Web,
        });
        let device = registered(&out, session).expect("the device is registered");
        Origin {
            session,
            uid,
            device,
            encoding: Encoding::Json,
            req: Some(1),
            service: false,
            received: std::time::Instant::now(),
        }
    }

    /// A service's group operation in one turn: what went out, and the service's answer.
    pub fn group(&mut self, op: GroupOp) -> (Vec<(usize, BusMsg)>, GroupAnswer) {
        let origin = Origin {
            session: self.new_session(),
            uid: Uid::new(UidKind::Service, 1),
            device: DeviceId::from_u64(1).expect("a device id"),
            encoding: Encoding::Json,
            req: Some(7),
            service: true,
            received: std::time::Instant::now(),
        };
        let mut out = self.turn(BusMsg::Group(Box::new(GroupRequest { origin, op })));
        let answers = replies(&out, origin.session);
        assert_eq!(answers.len(), 1, "one answer: {answers:?}");
        out.retain(|(_, m)| !matches!(m, BusMsg::Deliver { to, .. } if *to == origin.session));
        let frame = chinwag_protocol::json::decode(&answers[0]).expect("the answer decodes");
        assert_eq!(frame.req, Some(7), "the answer names the request");
        let result = match frame.message {
            Message::GroupCreateOk(info)
            | Message::GroupAddOk(info)
            | Message::GroupRemoveOk(info)
            | Message::ConvInfoOk(info) => Ok(info),
            Message::Error(e) => Err((e.code, e.message.into_owned())),
            other => panic!("not a group answer: {other:?}"),
        };
        (out, result)
    }

    /// Creates a group (whose key this owner owns) and returns it.
    pub fn create_group(&mut self, key: u64, members: Vec<Uid>) -> chinwag_protocol::ConvId {
        let (_, info) = self.group(GroupOp::Create { key, members });
        info.expect("the group is created").conv
    }

    /// Makes the next commit fail.
    pub fn fail_next_commit(&mut self) {
        self.owner.fail_next_commit = true;
    }
}

/// The partitions in the tests: every one served by the owner under test (of [`SHARDS`]).
pub fn test_map() -> PartitionMap {
    PartitionMap::from_assignment(vec![Some(OWNER_SHARD as u16); PARTITIONS], SHARDS)
}

/// The partition count in the tests: few, so that tests see several conversations share one.
pub const PARTITIONS: usize = 8;

fn open(dir: &Path, reply_bytes_max: usize, cmids: usize) -> Owner {
    let mut config = StoreConfig::new(dir);
    config.segment_bytes = 1 << 20;
    config.cmid_window_entries_max = cmids;
    let setup = LogSetup {
        root: dir.to_path_buf(),
        config,
    };
    // As the node does: open the partitions that have a log, then one generator, going on
    // after every registered device.
    let mut opened = Vec::new();
    for p in 0..PARTITIONS as PartitionId {
        if partition_dir(dir, p).is_dir() {
            let (store, _) = Store::open(setup.config_of(p)).expect("the log opens");
            opened.push((p, store));
        }
    }
    let mut generator = DeviceIdGenerator::new(NodeType::Client, 0).expect("cluster 0 fits");
    for last in opened.iter().filter_map(|(_, store)| store.device_max()) {
        generator.resume_after(last);
    }
    Owner::new(
        OWNER_SHARD,
        Arc::new(test_map()),
        setup,
        opened,
        Arc::new(Mutex::new(generator)),
        reply_bytes_max,
    )
}

pub fn buyer(id: u64) -> Uid {
    Uid::new(UidKind::Buyer, id)
}

pub fn agent(id: u64) -> Uid {
    Uid::new(UidKind::Agent, id)
}

/// An owner's outputs by the shard of this node each reaches, as the post office sends them
/// on a single node: a push to every shard, anything else where it names (`usize::MAX`: no
/// shard here).
pub fn by_shard(
    out: Vec<(crate::bus::post::To, BusMsg)>,
    map: &crate::bus::PartitionMap,
) -> Vec<(usize, BusMsg)> {
    use crate::bus::post::To;
    let mut shards = Vec::with_capacity(out.len());
    for (to, msg) in out {
        match (to, msg) {
            (To::Fanout, BusMsg::Push(fanout)) => {
                for shard in 0..map.shards() {
                    shards.push((shard, BusMsg::Push(std::sync::Arc::clone(&fanout))));
                }
            }
            (To::Shard(shard), msg) => shards.push((shard, msg)),
            (_, msg) => shards.push((msg.owner(map).unwrap_or(usize::MAX), msg)),
        }
    }
    shards
}

/// The device a `Registered` for `session` in `out` carries.
pub fn registered(out: &[(usize, BusMsg)], session: SessionRef) -> Option<DeviceId> {
    out.iter().find_map(|(shard, msg)| match msg {
        BusMsg::Registered {
            session: s, device, ..
        } if *s == session => {
            assert_eq!(
                *shard, session.shard as usize,
                "answered on the session's shard"
            );
            *device
        }
        _ => None,
    })
}

/// The payload of a server WebSocket message, as text (the tests speak JSON).
pub fn ws_text(ws_message: &[u8]) -> String {
    let header_len = match ws_message[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    String::from_utf8(ws_message[header_len..].to_vec()).expect("a JSON message is text")
}

/// The texts delivered to `session` in `out`, in order.
pub fn replies(out: &[(usize, BusMsg)], session: SessionRef) -> Vec<String> {
    out.iter()
        .filter_map(|(shard, msg)| match msg {
            BusMsg::Deliver { to, ws_message } if *to == session => {
                assert_eq!(
                    *shard, session.shard as usize,
                    "sent to the session's shard"
                );
                Some(ws_text(ws_message))
            }
            _ => None,
        })
        .collect()
}

/// A service's answer to a group operation: the conversation, or the error's code and text.
pub type GroupAnswer = Result<ConvInfo, (chinwag_protocol::ErrorCode, String)>;

/// One push as the tests see it: the shards it goes to, its users, the device left out, and
/// its JSON text.
pub type SeenPush = (Vec<usize>, Vec<Uid>, Option<DeviceId>, String);

/// The pushes in `out`.
pub fn pushes(out: &[(usize, BusMsg)]) -> Vec<SeenPush> {
    let mut found: Vec<SeenPush> = Vec::new();
    for (shard, msg) in out {
        let BusMsg::Push(fanout) = msg else { continue };
        let text = ws_text(&fanout.json);
        match found.last_mut() {
            // One push goes to every shard as the same shared `Fanout`.
            Some(last) if last.3 == text && !last.0.contains(shard) => last.0.push(*shard),
            _ => found.push((vec![*shard], fanout.users.to_vec(), fanout.except, text)),
        }
    }
    found
}

/// The `send_ok` in `texts`: its conversation and seq.
pub fn send_ok(texts: &[String]) -> (chinwag_protocol::ConvId, u64) {
    for text in texts {
        if let Ok(frame) = chinwag_protocol::json::decode(text) {
            if let chinwag_protocol::Message::SendOk(ok) = frame.message {
                return (ok.conv, ok.seq.0);
            }
        }
    }
    panic!("no send_ok in {texts:?}")
}

/// A `send` of `body` to `target`.
pub fn send(origin: &Origin, target: chinwag_protocol::Target, cmid: &str, body: &str) -> BusMsg {
    BusMsg::Send(Box::new(crate::bus::SendRequest {
        origin: *origin,
        target,
        cmid: cmid.into(),
        kind: "text".into(),
        body: body.into(),
        profile: None,
        profile_pending: false,
    }))
}

/// A `send` whose session carries the sender's `profile`.
pub fn send_with_profile(
    origin: &Origin,
    target: chinwag_protocol::Target,
    cmid: &str,
    profile: crate::store::StoredProfile,
) -> BusMsg {
    let BusMsg::Send(mut request) = send(origin, target, cmid, "hi") else {
        unreachable!("send makes a Send")
    };
    request.profile = Some(profile);
    BusMsg::Send(request)
}

/// The origin of a backend service's request, on a new session.
pub fn service_origin(h: &mut Harness) -> Origin {
    Origin {
        session: h.new_session(),
        uid: Uid::new(UidKind::Service, 1),
        device: DeviceId::from_u64(1).expect("a device id"),
        encoding: Encoding::Json,
        req: Some(7),
        service: true,
        received: std::time::Instant::now(),
    }
}
