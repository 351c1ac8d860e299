//! Feeds arbitrary bytes to the JSON decoder. Whatever decodes must survive a round trip
//! through both encodings unchanged.
#![no_main]

use bytes::BytesMut;
use chinwag_protocol::{binary, json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = json::decode_bytes(data) else {
        return;
    };
    let mut text = BytesMut::new();
    json::encode(&frame, &mut text);
    let again = json::decode_bytes(&text).expect("encoded JSON decodes");
    assert_eq!(again, frame);
    let mut wire = BytesMut::new();
    binary::encode(&frame, &mut wire).expect("a decoded frame encodes");
    assert_eq!(binary::decode(&wire).expect("encoded binary decodes"), frame);
});
