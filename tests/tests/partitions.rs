//! Partitions end to end (docs/storage.md, "Placement → partition → shard"): the data is
//! placed in partitions, each with its own log created on first write; the shard count is not
//! tied to the data, so a node restarts with any count and finds everything; a conversation id
//! naming a partition the node does not have is `not_found`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use chinwag_protocol::client::{Client, ClientError, Encoding};
use chinwag_protocol::{
    ConvId, Cursor, DeviceType, ErrorCode, History, HistoryRange, Message, Msg, Send, Seq, ShopId,
    Target, Uid,
};
use chinwag_tests::{buyer, history, Server};

const SECRET: &str = "e2e-secret-e2e-secret-e2e-secret-0";

/// A binary client logged in as `uid`, and its device id.
fn login(server: &Server, uid: Uid) -> (Client, u64) {
    let (client, ok) = server.login_as(uid, None, DeviceType::Web, Encoding::Binary);
    (client, ok.device_id.get())
}

fn send(client: &mut Client, target: Target, cmid: &str) -> (ConvId, Seq) {
    chinwag_tests::send(client, target, cmid, &format!("body {cmid}"))
}

/// Every message of `conv`, paging forward.
fn all_messages(client: &mut Client, conv: ConvId) -> Vec<Msg<'static>> {
    let mut out = Vec::new();
    let mut after = Seq(0);
    loop {
        let page = history(client, conv, HistoryRange::After(after), 200);
        let Some(last) = page.last() else {
            return out;
        };
        after = last.seq;
        out.extend(page);
    }
}

