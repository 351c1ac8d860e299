//! The store's unit tests: every call through the public API, torn and corrupt logs, a model.

use std::fs;
use std::path::{Path, PathBuf};

use chinwag_protocol::{ConvId, DeviceId, DeviceType, Seq, ShopId, Uid, UidKind};
use proptest::prelude::*;

use super::*;

const BUYER: Uid = Uid::new(UidKind::Buyer, 1);
const AGENT: Uid = Uid::new(UidKind::Agent, 2);

fn device() -> DeviceId {
    DeviceId::from_u64(42).unwrap()
}

/// Small segments and a small stride, so tests cross both often.
fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        segment_bytes: 64 << 10,
        index_stride: 4,
        body_bytes_max: 4 << 10,
        ..StoreConfig::new(dir)
    }
}

fn open(config: StoreConfig) -> (Store, RecoveryReport) {
    Store::open(config).unwrap()
}

fn send(store: &mut Store, conv: u64, cmid: &str, body: &[u8]) -> Appended {
    store
        .append_message(&NewMessage {
            conv: ConvId(conv),
            sender: BUYER,
            device: device(),
            cmid: cmid.as_bytes(),
            kind: b"text",
            body,
            ts_ms: 1_000,
        })
        .unwrap()
}

fn seqs(msgs: &[MessageRef<'_>]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq.0).collect()
}

#[test]
fn seqs_count_from_one_per_conversation_and_history_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(config(dir.path()));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    store.create_direct_conv(ConvId(2), BUYER, AGENT).unwrap();
    for i in 0..1_000 {
        let conv = 1 + i % 2;
        let got = send(&mut store, conv, &format!("m{i}"), &[i as u8; 100]);
        assert_eq!(
            got,
            Appended::Stored {
                seq: Seq(i / 2 + 1)
            }
        );
    }
    store.commit().unwrap();
    assert!(store.segments.len() > 2, "the test must cross segments");
    let c = ConvId(1);
    assert_eq!(
        seqs(&store.history(c, HistoryFrom::Newest, 3).unwrap()),
        [498, 499, 500]
    );
    assert_eq!(
        seqs(&store.history(c, HistoryFrom::Before(Seq(10)), 4).unwrap()),
        [6, 7, 8, 9]
    );
    assert_eq!(
        seqs(&store.history(c, HistoryFrom::After(Seq(10)), 4).unwrap()),
        [11, 12, 13, 14]
    );
    assert_eq!(
        seqs(&store.history(c, HistoryFrom::After(Seq(498)), 50).unwrap()),
        [499, 500]
    );
    assert_eq!(
        seqs(&store.history(c, HistoryFrom::Before(Seq(3)), 50).unwrap()),
        [1, 2]
    );
    assert!(store
        .history(c, HistoryFrom::After(Seq(500)), 5)
        .unwrap()
        .is_empty());
    let m = store.history(c, HistoryFrom::After(Seq(0)), 1).unwrap()[0];
    assert_eq!(
        (m.body, m.cmid, m.kind),
        (&[0u8; 100][..], &b"m0"[..], &b"text"[..])
    );
    assert!(matches!(
        store.history(ConvId(9), HistoryFrom::Newest, 1),
        Err(StoreError::UnknownConv(_))
    ));
}

#[test]
fn a_repeated_cmid_returns_the_original_seq_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(config(dir.path()));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    send(&mut store, 1, "a", b"x");
    send(&mut store, 1, "b", b"y");
    let tail = store.tail();
    assert_eq!(
        send(&mut store, 1, "a", b"x"),
        Appended::Duplicate {
            seq: Seq(1),
            ts_ms: 1_000
        }
    );
    assert_eq!(store.tail(), tail);
    store.commit().unwrap();
    drop(store);
    // The window survives a restart.
    let (mut store, _) = open(config(dir.path()));
    assert!(matches!(
        send(&mut store, 1, "b", b"y"),
        Appended::Duplicate { seq: Seq(2), .. }
    ));
}

#[test]
fn issue_9_the_same_cmid_in_another_conversation_is_a_new_message() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(config(dir.path()));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    store.create_shop_conv(ConvId(2), ShopId(8), BUYER).unwrap();
    assert_eq!(
        send(&mut store, 1, "1", b"x"),
        Appended::Stored { seq: Seq(1) }
    );
    assert_eq!(
        send(&mut store, 2, "1", b"y"),
        Appended::Stored { seq: Seq(1) }
    );
    assert!(matches!(
        send(&mut store, 2, "1", b"y"),
        Appended::Duplicate { seq: Seq(1), .. }
    ));
    let second = store.history(ConvId(2), HistoryFrom::Newest, 9).unwrap();
    assert_eq!(second.iter().map(|m| m.body).collect::<Vec<_>>(), [b"y"]);
}

