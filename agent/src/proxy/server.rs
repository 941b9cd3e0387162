//! Accepting redirected connections and running each one: original
//! destination, upstream connection, protocol detection, then the HTTP or
//! opaque relay under an idle timeout; draining on shutdown.
//!
//! Connections run on worker threads of their own, each a single-threaded
//! runtime, as nginx's and Envoy's workers are: a connection stays on the
//! thread it was handed to, so relaying a request wakes exactly one thread
//! and costs no work-stealing scheduler. The accept loops run on the
//! caller's runtime and hand connections out in turn.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::ProxySettings;
use super::context::{ProxiedRequest, TraceContextSource};
use super::detect::{FirstBytes, classify};
use super::http::{RequestContext, relay_http};
use super::stats::{Counter, ProxyStats};
use super::transport::{
    Activity, Cancel, Filled, Inbound, Outbound, bind_listener, connect_upstream,
    original_destination, relay_opaque, reset_on_close,
};

/// How long aborted connections get to close after the grace period.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// Pause after an accept error such as running out of file descriptors,
/// which would otherwise repeat at once and spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepted connections waiting for their worker; a worker that falls
/// behind slows accepting (back-pressure) instead of queueing sockets
/// without bound.
const HANDOFF_QUEUE: usize = 256;

/// A bound, not yet running, proxy. Binding first lets the caller learn
/// the addresses (port 0) and read the counters while it runs.
pub struct Proxy {
    listeners: Vec<TcpListener>,
    settings: ProxySettings,
    stats: Arc<ProxyStats>,
}

/// What every connection task shares.
struct Shared {
    settings: ProxySettings,
    contexts: Arc<dyn TraceContextSource>,
    stats: Arc<ProxyStats>,
    /// Woken whenever the last open connection closes.
    idle: Notify,
    /// Every open connection, for the idle timeout and the shutdown.
    live: Mutex<LiveConnections>,
}

impl Shared {
    fn live(&self) -> MutexGuard<'_, LiveConnections> {
        // The list stays consistent whatever panicked while holding it.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An accepted connection on its way to a worker, as a std socket: a
/// tokio socket belongs to the runtime that registered it.
struct Accepted {
    client: std::net::TcpStream,
    peer: SocketAddr,
    /// Counted open from the accept, so a drain also waits for connections
    /// still queued for their worker, and a connection dropped anywhere on
    /// the way is counted closed.
    open: OpenConnection,
    /// Shared with the idle sweep from the accept on.
    activity: Arc<Activity>,
}

/// The worker threads, and the round-robin turn of the accept loops.
struct Workers {
    handoff: Vec<mpsc::Sender<Accepted>>,
    next: AtomicUsize,
}

impl Workers {
    /// Hands `accepted` to the next worker in turn; waits while that
    /// worker's queue is full. Fails only when the worker has stopped.
    async fn hand_off(&self, accepted: Accepted) -> Result<(), Accepted> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.handoff.len();
        self.handoff[turn].send(accepted).await.map_err(|e| e.0)
    }
}

