//! Client-port listeners. Each shard binds its own listening socket to the same address with
//! `SO_REUSEPORT`, so the kernel spreads new connections over the shards and no accepted socket
//! ever crosses a thread.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};

/// Backlog of not-yet-accepted connections per shard; the kernel caps it at `somaxconn`.
const BACKLOG: i32 = 4096;

/// Binds a non-blocking listener on `addr` that other shards may bind too.
pub fn bind(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}
