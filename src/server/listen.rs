//! Accepting connections: wrapd's own accept loops in front of tonic, so that every listener
//! has limits and every connection carries its identity.
//!
//! - **Connections per listener** are capped ([`Limits::max_connections`], lowered at
//!   start-up to what the process's `RLIMIT_NOFILE` leaves room for, so that a flood on one
//!   listener cannot take the file descriptors the others need). A connection over the cap
//!   is accepted and closed at once: the caller sees the connection close before any HTTP/2
//!   byte, and a warning is logged (at most once a second per listener).
//! - **TLS handshakes** run one task per connection (a slow client holds up no other) and
//!   must finish within [`Limits::handshake_timeout`].
//! - **Idle connections** (no byte read or written for [`Limits::idle_timeout`]) are closed,
//!   handshake or not; gRPC clients reconnect transparently. TCP keepalive finds dead peers.
//! - **Accept errors** such as `EMFILE` back off for 100 ms instead of spinning.
//! - **HTTP/2**: streams per connection, header list size and the reset-stream budgets are
//!   set explicitly (see [`super::Daemon`]'s server builder).
//!
//! Unix socket connections carry a [`UnixPeer`]: the peer's uid, gid, pid and real groups
//! (`SO_PEERCRED` + `SO_PEERGROUPS`, read at connect time), resolved once into principals.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::authority::Rewritten;
use crate::auth::{UnixNames, UnixPeer};
use crate::config::Limits;

/// File descriptors kept free for everything but client connections (the token library,
/// the store, the audit and log files, a connection being accepted and closed).
const RESERVED_FDS: u64 = 64;

impl Limits {
    /// The limits with `max_connections` lowered so that `listeners` listeners at their cap
    /// stay within the process's open-file limit.
    #[allow(unsafe_code)] // getrlimit(2); see the SAFETY comment
    pub fn fitted_to_fd_limit(&self, listeners: usize) -> Self {
        let mut fitted = self.clone();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass; no other memory is touched.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
        if ok && limit.rlim_cur != libc::RLIM_INFINITY && listeners > 0 {
            let room = limit.rlim_cur.saturating_sub(RESERVED_FDS) / listeners as u64;
            let room = usize::try_from(room.max(1)).unwrap_or(usize::MAX);
            if room < fitted.max_connections {
                tracing::warn!(
                    nofile = limit.rlim_cur,
                    listeners,
                    max_connections = room,
                    "the open-file limit lowers the connection cap per listener"
                );
                fitted.max_connections = room;
            }
        }
        fitted
    }
}

/// A connection with its slot in the listener's cap and its idle timer.
pub struct Guarded<S> {
    inner: S,
    idle: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
    peer: Option<UnixPeer>,
    _slot: Slot,
}

impl<S> Guarded<S> {
    fn new(inner: S, idle: Duration, slot: Slot) -> Self {
        Self {
            inner,
            idle,
            last: Instant::now(),
            timer: Box::pin(tokio::time::sleep(idle)),
            peer: None,
            _slot: slot,
        }
    }

    /// Whether the idle timer has fired with no traffic since; re-arms it otherwise.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let due = self.last + self.idle;
            if Instant::now() >= due {
                return true;
            }
            self.timer.as_mut().reset(due.into());
        }
    }
}

