//! Accepting connections within bounds, for every listener: at most `max`
//! open at once and `per_peer` from one client address (the ones over are
//! closed as they arrive), the first bytes within `first_bytes`, and nothing
//! received for `idle` closes a connection. Sockets that connect and say
//! nothing cannot hold the service's slots or file descriptors for long.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures_util::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::telemetry::Throttle;

/// An HTTP/2 client's first bytes: the 24-byte preface and a frame header (its SETTINGS).
const FIRST_BYTES: usize = 24 + 9;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max: usize,
    /// Connections open at once from one IP address.
    pub per_peer: usize,
    /// How long a new connection has to send its first `FIRST_BYTES` bytes
    /// (for TLS: its hello).
    pub first_bytes: Duration,
    /// How long a connection may go without receiving a byte. Live gRPC
    /// clients answer the server's keepalive pings well within it.
    pub idle: Duration,
}

/// The connections `listener` accepts within `limits`; `name` labels the metrics.
pub fn bounded(
    listener: TcpListener,
    limits: Limits,
    name: &'static str,
) -> impl Stream<Item = io::Result<BoundedStream>> + Send + 'static {
    let state = Accepting {
        listener,
        limits,
        name,
        open: Arc::new(Semaphore::new(limits.max)),
        peers: Arc::new(Mutex::new(HashMap::new())),
        refused_log: Throttle::default(),
    };
    futures_util::stream::unfold(state, |state| async move {
        let stream = state.accept().await;
        Some((Ok(stream), state))
    })
}

struct Accepting {
    listener: TcpListener,
    limits: Limits,
    name: &'static str,
    open: Arc<Semaphore>,
    /// Connections open per client address.
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    refused_log: Throttle,
}

impl Accepting {
    /// The next connection within the limits; the ones over are closed.
    async fn accept(&self) -> BoundedStream {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(_) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.open.clone().try_acquire_owned() else {
                self.refuse("max", peer.ip());
                continue;
            };
            let Some(peer_slot) = PeerSlot::take(&self.peers, peer.ip(), self.limits.per_peer) else {
                self.refuse("per_peer", peer.ip());
                continue;
            };
            // Without it a response's trailers wait for the client's delayed ACK (Nagle).
            let _ = stream.set_nodelay(true);
            metrics::gauge!("readthrough_connections_open", "listener" => self.name).increment(1.0);
            let accepted = Instant::now();
            return BoundedStream {
                stream,
                limits: self.limits,
                name: self.name,
                accepted,
                received: 0,
                last_read: accepted,
                deadline: Box::pin(tokio::time::sleep_until(accepted + self.limits.first_bytes)),
                _slot: Slot {
                    _permit: permit,
                    _peer: peer_slot,
                    name: self.name,
                },
            };
        }
    }

    fn refuse(&self, reason: &'static str, peer: IpAddr) {
        metrics::counter!("readthrough_connections_refused_total", "listener" => self.name, "reason" => reason)
            .increment(1);
        if let Some(held_back) = self.refused_log.pass(Duration::from_secs(10)) {
            tracing::warn!(listener = self.name, reason, %peer, held_back, "connection refused: over the limit");
        }
    }
}

/// One connection's place in the listener's limits, given back on drop.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _peer: PeerSlot,
    name: &'static str,
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!("readthrough_connections_open", "listener" => self.name).decrement(1.0);
    }
}

struct PeerSlot {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl PeerSlot {
    fn take(peers: &Arc<Mutex<HashMap<IpAddr, usize>>>, peer: IpAddr, per_peer: usize) -> Option<Self> {
        let mut open = peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(peer).or_insert(0);
        if *count >= per_peer {
            return None;
        }
        *count += 1;
        Some(Self {
            peers: peers.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// An accepted connection: reads fail with `TimedOut` once it is past its
/// first-bytes deadline or idle for too long, and the server closes it.
pub struct BoundedStream {
    stream: TcpStream,
    limits: Limits,
    name: &'static str,
    accepted: Instant,
    /// Bytes received, counted up to `FIRST_BYTES`.
    received: usize,
    last_read: Instant,
    /// Fires at the deadline it was last set to, which may be earlier than
    /// the current one: it is moved on only when it fires, so that a read
    /// costs no timer update.
    deadline: Pin<Box<Sleep>>,
    _slot: Slot,
}

impl BoundedStream {
    /// When the connection times out if nothing more arrives, and why.
    fn due(&self) -> (Instant, &'static str) {
        if self.received < FIRST_BYTES {
            (self.accepted + self.limits.first_bytes, "first_bytes")
        } else {
            (self.last_read + self.limits.idle, "idle")
        }
    }

    /// `Ready(error)` once the connection is past its deadline; else the
    /// timer is armed to wake this task then.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let (due, phase) = self.due();
            if Instant::now() >= due {
                metrics::counter!("readthrough_connections_timed_out_total", "listener" => self.name, "phase" => phase)
                    .increment(1);
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, format!("{phase} timeout")));
            }
            if self.deadline.deadline() < due && self.deadline.is_elapsed() {
                self.deadline.as_mut().reset(due);
            }
            match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncRead for BoundedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                if read > 0 {
                    this.received = this.received.saturating_add(read).min(FIRST_BYTES);
                    this.last_read = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => this.poll_deadline(cx).map(Err),
        }
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for BoundedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}
