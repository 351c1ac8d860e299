//! SIGTERM: stop accepting, close connections with 1001, exit 0.

use chinwag_tests::{ws_close_code, Server};
use tungstenite::Message;

#[test]
fn sigterm_closes_with_1001_and_exits_zero() {
    let mut server = Server::start(&["--enable-echo"]);
    let mut clients: Vec<_> = (0..4).map(|_| server.ws("/echo")).collect();
    for ws in &mut clients {
        ws.send(Message::text("before")).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text("before"));
    }
    server.signal(libc::SIGTERM);
    for ws in &mut clients {
        assert_eq!(ws_close_code(ws), Some(1001));
    }
    let status = server.wait_exit();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        server.log()
    );
    assert!(server.try_ws("/echo").is_err(), "no longer accepting");
}
