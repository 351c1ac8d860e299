//! Crash test: a child process appends and acknowledges on a pipe; the parent SIGKILLs it at
//! random moments and checks, after every restart, that every acknowledged message is there
//! with its seq, that every conversation is 1..n without gap, and that retrying an
//! acknowledged send returns its seq and stores nothing.
//!
//! The child is this test binary itself, re-executed on the ignored test `crash_child` with
//! [`CHILD_DIR_ENV`] set (without it, that test returns at once).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chinwag_protocol::{ConvId, DeviceId, Seq, ShopId, Uid, UidKind};

use super::{Appended, FsyncPolicy, HistoryFrom, NewMessage, Store, StoreConfig};

const CHILD_DIR_ENV: &str = "CHINWAG_STORE_CRASH_DIR";
const CHILD_SEED_ENV: &str = "CHINWAG_STORE_CRASH_SEED";
const CONVS: u64 = 8;
const RUNS: u64 = 60;

fn config(dir: &Path, seed: u64) -> StoreConfig {
    StoreConfig {
        // Small segments, so kills land during segment switches and preparation too.
        segment_bytes: 256 << 10,
        body_bytes_max: 1 << 10,
        fsync: if seed % 4 == 0 {
            FsyncPolicy::Always
        } else {
            FsyncPolicy::Never
        },
        ..StoreConfig::new(dir)
    }
}

/// xorshift64*: enough randomness for kill moments and batch shapes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn body_of(cmid: &str) -> Vec<u8> {
    cmid.repeat(3).into_bytes()
}

fn sender(conv: u64) -> Uid {
    Uid::new(UidKind::Buyer, 100 + conv)
}

/// The child: appends batches forever, prints `ACK conv seq cmid` once a batch is committed.
#[test]
#[ignore = "run only as the child process of the crash test"]
fn crash_child() {
    let (Some(dir), Some(seed)) = (
        std::env::var_os(CHILD_DIR_ENV),
        std::env::var(CHILD_SEED_ENV).ok(),
    ) else {
        return; // Only meaningful as the child of `sigkill_at_random_moments_loses_nothing_acknowledged`.
    };
    let seed: u64 = seed.parse().expect("the parent passes a number");
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (mut store, _) = Store::open(config(Path::new(&dir), seed)).expect("recovery succeeds");
    for c in 0..CONVS {
        if store.conv(ConvId(c)).is_none() {
            store
                .create_shop_conv(ConvId(c), ShopId(c), sender(c))
                .expect("create");
        }
    }
    store.commit().expect("commit");
    let mut out = std::io::stdout().lock();
    let mut acks = String::new();
    let mut batch = Vec::new();
    // Bounded, so a child whose parent died does not run forever.
    for n in 0..20_000u64 {
        batch.clear();
        for i in 0..1 + rng.below(64) {
            let conv = rng.below(CONVS);
            let cmid = format!("{seed}-{n}-{i}");
            let appended = store
                .append_message(&NewMessage {
                    conv: ConvId(conv),
                    sender: sender(conv),
                    device: DeviceId::from_u64(1).expect("valid"),
                    cmid: cmid.as_bytes(),
                    kind: b"text",
                    body: &body_of(&cmid),
                    ts_ms: n,
                })
                .expect("append");
            let Appended::Stored { seq } = appended else {
                panic!("fresh cmids are never duplicates");
            };
            batch.push((conv, seq, cmid));
        }
        store.commit().expect("commit");
        // Only now may the acknowledgements go out.
        acks.clear();
        for (conv, seq, cmid) in &batch {
            acks.push_str(&format!("ACK {conv} {} {cmid}\n", seq.0));
        }
        out.write_all(acks.as_bytes()).expect("pipe");
        out.flush().expect("pipe");
        if n % 97 == 0 {
            store.snapshot().expect("snapshot");
        }
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let clock = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut rng = Rng(clock.as_nanos() as u64 | 1);
    // Every acknowledged (conv, seq, cmid) of every run so far.
    let mut acked: Vec<(u64, u64, String)> = Vec::new();
    let mut torn = 0;
    for run in 0..RUNS {
        // The low bits pick the policy: every fourth run uses `always`.
        let seed = (rng.next() >> 8 << 2) | (run & 3);
        let mut child = Command::new(&exe)
            .args(["--exact", "store::crash_test::crash_child", "--ignored"])
            .arg("--nocapture")
            .args(["--test-threads", "1"])
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_SEED_ENV, seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Drain the pipe on another thread, so the child never blocks on it and the kill
        // lands while it appends, commits, switches segments or writes snapshots.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Some(ack) = line.ok().as_deref().and_then(parse_ack) else {
                    continue;
                };
                if tx.send(ack).is_err() {
                    break;
                }
            }
        });
        let kill_after = 1 + rng.below(1_500);
        let mut seen = 0;
        while seen < kill_after {
            let Ok(ack) = rx.recv() else { break };
            acked.push(ack);
            seen += 1;
        }
        std::thread::sleep(Duration::from_micros(rng.below(3_000)));
        child.kill().unwrap(); // SIGKILL
                               // Acknowledgements written before the kill are in the pipe: they count too.
        reader.join().unwrap();
        acked.extend(rx.try_iter());
        let status = child.wait().unwrap();
        assert!(
            seen >= kill_after || !status.success(),
            "run {run}: the child stopped by itself"
        );
        if seen < kill_after {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("run {run}: the child failed before the kill: {err}");
        }
        torn += u64::from(check(dir.path(), run, &acked));
    }
    eprintln!(
        "{RUNS} kills, {} acknowledged messages checked, {torn} torn tails cut",
        acked.len()
    );
}