#[test]
fn holds_the_longest_cmid_and_kind_the_protocol_accepts() {
    use chinwag_protocol::limits::{CMID_LEN_MAX, KIND_LEN_MAX};
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(config(dir.path()));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    let (cmid, kind) = (vec![b'c'; CMID_LEN_MAX], vec![b'k'; KIND_LEN_MAX]);
    let mut msg = NewMessage {
        conv: ConvId(1),
        sender: BUYER,
        device: device(),
        cmid: &cmid,
        kind: &kind,
        body: b"b",
        ts_ms: 0,
    };
    assert_eq!(
        store.append_message(&msg).unwrap(),
        Appended::Stored { seq: Seq(1) }
    );
    let longer = vec![b'c'; CMID_LEN_MAX + 1];
    msg.cmid = &longer;
    assert!(matches!(
        store.append_message(&msg),
        Err(StoreError::TooLarge { what: "cmid", .. })
    ));
    store.commit().unwrap();
    drop(store);
    let (store, _) = open(config(dir.path()));
    let back = store.history(ConvId(1), HistoryFrom::Newest, 1).unwrap();
    assert_eq!((back[0].cmid, back[0].kind), (&cmid[..], &kind[..]));
}

#[test]
fn issue_9_restarts_reopen_the_active_segment_and_add_none() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(config(dir.path()));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    send(&mut store, 1, "a", b"x");
    store.commit().unwrap();
    let files = |dir: &Path| segment::list(dir).unwrap();
    drop(store);
    // A log with little in it keeps no segment prepared.
    let (mut store, _) = open(config(dir.path()));
    assert_eq!(store.stats().segments, 1);
    assert_eq!(files(dir.path()), [1]);
    // Half full, it asks for the next one.
    for i in 0..40 {
        send(&mut store, 1, &format!("h{i}"), &[5; 1000]);
    }
    store.commit().unwrap();
    assert_eq!(segment::segment_of(store.tail()), 1);
    let tail = store.tail();
    drop(store);
    for i in 0..5 {
        let (mut store, _) = open(config(dir.path()));
        assert_eq!(
            store.tail(),
            tail,
            "restart {i} continues where the log ended"
        );
        // The segment prepared for the next switch counts too.
        let stats = store.stats();
        assert_eq!(stats.segments, 2);
        assert_eq!(stats.segment_bytes, 2 * (64 << 10));
        store.commit().unwrap();
        drop(store);
        assert_eq!(files(dir.path()), [1, 2], "restart {i}");
    }
    // Appending after a restart fills segment 1, then switches to the prepared segment 2.
    let (mut store, _) = open(config(dir.path()));
    for i in 0..200 {
        send(&mut store, 1, &format!("m{i}"), &[7; 1000]);
    }
    store.commit().unwrap();
    assert!(segment::segment_of(store.tail()) >= 2);
    drop(store);
    let (store, _) = open(config(dir.path()));
    assert_eq!(store.conv(ConvId(1)).unwrap().last_seq(), Seq(241));
}

#[test]
fn rejects_fields_over_their_limits_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(config(dir.path()));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    let tail = store.tail();
    let body = vec![0u8; 4097];
    let err = store
        .append_message(&NewMessage {
            conv: ConvId(1),
            sender: BUYER,
            device: device(),
            cmid: b"c",
            kind: b"text",
            body: &body,
            ts_ms: 0,
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { what: "body", .. }));
    assert_eq!(store.tail(), tail);
    assert_eq!(store.conv(ConvId(1)).unwrap().last_seq(), Seq(0));
}

