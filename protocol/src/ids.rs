//! Identifiers of the contract, as newtypes with the exact bit layouts of `PROTOCOL.md`.
//!
//! Bit 0 is the most significant bit of the `u64`, as in the design this project implements.
//!
//! | id | bits |
//! |---|---|
//! | [`DeviceId`] | `[0]` 0 · `[1-3]` node type · `[4-15]` cluster · `[16-17]` device type · `[18-47]` seconds since [`PROJECT_EPOCH_UNIX_S`] · `[48-63]` counter |
//! | [`NodeId`] | `[0]` 0 · `[1-3]` node type · `[4-15]` node number · `[16-47]` IPv4 · `[48-63]` port |
//!
//! Every id prints and parses as a decimal `u64` ([`Uid`] as `"kind:id"`).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;

/// The project epoch, 2026-01-01T00:00:00Z, in Unix seconds. DeviceId timestamps count from it:
/// 30 bits of seconds last until 2060.
pub const PROJECT_EPOCH_UNIX_S: u64 = 1_767_225_600;

/// The largest timestamp a [`DeviceId`] can hold (30 bits).
pub const DEVICE_TS_MAX: u32 = (1 << 30) - 1;

/// A value did not fit the field it was meant for, or a text form did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdError(pub &'static str);

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for IdError {}

/// The kind of node an id belongs to (3 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NodeType {
    /// `000`: an external IM client (devices carry this type).
    Client = 0,
    /// `001`: a connector node (holds sockets).
    Connector = 1,
    /// `010`: a logic node (owns conversations).
    Logic = 2,
}

impl NodeType {
    /// The node type with these three bits, if one is defined.
    pub fn from_bits(bits: u8) -> Option<NodeType> {
        match bits {
            0 => Some(NodeType::Client),
            1 => Some(NodeType::Connector),
            2 => Some(NodeType::Logic),
            _ => None,
        }
    }
}

/// The kind of device a client logs in from (2 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DeviceType {
    /// A browser.
    Web = 0,
    /// An iOS app.
    Ios = 1,
    /// An Android app.
    Android = 2,
    /// A desktop app.
    Desktop = 3,
}

impl DeviceType {
    /// Every device type, in bit order.
    pub const ALL: [DeviceType; 4] = [
        DeviceType::Web,
        DeviceType::Ios,
        DeviceType::Android,
        DeviceType::Desktop,
    ];

    /// The device type with these two bits.
    pub fn from_bits(bits: u8) -> Option<DeviceType> {
        DeviceType::ALL.get(usize::from(bits)).copied()
    }

    /// The name used in JSON (`web`, `ios`, `android`, `desktop`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceType::Web => "web",
            DeviceType::Ios => "ios",
            DeviceType::Android => "android",
            DeviceType::Desktop => "desktop",
        }
    }
}

impl FromStr for DeviceType {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        DeviceType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or(IdError("device must be web, ios, android or desktop"))
    }
}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! decimal_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                parse_decimal_u64(s).map($name)
            }
        }
    };
}

decimal_id!(
    /// A conversation (decimal string in JSON).
    ConvId
);
decimal_id!(
    /// A shop, the account id of the business an agent works for (decimal string in JSON).
    ShopId
);
decimal_id!(
    /// A message's position in its conversation: 1, 2, 3, … without gap (a number in JSON).
    /// `Seq(0)` means "nothing yet" (an empty conversation, a cursor that has read nothing).
    Seq
);

/// Parses a canonical decimal `u64`: digits only, no sign, no surrounding space.
pub(crate) fn parse_decimal_u64(s: &str) -> Result<u64, IdError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IdError("expected a decimal u64"));
    }
    s.parse().map_err(|_| IdError("decimal u64 out of range"))
}

/// The fields of a [`DeviceId`], unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceIdParts {
    /// Bits 1-3.
    pub node_type: NodeType,
    /// Bits 4-15 (12 bits; 0 in a single cluster).
    pub cluster: u16,
    /// Bits 16-17.
    pub device_type: DeviceType,
    /// Bits 18-47: seconds since [`PROJECT_EPOCH_UNIX_S`] (30 bits).
    pub ts: u32,
    /// Bits 48-63.
    pub counter: u16,
}