fn parse_ack(line: &str) -> Option<(u64, u64, String)> {
    let mut f = line.strip_prefix("ACK ")?.split(' ');
    let conv = f.next()?.parse().ok()?;
    let seq = f.next()?.parse().ok()?;
    Some((conv, seq, f.next()?.to_string()))
}

/// Reopens the log as the next child will, and holds it to the invariants.
/// Returns whether recovery cut a torn tail.
fn check(dir: &Path, run: u64, acked: &[(u64, u64, String)]) -> bool {
    let (mut store, report) =
        Store::open(config(dir, 1)).unwrap_or_else(|e| panic!("run {run}: {e}"));
    for c in 0..CONVS {
        let Some(conv) = store.conv(ConvId(c)) else {
            assert!(acked.iter().all(|a| a.0 != c), "run {run}: conv {c} lost");
            continue;
        };
        // 1..n, each once, in order.
        let last = conv.last_seq().0;
        let mut next = 1;
        while next <= last {
            let page = store
                .history(ConvId(c), HistoryFrom::After(Seq(next - 1)), 200)
                .unwrap();
            assert!(!page.is_empty(), "run {run}: conv {c} ends at {next}");
            for m in page {
                assert_eq!(m.seq.0, next, "run {run}: conv {c} has a gap");
                next += 1;
            }
        }
    }
    for (conv, seq, cmid) in acked {
        let got = store
            .history(ConvId(*conv), HistoryFrom::After(Seq(seq - 1)), 1)
            .unwrap();
        let m = got
            .first()
            .unwrap_or_else(|| panic!("run {run}: acked {conv}/{seq} lost"));
        assert_eq!(
            (m.seq.0, m.cmid, m.body),
            (*seq, cmid.as_bytes(), body_of(cmid).as_slice()),
            "run {run}: acked {conv}/{seq} differs"
        );
    }
    // Retrying an acknowledged send after the crash stores nothing and returns its seq.
    for (conv, seq, cmid) in acked.iter().rev().take(200) {
        let retry = store
            .append_message(&NewMessage {
                conv: ConvId(*conv),
                sender: sender(*conv),
                device: DeviceId::from_u64(1).expect("valid"),
                cmid: cmid.as_bytes(),
                kind: b"text",
                body: &body_of(cmid),
                ts_ms: 0,
            })
            .unwrap();
        assert!(
            matches!(retry, Appended::Duplicate { seq: got, .. } if got == Seq(*seq)),
            "run {run}: retry of {cmid}: {retry:?}"
        );
    }
    report.truncated.is_some()
}
