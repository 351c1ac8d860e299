//! WeChat's pushes, from the bytes a forger controls: the query string, the XML (plain, or
//! decrypted from safe mode) and the ciphertext. No panic; a message that parses survives a
//! round trip through its own XML; a query survives a round trip through its string form.

#![no_main]

use base64::Engine;
use chinwag_engine::wechat::callback::Query;
use chinwag_engine::wechat::cipher::AesKey;
use chinwag_engine::wechat::message::{Envelope, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);

    let query = Query::parse(&text);
    assert_eq!(Query::parse(&query.to_query_string()), query);

    if let Ok(message) = Message::parse(&text) {
        assert_eq!(Message::parse(&message.to_xml()).as_ref(), Ok(&message));
    }
    if let Ok(envelope) = Envelope::parse(&text) {
        assert_eq!(Envelope::parse(&envelope.to_xml()).as_ref(), Ok(&envelope));
    }

    // WeChat's sample key: arbitrary ciphertexts (as sent, and as Base64 of the raw bytes, to
    // reach the padding and frame checks) must decrypt or fail cleanly.
    let key = AesKey::parse("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG").unwrap();
    let _ = key.decrypt(&text, "wxb11529c136998cb6");
    let padded = {
        let mut bytes = data.to_vec();
        bytes.resize(data.len().div_ceil(16).max(1) * 16, 0);
        bytes
    };
    let _ = key.decrypt(
        &base64::engine::general_purpose::STANDARD.encode(&padded),
        "wxb11529c136998cb6",
    );
});
