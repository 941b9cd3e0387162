//! Capture stage: kernel records in, [`CaptureEvent`]s out.
//!
//! [`probes`] loads and attaches the kernel programs; [`event`] decodes their
//! records and joins chunks into messages (pure, testable without a kernel);
//! [`Capture`] ties them together on tokio, reading the ring buffer when it
//! signals readiness (no busy polling) and handing events to a bounded
//! channel, so a slow consumer makes the kernel drop (and count) rather
//! than the agent grow without bound.

pub mod event;
pub mod kernel_offsets;
pub mod probes;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

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

/// A running capture. Dropping it stops the reader and detaches the probes.
pub struct Capture {
    probes: Probes,
    user: Arc<UserCounters>,
    reader: tokio::task::JoinHandle<()>,
}

impl Capture {
    /// Attaches the probes and starts reading. Must be called inside a tokio
    /// runtime. Events arrive on the returned receiver, which holds at most
    /// `channel_capacity` of them.
    pub fn start(
        settings: ProbeSettings,
        channel_capacity: usize,
    ) -> Result<(Self, mpsc::Receiver<CaptureEvent>)> {
        let (probes, ring) = Probes::attach(settings)?;
        let (tx, rx) = mpsc::channel(channel_capacity.max(1));
        let user = Arc::new(UserCounters::default());
        // SAFETY: the ring buffer owns its map fd, which stays open and the
        // same until the AsyncFd (which owns the ring buffer) is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
        let reader = tokio::spawn(read_ring(ring, tx, user.clone()));
        Ok((
            Self {
                probes,
                user,
                reader,
            },
            rx,
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

impl Drop for Capture {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Drains the ring buffer whenever the kernel signals data, decoding into a
/// batch first so no ring-buffer item is held across an await.
async fn read_ring(
    mut ring: AsyncFd<RingBuf<MapData>>,
    tx: mpsc::Sender<CaptureEvent>,
    user: Arc<UserCounters>,
) {
    let mut decoder = RecordDecoder::new();
    let mut batch = Vec::with_capacity(256);
    loop {
        let Ok(mut guard) = ring.readable_mut().await else {
            return;
        };
        let rb = guard.get_inner_mut();
        // Bounded batches: the channel's back-pressure applies between them.
        while batch.len() < 256 {
            let Some(item) = rb.next() else { break };
            match decoder.decode(&item) {
                Ok(event) => batch.push(event),
                Err(e) => {
                    user.decode_errors.fetch_add(1, Ordering::Relaxed);
                    log::debug!("dropping ring record: {e}");
                }
            }
        }
        let drained = batch.len() < 256;
        if drained {
            guard.clear_ready();
        }
        user.events.fetch_add(batch.len() as u64, Ordering::Relaxed);
        for event in batch.drain(..) {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}
