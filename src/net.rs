//! Accepting connections on the REST and xDS ports: a bound on open connections, and a deadline
//! for a new connection to send its first request.
//!
//! Without them, connections that never send a byte (or only the HTTP/2 preface) stay open for
//! ever, a few KiB and one file descriptor each: an easy way to use up the descriptors that real
//! proxies need. A connection past the maximum is accepted and closed at once (refusing it at the
//! TCP level would leave it in the kernel's backlog), and counted.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::ConnMetrics;

/// Limits of one listening port.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Time a new connection has to complete its handshake and send its first request.
    pub first_request_timeout: Duration,
}

/// Accepts connections on one port within its [`Limits`].
pub struct Acceptor {
    listener: TcpListener,
    limits: Limits,
    slots: Arc<Semaphore>,
    metrics: Arc<ConnMetrics>,
    /// For logs: `xds`, `http`.
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
        listener: TcpListener,
        limits: Limits,
        metrics: Arc<ConnMetrics>,
        port: &'static str,
    ) -> Self {
        Acceptor {
            listener,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            metrics,
            port,
        }
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The next connection within the limits; connections past the maximum are closed here.
    pub async fn accept(&self) -> (TcpStream, SocketAddr, Slot) {
        loop {
            let (tcp, peer) = match self.listener.accept().await {
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
                    let _ = tcp.set_nodelay(true);
                    return (
                        tcp,
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
                    drop(tcp);
                }
            }
        }
    }

    /// Runs one connection until it ends, closing it if no request arrived within the deadline.
    /// Long-lived connections of real clients are not affected once their first request is in.
    pub fn run_connection<C: Future>(
        &self,
        conn: C,
        first: FirstRequest,
        slot: Slot,
        peer: SocketAddr,
    ) -> Guarded<C> {
        Guarded {
            conn,
            deadline: Some(tokio::time::sleep(self.limits.first_request_timeout)),
            first,
            slot,
            peer,
            port: self.port,
        }
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
        peer: SocketAddr,
        port: &'static str,
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
