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
    // The flag overrides the file; the environment overrides the flag.
    let server = Server::start(&[&config, "--enable-echo=false"]);
    assert!(server.try_ws("/echo").is_err());
    let server = Server::start_with_env(
        &[&config, "--enable-echo=false"],
        &[("CHINWAG_ENABLE_ECHO", "true")],
    );
    assert!(server.try_ws("/echo").is_ok());
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
