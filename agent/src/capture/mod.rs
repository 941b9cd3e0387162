//! Capture stage: kernel records in, [`CaptureEvent`]s out.
//!
//! [`probes`] loads and attaches the kernel programs; [`event`] decodes their
//! records and joins chunks into messages (pure, testable without a kernel);
//! [`Capture`] attaches them and [`CaptureReader`] reads the ring buffer on
//! tokio when it signals readiness (no busy polling), in the consumer's own
//! task, so a slow consumer makes the kernel drop (and count) rather than
//! the agent grow without bound.

pub mod event;
pub mod kernel_offsets;
pub mod probes;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub use event::{
    CaptureEvent, Connection, ConnectionId, Direction, Message, RecordDecoder, Role, Syscall,
};
pub use probes::{ProbeSettings, Probes};

/// Counters of the user-space side of the capture.
#[derive(Debug, Default)]
pub struct UserCounters {
    /// Records that could not be decoded.
    pub decode_errors: AtomicU64,
    /// Events produced.
    pub events: AtomicU64,
}

/// A running capture. Dropping it detaches the probes.
pub struct Capture {
    probes: Probes,
    user: Arc<UserCounters>,
}

/// Reads the capture's ring buffer. Kept apart from [`Capture`] so that the
/// consumer can wait for records while the counters stay readable.
pub struct CaptureReader {
    ring: AsyncFd<RingBuf<MapData>>,
    decoder: RecordDecoder,
    user: Arc<UserCounters>,
}

/// Records decoded per [`CaptureReader::read`] at most: a bound on the work
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
        let user = Arc::new(UserCounters::default());
        // SAFETY: the ring buffer owns its map fd, which stays open and the
        // same until the AsyncFd (which owns the ring buffer) is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
        Ok((
            Self {
                probes,
                user: user.clone(),
            },
            CaptureReader {
                ring,
                decoder: RecordDecoder::new(),
                user,
            },
        ))
    }

    /// Kernel and user-space counters, by name.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut all = self.probes.counters()?;
        all.push((
            "user_decode_errors",
            self.user.decode_errors.load(Ordering::Relaxed),
        ));
        all.push(("user_events", self.user.events.load(Ordering::Relaxed)));
        Ok(all)
    }
}

impl CaptureReader {
    /// Waits until the kernel signals records, then decodes up to
    /// [`MAX_BATCH`] of them onto `batch`. Cancel-safe: nothing is taken
    /// from the ring before the only await.
    pub async fn read(&mut self, batch: &mut Vec<CaptureEvent>) -> std::io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        let rb = guard.get_inner_mut();
        let before = batch.len();
        let mut decoded = 0;
        while decoded < MAX_BATCH {
            let Some(item) = rb.next() else { break };
            decoded += 1;
            match self.decoder.decode(&item) {
                Ok(event) => batch.push(event),
                Err(e) => {
                    self.user.decode_errors.fetch_add(1, Ordering::Relaxed);
                    log::debug!("dropping ring record: {e}");
                }
            }
        }
        // A full batch may have left records behind: stay ready, so the
        // next read takes them without waiting for another signal.
        if decoded < MAX_BATCH {
            guard.clear_ready();
        }
        self.user
            .events
            .fetch_add((batch.len() - before) as u64, Ordering::Relaxed);
        Ok(())
    }
}
