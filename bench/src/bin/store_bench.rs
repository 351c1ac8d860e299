//! Large runs of the conversation log that do not fit criterion: append throughput, read
//! latency with 1,000,000 conversations, recovery of a multi-GiB log, restart from a snapshot.
//!
//! ```text
//! store_bench append   [--fsync never|always] [--messages N] [--cmid-entries N]
//! store_bench reads    [--convs N] [--messages N]
//! store_bench recovery [--gib N] [--convs N]
//! ```
//!
//! Each run uses a fresh directory under `--dir` (default: the system temp dir) and removes
//! it afterwards. Figures and the machine they came from are in `docs/benchmarks.md`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chinwag_engine::store::{Appended, FsyncPolicy, HistoryFrom, NewMessage, Store, StoreConfig};
use chinwag_protocol::{ConvId, DeviceId, Seq, ShopId, Uid, UidKind};
use hdrhistogram::Histogram;

const BATCH: u64 = 64;

struct Args {
    cmd: String,
    fsync: FsyncPolicy,
    messages: u64,
    convs: u64,
    gib: u64,
    cmid_entries: usize,
    dir: PathBuf,
}

fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        cmd: it.next().unwrap_or_else(|| usage()),
        fsync: FsyncPolicy::Never,
        messages: 0,
        convs: 0,
        gib: 2,
        cmid_entries: StoreConfig::new("").cmid_window_entries_max,
        dir: std::env::temp_dir(),
    };
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--fsync" => args.fsync = value.parse().unwrap_or_else(|_| usage()),
            "--messages" => args.messages = value.parse().unwrap_or_else(|_| usage()),
            "--convs" => args.convs = value.parse().unwrap_or_else(|_| usage()),
            "--gib" => args.gib = value.parse().unwrap_or_else(|_| usage()),
            "--cmid-entries" => args.cmid_entries = value.parse().unwrap_or_else(|_| usage()),
            "--dir" => args.dir = value.into(),
            _ => usage(),
        }
    }
    args
}

fn usage() -> ! {
    eprintln!(
        "usage: store_bench append|reads|recovery [--fsync P] [--messages N] [--convs N] \
         [--gib N] [--cmid-entries N] [--dir D]"
    );
    std::process::exit(2)
}

/// CPU time of the calling thread: the machine is shared, so wall time alone would blame the
/// store for other processes' work.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_THREAD_CPUTIME_ID is available on Linux");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn open(dir: &Path, fsync: FsyncPolicy, cmid_entries: usize) -> Store {
    let config = StoreConfig {
        fsync,
        cmid_window_entries_max: cmid_entries,
        ..StoreConfig::new(dir)
    };
    let (store, _) = Store::open(config).expect("open");
    store
}

fn create_convs(store: &mut Store, convs: u64) {
    for c in 0..convs {
        store
            .create_shop_conv(ConvId(c), ShopId(c), Uid::new(UidKind::Buyer, c))
            .expect("create");
        if c % 4096 == 0 {
            store.commit().expect("commit");
        }
    }
    store.commit().expect("commit");
}

/// Appends `count` 100-byte messages in batches of 64 (commit after each), to the conversation
/// `pick(n)` for message n.
fn append(store: &mut Store, first: u64, count: u64, mut pick: impl FnMut(u64) -> u64) {
    let body = [b'x'; 100];
    let mut cmid = [0u8; 16];
    for n in first..first + count {
        let conv = pick(n);
        cmid[..8].copy_from_slice(&n.to_le_bytes());
        let appended = store
            .append_message(&NewMessage {
                conv: ConvId(conv),
                sender: Uid::new(UidKind::Buyer, conv),
                device: DeviceId::from_u64(1).expect("valid"),
                cmid: &cmid,
                kind: b"text",
                body: &body,
                ts_ms: 1_767_225_600_000 + n / 1_000,
            })
            .expect("append");
        assert!(matches!(appended, Appended::Stored { .. }));
        if (n + 1) % BATCH == 0 {
            store.commit().expect("commit");
        }
    }
    store.commit().expect("commit");
}

fn run_append(args: &Args, dir: &Path) {
    let messages = if args.messages == 0 {
        5_000_000
    } else {
        args.messages
    };
    let convs = 10_000;
    let mut store = open(dir, args.fsync, args.cmid_entries);
    create_convs(&mut store, convs);
    let (wall, cpu) = (Instant::now(), thread_cpu());
    append(&mut store, 0, messages, |n| n % convs);
    let (wall, cpu) = (wall.elapsed(), thread_cpu() - cpu);
    println!(
        "append fsync={:?} batch={BATCH}: {messages} msgs of 100 B in {:.2} s wall = {:.0}/s; \
         appending thread CPU {:.2} s = {:.0}/s per core",
        args.fsync,
        wall.as_secs_f64(),
        messages as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64(),
        messages as f64 / cpu.as_secs_f64()
    );
}

