//! Feeds arbitrary bytes, in arbitrary chunks, to the binary stream decoder and decodes every
//! frame it yields. Whatever decodes must re-encode to the same bytes.
#![no_main]

use bytes::BytesMut;
use chinwag_protocol::binary::{self, StreamDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so the fuzzer explores chunk boundaries too.
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut decoder = StreamDecoder::new(4096);
    for piece in rest.chunks(chunk) {
        if decoder.extend(piece).is_err() {
            return;
        }
        while let Some(bytes) = decoder.next_frame() {
            if let Ok(frame) = binary::decode(&bytes) {
                let mut again = BytesMut::new();
                binary::encode(&frame, &mut again).expect("a decoded frame re-encodes");
                assert_eq!(&again[..], &bytes[..], "decode then encode changed the bytes");
            }
        }
    }
    for frame in binary::frames(rest) {
        let _ = frame;
    }
});