/// A device: one (account, device type) pair, stable across logins and restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(u64);

impl DeviceId {
    /// Packs the fields. Fails if `cluster` exceeds 12 bits or `ts` 30 bits.
    pub fn pack(parts: DeviceIdParts) -> Result<DeviceId, IdError> {
        if parts.cluster >= 1 << 12 {
            return Err(IdError("cluster exceeds 12 bits"));
        }
        if parts.ts > DEVICE_TS_MAX {
            return Err(IdError("device timestamp exceeds 30 bits"));
        }
        Ok(DeviceId(
            (parts.node_type as u64) << 60
                | u64::from(parts.cluster) << 48
                | (parts.device_type as u64) << 46
                | u64::from(parts.ts) << 16
                | u64::from(parts.counter),
        ))
    }

    /// Unpacks the fields.
    pub fn unpack(self) -> DeviceIdParts {
        let v = self.0;
        DeviceIdParts {
            // The constructors only admit defined node types (see `from_u64`).
            node_type: NodeType::from_bits((v >> 60) as u8 & 0b111).unwrap_or(NodeType::Client),
            cluster: (v >> 48) as u16 & 0xfff,
            // Two bits always name a device type.
            device_type: DeviceType::ALL[((v >> 46) & 0b11) as usize],
            ts: (v >> 16) as u32 & DEVICE_TS_MAX,
            counter: v as u16,
        }
    }

    /// The id with this raw value, if its top bit is 0 and its node type is defined.
    pub fn from_u64(v: u64) -> Result<DeviceId, IdError> {
        if v >> 63 != 0 {
            return Err(IdError("device id bit 0 must be 0"));
        }
        NodeType::from_bits((v >> 60) as u8 & 0b111).ok_or(IdError("undefined node type"))?;
        Ok(DeviceId(v))
    }

    /// The raw value.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The device type bits.
    pub fn device_type(self) -> DeviceType {
        self.unpack().device_type
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for DeviceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        DeviceId::from_u64(parse_decimal_u64(s)?)
    }
}

/// The fields of a [`NodeId`], unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeIdParts {
    /// Bits 1-3.
    pub node_type: NodeType,
    /// Bits 4-15: the node's number in its cluster (12 bits).
    pub number: u16,
    /// Bits 16-47.
    pub ip: Ipv4Addr,
    /// Bits 48-63.
    pub port: u16,
}

/// A server node of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u64);

impl NodeId {
    /// Packs the fields. Fails if `number` exceeds 12 bits.
    pub fn pack(parts: NodeIdParts) -> Result<NodeId, IdError> {
        if parts.number >= 1 << 12 {
            return Err(IdError("node number exceeds 12 bits"));
        }
        Ok(NodeId(
            (parts.node_type as u64) << 60
                | u64::from(parts.number) << 48
                | u64::from(u32::from(parts.ip)) << 16
                | u64::from(parts.port),
        ))
    }

    /// The id of a node listening on `addr`, numbered as the design does: by the low 12 bits
    /// of its IPv4 address.
    pub fn for_addr(node_type: NodeType, addr: SocketAddrV4) -> NodeId {
        let number = (u32::from(*addr.ip()) & 0xfff) as u16;
        NodeId((node_type as u64) << 60 | u64::from(number) << 48).with_addr(addr)
    }

    fn with_addr(self, addr: SocketAddrV4) -> NodeId {
        NodeId(self.0 | u64::from(u32::from(*addr.ip())) << 16 | u64::from(addr.port()))
    }

    /// Unpacks the fields.
    pub fn unpack(self) -> NodeIdParts {
        let v = self.0;
        NodeIdParts {
            // The constructors only admit defined node types (see `from_u64`).
            node_type: NodeType::from_bits((v >> 60) as u8 & 0b111).unwrap_or(NodeType::Client),
            number: (v >> 48) as u16 & 0xfff,
            ip: Ipv4Addr::from((v >> 16) as u32),
            port: v as u16,
        }
    }

