//! Accepting connections: TCP or Unix sockets, plain or TLS, with a bound on open connections and
//! a deadline for a new connection to complete its handshake and send its first request.
//!
//! Without the bound and the deadline, connections that never send a byte (or only the HTTP/2
//! preface) stay open for ever, a few KiB and one file descriptor each: an easy way to use up the
//! descriptors that real proxies need. A connection past the maximum is accepted and closed at
//! once (refusing it at the TCP level would leave it in the kernel's backlog), and counted.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::ConnMetrics;

/// Limits of one listening port.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Time a new connection has to complete its handshake (TLS included) and send its first
    /// request.
    pub first_request_timeout: Duration,
}

/// Where connections come from.
pub enum Listener {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A Unix socket (the sidecar agent's SDS).
    Unix(UnixListener),
}

/// Who is on the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A local process on a Unix socket.
    Unix,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// An accepted connection, before any TLS.
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix socket.
    Unix(UnixStream),
}

/// A connection as HTTP sees it: plain, or TLS (boxed: a TLS session is several KiB, and most
/// connections of a plain port never have one).
pub enum Io {
    /// Plain.
    Plain(Stream),
    /// TLS.
    Tls(Box<tokio_rustls::server::TlsStream<Stream>>),
}

macro_rules! delegate {
    ($ty:ident { $($variant:ident),* }) => {
        impl AsyncRead for $ty {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() { $($ty::$variant(s) => Pin::new(s).poll_read(cx, buf),)* }
            }
        }
        impl AsyncWrite for $ty {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() { $($ty::$variant(s) => Pin::new(s).poll_write(cx, buf),)* }
            }
            fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
                match self.get_mut() { $($ty::$variant(s) => Pin::new(s).poll_write_vectored(cx, bufs),)* }
            }
            fn is_write_vectored(&self) -> bool {
                match self { $($ty::$variant(s) => s.is_write_vectored(),)* }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() { $($ty::$variant(s) => Pin::new(s).poll_flush(cx),)* }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() { $($ty::$variant(s) => Pin::new(s).poll_shutdown(cx),)* }
            }
        }
    };
}

delegate!(Stream { Tcp, Unix });
delegate!(Io { Plain, Tls });

impl Io {
    /// The certificates the peer presented (TLS with client certificates only).
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        match self {
            Io::Tls(s) => s.get_ref().1.peer_certificates(),
            Io::Plain(_) => None,
        }
    }
}

/// Accepts connections on one port within its [`Limits`].
pub struct Acceptor {
    listener: Listener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    slots: Arc<Semaphore>,
    metrics: Arc<ConnMetrics>,
    /// For logs: `xds`, `http`, `ca`, `sds`.
    port: &'static str,
}

/// The place of one open connection; dropping it makes room for the next.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<ConnMetrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.open.dec();
    }
}

/// Set by a connection's service when its first request arrives.
#[derive(Debug, Clone, Default)]
pub struct FirstRequest(Arc<AtomicBool>);