#[test]
fn state_survives_restart_with_and_without_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(config(dir.path()));
    let web = DeviceId::from_u64(1 << 46 | 5).unwrap();
    assert_eq!(
        store.register_device(BUYER, DeviceType::Web, web).unwrap(),
        web
    );
    let other = DeviceId::from_u64(6).unwrap();
    assert_eq!(
        store
            .register_device(BUYER, DeviceType::Web, other)
            .unwrap(),
        web,
        "a device keeps its id"
    );
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    assert!(matches!(
        store.create_shop_conv(ConvId(3), ShopId(7), BUYER),
        Err(StoreError::ConvExists(ConvId(1)))
    ));
    store.create_direct_conv(ConvId(2), AGENT, BUYER).unwrap();
    store.create_group_conv(ConvId(4), 77, &[AGENT]).unwrap();
    assert!(matches!(
        store.create_group_conv(ConvId(5), 77, &[BUYER]),
        Err(StoreError::ConvExists(ConvId(4)))
    ));
    assert!(store.add_member(ConvId(4), BUYER, 0).unwrap());
    assert!(store.add_member(ConvId(1), AGENT, 0).unwrap());
    for i in 0..10 {
        send(&mut store, 1, &format!("m{i}"), b"hello");
    }
    assert_eq!(store.mark_read(ConvId(1), AGENT, Seq(99)).unwrap(), Seq(10));
    assert_eq!(store.mark_read(ConvId(1), AGENT, Seq(3)).unwrap(), Seq(10));
    store.commit().unwrap();

    let check = |store: &Store| {
        assert_eq!(store.device(BUYER, DeviceType::Web), Some(web));
        assert_eq!(store.device_max(), Some(web));
        assert_eq!(store.conv_max(), Some(ConvId(4)));
        assert_eq!(store.group_conv(77), Some(ConvId(4)));
        let group = store.conv(ConvId(4)).unwrap();
        assert_eq!(group.members(), &[AGENT, BUYER]);
        assert_eq!((group.group_key(), group.shop()), (Some(77), None));
        assert_eq!(store.conv(ConvId(1)).unwrap().group_key(), None);
        assert_eq!(store.shop_conv(ShopId(7), BUYER), Some(ConvId(1)));
        assert_eq!(store.direct_conv(BUYER, AGENT), Some(ConvId(2)));
        let c = store.conv(ConvId(1)).unwrap();
        assert_eq!(c.members(), &[BUYER, AGENT]);
        assert_eq!(c.cursor(AGENT), Seq(10));
        assert_eq!(c.cursor(BUYER), Seq(10), "a sender has read what he wrote");
        let mut convs = store.convs_of(AGENT).to_vec();
        convs.sort_unstable();
        assert_eq!(convs, [ConvId(1), ConvId(2), ConvId(4)]);
        let newest = store.history(ConvId(1), HistoryFrom::Newest, 50).unwrap();
        assert_eq!(seqs(&newest), (1..=10).collect::<Vec<_>>());
        assert_eq!(c.last_seq(), Seq(10));
    };
    check(&store);
    drop(store);
    let (mut store, report) = open(config(dir.path()));
    assert_eq!(report.snapshot, None);
    check(&store);
    let pos = store.snapshot().unwrap();
    assert!(store.remove_member(ConvId(1), AGENT, 0).unwrap());
    assert!(store.add_member(ConvId(1), AGENT, 0).unwrap());
    store.commit().unwrap();
    drop(store);
    let (store, report) = open(config(dir.path()));
    assert_eq!(report.snapshot, Some(pos));
    assert_eq!(
        report.records, 2,
        "only the records after the snapshot replay"
    );
    check(&store);
}

#[test]
fn retention_deletes_old_segments_and_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        retention_bytes_max: Some(3 * (64 << 10)),
        ..config(dir.path())
    };
    let (mut store, _) = open(cfg.clone());
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    store.create_direct_conv(ConvId(2), BUYER, AGENT).unwrap();
    for i in 0..2_000 {
        send(&mut store, 1, &format!("m{i}"), &[1; 200]);
    }
    store.commit().unwrap();
    let before = store.stats();
    let retained = store.retain(0).unwrap();
    // The stats count a segment prepared for the next switch (once the active one is half
    // full); retention keeps 3 live ones.
    let prepared = usize::from(store.active().end * 2 >= store.active().capacity());
    assert_eq!(retained.segments, before.segments - 3 - prepared);
    let after = store.stats();
    assert_eq!(after.segments, 3 + prepared);
    assert_eq!(after.segment_bytes, (3 + prepared as u64) * (64 << 10));
    assert_eq!(after.conversations, 2);
    assert_eq!(after.cmid_entries, 2_000);
    assert!(after.snapshot.is_some(), "retention took a snapshot first");
    let oldest = store
        .history(ConvId(1), HistoryFrom::After(Seq(0)), 10)
        .unwrap();
    assert!(
        oldest[0].seq.0 > 1,
        "the oldest messages went with their segments"
    );
    assert_eq!(
        seqs(&store.history(ConvId(1), HistoryFrom::Newest, 2).unwrap()),
        [1999, 2000]
    );
    drop(store);
    let (mut store, report) = open(cfg);
    assert!(report.snapshot.is_some());
    assert_eq!(store.direct_conv(AGENT, BUYER), Some(ConvId(2)));
    assert_eq!(
        send(&mut store, 1, "next", b""),
        Appended::Stored { seq: Seq(2001) }
    );
}

#[test]
fn age_retention_spares_recent_segments() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        retention_age_ms: Some(10_000),
        ..config(dir.path())
    };
    let (mut store, _) = open(cfg);
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    for i in 0..600 {
        send(&mut store, 1, &format!("m{i}"), &[1; 200]);
    }
    store.commit().unwrap();
    assert_eq!(store.retain(1_000 + 10_000).unwrap().segments, 0);
    let n = store.segments.len();
    assert_eq!(store.retain(1_000 + 10_001).unwrap().segments, n - 1);
}

/// The files of a log directory and their bytes.
type Files = Vec<(PathBuf, Vec<u8>)>;

