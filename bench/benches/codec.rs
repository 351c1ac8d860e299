//! Encode and decode of a 100-byte `send` and `msg`, in both encodings.
//!
//! `cargo bench -p chinwag-bench --bench codec`

use bytes::BytesMut;
use chinwag_bench::{msg_100, send_100};
use chinwag_protocol::{binary, json, Frame};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

fn bench_frame(c: &mut Criterion, name: &str, frame: &Frame<'_>) {
    let wire = binary::encode_to_bytes(frame).unwrap();
    let text = json::encode_to_bytes(frame);
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    let mut out = BytesMut::with_capacity(1024);
    group.bench_function("binary_encode", |b| {
        b.iter(|| {
            out.clear();
            binary::encode(black_box(frame), &mut out).unwrap();
            black_box(out.len())
        })
    });
    group.bench_function("binary_decode", |b| {
        b.iter(|| black_box(binary::decode(black_box(&wire)).unwrap()))
    });
    group.bench_function("json_encode", |b| {
        b.iter(|| {
            out.clear();
            json::encode(black_box(frame), &mut out);
            black_box(out.len())
        })
    });
    group.bench_function("json_decode", |b| {
        b.iter(|| black_box(json::decode_bytes(black_box(&text)).unwrap()))
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    bench_frame(c, "send_100", &send_100());
    bench_frame(c, "msg_100", &msg_100());
}

criterion_group!(benches, codec);
criterion_main!(benches);