impl Proxy {
    /// Listens on every address of `settings.listen`. Must be called within
    /// a tokio runtime.
    pub fn bind(settings: ProxySettings) -> io::Result<Proxy> {
        if settings.listen.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the proxy has no address to listen on",
            ));
        }
        let listeners = settings
            .listen
            .iter()
            .map(|&addr| {
                bind_listener(addr)
                    .map_err(|err| io::Error::new(err.kind(), format!("listen on {addr}: {err}")))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Proxy {
            listeners,
            settings,
            stats: Arc::default(),
        })
    }

    /// The addresses listened on (with the ports the system chose for 0).
    pub fn local_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.listeners.iter().map(TcpListener::local_addr).collect()
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<ProxyStats> {
        Arc::clone(&self.stats)
    }

    /// Serves until `shutdown` completes; then stops accepting, lets open
    /// connections finish for `settings.shutdown_grace`, resets the rest,
    /// and returns the counters. Starts `settings.workers` threads, which
    /// have ended when this returns.
    pub async fn run(
        self,
        contexts: Arc<dyn TraceContextSource>,
        shutdown: impl Future,
    ) -> io::Result<Arc<ProxyStats>> {
        let shared = Arc::new(Shared {
            live: Mutex::new(LiveConnections::new(self.settings.idle_timeout)),
            settings: self.settings,
            contexts,
            stats: self.stats,
            idle: Notify::new(),
        });
        let (stop_accepting, accepting) = watch::channel(false);
        let (exit_workers, exit) = watch::channel(false);
        let mut handoff = Vec::new();
        let mut ended = Vec::new();
        for n in 0..shared.settings.workers.max(1) {
            let (to_worker, from_acceptors) = mpsc::channel(HANDOFF_QUEUE);
            let (done, worker_ended) = oneshot::channel::<()>();
            let worker = Worker {
                shared: Arc::clone(&shared),
                connections: from_acceptors,
                exit: exit.clone(),
            };
            let started = std::thread::Builder::new()
                .name(format!("proxy-worker-{n}"))
                .spawn(move || {
                    worker.run();
                    let _ = done.send(());
                });
            if let Err(err) = started {
                // Those already started end with their queue closed.
                let _ = exit_workers.send(true);
                return Err(err);
            }
            handoff.push(to_worker);
            ended.push(worker_ended);
        }
        let workers = Arc::new(Workers {
            handoff,
            next: AtomicUsize::new(0),
        });
        // On this runtime, not the workers': a timer pending in a worker's
        // runtime costs each of its wake-ups a clock reading and a look at
        // the timer wheel (about 0.2 µs CPU per proxied request, perf stat
        // on one core).
        let sweeper = tokio::spawn(sweep_idle(Arc::clone(&shared)));
        let acceptors: Vec<JoinHandle<()>> = self
            .listeners
            .into_iter()
            .map(|listener| {
                tokio::spawn(accept_loop(
                    listener,
                    Arc::clone(&shared),
                    Arc::clone(&workers),
                    accepting.clone(),
                ))
            })
            .collect();
        shutdown.await;
        let _ = stop_accepting.send(true);
        for acceptor in acceptors {
            // Only a panic in the loop would make this an error, and it
            // has nothing left to clean up then.
            let _ = acceptor.await;
        }
        // No more hand-offs: each worker sees its queue end.
        drop(workers);
        let grace = shared.settings.shutdown_grace;
        if tokio::time::timeout(grace, all_closed(&shared))
            .await
            .is_err()
        {
            log::info!(
                "proxy: resetting {} connections still open after {grace:?}",
                shared.stats.active()
            );
            shared.live().cancel_all();
            let _ = tokio::time::timeout(ABORT_WAIT, all_closed(&shared)).await;
        }
        sweeper.abort();
        let _ = exit_workers.send(true);
        for worker in ended {
            // An error means the thread ended without saying so (a panic).
            let _ = worker.await;
        }
        Ok(Arc::clone(&shared.stats))
    }
}

/// Binds the proxy and serves until `shutdown` completes (see
/// [`Proxy::run`]), returning the final counters.
pub async fn serve(
    settings: ProxySettings,
    contexts: Arc<dyn TraceContextSource>,
    shutdown: impl Future,
) -> io::Result<Arc<ProxyStats>> {
    Proxy::bind(settings)?.run(contexts, shutdown).await
}

/// One worker thread: its own single-threaded runtime, running every
/// connection handed to it.
struct Worker {
    shared: Arc<Shared>,
    connections: mpsc::Receiver<Accepted>,
    /// Set once every connection has closed or been given up on; the
    /// runtime, and any connection task still in it, is dropped then.
    exit: watch::Receiver<bool>,
}

impl Worker {
    fn run(mut self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => {
                // Its connections are closed as the queue drops them.
                log::error!("proxy: a worker cannot start its runtime: {err}");
                return;
            }
        };
        runtime.block_on(async move {
            while let Some(accepted) = self.connections.recv().await {
                let Accepted {
                    client,
                    peer,
                    open,
                    activity,
                } = accepted;
                let client = match TcpStream::from_std(client) {
                    Ok(client) => client,
                    Err(err) => {
                        self.shared.stats.add(Counter::Errors);
                        log::warn!("proxy: cannot take over a connection from {peer}: {err}");
                        continue;
                    }
                };
                tokio::spawn(async move {
                    proxy_connection(client, peer, &open.0, &activity).await;
                    drop(open);
                });
            }
            let _ = self.exit.wait_for(|&exit| exit).await;
        });
    }
}