/// Files of a log directory, to restore it between damage experiments.
fn save(dir: &Path) -> Files {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

fn restore(dir: &Path, files: &[(PathBuf, Vec<u8>)]) {
    for e in fs::read_dir(dir).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    for (p, bytes) in files {
        fs::write(p, bytes).unwrap();
    }
}

/// (start, unpadded len) of every record in a segment file.
fn records_of(seg: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut off = segment::HEADER_BYTES;
    while let Ok(Some((_, padded))) = record::decode(seg, off) {
        let len = u32::from_le_bytes(seg[off..off + 4].try_into().unwrap()) as usize;
        out.push((off, len));
        off += padded;
    }
    out
}

/// Builds a log with 5 committed and 3 uncommitted messages; returns the saved files, the
/// segment path and the records.
fn torn_fixture(dir: &Path) -> (Files, PathBuf, Vec<(usize, usize)>) {
    let (mut store, _) = open(config(dir));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    for i in 0..5 {
        send(&mut store, 1, &format!("c{i}"), b"committed");
    }
    store.commit().unwrap();
    for i in 5..8 {
        send(&mut store, 1, &format!("c{i}"), b"in flight");
    }
    let path = store.segments[0].path.clone();
    drop(store);
    let files = save(dir);
    let seg = &files.iter().find(|(p, _)| *p == path).unwrap().1;
    let records = records_of(seg);
    assert_eq!(records.len(), 9, "conversation + 8 messages");
    (files, path, records)
}

#[test]
fn torn_tail_at_every_byte_keeps_every_committed_record() {
    let dir = tempfile::tempdir().unwrap();
    let (files, path, records) = torn_fixture(dir.path());
    let first_uncommitted = records[6].0;
    let end = records[8].0 + records[8].1;
    for cut in first_uncommitted..end {
        restore(dir.path(), &files);
        // The write stopped at `cut`: nothing after it reached the file.
        let mut seg = files.iter().find(|(p, _)| *p == path).unwrap().1.clone();
        seg[cut..].fill(0);
        fs::write(&path, &seg).unwrap();
        let (store, report) = open(config(dir.path()));
        let whole = records[6..].iter().filter(|(s, l)| s + l <= cut).count() as u64;
        let msgs = store.history(ConvId(1), HistoryFrom::Newest, 50).unwrap();
        assert_eq!(
            seqs(&msgs),
            (1..=5 + whole).collect::<Vec<_>>(),
            "cut {cut}"
        );
        // Recovery reports a cut exactly when a record was torn in its middle.
        let inside = records[6..].iter().any(|(s, l)| *s < cut && cut < s + l);
        assert_eq!(report.truncated.is_some(), inside, "cut {cut}");
    }
}

#[test]
fn corrupt_tail_at_every_byte_is_cut_off_after_the_last_good_record() {
    let dir = tempfile::tempdir().unwrap();
    let (files, path, records) = torn_fixture(dir.path());
    let first_uncommitted = records[6].0;
    let end = records[8].0 + records[8].1;
    for at in first_uncommitted..end {
        restore(dir.path(), &files);
        let mut seg = files.iter().find(|(p, _)| *p == path).unwrap().1.clone();
        seg[at] ^= 0x5a;
        fs::write(&path, &seg).unwrap();
        let (mut store, report) = open(config(dir.path()));
        let hit = records.iter().position(|(s, l)| (*s..s + l).contains(&at));
        // Records before the damaged one stay; it and all after it are cut.
        let kept = hit.map_or(8, |i| i as u64 - 1);
        let msgs = store.history(ConvId(1), HistoryFrom::Newest, 50).unwrap();
        assert_eq!(seqs(&msgs), (1..=kept).collect::<Vec<_>>(), "byte {at}");
        assert_eq!(report.truncated.is_some(), hit.is_some(), "byte {at}");
        // The cut tail never comes back: the next append takes the next seq, and a
        // restart sees exactly what is there.
        assert_eq!(
            send(&mut store, 1, "after", b"x"),
            Appended::Stored { seq: Seq(kept + 1) }
        );
        store.commit().unwrap();
        drop(store);
        let (store, report) = open(config(dir.path()));
        assert_eq!(report.truncated, None);
        let n = store
            .history(ConvId(1), HistoryFrom::Newest, 50)
            .unwrap()
            .len();
        assert_eq!(n as u64, kept + 1);
    }
}

#[test]
fn power_loss_leaving_holes_after_the_last_commit_loses_nothing_committed() {
    // Under `always`, what a power loss leaves of the records after the last commit is
    // any subset of their pages: simulate each page missing in turn, with the pages after
    // it (holding whole records) present.
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        fsync: FsyncPolicy::Always,
        ..config(dir.path())
    };
    let (mut store, _) = open(cfg.clone());
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    for i in 0..50 {
        send(&mut store, 1, &format!("c{i}"), &[b'c'; 300]);
    }
    store.commit().unwrap();
    let committed_end = segment::offset_of(store.tail());
    for i in 50..120 {
        send(&mut store, 1, &format!("u{i}"), &[b'u'; 300]);
    }
    let path = store.segments[0].path.clone();
    let uncommitted_end = store.segments[0].end;
    assert_eq!(store.segments.len(), 1, "the test stays in one segment");
    drop(store);
    let files = save(dir.path());
    let first_page = committed_end / 4096 * 4096;
    for page in (first_page..uncommitted_end).step_by(4096) {
        restore(dir.path(), &files);
        let mut seg = files.iter().find(|(p, _)| *p == path).unwrap().1.clone();
        // The part of the page after the commit did not reach the disk.
        let from = page.max(committed_end);
        seg[from..page + 4096].fill(0);
        fs::write(&path, &seg).unwrap();
        let (store, _) = open(cfg.clone());
        let msgs = store
            .history(ConvId(1), HistoryFrom::After(Seq(0)), 200)
            .unwrap();
        assert!(
            msgs.len() >= 50,
            "page {page}: a committed message was lost"
        );
        assert!(msgs
            .iter()
            .enumerate()
            .all(|(i, m)| m.seq.0 == i as u64 + 1));
        assert!(msgs[..50].iter().all(|m| m.body == [b'c'; 300]));
    }
}

