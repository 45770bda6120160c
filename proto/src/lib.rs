//! Causeway's wire formats, generated from `proto/causeway/v1/*.proto` with prost and tonic.
//!
//! # Layout
//! - [`v1`]: the `Transaction` record of the log (`txlog.proto`); the `ConfigManager` service
//!   (`cluster.proto`): registration, heartbeats, `GetConfig`, `Watch` and the admin calls; the
//!   `StoreNode` service (`node.proto`): gossip, replica sub-reads and coordinated reads.
//! - [`incoming`]: the connections a gRPC server of ours accepts.
//! - [`link`]: how our processes authenticate each other (mutual TLS, the cluster secret, the
//!   admin token).

pub mod link;

/// Version 1 of the wire formats.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("causeway.v1");

    /// The transaction record format this build writes.
    pub const TRANSACTION_FORMAT_VERSION: u32 = 3;

    /// The first format whose records begin document histories whose store changes share one
    /// automerge actor (earlier ones give each mutation its own). The fields are those of
    /// format 2: the version tells a build that applies histories the old way to stop rather
    /// than make other bytes than its replicas.
    pub const FORMAT_HISTORY_ACTORS: u32 = 3;

    /// Whether this build applies records of format `version`. Format 1 records (without
    /// conditions, limits or idempotency keys) read as format 2 ones.
    pub fn transaction_format_supported(version: u32) -> bool {
        matches!(version, 1..=3)
    }
}

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
    first_bytes: std::time::Duration,
) -> impl tokio_stream::Stream<Item = std::io::Result<Connection>> {
    let places = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    futures::stream::unfold((listener, places), move |(listener, places)| async move {
        let place = std::sync::Arc::clone(&places).acquire_owned().await.ok()?;
        let accepted = match listener.accept().await {
            Ok((tcp, _)) => {
                // Fails only on a socket the peer has already closed; serving it fails next.
                let _ = tcp.set_nodelay(true);
                Ok(Connection {
                    tcp,
                    _place: place,
                    awaiting: FIRST_BYTES,
                    deadline: Box::pin(tokio::time::sleep(first_bytes)),
                })
            }
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted: the
                // listener is fine, but trying again at once would spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                Err(e)
            }
        };
        Some((accepted, (listener, places)))
    })
}

/// The bytes a new connection must send within the first-bytes time: the HTTP/2 preface.
pub const FIRST_BYTES: usize = 24;

/// An accepted connection, holding its place among `max_connections` until it closes.
#[derive(Debug)]
pub struct Connection {
    tcp: tokio::net::TcpStream,
    _place: tokio::sync::OwnedSemaphorePermit,
    /// Of the first bytes, those not read yet.
    awaiting: usize,
    /// When reads fail if the first bytes have not all come.
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        if this.awaiting == 0 {
            return std::pin::Pin::new(&mut this.tcp).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                this.awaiting = this.awaiting.saturating_sub(read);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "a new connection sent too little in its first-bytes time",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
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