/// Cancels connections on which nothing moved for the idle timeout, a few
/// times per timeout, until aborted.
async fn sweep_idle(shared: Arc<Shared>) {
    let period = (shared.settings.idle_timeout / IDLE_SAMPLES).max(Duration::from_millis(1));
    loop {
        // A timeout too long to be a point in time is no limit.
        let Some(next) = Instant::now().checked_add(period) else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(next).await;
        shared.live().sweep(Instant::now());
    }
}

/// Samples of a connection's progress counter per idle timeout: a
/// connection is reset after between 1 and 1 + 1/IDLE_SAMPLES timeouts of
/// silence.
const IDLE_SAMPLES: u32 = 4;

/// The open connections, as the idle timeout and the shutdown see them.
/// They are swept a few times per timeout, so a connection's own task
/// needs no timer.
struct LiveConnections {
    entries: Vec<LiveConnection>,
    idle_timeout: Duration,
    /// Set once the shutdown gave up on open connections: a connection
    /// added after that is cancelled at once.
    cancelled_all: bool,
}

/// A connection as [`LiveConnections`] samples it.
struct LiveConnection {
    activity: Arc<Activity>,
    /// The progress counter at the last sweep.
    seen: u64,
    /// When the counter was last seen to change (or the connection began).
    quiet_since: Instant,
}

impl LiveConnection {
    /// Whether the connection's task has ended (and dropped its handle).
    fn ended(&self) -> bool {
        Arc::strong_count(&self.activity) == 1
    }
}

impl LiveConnections {
    fn new(idle_timeout: Duration) -> Self {
        Self {
            entries: Vec::new(),
            idle_timeout,
            cancelled_all: false,
        }
    }

    /// Registers a connection starting at `now`; its task holds the
    /// returned handle, whose dropping marks the connection ended.
    fn add(&mut self, now: Instant) -> Arc<Activity> {
        if self.entries.len() == self.entries.capacity() {
            // Ended connections go before the list grows, not only at the
            // next sweep, which may be many minutes away: amortized over
            // the additions, the list stays within twice the open ones.
            self.entries.retain(|entry| !entry.ended());
        }
        let activity = Arc::new(Activity::new());
        if self.cancelled_all {
            activity.cancel(Cancel::Shutdown);
        }
        self.entries.push(LiveConnection {
            seen: activity.moves(),
            quiet_since: now,
            activity: Arc::clone(&activity),
        });
        activity
    }

    /// Forgets ended connections and cancels those on which nothing moved
    /// for the idle timeout.
    fn sweep(&mut self, now: Instant) {
        let idle_timeout = self.idle_timeout;
        self.entries.retain_mut(|entry| {
            if entry.ended() {
                return false;
            }
            let moves = entry.activity.moves();
            if moves != entry.seen {
                entry.seen = moves;
                entry.quiet_since = now;
            } else if now.saturating_duration_since(entry.quiet_since) >= idle_timeout {
                entry.activity.cancel(Cancel::Idle);
            }
            true
        });
    }

    /// Cancels every open connection, and any added later.
    fn cancel_all(&mut self) {
        self.cancelled_all = true;
        for entry in &self.entries {
            entry.activity.cancel(Cancel::Shutdown);
        }
    }
}

/// Completes when no connection is open.
async fn all_closed(shared: &Shared) {
    loop {
        let notified = shared.idle.notified();
        tokio::pin!(notified);
        // Registered before the check, so a close in between is not missed.
        notified.as_mut().enable();
        if shared.stats.active() == 0 {
            return;
        }
        notified.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    workers: Arc<Workers>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|&stop| stop) => return,
            accepted = listener.accept() => accepted,
        };
        let handed = match accepted.and_then(|(client, peer)| Ok((client.into_std()?, peer))) {
            Ok((client, peer)) => {
                let open = OpenConnection::new(&shared);
                let activity = shared.live().add(Instant::now());
                let accepted = Accepted {
                    client,
                    peer,
                    open,
                    activity,
                };
                workers.hand_off(accepted).await
            }
            Err(err) => {
                shared.stats.add(Counter::Errors);
                log::warn!("proxy: accept failed: {err}");
                // Descriptor or memory exhaustion clears only as other
                // connections close; retrying at once would spin.
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        if handed.is_err() {
            // Only a worker that could not start refuses; the connection is
            // closed (and counted closed) as it is dropped.
            shared.stats.add(Counter::Errors);
        }
    }
}