#[test]
fn history_returns_at_most_the_configured_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(config(dir.path()));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    for i in 0..300 {
        send(&mut store, 1, &format!("m{i}"), b"x");
    }
    let msgs = store
        .history(ConvId(1), HistoryFrom::Newest, 10_000)
        .unwrap();
    assert_eq!(msgs.len(), 200);
    assert_eq!(msgs[0].seq, Seq(101));
}

#[test]
fn corruption_below_the_acknowledged_end_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (files, path, records) = torn_fixture(dir.path());
    // Damage the second committed message.
    let (start, _) = records[2];
    for at in [start, start + 20, start + 70] {
        restore(dir.path(), &files);
        let mut seg = files.iter().find(|(p, _)| *p == path).unwrap().1.clone();
        seg[at] ^= 0x01;
        fs::write(&path, &seg).unwrap();
        let err = Store::open(config(dir.path())).err().unwrap();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        // The operator may skip it; the message is lost, everything else is there.
        let (store, report) = open(StoreConfig {
            skip_corrupt: true,
            ..config(dir.path())
        });
        assert_eq!(report.skipped.len(), 1);
        let msgs = store.history(ConvId(1), HistoryFrom::Newest, 50).unwrap();
        assert_eq!(seqs(&msgs), [1, 3, 4, 5, 6, 7, 8]);
    }
}

#[test]
#[ignore = "needs root to mount a tmpfs; .ci/run runs it"]
fn disk_full_fails_appends_and_harms_nothing() {
    // A small tmpfs is a real full disk; mounting one needs root.
    let mnt = tempfile::tempdir().unwrap();
    let target = mnt.path().to_str().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs", target])
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "mounting a tmpfs failed: this test needs root");
    let result = std::panic::catch_unwind(|| {
        let dir = mnt.path().join("log");
        let cfg = StoreConfig {
            history_limit_max: usize::MAX,
            ..config(&dir)
        };
        let (mut store, _) = open(cfg.clone());
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        let mut stored = 0u64;
        let err = loop {
            let r = store.append_message(&NewMessage {
                conv: ConvId(1),
                sender: BUYER,
                device: device(),
                cmid: format!("m{stored}").as_bytes(),
                kind: b"text",
                body: &[7; 1000],
                ts_ms: 0,
            });
            match r {
                Ok(_) => stored += 1,
                Err(e) => break e,
            }
            assert!(stored < 10_000, "the disk never filled");
        };
        assert!(matches!(err, StoreError::DiskFull { .. }), "{err}");
        assert!(err.is_unavailable());
        store.commit().unwrap();
        // Everything stored before is intact, after a restart too.
        drop(store);
        let (store, _) = open(cfg);
        let msgs = store
            .history(ConvId(1), HistoryFrom::Newest, 10_000)
            .unwrap();
        assert_eq!(msgs.len() as u64, stored);
        assert!(msgs.iter().all(|m| m.body == [7; 1000]));
    });
    let _ = std::process::Command::new("umount").arg(target).status();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn verify_checks_every_record_and_names_the_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(config(dir.path()));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    for i in 0..500 {
        send(&mut store, 1, &format!("m{i}"), &[3; 150]);
    }
    store.commit().unwrap();
    assert_eq!(store.verify().unwrap().0, 501);
    let seg = &mut store.segments[1];
    seg.map[segment::HEADER_BYTES + 100] ^= 1;
    let bad = segment::position(seg.id, segment::HEADER_BYTES);
    assert!(matches!(
        store.verify(),
        Err(StoreError::Corrupt { position, .. }) if position == bad
    ));
}

