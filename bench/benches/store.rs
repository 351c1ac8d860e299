//! Micro-benchmarks of the conversation log (`engine::store`).
//!
//! `cargo bench -p chinwag-bench --bench store`. The large runs (1,000,000 conversations, a
//! 2 GiB recovery) are in `src/bin/store_bench.rs`; figures are in `docs/benchmarks.md`.

use std::hint::black_box;

use chinwag_engine::store::{FsyncPolicy, HistoryFrom, NewMessage, Store, StoreConfig};
use chinwag_protocol::{ConvId, DeviceId, Seq, ShopId, Uid, UidKind};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const CONVS: u64 = 10_000;
const BATCH: u64 = 64;

fn open(dir: &std::path::Path, fsync: FsyncPolicy) -> Store {
    let config = StoreConfig {
        fsync,
        ..StoreConfig::new(dir)
    };
    let (mut store, _) = Store::open(config).expect("open");
    for c in 0..CONVS {
        store
            .create_shop_conv(ConvId(c), ShopId(c), Uid::new(UidKind::Buyer, c))
            .expect("create");
    }
    store.commit().expect("commit");
    store
}

/// Appends one batch of 100-byte messages round-robin over the conversations, then commits.
fn append_batch(store: &mut Store, n: &mut u64, cmid: &mut Vec<u8>) {
    let body = [b'x'; 100];
    for _ in 0..BATCH {
        let conv = *n % CONVS;
        cmid.clear();
        cmid.extend_from_slice(&n.to_le_bytes());
        store
            .append_message(&NewMessage {
                conv: ConvId(conv),
                sender: Uid::new(UidKind::Buyer, conv),
                device: DeviceId::from_u64(1).expect("valid"),
                cmid,
                kind: b"text",
                body: &body,
                ts_ms: 1_700_000_000_000 + *n / 1_000,
            })
            .expect("append");
        *n += 1;
    }
    store.commit().expect("commit");
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_append_100B");
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(20);
    for (name, policy) in [
        ("never", FsyncPolicy::Never),
        ("always", FsyncPolicy::Always),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(dir.path(), policy);
        let (mut n, mut cmid) = (0, Vec::new());
        group.bench_function(format!("fsync_{name}_batch_64"), |b| {
            b.iter(|| append_batch(&mut store, &mut n, &mut cmid))
        });
    }
    group.finish();
}

fn history(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(dir.path(), FsyncPolicy::Never);
    let (mut n, mut cmid) = (0, Vec::new());
    // 200 messages in each of the 10,000 conversations, interleaved as in real traffic.
    while n < 200 * CONVS {
        append_batch(&mut store, &mut n, &mut cmid);
    }
    let mut group = c.benchmark_group("store_history_50");
    let mut conv = 0;
    group.bench_function("newest", |b| {
        b.iter(|| {
            conv = (conv + 7_919) % CONVS;
            black_box(
                store
                    .history(ConvId(conv), HistoryFrom::Newest, 50)
                    .expect("read"),
            )
        })
    });
    group.bench_function("after_seq_100", |b| {
        b.iter(|| {
            conv = (conv + 7_919) % CONVS;
            black_box(
                store
                    .history(ConvId(conv), HistoryFrom::After(Seq(100)), 50)
                    .expect("read"),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, append, history);
criterion_main!(benches);
