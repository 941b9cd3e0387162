//! Sockets and byte moving: listeners, the original destination of a
//! redirected connection, marked upstream connections, bounded read
//! buffers, writes that record progress, and the opaque copy. Nothing here
//! knows about HTTP.

use std::future::{Future, poll_fn};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use atomic_waker::AtomicWaker;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Pending connections the kernel queues per listener; a burst of new
/// connections (a client pool filling up) must not be refused.
const LISTEN_BACKLOG: i32 = 4096;

/// Read buffers start this size and grow only when a head needs more.
const INITIAL_READ_BUFFER: usize = 16 * 1024;

/// A listening socket for `addr`, with `SO_REUSEADDR` so a restarted proxy
/// can listen again at once, and `IPV6_V6ONLY` on IPv6 so `0.0.0.0` and `::`
/// can be listened on side by side. Needs a tokio runtime.
pub(crate) fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Where the client meant to connect before iptables REDIRECT sent the
/// connection here: `SO_ORIGINAL_DST` (IPv4, `SOL_IP`) or
/// `IP6T_SO_ORIGINAL_DST` (IPv6, `SOL_IPV6`), both option 80, which read
/// the connection's conntrack entry.
pub(crate) fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    let socket = SockRef::from(stream);
    let addr = if stream.local_addr()?.is_ipv4() {
        socket.original_dst_v4()?
    } else {
        socket.original_dst_v6()?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}

/// Connects to `destination` from a socket marked `mark` (`SO_MARK`, set
/// before the SYN so that the REDIRECT rules, which skip that mark, never
/// send the proxy's own connection back to it). Mark 0 sets nothing, which
/// needs no privilege.
pub(crate) async fn connect_upstream(
    destination: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = if destination.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if mark != 0 {
        SockRef::from(&socket).set_mark(mark)?;
    }
    // Heads and bodies are written separately; Nagle would hold the second
    // write back for a round trip.
    socket.set_nodelay(true)?;
    tokio::time::timeout(timeout, socket.connect(destination))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {destination} timed out"),
            )
        })?
}

/// Makes the next close of `stream` send RST instead of FIN, so that a
/// failure on one side reaches the other as a failure, not as a clean end
/// of data (which would pass a truncated body off as complete).
pub(crate) fn reset_on_close(stream: &TcpStream) {
    // Linger 0 never blocks the close, unlike other linger times.
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Why the proxy gave up on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cancel {
    /// Nothing moved for the idle timeout.
    Idle,
    /// The proxy is shutting down and the grace period is over.
    Shutdown,
}

impl From<Cancel> for io::Error {
    fn from(cancel: Cancel) -> Self {
        match cancel {
            Cancel::Idle => io::Error::new(io::ErrorKind::TimedOut, "idle timeout"),
            Cancel::Shutdown => io::Error::new(io::ErrorKind::Interrupted, "proxy shutting down"),
        }
    }
}

/// What a connection shares with the proxy's idle sweep: whether bytes
/// moved, in either direction, for the idle timeout, and whether the proxy
/// has given up on it (idle, or still open when the shutdown grace ended).
///
/// Progress is a counter bumped on every read and write rather than a
/// timestamp, so the relay's hot path reads no clock; the sweep samples
/// the counters of all connections a few times per timeout instead. That
/// keeps timers and shutdown signals out of the connection's own future,
/// which is polled twice per request: a timer and a watch channel polled
/// at every wake cost about 0.5 µs CPU per proxied request (perf stat,
/// everything on one core).
#[derive(Debug, Default)]
pub(crate) struct Activity {
    moves: AtomicU64,
    /// 0 while running, else 1 + the [`Cancel`] reason's index.
    cancelled: AtomicU8,
    /// The connection task, woken when it is cancelled.
    task: AtomicWaker,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records that bytes moved.
    pub(crate) fn touch(&self) {
        // Both directions of a connection are polled by one task, so a
        // plain load and store (no locked increment) cannot lose a move
        // that matters: any change of the value is progress.
        let moves = self.moves.load(Ordering::Relaxed);
        self.moves.store(moves.wrapping_add(1), Ordering::Relaxed);
    }

    /// The progress counter: any change since the last look is progress.
    pub(crate) fn moves(&self) -> u64 {
        self.moves.load(Ordering::Relaxed)
    }

    /// Makes [`Activity::until_cancelled`] end with `reason` (the first
    /// reason given wins).
    pub(crate) fn cancel(&self, reason: Cancel) {
        let code = match reason {
            Cancel::Idle => 1,
            Cancel::Shutdown => 2,
        };
        let _ = self
            .cancelled
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.task.wake();
    }

    /// Why the connection was cancelled, if it was.
    pub(crate) fn cancelled(&self) -> Option<Cancel> {
        match self.cancelled.load(Ordering::Acquire) {
            0 => None,
            1 => Some(Cancel::Idle),
            _ => Some(Cancel::Shutdown),
        }
    }

    /// Runs `work` until it completes or the connection is cancelled,
    /// whichever comes first.
    pub(crate) async fn until_cancelled<T>(
        &self,
        work: impl Future<Output = io::Result<T>>,
    ) -> io::Result<T> {
        let mut work = pin!(work);
        poll_fn(|cx| {
            // Registered before the check, so a cancel in between wakes
            // this task again instead of being missed.
            self.task.register(cx.waker());
            if let Some(reason) = self.cancelled() {
                return Poll::Ready(Err(reason.into()));
            }
            work.as_mut().poll(cx)
        })
        .await
    }
}

/// What a read into a [`ReadBuffer`] gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Filled {
    /// This many new bytes.
    Data(usize),
    /// The peer will send no more.
    Eof,
}

