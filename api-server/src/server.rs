//! The HTTP server's accept loop: at most `max_connections` connections open (a connection past
//! it waits in the listen backlog until one closes), TLS when `https` is set (the handshake
//! bounded by `header_read_ms`), the first bytes of each within `header_read_ms` too, then
//! HTTP/1.1 or HTTP/2 (`hyper_util`'s auto builder), request heads bounded by `header_read_ms`,
//! and a graceful stop.
//!
//! [`ProblemIo`] sits between hyper and the socket: hyper answers a request it cannot parse
//! (`Content-Length: abc`, a target over 64 KiB, a head too large) by itself, before the router,
//! with an empty body; those answers are replaced by the same status with a problem+json body
//! and `Connection: close`, so every error a client gets explains itself.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::problem::{Kind, Problem};

/// Concurrent streams of one HTTP/2 connection.
const HTTP2_MAX_STREAMS: u32 = 64;

/// The HTTP/2 connection preface: a client that sends a prefix of it may be about to speak
/// HTTP/2; anything else is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first bytes of `io`, read within `within`: enough to tell HTTP/1 from HTTP/2 (up to the
/// length of the HTTP/2 preface, or the first byte that leaves it). `None` when the peer ends
/// the connection or stays silent. Hyper's version detection reads them with no timeout of its
/// own, so a connection that sends nothing, or half the preface, would hold its place forever.
async fn first_bytes<T: AsyncRead + Unpin>(io: &mut T, within: Duration) -> Option<Vec<u8>> {
    let look = async {
        let mut first = Vec::with_capacity(H2_PREFACE.len());
        let mut buf = [0u8; H2_PREFACE.len()];
        while first.len() < H2_PREFACE.len() && first[..] == H2_PREFACE[..first.len()] {
            let n = io
                .read(&mut buf[..H2_PREFACE.len() - first.len()])
                .await
                .ok()?;
            if n == 0 {
                return None;
            }
            first.extend_from_slice(&buf[..n]);
        }
        Some(first)
    };
    tokio::time::timeout(within, look).await.ok().flatten()
}

/// What the accept loop needs.
pub(crate) struct Listener {
    pub(crate) listener: TcpListener,
    pub(crate) tls: Option<Arc<ServerConfig>>,
    pub(crate) max_connections: usize,
    pub(crate) header_read: Duration,
}

