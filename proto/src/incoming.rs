//! The connections a gRPC server accepts: Nagle's algorithm off, a cap on how many are open,
//! and a deadline for each new one's first bytes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The connections `listener` accepts, for tonic's `serve_with_incoming*`:
/// - with Nagle's algorithm off. Tonic applies its own `tcp_nodelay` only to listeners it binds
///   itself; without this, a small response written in two parts waits for the peer's delayed
///   ACK (40 ms on Linux), which showed as a 45 ms p99 on reads;
/// - at most `max_connections` open at once: past it, new connections wait in the listen
///   backlog until one closes;
/// - each sending its first [`FIRST_BYTES`] bytes (the HTTP/2 preface; a TLS ClientHello is
///   longer) within `first_bytes`, or failing its reads: a connection that sends nothing, or
///   half a preface, holds no place. Neither hyper's HTTP/2 handshake nor its keepalive pings
///   bound that wait.
pub fn incoming(
    listener: tokio::net::TcpListener,
    max_connections: usize,
    first_bytes: Duration,
) -> impl tokio_stream::Stream<Item = io::Result<Connection>> {
    let places = Arc::new(tokio::sync::Semaphore::new(
        max_connections.clamp(1, MAX_CONNECTIONS),
    ));
    futures::stream::unfold((listener, places), move |(listener, places)| async move {
        let place = Arc::clone(&places).acquire_owned().await.ok()?;
        let accepted = match listener.accept().await {
            Ok((tcp, _)) => {
                // Fails only on a socket the peer has already closed; serving it fails next.
                let _ = tcp.set_nodelay(true);
                Ok(Connection {
                    tcp,
                    _place: place,
                    awaiting: FIRST_BYTES,
                    deadline: Some(Box::pin(tokio::time::sleep(first_bytes))),
                })
            }
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted: the
                // listener is fine, but trying again at once would spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(e)
            }
        };
        Some((accepted, (listener, places)))
    })
}

/// The largest connection cap a server takes.
pub const MAX_CONNECTIONS: usize = 1 << 20;

/// The bytes a new connection must send within the first-bytes time: the HTTP/2 preface.
pub const FIRST_BYTES: usize = 24;

/// An accepted connection, holding its place among `max_connections` until it closes.
#[derive(Debug)]
pub struct Connection {
    tcp: tokio::net::TcpStream,
    _place: tokio::sync::OwnedSemaphorePermit,
    /// Of the first bytes, those not read yet.
    awaiting: usize,
    /// When reads fail if the first bytes have not all come; dropped once they have.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(deadline) = this.deadline.as_mut() else {
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                this.awaiting = this.awaiting.saturating_sub(read);
                // At the end of the stream too: the connection is over.
                if this.awaiting == 0 || read == 0 {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "a new connection sent too little in its first-bytes time",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}
