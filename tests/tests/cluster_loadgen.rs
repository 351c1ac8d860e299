//! `chinwag-loadgen --addr A,B`: the address list of a cluster's clients, checked on one node
//! so that it needs no Redis. Address A is a relay in front of the node (tests/src/cluster.rs
//! `Relay`) that the test kills mid-load, as a node dies; the users on it must move to B, catch
//! up with `history`, and the checker must still see every acknowledged message of every
//! conversation once and in order.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chinwag_tests::cluster::{LoadgenRun, Relay};
use chinwag_tests::Server;

const SECRET: &str = "loadgen-secret-loadgen-secret-loadgen";

#[test]
fn chat_users_of_a_dead_address_move_to_the_next_and_miss_nothing() {
    let server = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--messages-per-s-max=0",
        "--fsync=never",
    ]);
    let mut relay = Relay::start(server.addr);
    let addrs = format!("{},{}", relay.addr, server.addr);
    // 40 users: the even ones (one member of each conversation) reach the node through the
    // relay, the odd ones directly.
    let run = LoadgenRun::start(&[
        "chat",
        "--addr",
        &addrs,
        "--secret",
        SECRET,
        "--conversations",
        "20",
        "--window",
        "2",
        "--warmup-s",
        "0",
        "--duration-s",
        "4",
        "--drain-s",
        "20",
    ]);
    // Kill the relay once chat traffic flows through it (well past the logins' bytes).
    let deadline = Instant::now() + Duration::from_secs(60);
    while relay.bytes_down.load(Ordering::Relaxed) < 50_000 {
        assert!(
            Instant::now() < deadline,
            "no chat traffic through the relay"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    relay.kill();
    let (code, report) = run.finish();

    assert_eq!(report["violations"], 0, "{report}");
    assert_eq!(report["not_caught_up_at_end"], 0, "{report}");
    assert_eq!(
        report["reconnects"], 20,
        "every user of the relay moved on: {report}"
    );
    assert!(
        report["history_pages"].as_u64().unwrap() >= 20,
        "each caught up with history: {report}"
    );
    let sent = report["sent"].as_u64().unwrap();
    assert!(
        sent > 0 && report["send_ok"].as_u64().unwrap() > 0,
        "{report}"
    );
    // The only failures are the relayed connections ending, and reconnects the dead relay
    // refused.
    let failures = report["failures"].as_object().expect("failures by cause");
    for (cause, _) in failures {
        assert!(
            [
                "eof",
                "closed by server",
                "connect",
                "io",
                "upgrade refused"
            ]
            .iter()
            .any(|ok| cause.starts_with(ok)),
            "unexpected failure {cause}: {report}"
        );
    }
    assert_eq!(code, Some(1), "connections failed, so the run says so");
}