    /// The id with this raw value, if its top bit is 0 and its node type is defined.
    pub fn from_u64(v: u64) -> Result<NodeId, IdError> {
        if v >> 63 != 0 {
            return Err(IdError("node id bit 0 must be 0"));
        }
        NodeType::from_bits((v >> 60) as u8 & 0b111).ok_or(IdError("undefined node type"))?;
        Ok(NodeId(v))
    }

    /// The raw value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        NodeId::from_u64(parse_decimal_u64(s)?)
    }
}

/// What kind of account a [`Uid`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum UidKind {
    /// An IM client of a shop's customer.
    Buyer = 0,
    /// A customer reached through the WeChat channel.
    Wechat = 1,
    /// A shop's customer-service staff.
    Agent = 2,
    /// A backend service.
    Service = 3,
}

impl UidKind {
    /// Every kind, in code order.
    pub const ALL: [UidKind; 4] = [
        UidKind::Buyer,
        UidKind::Wechat,
        UidKind::Agent,
        UidKind::Service,
    ];

    /// The kind with this binary code.
    pub fn from_code(code: u8) -> Option<UidKind> {
        UidKind::ALL.get(usize::from(code)).copied()
    }

    /// The name used in text (`buyer`, `wechat`, `agent`, `service`).
    pub fn as_str(self) -> &'static str {
        match self {
            UidKind::Buyer => "buyer",
            UidKind::Wechat => "wechat",
            UidKind::Agent => "agent",
            UidKind::Service => "service",
        }
    }

    /// Whether this kind is a shop's customer (its messages are dispatched to agents).
    pub fn is_customer(self) -> bool {
        matches!(self, UidKind::Buyer | UidKind::Wechat)
    }
}

impl FromStr for UidKind {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        UidKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or(IdError("uid kind must be buyer, wechat, agent or service"))
    }
}

/// A user: an account of some kind. Text form `"kind:id"`, e.g. `"buyer:1001"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid {
    /// The account's kind.
    pub kind: UidKind,
    /// The account system's id.
    pub id: u64,
}

impl Uid {
    /// The uid of this kind and id.
    pub const fn new(kind: UidKind, id: u64) -> Uid {
        Uid { kind, id }
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.id)
    }
}

impl FromStr for Uid {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let (kind, id) = s
            .split_once(':')
            .ok_or(IdError("uid must be \"kind:id\""))?;
        Ok(Uid {
            kind: kind.parse()?,
            id: parse_decimal_u64(id)?,
        })
    }
}

/// Issues [`DeviceId`]s that never repeat on one node.
///
/// It takes the clock from its caller (seconds since the Unix epoch) and keeps the last
/// (timestamp, counter) it issued. Two rules make ids unique:
///
/// - **More than 65,536 ids in one second**: when the counter of the current second is spent,
///   the generator moves on to the next second before the clock does. Ids stay unique and
///   increasing; their timestamps run ahead of the clock until registrations slow down.
/// - **The clock steps backwards**: the generator never goes back. It keeps issuing from its
///   last timestamp, as if the clock had stood still, until the clock passes it again.
///
/// Across restarts, [`DeviceIdGenerator::resume_after`] starts after the greatest id the node
/// ever issued (the device table knows it), so a clock that is behind after a reboot cannot
/// repeat an id either.
#[derive(Debug, Clone)]
pub struct DeviceIdGenerator {
    node_type: NodeType,
    cluster: u16,
    /// The (timestamp, counter) of the last id issued, as `ts << 16 | counter`; `None` before
    /// the first.
    last: Option<u64>,
}

impl DeviceIdGenerator {
    /// A generator for ids of this node type and cluster. Fails if `cluster` exceeds 12 bits.
    pub fn new(node_type: NodeType, cluster: u16) -> Result<DeviceIdGenerator, IdError> {
        if cluster >= 1 << 12 {
            return Err(IdError("cluster exceeds 12 bits"));
        }
        Ok(DeviceIdGenerator {
            node_type,
            cluster,
            last: None,
        })
    }

    /// Continues after `last`, an id this node issued before (e.g. before a restart).
    pub fn resume_after(&mut self, last: DeviceId) {
        let position = last.get() & ((1 << 46) - 1);
        self.last = Some(self.last.map_or(position, |p| p.max(position)));
    }

