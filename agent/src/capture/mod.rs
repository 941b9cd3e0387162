//! Capture stage: kernel records in, [`CaptureEvent`]s out.
//!
//! [`probes`] loads and attaches the kernel programs; [`event`] decodes their
//! records and joins chunks into messages (pure, testable without a kernel);
//! [`Capture`] attaches them and [`CaptureReader`] reads the ring buffer on
//! tokio when it signals readiness (no busy polling), in the consumer's own
//! task, so a slow consumer makes the kernel drop (and count) rather than
//! the agent grow without bound. The consumer handles each event while the
//! ring still holds its record: the bytes are read where the kernel wrote
//! them, never copied.

pub mod event;
pub mod kernel_offsets;
pub mod probes;
pub mod python;

use foldhash::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::metrics::Reading;
use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub use event::{
    CaptureEvent, Connection, ConnectionId, Direction, Message, ProcessName, PythonContextEvent,
    Role, Syscall, decode_record,
};
pub use probes::{MIN_RING_BUFFER_BYTES, ProbeSettings, ProbeSettingsError, Probes};

/// Counters of the user-space side of the capture.
#[derive(Debug, Default)]
pub struct UserCounters {
    /// Records that could not be decoded.
    pub decode_errors: AtomicU64,
    /// Events produced.
    pub events: AtomicU64,
    /// Python processes whose contexts were read from (see [`python`]).
    pub python_watched: AtomicU64,
    /// Python processes that could not be watched.
    pub python_not_watched: AtomicU64,
}

/// A running capture. Dropping it detaches the probes.
pub struct Capture {
    probes: Arc<Mutex<Probes>>,
    user: Arc<UserCounters>,
}

/// Reads the capture's ring buffer. Kept apart from [`Capture`] so that the
/// consumer can wait for records while the counters stay readable.
pub struct CaptureReader {
    ring: AsyncFd<RingBuf<MapData>>,
    decoding: Decoding,
    /// Drains the ring without a wake-up (most records do not send one).
    drain: DrainTimer,
    /// The last timer drain stopped at a full batch: the next read, at
    /// once, takes more.
    backlog: bool,
}

/// What turns ring records into events.
struct Decoding {
    user: Arc<UserCounters>,
    /// New processes, to the thread that watches the Python ones (reading
    /// an interpreter takes tens of ms: not on the capture's path).
    to_watcher: mpsc::SyncSender<u32>,
    /// Processes sent to the watcher, and when: a pid is sent again after
    /// [`RECONSIDER_AFTER`], since it may now be another process's.
    seen_pids: HashMap<u32, Instant>,
}

/// How often the reader drains the ring without being woken: the longest a
/// record that sent no wake-up waits (see `ProbeSettings::wake_ports`).
/// Nothing waits on those records but the outputs, which batch for up to
/// a second; each wake-up of the reader costs tens of microseconds on a
/// VM, so at 10 ms the timer alone was a large part of the agent's cost at
/// a few thousand requests per second (docs/benchmarks.md).
pub const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// Processes remembered as considered at most; then the set starts over
/// (a process considered again costs one read of its maps).
const MAX_SEEN_PIDS: usize = 65_536;
/// How long a pid found not to be a Python interpreter stays so.
const RECONSIDER_AFTER: Duration = Duration::from_secs(10);

/// A process that is not Python and younger than this may still exec an
/// interpreter: the watcher looks at it again at its next listings.
const YOUNG_PROCESS: Duration = Duration::from_secs(3);
/// How often exited Python processes are unwatched.
const PYTHON_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often the watcher looks for processes started since: it lists
/// /proc only when the kernel gave out a process id since its last listing
/// (see [`newest_pid`]) or young processes wait for another look.
const PROCESS_SCAN_INTERVAL: Duration = Duration::from_millis(500);
/// How often the watcher lists /proc in any case: where /proc/loadavg is
/// not the kernel's own (a container's lxcfs), a new process is still
/// found, later.
const FULL_SCAN_INTERVAL: Duration = Duration::from_secs(5);
/// New processes waiting for the watcher at most; more are sent again
/// after [`RECONSIDER_AFTER`].
const WATCH_QUEUE: usize = 4096;

