//! What one WeChat push costs the shard that accepts it: `callback::open` in plain mode
//! (signature, XML) and safe mode (two signatures, AES-256-CBC, XML), with a 100-byte text;
//! the JSON decode of a 100-byte `send` (the WebSocket path's per-message decode) measured in
//! the same run as the baseline.
//!
//! `cargo bench -p chinwag-bench --bench wechat`

use chinwag_bench::send_100;
use chinwag_engine::wechat::account::{AccountSettings, Mode};
use chinwag_engine::wechat::callback::{self, Query};
use chinwag_engine::wechat::message::{Body, Envelope, Message, OpenId};
use chinwag_engine::wechat::signature::Signature;
use chinwag_protocol::json;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

const TOKEN: &str = "QDG6eK";
const APP_ID: &str = "wx5823bf96d3bd56c7";
const AES_KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";

fn push(c: &mut Criterion) {
    let account = |mode| {
        AccountSettings {
            app_id: APP_ID.into(),
            app_secret: "s".into(),
            token: TOKEN.into(),
            encoding_aes_key: Some(AES_KEY.into()),
            mode,
            api_base: "http://127.0.0.1:1".into(),
            shop: 1,
            kf_account: None,
        }
        .check()
        .unwrap()
    };
    let (plain, safe) = (account(Mode::Plain), account(Mode::Safe));
    let xml = Message {
        to: "gh_0123456789ab".into(),
        from: OpenId::parse("oQ7Zx0HqJZb2X9c5Ys1rTnW8kLmA").unwrap(),
        create_time: 1_700_000_000,
        msg_id: Some(24_000_000_000_000_001),
        body: Body::Text {
            content: "x".repeat(100),
        },
    }
    .to_xml();
    let (timestamp, nonce) = ("1700000000", "1234567890");
    let signed = Query {
        signature: Some(Signature::of(&[TOKEN, timestamp, nonce]).to_string()),
        timestamp: Some(timestamp.into()),
        nonce: Some(nonce.into()),
        ..Query::default()
    };
    let encrypt = safe.aes_key.as_ref().unwrap().encrypt(&xml, APP_ID);
    let mut sealed = signed.clone();
    sealed.encrypt_type = Some("aes".into());
    sealed.msg_signature = Some(Signature::of(&[TOKEN, timestamp, nonce, &encrypt]).to_string());
    let envelope = Envelope {
        to: Some("gh_0123456789ab".into()),
        encrypt,
    }
    .to_xml();
    let send = json::encode_to_bytes(&send_100());

    let mut group = c.benchmark_group("wechat_push");
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline_json_decode_send_100", |b| {
        b.iter(|| black_box(json::decode_bytes(black_box(&send)).unwrap()))
    });
    group.bench_function("open_plain_text_100", |b| {
        b.iter(|| black_box(callback::open(&plain, &signed, black_box(xml.as_bytes())).unwrap()))
    });
    group.bench_function("open_safe_text_100", |b| {
        b.iter(|| {
            black_box(callback::open(&safe, &sealed, black_box(envelope.as_bytes())).unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, push);
criterion_main!(benches);
