//! Configuration through the real binary: TOML file, flags, environment, --help.

use std::process::Command;

use chinwag_tests::{binary, Server};

#[test]
fn help_lists_every_setting() {
    let out = Command::new(binary())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--backend-listen",
        "--backend-frame-bytes-max",
        "--backend-connections-per-shard-max",
        "--data-dir",
        "--jwt-secret",
        "--jwt-secret-file",
        "--shards",
        "--fsync",
        "--enable-echo",
        "--log-level",
        "--frame-bytes-max",
        "--message-bytes-max",
        "--send-queue-bytes-max",
        "--messages-per-s-max",
        "--connections-per-shard-max",
        "--handshake-timeout-ms",
        "--idle-timeout-ms",
        "--close-timeout-ms",
        "--cmid-window-entries-max",
        "CHINWAG_",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn file_flags_and_environment_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chinwag.toml");
    std::fs::write(&path, "enable_echo = true\n").unwrap();
    let config = format!("--config={}", path.display());
    // The file turns echo on.
    let server = Server::start(&[&config]);
    assert!(server.try_ws("/echo").is_ok());
    drop(server);
    // The environment overrides the file; the flag overrides both.
    let server = Server::start_with_env(&[&config], &[("CHINWAG_ENABLE_ECHO", "false")]);
    assert!(server.try_ws("/echo").is_err());
    let server = Server::start(&[&config, "--enable-echo=false"]);
    assert!(server.try_ws("/echo").is_err());
    let server = Server::start_with_env(
        &[&config, "--enable-echo=true"],
        &[("CHINWAG_ENABLE_ECHO", "false")],
    );
    assert!(
        server.try_ws("/echo").is_ok(),
        "the flag beats the environment"
    );
}

#[test]
fn generates_jwt_secret_once_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start(&[]);
    let path = server.data_dir.path().join("jwt-secret");
    let meta = std::fs::metadata(&path).expect("secret file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn bad_config_fails_fast() {
    let out = Command::new(binary())
        .args(["serve", "--listen=127.0.0.1:0"])
        .env("CHINWAG_SHARDS", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("environment"));
}

/// Runs `chinwag serve` with `args` (and a fresh data directory unless `args` names one) until it
/// exits; returns its exit code and stderr.
fn serve_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(binary());
    command.arg("serve");
    if !args.iter().any(|a| a.starts_with("--data-dir")) {
        command.arg("--data-dir").arg(dir.path());
    }
    if !args.iter().any(|a| a.starts_with("--listen")) {
        command.arg("--listen=127.0.0.1:0");
    }
    if !args.iter().any(|a| a.starts_with("--backend-listen")) {
        command.arg("--backend-listen=127.0.0.1:0");
    }
    command.args(args);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("CHINWAG_")) {
        command.env_remove(key);
    }
    command.envs(env.iter().copied());
    let out = command.output().expect("run chinwag serve");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SECRET_ARG: &str = "--jwt-secret=config-test-secret-config-test-secret";

#[test]
fn a_fatal_start_error_reaches_stderr_whatever_the_log_level_and_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, "x").unwrap();
    let data_dir = format!("--data-dir={}", file.display());
    let (code, stderr) = serve_to_exit(&["--log-level=off", &data_dir, SECRET_ARG], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("not-a-directory"),
        "names the path: {stderr}"
    );
}

#[test]
fn an_unknown_log_level_is_refused() {
    let (code, stderr) = serve_to_exit(&["--log-level=loud", SECRET_ARG], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("log_level \"loud\""), "{stderr}");
    assert!(
        stderr.contains("off, error, warn, info, debug, trace"),
        "{stderr}"
    );
}

