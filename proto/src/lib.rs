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
/// - each showing its first bytes within `first_bytes`, or closed: a connection that sends
///   nothing holds no place.
///
/// The accept loop ends when the server drops the stream.
pub fn incoming(
    listener: tokio::net::TcpListener,
    max_connections: usize,
    first_bytes: std::time::Duration,
) -> impl tokio_stream::Stream<Item = std::io::Result<Connection>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let places = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
        loop {
            let place = tokio::select! {
                place = std::sync::Arc::clone(&places).acquire_owned() => match place {
                    Ok(place) => place,
                    Err(_) => return,
                },
                () = tx.closed() => return,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            // Fails only on a socket the peer has already closed; serving it fails right after.
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            tokio::spawn(async move {
                // `peek`, not `readable`: readiness may be reported before any byte came.
                let mut byte = [0u8; 1];
                let ready = tokio::time::timeout(first_bytes, tcp.peek(&mut byte)).await;
                if matches!(ready, Ok(Ok(n)) if n > 0) {
                    let _ = tx.send(Ok(Connection { tcp, _place: place })).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// An accepted connection, holding its place among `max_connections` until it closes.
#[derive(Debug)]
pub struct Connection {
    tcp: tokio::net::TcpStream,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
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