#[test]
fn interval_policy_flushes_only_when_the_interval_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        fsync: FsyncPolicy::Interval,
        fsync_interval_ms: 3_600_000,
        ..config(dir.path())
    };
    let (mut store, _) = open(cfg);
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    send(&mut store, 1, "a", b"x");
    store.commit().unwrap();
    assert!(store.synced < store.tail(), "an hour has not passed");
    // Committed all the same: it reads back.
    assert_eq!(
        seqs(&store.history(ConvId(1), HistoryFrom::Newest, 9).unwrap()),
        [1]
    );
    store.sync().unwrap();
    assert_eq!(store.synced, store.tail());
}

#[test]
fn a_damaged_snapshot_falls_back_to_an_older_one_or_a_full_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(config(dir.path()));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    send(&mut store, 1, "a", b"x");
    let older = store.snapshot().unwrap();
    send(&mut store, 1, "b", b"y");
    let newer = store.snapshot().unwrap();
    send(&mut store, 1, "c", b"z");
    store.commit().unwrap();
    drop(store);
    let newest = dir.path().join(snapshot::file_name(newer));
    let mut bytes = fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&newest, &bytes).unwrap();
    let (store, report) = open(config(dir.path()));
    assert_eq!(report.snapshot, Some(older));
    assert_eq!(report.snapshots_rejected.len(), 1);
    assert_eq!(store.conv(ConvId(1)).unwrap().last_seq(), Seq(3));
    drop(store);
    fs::remove_file(dir.path().join(snapshot::file_name(older))).unwrap();
    let (store, report) = open(config(dir.path()));
    assert_eq!(report.snapshot, None);
    assert_eq!(store.conv(ConvId(1)).unwrap().last_seq(), Seq(3));
}

#[test]
fn refuses_to_start_without_a_segment_or_the_snapshot_that_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        retention_bytes_max: Some(2 * (64 << 10)),
        ..config(dir.path())
    };
    let (mut store, _) = open(cfg.clone());
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    for i in 0..1_000 {
        send(&mut store, 1, &format!("m{i}"), &[1; 200]);
    }
    store.commit().unwrap();
    let middle = store.segments[1].path.clone();
    assert!(store.retain(0).unwrap().segments > 0);
    drop(store);
    let snapshots = snapshot::list(dir.path()).unwrap();
    assert_eq!(snapshots.len(), 1);
    fs::remove_file(&snapshots[0].1).unwrap();
    assert!(matches!(
        Store::open(cfg.clone()),
        Err(StoreError::Corrupt { .. })
    ));

    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(config(dir.path()));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    for i in 0..1_000 {
        send(&mut store, 1, &format!("m{i}"), &[1; 200]);
    }
    let middle_name = middle.file_name().unwrap().to_owned();
    drop(store);
    fs::remove_file(dir.path().join(middle_name)).unwrap();
    let err = Store::open(config(dir.path())).err().unwrap();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn member_limits_hold() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(StoreConfig {
        members_max: 3,
        ..config(dir.path())
    });
    let users: Vec<Uid> = (0..4).map(|i| Uid::new(UidKind::Service, i)).collect();
    store
        .create_direct_conv(ConvId(1), users[0], users[1])
        .unwrap();
    assert!(store.add_member(ConvId(1), users[2], 0).unwrap());
    assert!(matches!(
        store.add_member(ConvId(1), users[3], 0),
        Err(StoreError::TooLarge {
            what: "members",
            ..
        })
    ));
    assert!(!store.remove_member(ConvId(1), users[3], 0).unwrap());
    assert!(store.remove_member(ConvId(1), users[0], 0).unwrap());
    assert!(store.add_member(ConvId(1), users[3], 0).unwrap());
    assert!(matches!(
        store.create_direct_conv(ConvId(2), users[1], users[1]),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.add_member(ConvId(9), users[0], 0),
        Err(StoreError::UnknownConv(ConvId(9)))
    ));
    assert!(matches!(
        store.create_group_conv(ConvId(3), 1, &users),
        Err(StoreError::TooLarge {
            what: "members",
            ..
        })
    ));
    assert!(matches!(
        store.create_group_conv(ConvId(3), 1, &[users[0], users[0]]),
        Err(StoreError::Invalid(_))
    ));
    store.create_group_conv(ConvId(3), 1, &users[..3]).unwrap();
    assert_eq!(store.group_conv(1), Some(ConvId(3)));
}

#[test]
fn always_policy_flushes_at_commit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        fsync: FsyncPolicy::Always,
        ..config(dir.path())
    };
    let (mut store, _) = open(cfg.clone());
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    for i in 0..64 {
        send(&mut store, 1, &format!("m{i}"), b"batch");
    }
    assert!(store.synced < store.tail());
    store.commit().unwrap();
    assert_eq!(store.synced, store.tail());
    assert_eq!(store.segments[0].acked_end(), store.segments[0].end);
}

