//! Read cursors: `read` moves a member's cursor forward (never back), answers `read_ok` and
//! pushes a `receipt` to the other members' devices when it moved (in a conversation of more
//! than `GROUP_FULL_LIST_MAX` members, only to the reader's own other devices).

use chinwag_protocol::limits::GROUP_FULL_LIST_MAX;
use chinwag_protocol::{Cursor, ErrorCode, Message, Receipt};
use smallvec::SmallVec;

use super::{store_error, Owner};
use crate::bus::{Fanout, Origin};

impl Owner {
    pub(super) fn read(
        &mut self,
        origin: &Origin,
        cursor: Cursor,
    ) -> Result<(), (ErrorCode, String)> {
        let conv = cursor.conv;
        let before = self.member_conv(conv, origin.uid)?.cursor(origin.uid);
        let after = self
            .conv_log_mut(conv)
            .and_then(|log| log.mark_read(conv, origin.uid, cursor.seq))
            .map_err(store_error)?;
        let ok = origin.reply(Message::ReadOk(Cursor { conv, seq: after }));
        self.ack(origin, ok);
        if after > before {
            let mut members = self.members(conv);
            // In a large group every read would be a push to every member (members² in all):
            // the reader's other devices still learn it, the other members do not.
            if members.len() > GROUP_FULL_LIST_MAX {
                members = SmallVec::from_slice(&[origin.uid]);
            }
            self.fanout(Fanout::new(
                members,
                Some(origin.device),
                Message::Receipt(Receipt {
                    conv,
                    uid: origin.uid,
                    seq: after,
                }),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chinwag_protocol::{Cursor, Seq, Target};

    use crate::bus::BusMsg;
    use crate::logic::testing::*;

    #[test]
    fn a_read_moves_the_cursor_forward_only_and_sends_one_receipt() {
        let mut h = Harness::new();
        let a = h.login(buyer(1));
        let b = h.login(buyer(2));
        let mut conv = None;
        for cmid in ["1", "2", "3"] {
            let out = h.turn(send(&a, Target::User(b.uid), cmid, "x"));
            conv = Some(send_ok(&replies(&out, a.session)).0);
        }
        let conv = conv.unwrap();
        let read = |seq| BusMsg::Read {
            origin: Box::new(b),
            cursor: Cursor {
                conv,
                seq: Seq(seq),
            },
        };

        let out = h.turn(read(2));
        let ok = format!(r#""op":"read_ok","req":1,"conv":"{conv}","seq":2"#);
        assert!(replies(&out, b.session)[0].contains(&ok));
        let pushed = pushes(&out);
        assert_eq!(pushed.len(), 1);
        assert_eq!(pushed[0].2, Some(b.device), "not to the reading device");
        assert!(pushed[0].3.contains(r#""op":"receipt""#) && pushed[0].3.contains(r#""seq":2"#));

        // Backwards: the cursor stays, and nobody is told again.
        let out = h.turn(read(1));
        assert!(replies(&out, b.session)[0].contains(r#""seq":2"#));
        assert!(pushes(&out).is_empty());

        // Past the last message: only as far as there are messages.
        let out = h.turn(read(99));
        assert!(replies(&out, b.session)[0].contains(r#""seq":3"#));
    }
}
