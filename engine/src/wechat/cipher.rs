//! Safe mode's message encryption (消息加解密): AES-256-CBC under the account's EncodingAESKey.
//!
//! The contract, from WeChat's documentation and samples:
//! - the key is the Base64 decoding of the 43-character EncodingAESKey followed by `=` (32
//!   bytes); the IV is the key's first 16 bytes;
//! - the plaintext is 16 random bytes, the XML's length as 4 bytes big-endian, the XML, and the
//!   AppID it is addressed to;
//! - it is padded PKCS#7-style to a multiple of **32** bytes (not AES's 16: the pad byte is
//!   1..=32), encrypted without further padding and sent in Base64.
//!
//! The crates do the cryptography (`aes`, `cbc`, `base64`); this module only frames the bytes.
//! Every bad input is a [`CipherError`]: nothing here panics on what arrives from outside.

use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;

type Encryptor = cbc::Encryptor<aes::Aes256>;
type Decryptor = cbc::Decryptor<aes::Aes256>;

/// The block WeChat pads to (twice AES's block).
const PAD_BLOCK: usize = 32;
/// Random bytes that open every plaintext.
const RANDOM_BYTES: usize = 16;
/// Length of an EncodingAESKey as the official-account settings page shows it.
const ENCODING_AES_KEY_CHARS: usize = 43;

/// Base64 as WeChat writes it: standard alphabet, padded. Decoding accepts non-zero trailing
/// bits, because a random 43-character EncodingAESKey ends in one whose low bits are rarely zero.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why an EncodingAESKey was refused (at configuration time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// Not 43 characters.
    Length,
    /// Not Base64.
    Base64,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Length => write!(
                f,
                "an EncodingAESKey has {ENCODING_AES_KEY_CHARS} characters"
            ),
            KeyError::Base64 => write!(f, "an EncodingAESKey is Base64 (A-Z, a-z, 0-9, + and /)"),
        }
    }
}

impl std::error::Error for KeyError {}

/// Why an encrypted message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherError {
    /// The `Encrypt` text is not Base64.
    Base64,
    /// The ciphertext is empty or not a whole number of AES blocks.
    Length,
    /// The decrypted bytes do not end in valid padding: the wrong key, or tampering.
    Padding,
    /// The length field points past the end of the plaintext.
    Frame,
    /// The XML is not UTF-8.
    Utf8,
    /// The message is addressed to another AppID.
    AppId,
}

impl std::fmt::Display for CipherError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CipherError::Base64 => "Encrypt is not Base64",
            CipherError::Length => "ciphertext is not a whole number of AES blocks",
            CipherError::Padding => "bad padding after decryption (wrong EncodingAESKey?)",
            CipherError::Frame => "the length field points past the plaintext",
            CipherError::Utf8 => "the decrypted XML is not UTF-8",
            CipherError::AppId => "the message is for another AppID",
        })
    }
}

impl std::error::Error for CipherError {}

/// An account's AES key, parsed from its EncodingAESKey.
#[derive(Clone)]
pub struct AesKey([u8; 32]);

impl std::fmt::Debug for AesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A key never reaches a log.
        f.write_str("AesKey(..)")
    }
}

impl AesKey {
    /// Parses the 43-character EncodingAESKey of the account's settings.
    pub fn parse(encoding_aes_key: &str) -> Result<AesKey, KeyError> {
        if encoding_aes_key.len() != ENCODING_AES_KEY_CHARS {
            return Err(KeyError::Length);
        }
        let mut key = [0u8; 32];
        let mut padded = [0u8; ENCODING_AES_KEY_CHARS + 1];
        padded[..ENCODING_AES_KEY_CHARS].copy_from_slice(encoding_aes_key.as_bytes());
        padded[ENCODING_AES_KEY_CHARS] = b'=';
        match BASE64.decode_slice(padded, &mut key) {
            Ok(32) => Ok(AesKey(key)),
            _ => Err(KeyError::Base64),
        }
    }

