//! The agent's correlation running live over the shared capture, sharing
//! its decisions with an in-process proxy, as `agent run` does: for tests
//! whose proxy must inject the contexts the probes decide (a request's
//! parent, its tracestate, a forwarder's own span).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use agent::correlate::{Correlator, ProcessFilter, ProcessTable, ProxyContexts, SpanSettings};
use agent::span::Span;

use crate::capture;

/// A correlator following the capture on a thread of its own.
pub struct LiveCorrelation {
    contexts: Arc<ProxyContexts>,
    spans: Arc<Mutex<Vec<Span>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the capture's log is looked at: well within the proxy's wait
/// for a decision.
const POLL: Duration = Duration::from_micros(500);

impl LiveCorrelation {
    /// Starts correlating the events captured from now on; requests to
    /// `proxied_ports` are agreed with the proxy that uses [`Self::contexts`].
    pub fn start(proxied_ports: Vec<u16>) -> Self {
        capture().wake_on_requests_to(&proxied_ports);
        let contexts = Arc::new(ProxyContexts::new());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (_, mut position) = capture().events_since(usize::MAX);
        let thread = {
            let (contexts, spans, stop) = (contexts.clone(), spans.clone(), stop.clone());
            std::thread::spawn(move || {
                let sampler = agent::sampling::Sampler::new(100.0, true).unwrap();
                let mut correlator = Correlator::new(
                    sampler,
                    SpanSettings::default(),
                    ProcessTable::new("/proc", ProcessFilter::default()),
                );
                correlator.share_with_proxy(
                    contexts,
                    agent::proxy::RedirectScope::of_ports(proxied_ports),
                );
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (events, next) = capture().events_since(position);
                    position = next;
                    for event in &events {
                        correlator.handle(event, &mut out);
                    }
                    correlator.release_held(&mut out);
                    if !out.is_empty() {
                        spans.lock().unwrap().append(&mut out);
                    }
                    if events.is_empty() {
                        std::thread::sleep(POLL);
                    }
                }
            })
        };
        Self {
            contexts,
            spans,
            stop,
            thread: Some(thread),
        }
    }

    /// The table the proxy asks for each request's context.
    pub fn contexts(&self) -> Arc<ProxyContexts> {
        self.contexts.clone()
    }

    /// The spans finished so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

impl Drop for LiveCorrelation {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