#[test]
fn impossible_combinations_are_refused_up_front_with_the_bound() {
    for (args, says) in [
        (
            &["--frame-bytes-max=100000"][..],
            "frame_bytes_max (100000) must be at most message_bytes_max (65536)",
        ),
        (&["--shards=300"][..], "must be at most 256"),
        (
            &[
                "--log-segment-bytes=70000",
                "--message-bytes-max=1048576",
                "--send-queue-bytes-max=4194304",
            ][..],
            "must hold the largest record: at least",
        ),
    ] {
        let mut all = args.to_vec();
        all.push(SECRET_ARG);
        let (code, stderr) = serve_to_exit(&all, &[]);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn listen_takes_a_host_name_and_says_when_the_port_is_out_of_range() {
    let (code, stderr) = serve_to_exit(&["--listen=127.0.0.1:70000", SECRET_ARG], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("out of range"), "{stderr}");
    let server = Server::start(&["--listen=localhost:0", SECRET_ARG]);
    assert!(server.addr.ip().is_loopback(), "{}", server.addr);
    assert!(server.try_ws("/ws").is_ok());
}

#[test]
fn the_start_log_shows_version_data_dir_and_config_and_warns_of_unknown_variables() {
    let secret = "visible-nowhere-visible-nowhere-visible";
    let server = Server::start_with_env(
        &[&format!("--jwt-secret={secret}")],
        &[("CHINWAG_IDLE_TIMEOUT", "5")],
    );
    let log = server.log();
    let start = log
        .lines()
        .find(|l| l.contains("starting"))
        .unwrap_or_else(|| panic!("no start line: {log}"));
    assert!(start.contains(env!("CARGO_PKG_VERSION")), "{start}");
    assert!(
        start.contains(&server.data_dir.path().display().to_string()),
        "{start}"
    );
    assert!(start.contains("idle_timeout_ms: 90000"), "{start}");
    assert!(!log.contains(secret), "the secret is redacted: {log}");
    assert!(
        log.lines()
            .any(|l| l.contains("CHINWAG_IDLE_TIMEOUT") && l.contains("WARN")),
        "{log}"
    );
    let recovered = log
        .lines()
        .find(|l| l.contains("logs recovered"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        recovered.contains("from_snapshots=") && recovered.contains("conversations="),
        "{recovered}"
    );
}

#[test]
fn metrics_include_process_figures_and_build_info() {
    let server = Server::start(&[SECRET_ARG]);
    let (status, body) = server.get("/metrics");
    assert_eq!(status, 200);
    for line in [
        "# TYPE process_resident_memory_bytes gauge",
        "# TYPE process_open_fds gauge",
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE process_start_time_seconds gauge",
        "chinwag_build_info{version=\"",
    ] {
        assert!(body.contains(line), "{line}:\n{body}");
    }
    assert!(server.metric("process_resident_memory_bytes", "") > 1_000_000);
    assert!(server.metric("process_open_fds", "") >= 3);
}

#[test]
fn metrics_count_requests_by_op_and_errors_by_code() {
    use chinwag_protocol::client::{Client, ClientError, Encoding};
    use chinwag_protocol::{ConvId, ErrorCode, History, HistoryRange, Message};
    let server = Server::start(&[SECRET_ARG]);
    let mut client = Client::connect(&server.ws_url(), Encoding::Json).unwrap();
    for _ in 0..3 {
        client.call(Message::Ping).unwrap();
    }
    // Before login: not_logged_in.
    let refused = client.call(Message::History(History {
        conv: ConvId(1),
        range: HistoryRange::Newest,
        limit: 10,
    }));
    assert!(
        matches!(refused, Err(ClientError::Rejected(ref e)) if e.code == ErrorCode::NotLoggedIn),
        "{refused:?}"
    );
    assert_eq!(server.metric("chinwag_requests_total", "op=\"ping\""), 3);
    assert_eq!(server.metric("chinwag_requests_total", "op=\"history\""), 1);
    assert_eq!(server.metric("chinwag_requests_total", "op=\"send\""), 0);
    assert_eq!(
        server.metric("chinwag_errors_total", "code=\"not_logged_in\""),
        1
    );
    assert_eq!(
        server.metric("chinwag_errors_total", "code=\"not_found\""),
        0
    );
}

#[test]
fn the_log_of_a_closed_connection_names_its_peer_and_uid() {
    use chinwag_protocol::client::{Client, Encoding};
    use chinwag_protocol::token::{self, Claims};
    use chinwag_protocol::{DeviceType, Uid, UidKind};
    let secret = "config-test-secret-config-test-secret";
    let server = Server::start(&[SECRET_ARG, "--log-level=debug"]);
    let mut client = Client::connect(&server.ws_url(), Encoding::Json).unwrap();
    let uid = Uid::new(UidKind::Buyer, 4711);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let token = token::mint(
        secret.as_bytes(),
        &Claims {
            uid,
            shop: None,
            exp,
        },
    );
    client.login(&token, DeviceType::Web).unwrap();
    let local = client.websocket().get_ref().local_addr().unwrap();
    client.close().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let line = loop {
        let log = server.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains(" closed") && l.contains("uid=buyer:4711"))
        {
            break line.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no close line: {log}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(line.contains(&format!("peer={local}")), "{line}");
    assert!(line.contains("peer_closed"), "{line}");
}

#[test]
fn metrics_give_the_send_to_send_ok_latency() {
    use chinwag_protocol::client::{Client, Encoding};
    use chinwag_protocol::token::{self, Claims};
    use chinwag_protocol::{DeviceType, Message, Send, Target, Uid, UidKind};
    let secret = "config-test-secret-config-test-secret";
    let server = Server::start(&[SECRET_ARG]);
    let mut client = Client::connect(&server.ws_url(), Encoding::Binary).unwrap();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let uid = Uid::new(UidKind::Buyer, 1);
    let token = token::mint(
        secret.as_bytes(),
        &Claims {
            uid,
            shop: None,
            exp,
        },
    );
    client.login(&token, DeviceType::Web).unwrap();
    for n in 0..5 {
        client
            .call(Message::Send(Send {
                target: Target::User(Uid::new(UidKind::Buyer, 2)),
                cmid: format!("m-{n}").into(),
                kind: "text".into(),
                body: "hi".into(),
            }))
            .unwrap();
    }
    // The shards copy their owners' figures into the metrics now and then: wait for it.
    assert_eq!(
        server.wait_metric("chinwag_send_ok_seconds_count", "", 5),
        5
    );
    assert_eq!(
        server.metric("chinwag_send_ok_seconds_bucket", "le=\"+Inf\""),
        5
    );
    let (_, body) = server.get("/metrics");
    assert!(
        body.contains("# TYPE chinwag_send_ok_seconds histogram"),
        "{body}"
    );
}