fn idle_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle for too long")
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.last = Instant::now();
                Poll::Ready(result)
            }
            Poll::Pending if this.idle_expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if result.is_ready() {
            this.last = Instant::now();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if result.is_ready() {
            this.last = Instant::now();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Guarded<TcpStream> {
    /// The peer's address.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.inner.peer_addr().ok()
    }
}

impl Connected for Guarded<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A unix socket connection: its header blocks pass the `:authority` rewriter.
pub type UnixConnection = Guarded<Rewritten<UnixStream>>;

impl Connected for UnixConnection {
    type ConnectInfo = Option<UnixPeer>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

/// A TLS connection, as tonic sees it (peer certificates in its connect info).
pub type TlsConnection = TlsStream<Guarded<TcpStream>>;

/// Incoming connections for tonic.
pub type Incoming<C> = ReceiverStream<Result<C, io::Error>>;

/// Logs a listener's trouble at most once a second.
struct Throttle(Option<Instant>);

impl Throttle {
    fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self
            .0
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

/// After a failed accept: log (throttled) and pause. EMFILE, ENFILE and ENOMEM leave the
/// connection in the backlog, so without a pause the loop would spin on it.
async fn back_off(what: &'static str, err: &io::Error, throttle: &mut Throttle) {
    if throttle.ready() {
        tracing::warn!(listener = what, error = %err, "accept failed; backing off");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// A connection's place in its listener's cap; counted in the metrics while it lives.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    listener: &'static str,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, listener: &'static str) -> Self {
        metrics::counter!("wrapd_connections_total", "listener" => listener).increment(1);
        metrics::gauge!("wrapd_connections", "listener" => listener).increment(1.0);
        Self {
            _permit: permit,
            listener,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!("wrapd_connections", "listener" => self.listener).decrement(1.0);
    }
}

/// A slot in the listener's cap, or `None` (logged) when it is full.
fn slot(
    slots: &Arc<Semaphore>,
    what: &'static str,
    max: usize,
    throttle: &mut Throttle,
) -> Option<Slot> {
    match slots.clone().try_acquire_owned() {
        Ok(permit) => Some(Slot::new(permit, what)),
        Err(_) => {
            if throttle.ready() {
                tracing::warn!(
                    listener = what,
                    max_connections = max,
                    "connection cap reached: closing new connections at once"
                );
            }
            None
        }
    }
}

/// Serves TCP + mutual TLS connections from `listener`: returns the stream for tonic and
/// the accept task (abort it to stop accepting).
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: &Limits,
) -> (Incoming<TlsConnection>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let limits = limits.clone();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let task = tokio::spawn(async move {
        let (mut accept_throttle, mut cap_throttle) = (Throttle(None), Throttle(None));
        loop {
            let (stream, addr): (TcpStream, SocketAddr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    back_off("tcp", &err, &mut accept_throttle).await;
                    continue;
                }
            };
            let Some(permit) = slot(&slots, "tcp", limits.max_connections, &mut cap_throttle)
            else {
                drop(stream);
                continue;
            };
            if tx.is_closed() {
                return;
            }
            let keepalive = socket2::TcpKeepalive::new().with_time(limits.tcp_keepalive);
            if let Err(err) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
                tracing::debug!(error = %err, "cannot set TCP keepalive");
            }
            let _ = stream.set_nodelay(true);
            let guarded = Guarded::new(stream, limits.idle_timeout, permit);
            let (acceptor, tx, timeout) = (acceptor.clone(), tx.clone(), limits.handshake_timeout);
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, acceptor.accept(guarded)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(peer = %addr, error = %err, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}

/// Serves unix socket connections from `listener`, each with its [`UnixPeer`] and its
/// `:authority` rewriter (see `authority.rs`).
pub fn unix_incoming(
    listener: UnixListener,
    names: Arc<UnixNames>,
    limits: &Limits,
    what: &'static str,
) -> (Incoming<UnixConnection>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let limits = limits.clone();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let task = tokio::spawn(async move {
        let (mut accept_throttle, mut cap_throttle) = (Throttle(None), Throttle(None));
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    back_off(what, &err, &mut accept_throttle).await;
                    continue;
                }
            };
            let Some(permit) = slot(&slots, what, limits.max_connections, &mut cap_throttle) else {
                drop(stream);
                continue;
            };
            if tx.is_closed() {
                return;
            }
            let mut guarded = Guarded::new(Rewritten::new(stream), limits.idle_timeout, permit);
            let (names, tx) = (names.clone(), tx.clone());
            tokio::spawn(async move {
                guarded.peer = peer_of(guarded.inner.get_ref(), &names);
                let _ = tx.send(Ok(guarded)).await;
            });
        }
    });
    (ReceiverStream::new(rx), task)
}

/// The peer's credentials and real groups, as principals; `None` if the kernel gives none
/// (the call is then UNAUTHENTICATED).
fn peer_of(stream: &UnixStream, names: &UnixNames) -> Option<UnixPeer> {
    let cred = match stream.peer_cred() {
        Ok(cred) => cred,
        Err(err) => {
            tracing::warn!(error = %err, "no peer credentials on a unix socket connection");
            return None;
        }
    };
    let groups = match peer_groups(stream) {
        Ok(groups) => groups,
        Err(err) => {
            tracing::warn!(error = %err, "SO_PEERGROUPS failed; only the primary group is known");
            Vec::new()
        }
    };
    Some(UnixPeer {
        uid: cred.uid(),
        pid: cred.pid(),
        principals: names.principals(cred.uid(), cred.gid(), &groups),
    })
}

/// The peer process's supplementary groups at connect time (`SO_PEERGROUPS`, Linux 4.13+):
/// its real groups, not what `/etc/group` says today, so a process that dropped a group (or
/// was never given it) gets none of that group's rights.
#[allow(unsafe_code)] // getsockopt(2); see the SAFETY comment
fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * size_of::<libc::gid_t>())
            .map_err(|_| io::Error::other("too many groups"))?;
        // SAFETY: the buffer is valid for `len` bytes and outlives the call; the kernel
        // writes at most `len` bytes and sets `len` to what it wrote (or needs).
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && count > groups.len() && count <= 65_536 {
            groups.resize(count, 0);
            continue;
        }
        return Err(err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn peer_groups_are_the_processs_own() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut mine: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut theirs = peer_groups(&a).unwrap();
        mine.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(theirs, mine);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_times_out_and_traffic_keeps_it_open() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(64);
        let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let mut guarded = Guarded::new(a, Duration::from_secs(10), Slot::new(slot, "test"));
        let mut buf = [0u8; 1];
        b.write_all(b"x").await.unwrap();
        tokio::time::advance(Duration::from_secs(8)).await;
        guarded.read_exact(&mut buf).await.unwrap();
        tokio::time::advance(Duration::from_secs(8)).await;
        // 16 s since the start, 8 s since the last byte: still open.
        b.write_all(b"y").await.unwrap();
        guarded.read_exact(&mut buf).await.unwrap();
        let err = guarded.read_exact(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
