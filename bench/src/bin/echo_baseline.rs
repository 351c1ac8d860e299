//! The baseline for chinwag's echo benchmark: a WebSocket echo server written the usual way
//! with tokio-tungstenite, as fairly tuned as chinwag's own setup — one current-thread runtime
//! per core, each with its own `SO_REUSEPORT` listener (no work stealing, no cross-thread
//! wake-ups), a 4 KiB read buffer, `TCP_NODELAY`.
//!
//!   echo-baseline [ADDR] [THREADS]     (defaults: 127.0.0.1:7100, one per core)

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use socket2::{Domain, Socket, Type};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .as_deref()
        .unwrap_or("127.0.0.1:7100")
        .parse()
        .expect("ADDR");
    let threads = match args.next() {
        Some(n) => n.parse().expect("THREADS"),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut handles = Vec::new();
    for _ in 0..threads {
        let listener = bind(addr)?;
        handles.push(std::thread::spawn(move || serve(listener)));
    }
    eprintln!("echo-baseline: listening addr={addr} threads={threads}");
    for handle in handles {
        handle.join().expect("thread")?;
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

fn serve(listener: std::net::TcpListener) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::task::spawn_local(async move {
                let config = WebSocketConfig::default().read_buffer_size(4096);
                let Ok(mut ws) =
                    tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
                else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    })
}