/// Records handled per [`CaptureReader::read`] at most: a bound on the work
/// between two awaits, so the consumer's other duties are not starved.
pub const MAX_BATCH: usize = 256;

impl Capture {
    /// Attaches the probes. Must be called inside a tokio runtime. The
    /// consumer reads events with the returned reader, in its own task:
    /// no thread sits between the ring buffer and the correlator, so an
    /// event costs no cross-thread wake-up (the proxy waits on it), and a
    /// consumer that falls behind leaves the records in the ring, where the
    /// kernel drops (and counts) what no longer fits.
    pub fn start(settings: ProbeSettings) -> Result<(Self, CaptureReader)> {
        let (probes, ring) = Probes::attach(settings)?;
        let probes = Arc::new(Mutex::new(probes));
        let user = Arc::new(UserCounters::default());
        // SAFETY: the ring buffer owns its map fd, which stays open and the
        // same until the AsyncFd (which owns the ring buffer) is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
        let (to_watcher, new_pids) = mpsc::sync_channel(WATCH_QUEUE);
        spawn_python_watcher(probes.clone(), user.clone(), new_pids)?;
        Ok((
            Self {
                probes: probes.clone(),
                user: user.clone(),
            },
            CaptureReader {
                ring,
                decoding: Decoding {
                    user,
                    to_watcher,
                    seen_pids: HashMap::default(),
                },
                drain: DrainTimer::start(DRAIN_EVERY)
                    .map_err(|e| anyhow::anyhow!("starting the drain timer: {e}"))?,
                backlog: false,
            },
        ))
    }

    /// Client requests to `ports` wake the reader at once from now on (as
    /// [`ProbeSettings::wake_ports`] at start): for a proxy started later.
    pub fn wake_on_requests_to(&self, ports: &[u16]) -> Result<()> {
        let mut probes = self
            .probes
            .lock()
            .map_err(|_| anyhow::anyhow!("the probes' lock is poisoned"))?;
        probes.wake_on_requests_to(ports)
    }

    /// Whether the contexts of Python process `pid` are read (see
    /// [`python`]).
    pub fn is_python_watched(&self, pid: u32) -> bool {
        self.probes
            .lock()
            .is_ok_and(|probes| probes.is_python_watched(pid))
    }

    /// Kernel and user-space counters, by name.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut all = self
            .probes
            .lock()
            .map_err(|_| anyhow::anyhow!("the probes' lock is poisoned"))?
            .counters()?;
        let user = &self.user;
        let values = [
            &user.decode_errors,
            &user.events,
            &user.python_watched,
            &user.python_not_watched,
        ];
        all.extend(
            USER_COUNTER_NAMES
                .into_iter()
                .zip(values.map(|v| v.load(Ordering::Relaxed))),
        );
        Ok(all)
    }

    /// [`Self::counters`] as metrics.
    pub fn readings(&self) -> Result<Vec<Reading>> {
        Ok(self
            .counters()?
            .into_iter()
            .map(|(name, value)| counter_reading(name, value))
            .collect())
    }
}

/// Names of the user-space counters in [`Capture::counters`], after the
/// kernel's (`agent_common::counter::NAMES`).
pub const USER_COUNTER_NAMES: [&str; 4] = [
    "user_decode_errors",
    "user_events",
    "python_watched",
    "python_not_watched",
];

/// The metric of a capture counter named `name` (see [`Capture::counters`]).
pub fn counter_reading(name: &'static str, value: u64) -> Reading {
    if let Some(reason) = name.strip_prefix("drop_") {
        return Reading::counter(
            "agent_capture_dropped",
            "Messages and records the kernel probes dropped or cut, by reason",
            value,
        )
        .with("reason", reason);
    }
    let (family, help) = match name {
        "records_sent" => (
            "agent_capture_records",
            "Records the kernel probes wrote to the ring buffer",
        ),
        "messages_not_http" => (
            "agent_capture_messages_not_http",
            "Messages on TCP connections not copied because they are not HTTP/1.x",
        ),
        "python_context_unread" => (
            "agent_capture_python_context_unread",
            "Messages of watched Python processes whose thread's context could not be read",
        ),
        "user_decode_errors" => (
            "agent_capture_decode_errors",
            "Ring-buffer records user space could not decode",
        ),
        "user_events" => (
            "agent_capture_events",
            "Events user space decoded from the ring buffer",
        ),
        "python_watched" => (
            "agent_python_processes_watched",
            "Python processes whose asyncio contexts the probes read",
        ),
        "python_not_watched" => (
            "agent_python_processes_not_watched",
            "Python processes whose interpreter could not be read",
        ),
        _ => (
            "agent_capture_other",
            "Capture counters without a metric of their own, by name",
        ),
    };
    let reading = Reading::counter(family, help, value);
    if family == "agent_capture_other" {
        reading.with("counter", name)
    } else {
        reading
    }
}