/// Counts a connection as open until dropped, however its task ends.
struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.stats.connection_opened();
        Self(Arc::clone(shared))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.0.stats.connection_closed() == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

/// How a connection will be relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http,
    Opaque,
}

async fn proxy_connection(
    mut client: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    activity: &Activity,
) {
    let settings = &shared.settings;
    let stats = &shared.stats;
    let (destination, local) = match (original_destination(&client), client.local_addr()) {
        // A connection made to the proxy's own address was not redirected;
        // forwarding it would connect to the proxy again.
        (Ok(destination), Ok(local)) if destination != local => (destination, local),
        (Ok(destination), _) => {
            log::debug!("proxy: {peer} connected to {destination} directly; closing");
            stats.add(Counter::ConnectionsRefused);
            return;
        }
        (Err(err), _) => {
            log::debug!("proxy: no original destination for {peer}: {err}");
            stats.add(Counter::ConnectionsRefused);
            return;
        }
    };
    let connecting = connect_upstream(
        destination,
        settings.upstream_mark,
        settings.connect_timeout,
    );
    let mut upstream = match activity.until_cancelled(connecting).await {
        Ok(upstream) => upstream,
        // Nothing was relayed yet: dropping the client socket is enough.
        Err(_) if activity.cancelled().is_some() => return,
        Err(err) => {
            log::debug!("proxy: {peer} -> {destination}: connect failed: {err}");
            stats.add(Counter::Errors);
            // The client sees the failure as it would have without the
            // proxy: a reset, not an accepted-then-closed connection.
            reset_on_close(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let result = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let mut client_in = Inbound::new(client_read, settings.head_limit(), activity);
        let mut client_out = Outbound::new(client_write, activity);
        let mut upstream_in = Inbound::new(upstream_read, settings.head_limit(), activity);
        let mut upstream_out = Outbound::new(upstream_write, activity);
        let relay = async {
            let protocol = detect(&mut client_in, &mut upstream_in, settings).await?;
            match protocol {
                Protocol::Http => {
                    stats.add(Counter::ConnectionsHttp);
                    // The application's own address, which the probes
                    // report: NAT may have changed the port the proxy sees.
                    let client = super::conntrack::original_source(local, peer).unwrap_or(peer);
                    if client != peer {
                        stats.add(Counter::SourcesRemapped);
                    }
                    let context = RequestContext {
                        request: ProxiedRequest {
                            client,
                            original_destination: destination,
                            index: 0,
                            method: String::new(),
                            target: String::new(),
                        },
                        contexts: shared.contexts.as_ref(),
                        stats,
                    };
                    relay_http(
                        &mut client_in,
                        &mut client_out,
                        &mut upstream_in,
                        &mut upstream_out,
                        context,
                    )
                    .await
                }
                Protocol::Opaque => {
                    stats.add(Counter::ConnectionsOpaque);
                    tokio::try_join!(
                        relay_opaque(&mut client_in, &mut upstream_out),
                        relay_opaque(&mut upstream_in, &mut client_out),
                    )
                    .map(|_| ())
                }
            }
        };
        activity.until_cancelled(relay).await
    };
    if let Err(err) = result {
        log::debug!("proxy: {peer} -> {destination}: {err}");
        stats.add(Counter::Errors);
        // One side failed, reset or timed out: both peers learn it as a
        // reset, never as a clean end that could hide lost bytes.
        reset_on_close(&client);
        reset_on_close(&upstream);
    }
}

/// Decides how to relay a connection from its first bytes, which stay
/// buffered in `client_in`. The upstream connection already exists, so a
/// server that speaks first is noticed instead of waited out.
///
/// While neither side has said anything there is nothing to relay, so
/// nothing is lost by waiting (the idle timeout still applies): a client
/// that opens connections ahead of use, as pools do, still gets its
/// requests injected. The detect timeout starts with the client's first
/// bytes, and only bounds how long a prefix that could still become a
/// request line is held back.
async fn detect<CR, UR>(
    client_in: &mut Inbound<'_, CR>,
    upstream_in: &mut Inbound<'_, UR>,
    settings: &ProxySettings,
) -> io::Result<Protocol>
where
    CR: tokio::io::AsyncRead + Unpin,
    UR: tokio::io::AsyncRead + Unpin + Peek,
{
    let timed_out = tokio::time::sleep(settings.detect_timeout);
    tokio::pin!(timed_out);
    let mut armed = false;
    loop {
        tokio::select! {
            biased;
            // Server-first protocols (SMTP, MySQL, SSH...) are never HTTP;
            // an upstream that closes or fails goes the same way and the
            // opaque relay passes that on.
            _ = upstream_in.io_mut().peek_byte() => return Ok(Protocol::Opaque),
            filled = client_in.fill() => {
                if filled? == Filled::Eof {
                    return Ok(Protocol::Opaque);
                }
                match classify(client_in.data()) {
                    FirstBytes::Http => return Ok(Protocol::Http),
                    FirstBytes::Opaque => return Ok(Protocol::Opaque),
                    FirstBytes::Undecided if client_in.is_full() => return Ok(Protocol::Opaque),
                    FirstBytes::Undecided if !armed => {
                        armed = true;
                        // A limit too large to be a point in time is none.
                        match Instant::now().checked_add(settings.detect_timeout) {
                            Some(deadline) => timed_out.as_mut().reset(deadline),
                            None => armed = false,
                        }
                    }
                    FirstBytes::Undecided => {}
                }
            }
            () = &mut timed_out, if armed => return Ok(Protocol::Opaque),
        }
    }
}

/// Waiting for a byte to read without reading it.
trait Peek {
    /// Completes when a byte can be read, the peer closed, or an error is
    /// pending.
    fn peek_byte(&mut self) -> impl Future<Output = io::Result<usize>> + Send;
}

impl Peek for tokio::net::tcp::ReadHalf<'_> {
    async fn peek_byte(&mut self) -> io::Result<usize> {
        let mut byte = [0; 1];
        self.peek(&mut byte).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    #[test]
    fn a_quiet_connection_is_cancelled_once_the_timeout_has_passed() {
        let mut live = LiveConnections::new(LIMIT);
        let start = Instant::now();
        let activity = live.add(start);
        live.sweep(start + LIMIT - Duration::from_millis(1));
        assert_eq!(activity.cancelled(), None);
        live.sweep(start + LIMIT);
        assert_eq!(activity.cancelled(), Some(Cancel::Idle));
    }

    #[test]
    fn bytes_moving_restart_the_idle_clock() {
        let mut live = LiveConnections::new(LIMIT);
        let start = Instant::now();
        let activity = live.add(start);
        activity.touch();
        let seen_moving = start + LIMIT / 2;
        live.sweep(seen_moving);
        live.sweep(start + LIMIT);
        assert_eq!(activity.cancelled(), None);
        live.sweep(seen_moving + LIMIT);
        assert_eq!(activity.cancelled(), Some(Cancel::Idle));
    }

    #[test]
    fn ended_connections_are_forgotten_without_waiting_for_a_sweep() {
        let mut live = LiveConnections::new(LIMIT);
        let start = Instant::now();
        let kept = live.add(start);
        for _ in 0..10_000 {
            drop(live.add(start));
        }
        assert!(live.entries.len() <= 4, "{} entries", live.entries.len());
        live.sweep(start);
        assert_eq!(live.entries.len(), 1);
        assert!(Arc::ptr_eq(&live.entries[0].activity, &kept));
    }

    #[test]
    fn cancel_all_reaches_open_and_later_connections() {
        let mut live = LiveConnections::new(LIMIT);
        let start = Instant::now();
        let open = live.add(start);
        live.cancel_all();
        let later = live.add(start);
        assert_eq!(open.cancelled(), Some(Cancel::Shutdown));
        assert_eq!(later.cancelled(), Some(Cancel::Shutdown));
    }
}
