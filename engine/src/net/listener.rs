//! Client-port listeners. Each shard binds its own listening socket to the same address with
//! `SO_REUSEPORT`, so the kernel spreads new connections over the shards and no accepted socket
//! ever crosses a thread.
//!
//! # One node per port
//!
//! `SO_REUSEPORT` lets any process of the same user join the group, and the kernel would then
//! split new connections between two unrelated nodes. [`bind_shards`] keeps the group to this
//! process in two steps:
//!
//! 1. It claims the port among chinwag nodes on the host: an abstract Unix socket named
//!    `chinwag-port-<port>` is bound, which the kernel allows once per network namespace (the
//!    scope of the TCP port) and releases when the process ends, however it ends. A second
//!    node fails here, whatever the timing of the two starts.
//! 2. It probes the address with a plain bind (no `SO_REUSEPORT`), which fails if any socket
//!    listens there: another program, or a node that does not claim ports.
//!
//! Only then are the shards' sockets bound. The claim is per port, not per address: two nodes
//! on one host cannot share a port number even on different local addresses.

use std::io;
use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};

use socket2::{Domain, Socket, Type};

/// Backlog of not-yet-accepted connections per shard; the kernel caps it at `somaxconn`.
const BACKLOG: i32 = 4096;

/// This process's claim on a port; dropping it (or exiting) releases the port to other nodes.
#[derive(Debug)]
pub struct PortClaim(#[allow(dead_code)] UnixListener);

/// Binds `count` non-blocking listeners on `addr` (port 0: one the kernel picks), one per
/// shard, that no other process can join. Returns them, the bound address and the claim to
/// keep for as long as they listen. An address taken by another node or program fails with
/// [`io::ErrorKind::AddrInUse`] and a message naming it.
pub fn bind_shards(
    addr: SocketAddr,
    count: usize,
) -> io::Result<(Vec<mio::net::TcpListener>, SocketAddr, PortClaim)> {
    let early = if addr.port() == 0 {
        None
    } else {
        let claim = claim(addr)?;
        probe(addr)?;
        Some(claim)
    };
    let first = bind(addr)?;
    let bound = first.local_addr()?;
    // A port the kernel just picked was free; claim it now that its number is known.
    let claim = match early {
        Some(claim) => claim,
        None => claim(bound)?,
    };
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(bind(bound)?);
    }
    Ok((listeners, bound, claim))
}

fn claim(addr: SocketAddr) -> io::Result<PortClaim> {
    let name = format!("chinwag-port-{}", addr.port());
    let unix = UnixAddr::from_abstract_name(name.as_bytes())?;
    match UnixListener::bind_addr(&unix) {
        Ok(listener) => Ok(PortClaim(listener)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{addr}: another chinwag node on this host serves port {}",
                addr.port()
            ),
        )),
        Err(e) => Err(e),
    }
}

fn probe(addr: SocketAddr) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // SO_REUSEADDR only lets the probe past connections of an earlier run still in TIME_WAIT;
    // a listening socket on the address still makes it fail.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into()).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{addr}: address already in use"),
            )
        } else {
            e
        }
    })
}

/// Binds a non-blocking listener on `addr` that other shards may bind too (unclaimed: use
/// [`bind_shards`] for a node).
pub(crate) fn bind(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_group_on_the_same_port_is_refused() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (_listeners, addr, claim) = bind_shards(any, 2).unwrap();
        let err = bind_shards(addr, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("another chinwag"), "{err}");
        drop(claim);
        // Without the claim the plain-bind probe still sees the listeners.
        let err = bind_shards(addr, 2).unwrap_err();
        assert!(err.to_string().contains("already in use"), "{err}");
    }
}