    /// The next id for a device of `device_type`, at `now_unix_s`.
    ///
    /// Fails only when the timestamp no longer fits 30 bits (the year 2060) or the clock is
    /// before the project epoch with no earlier id to continue from.
    pub fn next(&mut self, device_type: DeviceType, now_unix_s: u64) -> Result<DeviceId, IdError> {
        let clock = now_unix_s
            .checked_sub(PROJECT_EPOCH_UNIX_S)
            .map(|s| s << 16);
        let position = match (self.last, clock) {
            (None, None) => return Err(IdError("clock is before the project epoch")),
            (None, Some(clock)) => clock,
            // The clock is ahead of the last id: follow it.
            (Some(last), Some(clock)) if clock > last => clock,
            // The clock is at or behind the last id: continue from it.
            (Some(last), _) => last + 1,
        };
        if position >> 16 > u64::from(DEVICE_TS_MAX) {
            return Err(IdError("device timestamp exceeds 30 bits"));
        }
        self.last = Some(position);
        DeviceId::pack(DeviceIdParts {
            node_type: self.node_type,
            cluster: self.cluster,
            device_type,
            ts: (position >> 16) as u32,
            counter: position as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn device_id_layout_matches_the_contract() {
        let id = DeviceId::pack(DeviceIdParts {
            node_type: NodeType::Logic,
            cluster: 0xabc,
            device_type: DeviceType::Desktop,
            ts: 0x2345_6789,
            counter: 0xbeef,
        })
        .unwrap();
        // 0 | 010 | 1010_1011_1100 | 11 | 10_0011_0100_0101_0110_0111_1000_1001 | beef
        assert_eq!(id.get(), 0x2abc_e345_6789_beef);
        assert_eq!(id.to_string(), (0x2abc_e345_6789_beefu64).to_string());
        assert_eq!(id.unpack().ts, 0x2345_6789);
        assert_eq!(id.device_type(), DeviceType::Desktop);
    }

    #[test]
    fn node_id_layout_matches_the_contract() {
        let addr = SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 7000);
        let id = NodeId::for_addr(NodeType::Connector, addr);
        let parts = id.unpack();
        assert_eq!(parts.node_type, NodeType::Connector);
        assert_eq!(parts.number, 0x203);
        assert_eq!(parts.ip, Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(parts.port, 7000);
        assert_eq!(id.get(), 1 << 60 | 0x203 << 48 | 0x0a01_0203 << 16 | 7000);
        assert_eq!(NodeId::pack(parts).unwrap(), id);
    }

    #[test]
    fn ids_reject_values_outside_their_layout() {
        assert!(DeviceId::from_u64(1 << 63).is_err());
        assert!(DeviceId::from_u64(7 << 60).is_err());
        assert!(NodeId::from_u64(3 << 60).is_err());
        assert!("12a".parse::<ConvId>().is_err());
        assert!("+12".parse::<ConvId>().is_err());
        assert!("".parse::<ConvId>().is_err());
        assert!("18446744073709551616".parse::<ConvId>().is_err());
        assert_eq!(
            "18446744073709551615".parse::<ConvId>().unwrap(),
            ConvId(u64::MAX)
        );
        assert!("buyer".parse::<Uid>().is_err());
        assert!("admin:1".parse::<Uid>().is_err());
        assert!("agent:-1".parse::<Uid>().is_err());
        assert_eq!(
            "wechat:42".parse::<Uid>().unwrap(),
            Uid::new(UidKind::Wechat, 42)
        );
    }

    const T0: u64 = PROJECT_EPOCH_UNIX_S + 1_000;

    #[test]
    fn generator_borrows_the_next_second_after_65536_ids() {
        let mut g = DeviceIdGenerator::new(NodeType::Client, 0).unwrap();
        let mut seen = HashSet::new();
        let mut prev = None;
        for _ in 0..65_536 * 2 + 10 {
            let id = g.next(DeviceType::Web, T0).unwrap();
            assert!(seen.insert(id), "repeated {id}");
            assert!(prev < Some(id));
            prev = Some(id);
        }
        // Two seconds' worth of counters were spent within one clock second.
        assert_eq!(prev.unwrap().unpack().ts, 1_000 + 2);
        assert_eq!(prev.unwrap().unpack().counter, 9);
        // When the clock catches up and passes, ids follow it again.
        let later = g.next(DeviceType::Web, T0 + 10).unwrap();
        assert_eq!((later.unpack().ts, later.unpack().counter), (1_010, 0));
    }

    #[test]
    fn generator_never_goes_back_when_the_clock_does() {
        let mut g = DeviceIdGenerator::new(NodeType::Client, 0).unwrap();
        let a = g.next(DeviceType::Ios, T0 + 100).unwrap();
        let b = g.next(DeviceType::Ios, T0 + 5).unwrap();
        let c = g.next(DeviceType::Ios, T0 - 900).unwrap();
        assert!(a < b && b < c);
        assert_eq!(c.unpack().ts, 1_100);
        assert_eq!(c.unpack().counter, 2);
        // Even a clock before the project epoch continues from the last id.
        let d = g.next(DeviceType::Ios, 0).unwrap();
        assert!(c < d);
    }

    #[test]
    fn generator_resumes_after_a_restart_with_a_clock_behind() {
        let mut before = DeviceIdGenerator::new(NodeType::Client, 0).unwrap();
        let last = (0..5)
            .map(|_| before.next(DeviceType::Android, T0 + 50).unwrap())
            .last()
            .unwrap();
        let mut after = DeviceIdGenerator::new(NodeType::Client, 0).unwrap();
        after.resume_after(last);
        let next = after.next(DeviceType::Web, T0).unwrap();
        assert_eq!(next.unpack().ts, last.unpack().ts);
        assert_eq!(next.unpack().counter, last.unpack().counter + 1);
    }

    #[test]
    fn generator_refuses_past_the_30_bit_timestamp() {
        let mut g = DeviceIdGenerator::new(NodeType::Client, 0).unwrap();
        let end = PROJECT_EPOCH_UNIX_S + u64::from(DEVICE_TS_MAX);
        assert!(g.next(DeviceType::Web, end).is_ok());
        assert!(g.next(DeviceType::Web, end + 1).is_err());
        assert!(DeviceIdGenerator::new(NodeType::Client, 0)
            .unwrap()
            .next(DeviceType::Web, PROJECT_EPOCH_UNIX_S - 1)
            .is_err());
    }

    proptest! {
        #[test]
        fn device_id_packs_and_unpacks(nt in 0u8..3, cluster in 0u16..4096, dt in 0u8..4,
                                        ts in 0u32..=DEVICE_TS_MAX, counter: u16) {
            let parts = DeviceIdParts {
                node_type: NodeType::from_bits(nt).unwrap(),
                cluster,
                device_type: DeviceType::from_bits(dt).unwrap(),
                ts,
                counter,
            };
            let id = DeviceId::pack(parts).unwrap();
            prop_assert_eq!(id.unpack(), parts);
            prop_assert_eq!(id.to_string().parse::<DeviceId>().unwrap(), id);
        }

        #[test]
        fn node_id_packs_and_unpacks(nt in 0u8..3, number in 0u16..4096, ip: u32, port: u16) {
            let parts = NodeIdParts {
                node_type: NodeType::from_bits(nt).unwrap(),
                number,
                ip: Ipv4Addr::from(ip),
                port,
            };
            let id = NodeId::pack(parts).unwrap();
            prop_assert_eq!(id.unpack(), parts);
            prop_assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
        }

        #[test]
        fn uid_text_round_trips(kind in 0u8..4, id: u64) {
            let uid = Uid::new(UidKind::from_code(kind).unwrap(), id);
            prop_assert_eq!(uid.to_string().parse::<Uid>().unwrap(), uid);
        }

        #[test]
        fn generator_is_unique_under_any_clock(steps in proptest::collection::vec(-3i64..4, 1..2000)) {
            let mut g = DeviceIdGenerator::new(NodeType::Client, 0).unwrap();
            let mut clock = T0 as i64;
            let mut prev: Option<DeviceId> = None;
            for step in steps {
                clock += step;
                let id = g.next(DeviceType::Web, clock as u64).unwrap();
                prop_assert!(prev.is_none_or(|p| p.get() & ((1 << 46) - 1) < id.get() & ((1 << 46) - 1)));
                prev = Some(id);
            }
        }
    }
}