/// The read side of one direction: a socket half and a buffer of at most
/// `limit` bytes that have been read but not yet forwarded. The bound is
/// the back-pressure: nothing more is read until the buffered bytes are
/// written on, so a slow reader at the other end slows the sender instead
/// of growing memory.
pub(crate) struct Inbound<'a, R> {
    io: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    limit: usize,
    activity: &'a Activity,
}

impl<'a, R: AsyncRead + Unpin> Inbound<'a, R> {
    pub(crate) fn new(io: R, limit: usize, activity: &'a Activity) -> Self {
        Self {
            io,
            buf: Vec::new(),
            start: 0,
            end: 0,
            limit: limit.max(1),
            activity,
        }
    }

    /// The bytes read and not yet consumed.
    pub(crate) fn data(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or_default()
    }

    /// Marks the first `n` buffered bytes as forwarded.
    pub(crate) fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Whether the buffer holds `limit` bytes and can take no more.
    pub(crate) fn is_full(&self) -> bool {
        self.end - self.start >= self.limit
    }

    /// The socket half, for readiness checks that read nothing.
    pub(crate) fn io_mut(&mut self) -> &mut R {
        &mut self.io
    }

    /// Reads more bytes after the buffered ones. Cancel-safe: if the future
    /// is dropped before completing, no bytes are lost.
    pub(crate) async fn fill(&mut self) -> io::Result<Filled> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < self.limit {
                let grown = (self.buf.len() * 2)
                    .max(INITIAL_READ_BUFFER)
                    .min(self.limit);
                self.buf.resize(grown, 0);
            } else {
                return Err(io::Error::other("read buffer full"));
            }
        }
        let n = self.io.read(&mut self.buf[self.end..]).await?;
        self.activity.touch();
        if n == 0 {
            return Ok(Filled::Eof);
        }
        self.end += n;
        Ok(Filled::Data(n))
    }
}

/// The write side of one direction.
pub(crate) struct Outbound<'a, W> {
    io: W,
    activity: &'a Activity,
}

impl<'a, W: AsyncWrite + Unpin> Outbound<'a, W> {
    pub(crate) fn new(io: W, activity: &'a Activity) -> Self {
        Self { io, activity }
    }

    /// Writes all of `bytes`, recording progress after each partial write
    /// so that a slow but moving reader is not taken for an idle one.
    pub(crate) async fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = self.io.write(bytes).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.activity.touch();
            bytes = bytes.get(n..).unwrap_or_default();
        }
        Ok(())
    }

    /// Writes all of `first` and then all of `second`, as one system call
    /// when the socket takes both at once (a rewritten head and the body
    /// bytes read with it).
    pub(crate) async fn write_all_pair(&mut self, first: &[u8], second: &[u8]) -> io::Result<()> {
        let (mut first, mut second) = (first, second);
        while !first.is_empty() {
            let slices = [IoSlice::new(first), IoSlice::new(second)];
            let n = self.io.write_vectored(&slices).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.activity.touch();
            let from_first = n.min(first.len());
            first = &first[from_first..];
            second = second.get(n - from_first..).unwrap_or_default();
        }
        self.write_all(second).await
    }

    /// Sends FIN: the other side of the proxy finished sending, and this
    /// side's peer must see the same half-close.
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }
}

/// Copies `from` to `to` unchanged (buffered bytes first) until `from`
/// ends, then half-closes `to`.
pub(crate) async fn relay_opaque<R, W>(
    from: &mut Inbound<'_, R>,
    to: &mut Outbound<'_, W>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let pending = from.data().len();
        if pending > 0 {
            to.write_all(from.data()).await?;
            from.consume(pending);
        }
        if from.fill().await? == Filled::Eof {
            return to.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn cancel_wakes_waiting_work_with_the_first_reason() {
        let activity = Arc::new(Activity::new());
        let waiting = Arc::clone(&activity);
        let task = tokio::spawn(async move {
            waiting
                .until_cancelled(std::future::pending::<io::Result<()>>())
                .await
        });
        // Lets the task run until it waits, so the cancel has to wake it.
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        activity.cancel(Cancel::Idle);
        activity.cancel(Cancel::Shutdown);
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(activity.cancelled(), Some(Cancel::Idle));
    }

    #[tokio::test]
    async fn work_that_completes_gives_its_result() {
        let activity = Activity::new();
        let done = activity.until_cancelled(async { Ok(7) }).await.unwrap();
        assert_eq!(done, 7);
        assert_eq!(activity.cancelled(), None);
    }

    #[tokio::test]
    async fn work_cancelled_before_it_starts_never_runs() {
        let activity = Activity::new();
        activity.cancel(Cancel::Shutdown);
        let work = async { panic!("cancelled work was polled") };
        let err = activity.until_cancelled::<()>(work).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
    }
}