    fn iv(&self) -> [u8; 16] {
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&self.0[..16]);
        iv
    }

    /// Encrypts `xml` for `app_id` with fresh random bytes; returns the Base64 `Encrypt` text.
    pub fn encrypt(&self, xml: &str, app_id: &str) -> String {
        let mut random = [0u8; RANDOM_BYTES];
        // The random prefix only varies the ciphertext; WeChat ignores its value. Should the
        // OS's generator fail, a clock-derived prefix still varies it.
        if getrandom::fill(&mut random).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            random.copy_from_slice(&nanos.to_le_bytes());
        }
        self.encrypt_with_random(xml, app_id, &random)
    }

    /// Encrypts with the given random prefix (deterministic: for published test vectors).
    pub fn encrypt_with_random(
        &self,
        xml: &str,
        app_id: &str,
        random: &[u8; RANDOM_BYTES],
    ) -> String {
        let xml_len =
            u32::try_from(xml.len()).expect("an XML message under 4 GiB (callers bound it)");
        let unpadded = RANDOM_BYTES + 4 + xml.len() + app_id.len();
        let pad = PAD_BLOCK - unpadded % PAD_BLOCK;
        let mut buf = Vec::with_capacity(unpadded + pad);
        buf.extend_from_slice(random);
        buf.extend_from_slice(&xml_len.to_be_bytes());
        buf.extend_from_slice(xml.as_bytes());
        buf.extend_from_slice(app_id.as_bytes());
        // `pad` is 1..=32, so it fits in the byte it is written as.
        buf.resize(unpadded + pad, pad as u8);
        let len = buf.len();
        let ciphertext = Encryptor::new(&self.0.into(), &self.iv().into())
            .encrypt_padded::<NoPadding>(&mut buf, len)
            .expect("the buffer is padded to a whole number of blocks above");
        BASE64.encode(ciphertext)
    }

    /// Decrypts an `Encrypt` text and checks that it is addressed to `app_id`; returns the XML.
    pub fn decrypt(&self, encrypt: &str, app_id: &str) -> Result<String, CipherError> {
        let mut buf = BASE64
            .decode(encrypt.trim())
            .map_err(|_| CipherError::Base64)?;
        if buf.is_empty() || buf.len() % 16 != 0 {
            return Err(CipherError::Length);
        }
        let plain = Decryptor::new(&self.0.into(), &self.iv().into())
            .decrypt_padded::<NoPadding>(&mut buf)
            .map_err(|_| CipherError::Length)?;
        let pad = usize::from(*plain.last().ok_or(CipherError::Length)?);
        if pad == 0 || pad > PAD_BLOCK || pad > plain.len() {
            return Err(CipherError::Padding);
        }
        let (content, padding) = plain.split_at(plain.len() - pad);
        if padding.iter().any(|&b| usize::from(b) != pad) {
            return Err(CipherError::Padding);
        }
        let frame = content.get(RANDOM_BYTES..).ok_or(CipherError::Frame)?;
        let len_bytes: [u8; 4] = frame
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(CipherError::Frame)?;
        let xml_len = u32::from_be_bytes(len_bytes) as usize;
        let rest = &frame[4..];
        if xml_len > rest.len() {
            return Err(CipherError::Frame);
        }
        let (xml, to_app_id) = rest.split_at(xml_len);
        if to_app_id != app_id.as_bytes() {
            return Err(CipherError::AppId);
        }
        String::from_utf8(xml.to_vec()).map_err(|_| CipherError::Utf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // WeChat's official-account sample (WXBizMsgCryptTest): EncodingAESKey
    // "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", AppID wxb11529c136998cb6, random prefix
    // "aaaabbbbccccdddd".
    const SAMPLE_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
    const SAMPLE_APP_ID: &str = "wxb11529c136998cb6";
    const SAMPLE_RANDOM: &[u8; 16] = b"aaaabbbbccccdddd";

    #[test]
    fn matches_wechat_sample_short_text() {
        let key = AesKey::parse(SAMPLE_KEY).unwrap();
        let encrypted = key.encrypt_with_random("我是中文abcd123", SAMPLE_APP_ID, SAMPLE_RANDOM);
        assert_eq!(
            encrypted,
            "jn1L23DB+6ELqJ+6bruv21Y6MD7KeIfP82D6gU39rmkgczbWwt5+3bnyg5K55bgVtVzd832WzZGMhkP72vVOfg=="
        );
        assert_eq!(
            key.decrypt(&encrypted, SAMPLE_APP_ID).unwrap(),
            "我是中文abcd123"
        );
    }

    #[test]
    fn matches_wechat_sample_video_reply() {
        let key = AesKey::parse(SAMPLE_KEY).unwrap();
        let xml = "<xml><ToUserName><![CDATA[oia2Tj我是中文jewbmiOUlr6X-1crbLOvLw]]></ToUserName><FromUserName><![CDATA[gh_7f083739789a]]></FromUserName><CreateTime>1407743423</CreateTime><MsgType><![CDATA[video]]></MsgType><Video><MediaId><![CDATA[eYJ1MbwPRJtOvIEabaxHs7TX2D-HV71s79GUxqdUkjm6Gs2Ed1KF3ulAOA9H1xG0]]></MediaId><Title><![CDATA[testCallBackReplyVideo]]></Title><Description><![CDATA[testCallBackReplyVideo]]></Description></Video></xml>";
        let expected = "jn1L23DB+6ELqJ+6bruv23M2GmYfkv0xBh2h+XTBOKVKcgDFHle6gqcZ1cZrk3e1qjPQ1F4RsLWzQRG9udbKWesxlkupqcEcW7ZQweImX9+wLMa0GaUzpkycA8+IamDBxn5loLgZpnS7fVAbExOkK5DYHBmv5tptA9tklE/fTIILHR8HLXa5nQvFb3tYPKAlHF3rtTeayNf0QuM+UW/wM9enGIDIJHF7CLHiDNAYxr+r+OrJCmPQyTy8cVWlu9iSvOHPT/77bZqJucQHQ04sq7KZI27OcqpQNSto2OdHCoTccjggX5Z9Mma0nMJBU+jLKJ38YB1fBIz+vBzsYjrTmFQ44YfeEuZ+xRTQwr92vhA9OxchWVINGC50qE/6lmkwWTwGX9wtQpsJKhP+oS7rvTY8+VdzETdfakjkwQ5/Xka042OlUb1/slTwo4RscuQ+RdxSGvDahxAJ6+EAjLt9d8igHngxIbf6YyqqROxuxqIeIch3CssH/LqRs+iAcILvApYZckqmA7FNERspKA5f8GoJ9sv8xmGvZ9Yrf57cExWtnX8aCMMaBropU/1k+hKP5LVdzbWCG0hGwx/dQudYR/eXp3P0XxjlFiy+9DMlaFExWUZQDajPkdPrEeOwofJb";
        assert_eq!(
            key.encrypt_with_random(xml, SAMPLE_APP_ID, SAMPLE_RANDOM),
            expected
        );
        assert_eq!(key.decrypt(expected, SAMPLE_APP_ID).unwrap(), xml);
    }

    // wechatpy's tests (tests/test_crypto.py): EncodingAESKey
    // "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR", id wx49f0ab532d5d035a, random prefix
    // "1234567890123456": an independent implementation's exact ciphertext.
    #[test]
    fn matches_wechatpy_encrypt_vector() {
        let key = AesKey::parse("kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR").unwrap();
        let xml = "<xml>\n<MsgType><![CDATA[text]]></MsgType>\n<Content><![CDATA[test]]></Content>\n<FromUserName><![CDATA[wx49f0ab532d5d035a]]></FromUserName>\n<ToUserName><![CDATA[messense]]></ToUserName>\n<AgentID>1</AgentID>\n<CreateTime>1411525903</CreateTime>\n</xml>";
        let expected = "9s4gMv99m88kKTh/H8IdkOiMg6bisoy3ypwy9H4hvSPe9nsGaqyw5hhSjdYbcrKk+j3nba4HMOTzHrluLBYqxgNcBqGsL8GqxlhZgURnAtObvesEl5nZ+uBE8bviY0LWke8Zy9V/QYKxNV2FqllNXcfmstttyIkMKCCmVbCFM2JTF5wY0nFhHZSjPUL2Q1qvSUCUld+/WIXrx0oyKQmpB6o8NRrrNrsDf03oxI1p9FxUgMnwKKZeOA/uu+2IEvEBtb7muXsVbwbgX05UPPJvFurDXafG0RQyPR+mf1nDnAtQmmNOuiR5MIkdQ39xn1vWwi1O5oazPoQJz0nTYjxxEE8kv3kFxtAGVRe3ypD3WeK2XeFYFMNMpatF9XiKzHo3";
        assert_eq!(
            key.encrypt_with_random(xml, "wx49f0ab532d5d035a", b"1234567890123456"),
            expected
        );
        // ... and its reply's msg_signature (token 123456, timestamp 1411525903, nonce 461056294).
        let signature = crate::wechat::signature::Signature::of(&[
            "123456",
            "1411525903",
            "461056294",
            expected,
        ]);
        assert_eq!(
            signature.to_string(),
            "407518b7649e86ef23978113f92d27afa9296533"
        );
    }

    #[test]
    fn decrypts_wechatpy_message_and_checks_its_app_id() {
        let key = AesKey::parse("kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR").unwrap();
        let encrypt = "RgqEoJj5A4EMYlLvWO1F86ioRjZfaex/gePD0gOXTxpsq5Yj4GNglrBb8I2BAJVODGajiFnXBu7mCPatfjsu6IHCrsTyeDXzF6Bv283dGymzxh6ydJRvZsryDyZbLTE7rhnus50qGPMfp2wASFlzEgMW9z1ef/RD8XzaFYgm7iTdaXpXaG4+BiYyolBug/gYNx410cvkKR2/nPwBiT+P4hIiOAQqGp/TywZBtDh1yCF2KOd0gpiMZ5jSw3e29mTvmUHzkVQiMS6td7vXUaWOMZnYZlF3So2SjHnwh4jYFxdgpkHHqIrH/54SNdshoQgWYEvccTKe7FS709/5t6NMxuGhcUGAPOQipvWTT4dShyqio7mlsl5noTrb++x6En749zCpQVhDpbV6GDnTbcX2e8K9QaNWHp91eBdCRxthuL0=";
        let signature = crate::wechat::signature::Signature::of(&[
            "123456",
            "1411525903",
            "461056294",
            encrypt,
        ]);
        assert_eq!(
            signature.to_string(),
            "74d92dfeb87ba7c714f89d98870ae5eb62dff26d"
        );
        let xml = key.decrypt(encrypt, "wx49f0ab532d5d035a").unwrap();
        assert!(xml.contains("<Content><![CDATA[test]]></Content>"), "{xml}");
        assert!(
            xml.contains("<FromUserName><![CDATA[messense]]></FromUserName>"),
            "{xml}"
        );
        assert_eq!(
            key.decrypt(encrypt, "wx0000000000000000"),
            Err(CipherError::AppId)
        );
    }

    #[test]
    fn decrypts_wechat_sample_callback() {
        let key = AesKey::parse("jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C").unwrap();
        let encrypt = "RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3QczcdCUpj911L3vg3W/sYYvuJTs3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLjvd4Xgpue06DOdnLxAUHzM6+kDZ+HMZfJYuR+LtwGc2hgf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMnvw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGUcallcrw8V2t9EL4EhzJWrQUax5wLVMNS0+rUPA3k22Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KDYA5Pl/T8Z1ptDAVe0lXdQ2YoyyH2uyPIGHBZZIs2pDBS8R07+qN+E7Q==";
        let xml = key.decrypt(encrypt, "wx5823bf96d3bd56c7").unwrap();
        assert!(xml.starts_with("<xml>"), "{xml}");
        assert!(
            xml.contains("<ToUserName><![CDATA[wx5823bf96d3bd56c7]]></ToUserName>"),
            "{xml}"
        );
    }

    #[test]
    fn refuses_bad_keys() {
        assert_eq!(AesKey::parse("short").unwrap_err(), KeyError::Length);
        assert_eq!(
            AesKey::parse(&"!".repeat(43)).unwrap_err(),
            KeyError::Base64
        );
        assert_eq!(
            AesKey::parse(&"é".repeat(21)).unwrap_err(),
            KeyError::Length
        );
    }

    #[test]
    fn refuses_bad_ciphertexts() {
        let key = AesKey::parse(SAMPLE_KEY).unwrap();
        let other = AesKey::parse("kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR").unwrap();
        assert_eq!(
            key.decrypt("not base64!", SAMPLE_APP_ID),
            Err(CipherError::Base64)
        );
        assert_eq!(key.decrypt("", SAMPLE_APP_ID), Err(CipherError::Length));
        assert_eq!(key.decrypt("AAAA", SAMPLE_APP_ID), Err(CipherError::Length));
        let sealed = key.encrypt("<xml/>", SAMPLE_APP_ID);
        // Another key almost always yields bad padding; when the garbage happens to end in a
        // valid pad, the frame or the AppID check refuses it instead. Either way: an error.
        assert!(other.decrypt(&sealed, SAMPLE_APP_ID).is_err());
        assert_eq!(key.decrypt(&sealed, "wxother"), Err(CipherError::AppId));
        assert_eq!(key.decrypt(&sealed, SAMPLE_APP_ID).unwrap(), "<xml/>");
    }

    #[test]
    fn random_prefix_varies_the_ciphertext() {
        let key = AesKey::parse(SAMPLE_KEY).unwrap();
        assert_ne!(
            key.encrypt("<xml/>", SAMPLE_APP_ID),
            key.encrypt("<xml/>", SAMPLE_APP_ID)
        );
    }

    proptest::proptest! {
        #[test]
        fn round_trips_and_never_panics(xml in ".{0,300}", garbage in proptest::collection::vec(0u8..=255, 0..200)) {
            let key = AesKey::parse(SAMPLE_KEY).unwrap();
            let sealed = key.encrypt(&xml, SAMPLE_APP_ID);
            proptest::prop_assert_eq!(key.decrypt(&sealed, SAMPLE_APP_ID).unwrap(), xml);
            let _ = key.decrypt(&BASE64.encode(&garbage), SAMPLE_APP_ID);
        }
    }
}
