//! chinwag's benchmarks: criterion micro-benchmarks in `benches/`, and the fixtures they share.

use chinwag_protocol::{ConvId, Frame, Message, Msg, Seq, Target, Uid, UidKind};

/// A 100-byte message body, the size the benchmark targets name.
pub const BODY_100: &str = "chinwag benchmark body: the quick brown fox jumps over the lazy dog, then naps. 0123456789abcdefghij";

const _: () = assert!(BODY_100.len() == 100);

/// A `send` of a 100-byte body, as a client sends it.
pub fn send_100() -> Frame<'static> {
    Frame::with_req(
        12_345,
        Message::Send(chinwag_protocol::Send {
            target: Target::Conv(ConvId(9_876_543_210)),
            cmid: "6f1c9a52-3f0e-4b8e-9d7c-1a2b3c4d5e6f".into(),
            kind: "text".into(),
            body: BODY_100.into(),
        }),
    )
}

/// The `msg` push that the `send` becomes.
pub fn msg_100() -> Frame<'static> {
    Frame::new(Message::Msg(chinwag_protocol::MsgPush::bare(Msg {
        conv: ConvId(9_876_543_210),
        seq: Seq(1_234),
        from: Uid::new(UidKind::Buyer, 100_001),
        ts: 1_767_225_600_000,
        kind: "text".into(),
        body: BODY_100.into(),
        cmid: "6f1c9a52-3f0e-4b8e-9d7c-1a2b3c4d5e6f".into(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chinwag_protocol::{binary, json};

    #[test]
    fn fixtures_round_trip_in_both_encodings() {
        for frame in [send_100(), msg_100()] {
            let wire = binary::encode_to_bytes(&frame).unwrap();
            assert_eq!(binary::decode(&wire).unwrap(), frame);
            let text = json::encode_to_bytes(&frame);
            assert_eq!(json::decode_bytes(&text).unwrap(), frame);
        }
    }
}