impl CaptureReader {
    /// Waits until the kernel signals records or the drain timer ticks,
    /// then hands up to [`MAX_BATCH`] events to `handle`, one at a time and
    /// in the ring's order, each while the ring still holds its record
    /// (none when the timer found the ring empty). Returns on every tick,
    /// so that the caller's own periodic work shares the timer's wake-up
    /// instead of paying for one of its own. Cancel-safe: nothing is taken
    /// from the ring before the only await.
    pub async fn read(
        &mut self,
        mut handle: impl FnMut(CaptureEvent<'_>),
    ) -> std::io::Result<Woken> {
        if self.backlog {
            // More at once, but through the runtime's budget: a ring that
            // stays full must not starve the loop's other branches.
            tokio::task::consume_budget().await;
            self.backlog = self.decoding.drain(self.ring.get_mut(), &mut handle).full;
            return Ok(Woken::Backlog);
        }
        loop {
            // Woken by the kernel (enough waiting, or a request the proxy
            // waits on), or by the timer for what sent no wake-up.
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard?;
                    let drained = self.decoding.drain(guard.get_inner_mut(), &mut handle);
                    // A full batch may have left records behind: stay
                    // ready, so the next read takes them at once.
                    if !drained.full {
                        guard.clear_ready();
                    }
                    if drained.records > 0 {
                        return Ok(Woken::Kernel);
                    }
                }
                ticked = self.drain.tick() => {
                    ticked?;
                    self.backlog = self.decoding.drain(self.ring.get_mut(), &mut handle).full;
                    return Ok(Woken::Timer);
                }
            }
        }
    }
}

/// The drain timer: a timerfd in the runtime's epoll set rather than a
/// tokio interval. tokio's timer wheel parks at most until the start of
/// the wheel slot holding the next deadline (64 ms wide at this period),
/// then again until the deadline, and its timers wake the loop's future
/// through the runtime's own eventfd: three wake-ups and a write per tick
/// where a timerfd makes one (docs/benchmarks.md).
struct DrainTimer(AsyncFd<std::os::fd::OwnedFd>);