/// What the model of the store does.
#[derive(Debug, Clone)]
enum Op {
    Send {
        conv: u8,
        cmid: u8,
        body: u8,
    },
    Read {
        conv: u8,
        from: u8,
        at: u8,
        limit: u8,
    },
    Cursor {
        conv: u8,
        seq: u8,
    },
    Commit,
    Snapshot,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..4, any::<u8>(), any::<u8>())
            .prop_map(|(conv, cmid, body)| Op::Send { conv, cmid, body }),
        4 => (0u8..4, 0u8..3, any::<u8>(), 0u8..40)
            .prop_map(|(conv, from, at, limit)| Op::Read { conv, from, at, limit }),
        1 => (0u8..4, any::<u8>()).prop_map(|(conv, seq)| Op::Cursor { conv, seq }),
        2 => Just(Op::Commit),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random interleavings of appends, reads, snapshots and restarts agree with a plain
    /// in-memory model.
    #[test]
    fn store_agrees_with_a_model(ops in proptest::collection::vec(op(), 1..150)) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig { index_stride: 3, ..config(dir.path()) };
        let (mut store, _) = open(cfg.clone());
        for c in 0..4u64 {
            store.create_shop_conv(ConvId(c), ShopId(c), BUYER).unwrap();
        }
        // Per conversation, the bodies by seq - 1; per (conv, cmid), its seq.
        let mut model: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 4];
        let mut cmids = std::collections::HashMap::new();
        let mut cursors = [0u64; 4];
        for op in ops {
            match op {
                Op::Send { conv, cmid, body } => {
                    let body = vec![body; usize::from(body) * 3];
                    let cmid = format!("{cmid}");
                    let got = send(&mut store, u64::from(conv), &cmid, &body);
                    let want = match cmids.get(&(conv, cmid.clone())) {
                        Some(&s) => Appended::Duplicate { seq: Seq(s), ts_ms: 1_000 },
                        None => {
                            let list = &mut model[usize::from(conv)];
                            list.push(body);
                            let seq = list.len() as u64;
                            cmids.insert((conv, cmid), seq);
                            cursors[usize::from(conv)] = seq;
                            Appended::Stored { seq: Seq(seq) }
                        }
                    };
                    prop_assert_eq!(got, want);
                }
                Op::Read { conv, from, at, limit } => {
                    let list = &model[usize::from(conv)];
                    let last = list.len() as u64;
                    let at = u64::from(at) % (last + 2);
                    let k = u64::from(limit);
                    let (from, lo, hi) = match from {
                        0 => (HistoryFrom::Newest, last.saturating_sub(k) + 1, last),
                        1 if at == 0 => (HistoryFrom::Before(Seq(0)), last.saturating_sub(k) + 1, last),
                        1 => {
                            let hi = (at - 1).min(last);
                            (HistoryFrom::Before(Seq(at)), hi.saturating_sub(k) + 1, hi)
                        }
                        _ => (HistoryFrom::After(Seq(at)), at + 1, (at + k).min(last)),
                    };
                    let want: Vec<(u64, &[u8])> = if k == 0 { Vec::new() } else {
                        (lo..=hi).map(|s| (s, list[s as usize - 1].as_slice())).collect()
                    };
                    let got = store.history(ConvId(u64::from(conv)), from, usize::from(limit)).unwrap();
                    let got: Vec<(u64, &[u8])> = got.iter().map(|m| (m.seq.0, m.body)).collect();
                    prop_assert_eq!(got, want);
                }
                Op::Cursor { conv, seq } => {
                    let c = usize::from(conv);
                    let want = (u64::from(seq).min(model[c].len() as u64)).max(cursors[c]);
                    cursors[c] = want;
                    let got = store.mark_read(ConvId(u64::from(conv)), BUYER, Seq(u64::from(seq))).unwrap();
                    prop_assert_eq!(got, Seq(want));
                }
                Op::Commit => store.commit().unwrap(),
                Op::Snapshot => { store.snapshot().unwrap(); }
                Op::Restart => {
                    drop(store);
                    store = open(cfg.clone()).0;
                }
            }
        }
        for (c, list) in model.iter().enumerate() {
            let conv = store.conv(ConvId(c as u64)).unwrap();
            prop_assert_eq!(conv.last_seq(), Seq(list.len() as u64));
            prop_assert_eq!(conv.cursor(BUYER), Seq(cursors[c]));
        }
    }
}