impl FirstRequest {
    /// Records that a request arrived.
    pub fn seen(&self) {
        if !self.0.load(Ordering::Relaxed) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    fn arrived(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Acceptor {
    /// Accepts on `listener` within `limits`.
    pub fn new(
        listener: impl Into<Listener>,
        limits: Limits,
        metrics: Arc<ConnMetrics>,
        port: &'static str,
    ) -> Self {
        Acceptor {
            listener: listener.into(),
            tls: None,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            metrics,
            port,
        }
    }

    /// Connections speak TLS with `config`.
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tokio_rustls::TlsAcceptor::from(config));
        self
    }

    /// The TCP address the listener is bound to (`None` for a Unix socket).
    pub fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().map(Some),
            Listener::Unix(_) => Ok(None),
        }
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    async fn accept_raw(&self) -> io::Result<(Stream, Peer)> {
        match &self.listener {
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), Peer::Tcp(a)))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), Peer::Unix))
            }
        }
    }

    /// The next connection within the limits; connections past the maximum are closed here.
    pub async fn accept(&self) -> (Stream, Peer, Slot) {
        loop {
            let (stream, peer) = match self.accept_raw().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(port = self.port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            self.metrics.accepted.inc();
            match self.slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    self.metrics.open.inc();
                    return (
                        stream,
                        peer,
                        Slot {
                            _permit: permit,
                            metrics: self.metrics.clone(),
                        },
                    );
                }
                Err(_) => {
                    self.metrics.refused.inc();
                    tracing::debug!(port = self.port, %peer, max = self.limits.max_connections, "connection refused: too many open connections");
                    drop(stream);
                }
            }
        }
    }

    /// Serves one accepted connection on a task of its own: the TLS handshake if the port speaks
    /// TLS, then `serve(io, first)`, whose service must call [`FirstRequest::seen`] on each
    /// request. The connection is closed if no request arrived within the deadline (handshake
    /// included); connections of real clients are not affected once their first request is in.
    ///
    /// `serve` should return a combinator or hand-written future, not an `async` block over the
    /// connection, which the compiler lays out with room for the connection twice.
    pub fn spawn<F, C>(&self, stream: Stream, peer: Peer, slot: Slot, serve: F)
    where
        F: FnOnce(Io, FirstRequest) -> C + Send + 'static,
        C: Future + Send + 'static,
    {
        let deadline = tokio::time::Instant::now() + self.limits.first_request_timeout;
        let port = self.port;
        let first = FirstRequest::default();
        match &self.tls {
            None => {
                let conn = serve(Io::Plain(stream), first.clone());
                tokio::spawn(Guarded::new(conn, deadline, first, slot, peer, port));
            }
            Some(tls) => {
                let handshake = tls.accept(stream);
                tokio::spawn(async move {
                    let io = match tokio::time::timeout_at(deadline, handshake).await {
                        Ok(Ok(s)) => Io::Tls(Box::new(s)),
                        Ok(Err(e)) => {
                            tracing::debug!(port, %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            slot.metrics.silent.inc();
                            tracing::debug!(port, %peer, "connection closed: no TLS handshake within the deadline");
                            return;
                        }
                    };
                    Guarded::new(serve(io, first.clone()), deadline, first, slot, peer, port).await;
                });
            }
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Listener::Unix(l)
    }
}

pin_project_lite::pin_project! {
    /// A connection with its slot and its first-request deadline. A hand-written future rather
    /// than an `async` block: the compiler lays an `async` block that selects over the connection
    /// out with room for it twice, and a connection is kept for hours by every proxy.
    pub struct Guarded<C> {
        #[pin]
        conn: C,
        #[pin]
        deadline: Option<tokio::time::Sleep>,
        first: FirstRequest,
        slot: Slot,
        peer: Peer,
        port: &'static str,
    }
}

impl<C: Future> Guarded<C> {
    fn new(
        conn: C,
        deadline: tokio::time::Instant,
        first: FirstRequest,
        slot: Slot,
        peer: Peer,
        port: &'static str,
    ) -> Self {
        Guarded {
            conn,
            deadline: Some(tokio::time::sleep_until(deadline)),
            first,
            slot,
            peer,
            port,
        }
    }
}

impl<C: Future> Future for Guarded<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.conn.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if let Some(deadline) = this.deadline.as_mut().as_pin_mut() {
            if deadline.poll(cx).is_ready() {
                if !this.first.arrived() {
                    this.slot.metrics.silent.inc();
                    tracing::debug!(port = *this.port, peer = %this.peer, "connection closed: no request within the deadline");
                    return Poll::Ready(());
                }
                this.deadline.set(None);
            }
        }
        Poll::Pending
    }
}

/// Connections the kernel queues for `accept` on our TCP ports (capped by `net.core.somaxconn`).
/// tokio's `TcpListener::bind` asks for 1,024: when ten thousand proxies reconnect at once after a
/// restart, the queue overflows faster than a busy accept loop drains it, and the kernel drops the
/// handshakes it has no room for (the clients see resets and retry, adding to the herd).
pub const ACCEPT_BACKLOG: u32 = 16_384;

/// Binds a TCP listener on `addr` with [`ACCEPT_BACKLOG`] (and `SO_REUSEADDR`, as `bind` does).
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Binds a Unix socket at `path` (replacing a stale one) with mode 0600: only the owner (the
/// sidecar's Envoy runs as the same user, or root) may connect.
pub fn bind_unix(path: &std::path::Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}