/// Serves `app` on the listener until `stop` says stop, then stops accepting and waits for the
/// open connections to finish their requests (the caller bounds that wait).
pub(crate) async fn serve(
    listener: Listener,
    app: Router,
    stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut stop = stop;
    let mut stopped = std::pin::pin!(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    let Listener {
        listener,
        tls,
        max_connections,
        header_read,
    } = listener;
    let connections = Arc::new(Semaphore::new(max_connections));
    let acceptor = tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read);
    // HTTP/2 has no head timeout: pings find dead peers, and streams per connection are
    // bounded (each may hold a body of `max_body_bytes`).
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(header_read))
        .keep_alive_timeout(header_read)
        .max_concurrent_streams(HTTP2_MAX_STREAMS);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => {
                permit.map_err(|_| io::Error::other("the connection limit closed"))?
            }
            () = &mut stopped => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => tcp,
                Err(e) => {
                    // Out of file descriptors or a connection reset before it was accepted:
                    // the listener itself is fine; wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        // Small responses must not wait for the client's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let result = match acceptor {
                None => serve_connection(tcp, header_read, &builder, service, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(header_read, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            serve_connection(tls, header_read, &builder, service, watcher).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Serves one connection (plaintext, or TLS after its handshake) once it has shown its first
/// bytes within `header_read`.
async fn serve_connection<T>(
    mut io: T,
    header_read: Duration,
    builder: &auto::Builder<TokioExecutor>,
    service: TowerToHyperService<Router>,
    watcher: Watcher,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(first) = first_bytes(&mut io, header_read).await else {
        return Ok(());
    };
    let conn = builder
        .serve_connection(TokioIo::new(ProblemIo::new(io, first)), service)
        .into_owned();
    watcher.watch(conn).await
}

/// A connection's socket as hyper sees it: the first bytes, read to tell the protocol,
/// replayed before the rest; and hyper's own answers to requests it cannot parse
/// (400, 414, 431 with an empty body) are replaced by the same status with a problem+json body
/// and `Connection: close` (hyper closes the connection after them anyway).
#[derive(Debug)]
pub(crate) struct ProblemIo<T> {
    inner: T,
    /// Bytes read before hyper took the connection, for hyper to read first.
    unread: Vec<u8>,
    /// A replacement answer still to write, and how much of it is written.
    pending: Vec<u8>,
    written: usize,
}

impl<T> ProblemIo<T> {
    pub(crate) fn new(inner: T, unread: Vec<u8>) -> ProblemIo<T> {
        ProblemIo {
            inner,
            unread,
            pending: Vec::new(),
            written: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> ProblemIo<T> {
    /// Writes what is left of a replacement answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes `replacement` in place of hyper's `len` bytes.
    fn replace(
        &mut self,
        cx: &mut Context<'_>,
        replacement: Vec<u8>,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        self.pending = replacement;
        self.written = 0;
        // What cannot be written now is written by the next write, flush or shutdown.
        if let Poll::Ready(Err(e)) = self.poll_pending(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(len))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ProblemIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread[..n]);
            self.unread.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ProblemIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        if let Some(replacement) = problem_answer(buf) {
            return this.replace(cx, replacement, buf.len());
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if len <= MAX_HYPER_ANSWER {
            let whole: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            if let Some(replacement) = problem_answer(&whole) {
                return this.replace(cx, replacement, len);
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// hyper's answers to unparsable requests are a status line and a few headers, well below this.
const MAX_HYPER_ANSWER: usize = 512;

/// When `bytes` are one of hyper's own answers to an unparsable request (a 400, 414 or 431 head
/// with `content-length: 0`, no `content-type` and nothing after it: every answer of the router
/// has a content type), the same answer with a problem+json body and `Connection: close`.
fn problem_answer(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.len() > MAX_HYPER_ANSWER || !bytes.starts_with(b"HTTP/1.") {
        return None;
    }
    let head = std::str::from_utf8(bytes).ok()?.strip_suffix("\r\n\r\n")?;
    if head.contains("\r\n\r\n") {
        return None;
    }
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let code = status_line.split(' ').nth(1)?;
    let problem = match code {
        "400" => Problem::new(
            Kind::MalformedRequest,
            "the request is not valid HTTP/1.1: its request line or a header (such as \
             Content-Length) cannot be parsed",
        ),
        "414" => Problem::new(
            Kind::UriTooLong,
            "the request target is longer than the server reads (64 KiB); document ids are far \
             shorter",
        ),
        "431" => Problem::new(
            Kind::HeadersTooLarge,
            "the request head has more or larger headers than the server reads",
        ),
        _ => return None,
    };
    let mut has_empty_length = false;
    let mut kept = Vec::new();
    for line in lines {
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("content-type") {
            return None;
        }
        if name.eq_ignore_ascii_case("content-length") {
            has_empty_length = line[name.len() + 1..].trim() == "0";
        } else if !name.eq_ignore_ascii_case("connection") {
            kept.push(line);
        }
    }
    if !has_empty_length {
        return None;
    }
    let body = serde_json::to_vec(&problem.body()).ok()?;
    let mut out = Vec::with_capacity(head.len() + body.len() + 128);
    out.extend_from_slice(status_line.as_bytes());
    out.extend_from_slice(b"\r\n");
    for line in kept {
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"content-type: application/problem+json\r\nconnection: close\r\n");
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(&body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_empty_error_heads_are_replaced() {
        let hyper_414 = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Sat, 06 Dec 2025 12:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(problem_answer(hyper_414).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"));
        assert!(head.contains("date: Sat"));
        assert!(head.contains("content-type: application/problem+json"));
        assert!(head.contains("connection: close"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(!head.contains("content-length: 0"));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["type"], "urn:causeway:problem:uri_too_long");
        assert_eq!(json["status"], 414);

        // The router's own answers have a content type, a body, or another status.
        for bytes in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 5\r\n\r\n",
            b"not http",
        ] {
            assert!(problem_answer(bytes).is_none(), "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}