#[test]
fn segments_start_small_and_double_up_to_segment_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        segment_bytes: 1 << 20,
        segment_bytes_first: 64 << 10,
        ..config(dir.path())
    };
    let sizes: Vec<u64> = (1..=6).map(|id| cfg.segment_bytes_for(id)).collect();
    assert_eq!(
        sizes,
        [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 1 << 20]
    );
    let (mut store, _) = open(cfg.clone());
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    for i in 0..400 {
        send(&mut store, 1, &format!("m{i}"), &[3; 1000]);
    }
    store.commit().unwrap();
    let files: Vec<u64> = segment::list(dir.path())
        .unwrap()
        .into_iter()
        .map(|id| {
            fs::metadata(dir.path().join(segment::file_name(id)))
                .unwrap()
                .len()
        })
        .collect();
    assert_eq!(files[..3], [64 << 10, 128 << 10, 256 << 10], "{files:?}");
    drop(store);
    let (store, _) = open(cfg);
    assert_eq!(store.conv(ConvId(1)).unwrap().last_seq(), Seq(400));

    // A segment is never smaller than the largest record needs.
    let big = StoreConfig {
        body_bytes_max: 200 << 10,
        segment_bytes: 1 << 20,
        segment_bytes_first: 64 << 10,
        ..StoreConfig::new(dir.path())
    };
    assert!(big.segment_bytes_for(1) >= big.segment_bytes_needed());
}

#[test]
fn one_preparer_serves_the_logs_of_a_shard() {
    let dir = tempfile::tempdir().unwrap();
    let preparer = Preparer::new();
    let mut stores: Vec<Store> = (0..4)
        .map(|i| {
            open(StoreConfig {
                preparer: preparer.clone(),
                ..config(&dir.path().join(format!("{i}")))
            })
            .0
        })
        .collect();
    for (i, store) in stores.iter_mut().enumerate() {
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        for m in 0..150 * (i + 1) {
            send(store, 1, &format!("m{m}"), &[1; 1000]);
        }
        store.commit().unwrap();
    }
    drop(stores);
    for i in 0..4 {
        let (store, _) = open(config(&dir.path().join(format!("{i}"))));
        assert_eq!(
            store.conv(ConvId(1)).unwrap().last_seq(),
            Seq(150 * (i as u64 + 1))
        );
    }
}

#[test]
fn fsync_never_syncs_nothing_while_a_log_opens_fills_and_rolls_segments() {
    let root = tempfile::tempdir().unwrap();
    // A new partition directory under a new parent, as a node's first write makes it.
    let dir = root.path().join("partitions").join("00007");
    let (mut store, _) = open(config(&dir));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    for i in 0..400 {
        send(&mut store, 1, &format!("m{i}"), &[3; 1000]);
        store.commit().unwrap();
    }
    assert!(store.segments.len() >= 3, "the test must roll segments");
    assert_eq!(os::synced::under(root.path()), Vec::<PathBuf>::new());
    drop(store);
    let (store, _) = open(config(&dir));
    assert_eq!(store.conv(ConvId(1)).unwrap().last_seq(), Seq(400));

    // The same under `always`: the new directories, every segment and its name are synced.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("partitions").join("00007");
    let (mut store, _) = open(StoreConfig {
        fsync: FsyncPolicy::Always,
        ..config(&dir)
    });
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    for i in 0..400 {
        send(&mut store, 1, &format!("m{i}"), &[3; 1000]);
        store.commit().unwrap();
    }
    let synced = os::synced::under(root.path());
    assert!(synced.contains(&root.path().to_path_buf()));
    assert!(synced.contains(&root.path().join("partitions")));
    for seg in &store.segments {
        assert!(synced.contains(&seg.path.with_extension("seg.tmp")));
    }
    assert!(synced.iter().filter(|p| **p == dir).count() >= store.segments.len());
}

#[test]
fn a_blank_last_segment_left_by_a_power_loss_under_fsync_never_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(config(dir.path()));
    store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
    for i in 0..10 {
        send(&mut store, 1, &format!("m{i}"), b"kept");
    }
    store.commit().unwrap();
    drop(store);
    // Segment 2's name reached the disk, its header did not (nor anything else).
    let blank = dir.path().join(segment::file_name(2));
    fs::write(&blank, vec![0u8; 128 << 10]).unwrap();
    let (store, _) = open(config(dir.path()));
    assert_eq!(store.conv(ConvId(1)).unwrap().last_seq(), Seq(10));
    assert_eq!(segment::list(dir.path()).unwrap(), [1]);
    drop(store);

    // A lost header with something after it is not an unfinished creation: it is refused.
    let mut damaged = vec![0u8; 128 << 10];
    damaged[4096] = 1;
    fs::write(&blank, damaged).unwrap();
    assert!(matches!(
        Store::open(config(dir.path())),
        Err(StoreError::Corrupt { .. })
    ));

    // A log whose only segment is blank starts empty.
    let only = tempfile::tempdir().unwrap();
    fs::write(only.path().join(segment::file_name(1)), vec![0u8; 64 << 10]).unwrap();
    let (store, _) = open(config(only.path()));
    assert!(store.conv(ConvId(1)).is_none());
}