/// The partition directories under the data directory.
fn partition_dirs(data_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(data_dir.join("partitions")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// The conversations of one run of the test below: per conversation, who reads it and the
/// cmids stored, in seq order.
type Book = BTreeMap<ConvId, (u64, Vec<String>)>;

/// Writes one more message into every conversation of `book` (creating them the first time)
/// and checks each seq follows the last.
fn write_round(server: &Server, book: &mut Book, round: usize) {
    for writer in 0..4u64 {
        let (mut client, _) = login(server, buyer(100 + writer));
        for other in 0..3u64 {
            let reader = 200 + other;
            let cmid = format!("r{round}-w{writer}-o{other}");
            let (conv, seq) = send(&mut client, Target::User(buyer(reader)), &cmid);
            let entry = book.entry(conv).or_insert((reader, Vec::new()));
            entry.1.push(cmid);
            assert_eq!(seq, Seq(entry.1.len() as u64), "{conv}: seqs continue 1..n");
        }
        // Shops too: their conversations live in the shop's partition.
        let cmid = format!("r{round}-w{writer}-shop");
        let (conv, seq) = send(&mut client, Target::Shop(ShopId(writer + 1)), &cmid);
        let entry = book.entry(conv).or_insert((100 + writer, Vec::new()));
        entry.1.push(cmid);
        assert_eq!(seq, Seq(entry.1.len() as u64));
    }
}

/// Every conversation of `book` holds exactly its messages, 1..n, and the cursor of each
/// reader who read (`cursors`) is where it was left.
fn check_book(server: &Server, book: &Book, cursors: &BTreeMap<ConvId, Seq>) {
    for (conv, (reader, cmids)) in book {
        let (mut client, _) = login(server, buyer(*reader));
        let stored = all_messages(&mut client, *conv);
        let seqs: Vec<u64> = stored.iter().map(|m| m.seq.0).collect();
        let expected: Vec<u64> = (1..=cmids.len() as u64).collect();
        assert_eq!(seqs, expected, "{conv}");
        let stored_cmids: Vec<&str> = stored.iter().map(|m| &*m.cmid).collect();
        assert_eq!(stored_cmids, *cmids, "{conv}");
        let Message::ConvsOk(listed) = client.call(Message::Convs).unwrap().message else {
            panic!("convs")
        };
        let entry = listed.iter().find(|c| c.conv == *conv).expect("listed");
        if let Some(cursor) = cursors.get(conv) {
            assert_eq!(entry.read_seq, *cursor, "{conv}: the reader's cursor");
        }
    }
}

#[test]
fn restarts_with_2_then_1_then_3_shards_keep_every_conversation_device_and_cursor() {
    let base = ["--jwt-secret", SECRET, "--messages-per-s-max=0"];
    let run = |data: Option<tempfile::TempDir>, shards: &str| {
        let mut args = base.to_vec();
        args.push(shards);
        match data {
            None => Server::start(&args),
            Some(dir) => Server::start_in(dir, &args, &[]),
        }
    };
    let mut book = Book::new();
    let mut cursors = BTreeMap::new();

    let server = run(None, "--shards=2");
    write_round(&server, &mut book, 0);
    write_round(&server, &mut book, 1);
    let devices: Vec<u64> = (0..4).map(|w| login(&server, buyer(100 + w)).1).collect();
    // Readers read part of their conversations.
    for (conv, (reader, _)) in book.iter().filter(|(_, (r, _))| *r >= 200) {
        let (mut client, _) = login(&server, buyer(*reader));
        let reply = client
            .call(Message::Read(Cursor {
                conv: *conv,
                seq: Seq(1),
            }))
            .unwrap();
        assert!(matches!(reply.message, Message::ReadOk(_)), "{reply:?}");
        cursors.insert(*conv, Seq(1));
    }
    let partitions: BTreeSet<u64> = book.keys().map(|c| c.0 & 0xffff).collect();
    assert!(
        partitions.len() >= 4,
        "the conversations spread over partitions: {partitions:?}"
    );
    server.signal(libc::SIGTERM);
    let data = server.into_data_dir();

    let data = restart_and_check(data, &base, "--shards=1", &mut book, &cursors, &devices, 2);
    let data = restart_and_check(data, &base, "--shards=3", &mut book, &cursors, &devices, 3);
    // And back to 2, after a SIGKILL this time.
    let mut args = base.to_vec();
    args.push("--shards=2");
    let server = Server::start_in(data, &args, &[]);
    check_book(&server, &book, &cursors);
}

/// Restarts the node on `data` with `shards`, checks every conversation, device and cursor,
/// writes one more round, and stops it (SIGKILL: what was acknowledged must be there next).
fn restart_and_check(
    data: tempfile::TempDir,
    base: &[&str],
    shards: &str,
    book: &mut Book,
    cursors: &BTreeMap<ConvId, Seq>,
    devices: &[u64],
    round: usize,
) -> tempfile::TempDir {
    let mut args = base.to_vec();
    args.push(shards);
    let server = Server::start_in(data, &args, &[]);
    let count = shards.trim_start_matches("--shards=");
    assert!(
        server.log().contains(&format!("shards={count}")),
        "runs {shards}: {}",
        server.log()
    );
    check_book(&server, book, cursors);
    let again: Vec<u64> = (0..4).map(|w| login(&server, buyer(100 + w)).1).collect();
    assert_eq!(again, devices, "devices keep their ids");
    write_round(&server, book, round);
    server.signal(libc::SIGKILL);
    server.into_data_dir()
}

#[test]
fn an_empty_node_creates_no_partition_directory_until_one_is_written() {
    let server = Server::start(&["--jwt-secret", SECRET, "--shards=2"]);
    assert_eq!(partition_dirs(server.data_dir.path()), Vec::<String>::new());
    assert_eq!(server.metric("chinwag_log_partitions_open", ""), 0);
    assert_eq!(server.metric("chinwag_log_segment_bytes", ""), 0);
    // A login registers the device in the user's partition: its log is created.
    let (mut client, _) = login(&server, buyer(1));
    let dirs = partition_dirs(server.data_dir.path());
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    // The gauges are published once per sweep tick, not at the write.
    assert_eq!(server.wait_metric("chinwag_log_partitions_open", "", 1), 1);
    // A conversation lives in its key's partition: the id names it.
    let (conv, _) = send(&mut client, Target::Shop(ShopId(9)), "c1");
    let dirs = partition_dirs(server.data_dir.path());
    assert!(
        dirs.contains(&format!("{:05}", conv.0 & 0xffff)),
        "{conv} is in its partition: {dirs:?}"
    );
    assert!(dirs.len() <= 2, "{dirs:?}");
    // Reads create nothing.
    let (mut other, _) = login(&server, buyer(1));
    let before = partition_dirs(server.data_dir.path());
    let reply = other.call(Message::History(History {
        conv: ConvId(conv.0 + (1 << 16) + 1),
        range: HistoryRange::Newest,
        limit: 10,
    }));
    assert!(
        matches!(&reply, Err(ClientError::Rejected(e)) if e.code == ErrorCode::NotFound),
        "{reply:?}"
    );
    assert_eq!(partition_dirs(server.data_dir.path()), before);
}

#[test]
fn a_conversation_id_naming_a_partition_out_of_range_is_not_found() {
    let server = Server::start(&["--jwt-secret", SECRET, "--partitions=64"]);
    let (mut client, _) = login(&server, buyer(1));
    let (conv, _) = send(&mut client, Target::User(buyer(2)), "c1");
    assert!(conv.0 & 0xffff < 64, "{conv}");
    for forged in [
        ConvId(conv.0 & !0xffff | 64),
        ConvId(1 << 16 | 0xffff),
        ConvId(u64::MAX),
        ConvId(300),
    ] {
        let sent = client.call(Message::Send(Send {
            target: Target::Conv(forged),
            cmid: "x".into(),
            kind: "text".into(),
            body: "x".into(),
        }));
        let read = client.call(Message::Read(Cursor {
            conv: forged,
            seq: Seq(1),
        }));
        let history = client.call(Message::History(History {
            conv: forged,
            range: HistoryRange::Newest,
            limit: 1,
        }));
        for reply in [sent, read, history] {
            match reply {
                Err(ClientError::Rejected(e)) => {
                    assert_eq!(e.code, ErrorCode::NotFound, "{forged}")
                }
                other => panic!("{forged}: expected not_found, got {other:?}"),
            }
        }
    }
    // The node is unharmed and the real conversation is there.
    assert_eq!(all_messages(&mut client, conv).len(), 1);
    assert_eq!(server.get("/healthz").0, 200);
}

#[test]
fn another_partition_count_on_an_existing_directory_is_refused() {
    let server = Server::start(&["--jwt-secret", SECRET, "--partitions=64"]);
    server.signal(libc::SIGTERM);
    let data = server.into_data_dir();
    let mut child = std::process::Command::new(chinwag_tests::binary())
        .args([
            "serve",
            "--listen=127.0.0.1:0",
            "--backend-listen=127.0.0.1:0",
        ])
        .args(["--jwt-secret", SECRET, "--partitions=256", "--data-dir"])
        .arg(data.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("--partitions 64"), "{log}");
    // 0, the default, takes the recorded count.
    let server = Server::start_in(data, &["--jwt-secret", SECRET], &[]);
    assert!(server.log().contains("partitions=64"), "{}", server.log());
}