impl DrainTimer {
    /// A timer that fires every `period`, the first time one period from
    /// now. Ticks missed while the loop was busy fold into the next one.
    fn start(period: Duration) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain syscalls; the fd is owned from here on.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new fd nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let every = libc::timespec {
            tv_sec: period.as_secs() as libc::time_t,
            tv_nsec: period.subsec_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: every,
            it_value: every,
        };
        // SAFETY: `spec` outlives the call; the old value is not asked for.
        let set = unsafe {
            libc::timerfd_settime(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if set < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the fd, which stays open and the same
        // until it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Self(fd))
    }

    /// Waits for the next tick. Cancel-safe: a tick is consumed only when
    /// this returns.
    async fn tick(&self) -> std::io::Result<()> {
        loop {
            let mut guard = self.0.readable().await?;
            let read = guard.try_io(|fd| {
                let mut expirations = 0u64;
                // SAFETY: reads 8 bytes into a u64 that outlives the call.
                let n = unsafe {
                    libc::read(
                        std::os::fd::AsRawFd::as_raw_fd(fd.get_ref()),
                        (&raw mut expirations).cast(),
                        8,
                    )
                };
                if n == 8 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
            match read {
                Ok(result) => {
                    // The read took every expiration: nothing to read until
                    // the next one, which the runtime will see as new
                    // readiness (clearing does not hide it).
                    guard.clear_ready();
                    return result;
                }
                // Not due after all (readiness was stale): wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

/// What ended a [`CaptureReader::read`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woken {
    /// The kernel signalled records.
    Kernel,
    /// The drain timer ticked (every [`DRAIN_EVERY`]).
    Timer,
    /// The last drain stopped at a full batch and this one took more, at
    /// once.
    Backlog,
}

/// What one [`Decoding::drain`] took from the ring.
struct Drained {
    /// Records taken (events and undecodable ones).
    records: usize,
    /// It stopped at [`MAX_BATCH`]: more may be waiting.
    full: bool,
}

impl Decoding {
    /// Hands up to [`MAX_BATCH`] records of `rb` to `handle` as events,
    /// each before the ring may reuse its space (the item is released when
    /// dropped, after `handle` returns).
    fn drain(
        &mut self,
        rb: &mut RingBuf<MapData>,
        handle: &mut impl FnMut(CaptureEvent<'_>),
    ) -> Drained {
        let mut records = 0;
        let mut events = 0;
        let now = Instant::now();
        while records < MAX_BATCH {
            let Some(item) = rb.next() else { break };
            records += 1;
            match decode_record(&item) {
                Ok(event) => {
                    self.note_pid(event.pid(), now);
                    events += 1;
                    handle(event);
                }
                Err(e) => {
                    self.user.decode_errors.fetch_add(1, Ordering::Relaxed);
                    log::debug!("dropping ring record: {e}");
                }
            }
        }
        self.user.events.fetch_add(events, Ordering::Relaxed);
        Drained {
            records,
            full: records == MAX_BATCH,
        }
    }

    /// Sends `pid` to the Python watcher if it was not considered lately.
    fn note_pid(&mut self, pid: u32, now: Instant) {
        if self
            .seen_pids
            .get(&pid)
            .is_some_and(|seen| now.duration_since(*seen) < RECONSIDER_AFTER)
        {
            return;
        }
        if self.seen_pids.len() >= MAX_SEEN_PIDS {
            self.seen_pids.clear();
        }
        self.seen_pids.insert(pid, now);
        // Full: this pid is sent again after RECONSIDER_AFTER.
        let _ = self.to_watcher.try_send(pid);
    }
}

/// Starts the thread that watches the Python processes (see [`python`]):
/// those running already (a restarted agent, or one deployed onto a busy
/// node, reads them before their next request, not after), those started
/// since (found by listing /proc, at most every [`PROCESS_SCAN_INTERVAL`],
/// so that a new service is read before its first requests, not when the
/// capture's reader gets to them), and the ones the reader sends; it
/// unwatches the ones that exited. It ends when the reader is dropped.
fn spawn_python_watcher(
    probes: Arc<Mutex<Probes>>,
    user: Arc<UserCounters>,
    new_pids: mpsc::Receiver<u32>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("python-watch".into())
        .spawn(move || {
            let mut known = std::collections::HashSet::default();
            let mut last_scan = Instant::now() - PROCESS_SCAN_INTERVAL;
            let mut last_listing = Instant::now();
            let mut listed_up_to = None;
            // Processes to look at again at the next listing.
            let mut unsettled = true;
            let mut last_sweep = Instant::now();
            loop {
                if last_scan.elapsed() >= PROCESS_SCAN_INTERVAL {
                    last_scan = Instant::now();
                    // Read before listing: a process started during the
                    // listing changes it, and the next scan lists again.
                    // Listing /proc and reading each new process's maps is
                    // most of an idle agent's CPU when done every scan.
                    let newest =
                        newest_pid(&std::fs::read_to_string("/proc/loadavg").unwrap_or_default());
                    if unsettled
                        || newest.is_none()
                        || newest != listed_up_to
                        || last_listing.elapsed() >= FULL_SCAN_INTERVAL
                    {
                        listed_up_to = newest;
                        last_listing = last_scan;
                        unsettled = false;
                        let mut running: std::collections::HashSet<u32> =
                            running_pids().into_iter().collect();
                        let new: Vec<u32> = running.difference(&known).copied().collect();
                        for pid in new {
                            if !consider(&probes, &user, pid) {
                                // Looked at again on the next listing.
                                running.remove(&pid);
                                unsettled = true;
                            }
                        }
                        known = running;
                    }
                }
                match new_pids.recv_timeout(PROCESS_SCAN_INTERVAL) {
                    Ok(pid) => {
                        consider(&probes, &user, pid);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                if last_sweep.elapsed() >= PYTHON_SWEEP_INTERVAL {
                    last_sweep = Instant::now();
                    if let Ok(mut probes) = probes.lock() {
                        probes.forget_exited_python();
                    }
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("starting the Python watcher thread: {e}"))?;
    Ok(())
}

/// The last process id the kernel gave out, from the text of
/// /proc/loadavg (its fifth field): unchanged, no process or thread
/// started in between.
fn newest_pid(loadavg: &str) -> Option<u32> {
    loadavg.split_whitespace().nth(4)?.parse().ok()
}

/// The processes running now, from /proc.
fn running_pids() -> Vec<u32> {
    let own = std::process::id();
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| *pid != own)
                .collect()
        })
        .unwrap_or_default()
}

/// A process seen for the first time: watch its contexts if it is a
/// Python interpreter (its first records come before the watch). False
/// when it could not be settled (a failure that may pass, such as a read
/// racing a thread's exit): worth another look.
fn consider(probes: &Mutex<Probes>, user: &UserCounters, pid: u32) -> bool {
    let Ok(mut probes) = probes.lock() else {
        return true;
    };
    let started = Instant::now();
    match probes.watch_python(pid) {
        Ok(Some(interpreter)) => {
            user.python_watched.fetch_add(1, Ordering::Relaxed);
            let (major, minor, micro) = interpreter.version;
            log::info!(
                "reading the contexts of Python {major}.{minor}.{micro} in pid {pid} ({}), set up in {:?}",
                interpreter.object.display(),
                started.elapsed()
            );
        }
        // A process seen between its fork and its exec (`ip netns exec`,
        // a shell, a launcher) is not Python yet: young ones are looked at
        // again, or a service would wait for the reader's next mention of
        // its pid.
        Err(python::NotWatched::NotPython)
            if python::age(std::path::Path::new("/proc"), pid)
                .is_some_and(|age| age < YOUNG_PROCESS) =>
        {
            return false;
        }
        Ok(None) | Err(python::NotWatched::NotPython | python::NotWatched::Gone) => {}
        Err(e @ (python::NotWatched::Unreadable(_) | python::NotWatched::LayoutMismatch)) => {
            log::debug!("pid {pid}: Python contexts not read yet: {e}");
            return false;
        }
        Err(e) => {
            user.python_not_watched.fetch_add(1, Ordering::Relaxed);
            log::info!("pid {pid}: Python contexts not read: {e}");
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_pid_is_the_last_field_of_loadavg() {
        assert_eq!(newest_pid("0.52 0.58 0.59 2/389 31337\n"), Some(31337));
        assert_eq!(newest_pid("0.52 0.58 0.59 2/389"), None);
        assert_eq!(newest_pid(""), None);
        // This kernel's own, and it moves when a process starts.
        let read = || newest_pid(&std::fs::read_to_string("/proc/loadavg").unwrap()).unwrap();
        let before = read();
        std::process::Command::new("true").status().unwrap();
        assert_ne!(read(), before);
    }

    #[tokio::test]
    async fn the_drain_timer_ticks_a_period_apart_and_folds_missed_ticks() {
        let period = Duration::from_millis(200);
        let timer = DrainTimer::start(period).unwrap();
        let started = Instant::now();
        timer.tick().await.unwrap();
        // The first tick comes one period after the start, not at once.
        assert!(started.elapsed() >= period - Duration::from_millis(20));

        // Busy for several periods: the next tick is due at once, and
        // only one is (the missed ones fold into it).
        std::thread::sleep(period * 3);
        tokio::time::timeout(period / 2, timer.tick())
            .await
            .expect("a missed tick is due at once")
            .unwrap();
        tokio::select! {
            biased;
            _ = timer.tick() => panic!("a second tick right after the folded one"),
            () = std::future::ready(()) => {}
        }
        let waiting = Instant::now();
        timer.tick().await.unwrap();
        assert!(waiting.elapsed() < period * 2, "ticks keep coming");
    }
}
