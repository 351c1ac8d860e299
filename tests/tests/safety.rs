//! Day-one safety (issue 9), against the real binary: one node per data directory and per
//! port, real secrets, idempotency per conversation, stable placement, no disk growth from
//! restarts, login refusals and a drain that load balancers can see.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chinwag_tests::{binary, Server, WAIT};

const SECRET: &str = "safety-secret-safety-secret-safety";

/// Runs `chinwag serve ARGS` and waits (at most `WAIT`) for it to exit; returns its exit code
/// (`None` if it was still running, and was killed) and its stderr.
fn serve_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(binary());
    command.arg("serve").args(args);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("CHINWAG_")) {
        command.env_remove(key);
    }
    command.envs(env.iter().copied());
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chinwag");
    let stderr = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.push(line);
        }
        lines.join("\n")
    });
    let deadline = Instant::now() + WAIT;
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, reader.join().unwrap())
}

#[test]
fn issue_9_a_second_node_on_one_data_directory_is_refused() {
    let first = Server::start(&["--jwt-secret", SECRET]);
    let dir = first.data_dir.path().to_str().unwrap().to_string();
    let (code, log) = serve_to_exit(
        &[
            "--listen=127.0.0.1:0",
            "--shards=2",
            "--data-dir",
            &dir,
            "--jwt-secret",
            SECRET,
        ],
        &[],
    );
    assert_eq!(code, Some(2), "the second node must exit 2; log:\n{log}");
    assert!(log.contains(&dir), "names the directory: {log}");
    assert!(
        log.contains(&format!("pid {}", first.pid())),
        "names the holder: {log}"
    );
    // The first node is unharmed.
    assert_eq!(first.get("/healthz").0, 200);
}

#[test]
fn issue_9_a_second_node_on_one_port_is_refused() {
    let first = Server::start(&["--jwt-secret", SECRET]);
    let other = tempfile::tempdir().unwrap();
    let listen = format!("--listen={}", first.addr);
    let (code, log) = serve_to_exit(
        &[
            &listen,
            "--shards=2",
            "--data-dir",
            other.path().to_str().unwrap(),
            "--jwt-secret",
            "another-secret-another-secret-another",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "the second node must exit 2; log:\n{log}");
    assert!(
        log.contains(&first.addr.to_string()),
        "names the address: {log}"
    );
    assert_eq!(first.get("/healthz").0, 200);
}

#[test]
fn issue_9_empty_and_short_secrets_are_refused_from_every_source() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let base = ["--listen=127.0.0.1:0", "--shards=1", "--data-dir", data_dir];
    let short_file = dir.path().join("short");
    std::fs::write(&short_file, "x\n").unwrap();
    let short_file = format!("--jwt-secret-file={}", short_file.display());
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case<'_>; 5] = [
        (&["--jwt-secret", ""], &[]),
        (&["--jwt-secret", "x"], &[]),
        (&["--jwt-secret", &SECRET[..31]], &[]),
        (&[], &[("CHINWAG_JWT_SECRET", "")]),
        (&[&short_file], &[]),
    ];
    for (args, env) in cases {
        let all: Vec<&str> = base.iter().chain(args).copied().collect();
        let (code, log) = serve_to_exit(&all, env);
        assert_eq!(
            code,
            Some(2),
            "{args:?} {env:?} must be refused; log:\n{log}"
        );
        assert!(log.contains("openssl rand"), "says how to make one: {log}");
    }
    let help = Command::new(binary())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("visible to other local users"), "{help}");
    assert!(help.contains("--jwt-secret-file"), "{help}");
}

#[test]
fn a_secret_file_and_the_generated_secret_mint_tokens_the_node_accepts() {
    use chinwag_protocol::client::{Client, Encoding};
    use chinwag_protocol::DeviceType;
    // Generated: `chinwag token --data-dir` reads it while the node holds the directory.
    let server = Server::start(&[]);
    let token = |args: &[&str]| {
        let out = Command::new(binary())
            .arg("token")
            .args(args)
            .args(["--uid", "buyer:1"])
            .env_remove("CHINWAG_JWT_SECRET")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let dir = server.data_dir.path().to_str().unwrap().to_string();
    let mut client = Client::connect(&server.ws_url(), Encoding::Json).unwrap();
    client
        .login(&token(&["--data-dir", &dir]), DeviceType::Web)
        .expect("token from --data-dir accepted");
    drop(server);
    // From a file, given to both.
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let file = file.to_str().unwrap();
    let server = Server::start(&[&format!("--jwt-secret-file={file}")]);
    let mut client = Client::connect(&server.ws_url(), Encoding::Json).unwrap();
    client
        .login(&token(&["--secret-file", file]), DeviceType::Web)
        .expect("token from --secret-file accepted");
    let short = Command::new(binary())
        .args(["token", "--secret", "short", "--uid", "buyer:1"])
        .env_remove("CHINWAG_JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(short.status.code(), Some(2));
}

#[test]
fn an_explicit_shard_count_other_than_the_recorded_one_is_refused_and_0_takes_it() {
    let small = "--log-segment-bytes=1048576";
    let server = Server::start(&["--jwt-secret", SECRET, "--shards=3", small]);
    server.signal(libc::SIGTERM);
    let dir = server.into_data_dir();
    let path = dir.path().to_str().unwrap();
    let (code, log) = serve_to_exit(
        &[
            "--listen=127.0.0.1:0",
            "--shards=2",
            "--data-dir",
            path,
            "--jwt-secret",
            SECRET,
            small,
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("--shards 3"), "{log}");
    let server = Server::start_in(dir, &["--jwt-secret", SECRET, "--shards=0", small], &[]);
    assert!(
        server.log().contains("shards=3"),
        "0 takes the recorded count: {}",
        server.log()
    );
}

#[test]
fn a_data_directory_of_the_old_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shards"), "2\n").unwrap();
    std::fs::create_dir(dir.path().join("shard-0")).unwrap();
    let (code, log) = serve_to_exit(
        &[
            "--listen=127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--jwt-secret",
            SECRET,
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("data format 1"), "{log}");
}
