//! Read cursors: `read` moves a member's cursor forward (never back), answers `read_ok` and
//! pushes a `receipt` to the other members' devices when it moved.

use chinwag_protocol::{Cursor, ErrorCode, Message, Receipt};

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
            .store
            .mark_read(conv, origin.uid, cursor.seq)
            .map_err(store_error)?;
        let ok = origin.reply(Message::ReadOk(Cursor { conv, seq: after }));
        self.ack(origin, ok);
        if after > before {
            let members = self.members(conv);
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