fn run_reads(args: &Args, dir: &Path) {
    let convs = if args.convs == 0 {
        1_000_000
    } else {
        args.convs
    };
    let messages = if args.messages == 0 {
        10_000_000
    } else {
        args.messages
    };
    // A few conversations are busy (2,000 messages each), the rest have a handful; all are
    // interleaved in the log as real traffic would be.
    let hot = 1_000.min(convs);
    let mut store = open(dir, FsyncPolicy::Never, args.cmid_entries);
    let t = Instant::now();
    create_convs(&mut store, convs);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    append(&mut store, 0, messages, |n| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if n % 5 == 0 {
            rng % hot
        } else {
            rng % convs
        }
    });
    println!(
        "built: {convs} conversations, {messages} messages in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for (name, from) in [
        ("newest 50", None),
        ("50 after S (S = last - 500)", Some(500)),
        ("50 before S (S = last - 500)", Some(0)),
    ] {
        let mut hist = Histogram::<u64>::new(3).expect("histogram");
        let mut returned = 0;
        for i in 0..200_000u64 {
            let conv = ConvId(i.wrapping_mul(0x9e37_79b9) % hot);
            let last = store.conv(conv).expect("exists").last_seq().0;
            let from = match from {
                None => HistoryFrom::Newest,
                Some(500) => HistoryFrom::After(Seq(last.saturating_sub(500))),
                Some(_) => HistoryFrom::Before(Seq(last.saturating_sub(500))),
            };
            let t = Instant::now();
            let msgs = store.history(conv, from, 50).expect("read");
            hist.record(t.elapsed().as_nanos() as u64)
                .expect("in range");
            returned += msgs.len();
            std::hint::black_box(msgs);
        }
        println!(
            "{name}: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us ({:.1} msgs per read)",
            hist.value_at_quantile(0.5) as f64 / 1e3,
            hist.value_at_quantile(0.99) as f64 / 1e3,
            hist.value_at_quantile(0.999) as f64 / 1e3,
            hist.max() as f64 / 1e3,
            returned as f64 / 200_000.0
        );
    }
}

fn run_recovery(args: &Args, dir: &Path) {
    // About 184 bytes per 100-byte message record.
    let messages = args.gib * (1 << 30) / 184;
    let convs = if args.convs == 0 { 100_000 } else { args.convs };
    {
        let mut store = open(dir, FsyncPolicy::Never, args.cmid_entries);
        create_convs(&mut store, convs);
        append(&mut store, 0, messages, |n| {
            n.wrapping_mul(0x9e37_79b9) % convs
        });
        store.sync().expect("sync");
    }
    for warm in [true, false] {
        if !warm {
            evict_page_cache(dir);
        }
        let t = Instant::now();
        let (store, report) = Store::open(StoreConfig::new(dir)).expect("recover");
        let secs = t.elapsed().as_secs_f64();
        println!(
            "full replay ({} page cache): {} records, {:.2} GiB in {secs:.2} s = {:.2} GB/s",
            if warm { "warm" } else { "cold" },
            report.records,
            report.bytes as f64 / (1u64 << 30) as f64,
            report.bytes as f64 / secs / 1e9
        );
        if warm {
            let t = Instant::now();
            let (records, bytes) = store.verify().expect("verify");
            let secs = t.elapsed().as_secs_f64();
            println!(
                "scan (CRC of every record, no state): {records} records, {:.2} GiB in {secs:.2} s = {:.2} GB/s",
                bytes as f64 / (1u64 << 30) as f64,
                bytes as f64 / secs / 1e9
            );
        }
        drop(store);
    }
    let mut store = open(dir, FsyncPolicy::Never, args.cmid_entries);
    let t = Instant::now();
    store.snapshot().expect("snapshot");
    println!("snapshot written in {:.2} s", t.elapsed().as_secs_f64());
    append(&mut store, messages, 100_000, |n| n % convs);
    drop(store);
    let t = Instant::now();
    let (_store, report) = Store::open(StoreConfig::new(dir)).expect("recover");
    println!(
        "restart from snapshot + {} records: {:.2} s",
        report.records,
        t.elapsed().as_secs_f64()
    );
}

/// Drops the log's pages from the page cache, as after a reboot (only this log's files, not
/// the whole machine's cache).
fn evict_page_cache(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("list") {
        let file = std::fs::File::open(entry.expect("entry").path()).expect("open");
        file.sync_all().expect("sync");
        // SAFETY: posix_fadvise only reads its integer arguments; `file` is open.
        #[allow(unsafe_code)]
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        };
    }
}

fn main() {
    let args = parse();
    let dir = tempfile::Builder::new()
        .prefix("chinwag-store-bench")
        .tempdir_in(&args.dir)
        .expect("tempdir");
    match args.cmd.as_str() {
        "append" => run_append(&args, dir.path()),
        "reads" => run_reads(&args, dir.path()),
        "recovery" => run_recovery(&args, dir.path()),
        _ => usage(),
    }
}
