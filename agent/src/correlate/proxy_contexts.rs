//! Agreement between the correlator and the proxy on the ids of a proxied
//! request, so that the `traceparent` the proxy injects names exactly the
//! CLIENT span the probes report for the application's request.
//!
//! The application's request is seen twice: by the probes (its write, with
//! no `traceparent`) and by the proxy (reading it from the redirected
//! connection). Both name it the same way: the application's address, the
//! original destination, and the request's position on the connection.
//! Whichever side decides first records its context; the other adopts it.
//! The check-and-record is one step under a lock, so the two can never
//! decide differently.

use foldhash::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::tracecontext::{IdGenerator, PropagatedContext, TraceParent, root_flags};

/// A request as both sides can name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProxiedRequestKey {
    /// The application's end of the connection.
    pub client: SocketAddr,
    /// Where the application sent it (the proxy's SO_ORIGINAL_DST).
    pub original_destination: SocketAddr,
    /// 0-based position of the request on its connection.
    pub index: u64,
}

/// Decisions kept at most per side; when full, the oldest go first.
const MAX_PENDING: usize = 65_536;

/// A decision nobody claimed for this long never will be: the other side
/// sees the same request within milliseconds (the proxy reads it as the
/// probes record it). Entries for requests the proxy never sees (what the
/// redirect scope cannot tell from addresses) go after this.
const MAX_DECISION_AGE: Duration = Duration::from_secs(30);

/// Inserts between two sweeps of entries older than [`MAX_DECISION_AGE`].
const SWEEP_EVERY: u32 = 1024;

/// Decisions by request, each with when it was made: bounded in number
/// and in age, never cleared all at once (live entries stay).
struct AgingDecisions<V> {
    entries: HashMap<ProxiedRequestKey, (V, Instant)>,
    inserts_since_sweep: u32,
}

impl<V> Default for AgingDecisions<V> {
    fn default() -> Self {
        Self {
            entries: HashMap::default(),
            inserts_since_sweep: 0,
        }
    }
}

impl<V> AgingDecisions<V> {
    fn remove(&mut self, key: &ProxiedRequestKey) -> Option<V> {
        self.entries.remove(key).map(|(value, _)| value)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn insert(&mut self, key: ProxiedRequestKey, value: V, now: Instant) {
        self.inserts_since_sweep += 1;
        if self.inserts_since_sweep >= SWEEP_EVERY || self.entries.len() >= MAX_PENDING {
            self.inserts_since_sweep = 0;
            self.entries
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < MAX_DECISION_AGE);
        }
        if self.entries.len() >= MAX_PENDING {
            // All young: the oldest quarter goes (a rare sort, not per insert).
            let mut ages: Vec<Instant> = self.entries.values().map(|(_, at)| *at).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 4];
            self.entries.retain(|_, (_, at)| *at > cutoff);
        }
        self.entries.insert(key, (value, now));
    }
}

#[derive(Default)]
struct Decisions {
    /// Decided by the correlator, not yet taken by the proxy.
    by_correlator: AgingDecisions<PropagatedContext>,
    /// Decided by the proxy (it could not wait longer), for the correlator
    /// to adopt.
    by_proxy: AgingDecisions<TraceParent>,
    /// Requests the proxy is waiting on, each with its own channel, so a
    /// decision wakes exactly the request it is for (not every waiter).
    waiting: HashMap<ProxiedRequestKey, oneshot::Sender<PropagatedContext>>,
    /// Requests that carry a valid traceparent, as the correlator saw them:
    /// Some(context) when the sender forwards one an inbound request of its
    /// own brought (the proxy writes the sender's CLIENT span instead), None
    /// when it is the application's own (the request passes unchanged).
    wire_decisions: AgingDecisions<Option<PropagatedContext>>,
    /// Proxied requests with a traceparent waiting for that decision.
    wire_waiting: HashMap<ProxiedRequestKey, oneshot::Sender<Option<PropagatedContext>>>,
    ids: IdGenerator,
}

/// How the proxy's requests got their contexts, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgreementCounters {
    /// The probes had already decided when the proxy asked.
    pub ready: u64,
    /// The proxy waited, and the probes decided within the wait.
    pub waited: u64,
    /// The wait ran out; the proxy decided and the correlator adopts it.
    pub decided_by_proxy: u64,
    /// A request with a traceparent whose wait ran out: passed unchanged,
    /// whether or not its sender forwarded it.
    pub traceparent_unknown: u64,
}

impl AgreementCounters {
    /// The counters as metrics: how each proxied request's context was
    /// agreed on.
    pub fn readings(&self) -> Vec<crate::metrics::Reading> {
        const FAMILY: &str = "agent_proxy_contexts";
        const HELP: &str =
            "Proxied requests, by how the probes and the proxy agreed on their context";
        let reading = |outcome: &'static str, value| {
            crate::metrics::Reading::counter(FAMILY, HELP, value).with("outcome", outcome)
        };
        vec![
            reading("ready", self.ready),
            reading("waited", self.waited),
            reading("decided_by_proxy", self.decided_by_proxy),
            reading("traceparent_unknown", self.traceparent_unknown),
        ]
    }
}

/// The table both sides share (behind an `Arc`).
#[derive(Default)]
pub struct ProxyContexts {
    decisions: Mutex<Decisions>,
    ready: AtomicU64,
    waited: AtomicU64,
    decided_by_proxy: AtomicU64,
    wire_unknown: AtomicU64,
}

impl ProxyContexts {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Decisions> {
        self.decisions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How the proxy's requests got their contexts so far.
    pub fn counters(&self) -> AgreementCounters {
        AgreementCounters {
            ready: self.ready.load(Ordering::Relaxed),
            waited: self.waited.load(Ordering::Relaxed),
            decided_by_proxy: self.decided_by_proxy.load(Ordering::Relaxed),
            traceparent_unknown: self.wire_unknown.load(Ordering::Relaxed),
        }
    }

    /// Correlator side: the context it chose for the CLIENT span of `key`
    /// (and the tracestate it continues). Returns the proxy's decision
    /// instead when the proxy decided first (a new trace, no tracestate);
    /// the caller must then use that one.
    pub fn settle_client_context(
        &self,
        key: ProxiedRequestKey,
        chosen: PropagatedContext,
    ) -> PropagatedContext {
        let mut d = self.lock();
        if let Some(by_proxy) = d.by_proxy.remove(&key) {
            return PropagatedContext::without_state(by_proxy);
        }
        if let Some(waiter) = d.waiting.remove(&key) {
            // Sent under the lock: a proxy whose wait just ran out finds
            // its entry gone and takes this value, never deciding itself.
            if waiter.send(chosen.clone()).is_ok() {
                return chosen;
            }
        }
        d.by_correlator.insert(key, chosen.clone(), Instant::now());
        chosen
    }

    /// Correlator side: request `key` carries a valid traceparent; `forward`
    /// is the context to write instead when its sender forwards one it
    /// received (see [`Self::forwarded_context_for`]), None to leave it.
    pub fn settle_wire_request(&self, key: ProxiedRequestKey, forward: Option<PropagatedContext>) {
        let mut d = self.lock();
        let forward = match d.wire_waiting.remove(&key) {
            Some(waiter) => match waiter.send(forward) {
                Ok(()) => return,
                Err(forward) => forward,
            },
            None => forward,
        };
        d.wire_decisions.insert(key, forward, Instant::now());
    }

    /// Proxy side, for request `key` carrying a valid traceparent: the
    /// context to write instead when its sender forwards a traceparent it
    /// received itself (a gateway), so that the next service becomes the
    /// child of the sender's own CLIENT span; None to pass it unchanged.
    /// Waits up to `wait` for the correlator's view of the request (it
    /// cannot tell a forward from the application's own traceparent
    /// without it); None when the wait runs out. Never decides ids of its
    /// own: the trace is the sender's.
    pub async fn forwarded_context_for(
        &self,
        key: ProxiedRequestKey,
        wait: Duration,
    ) -> Option<PropagatedContext> {
        let decided = {
            let mut d = self.lock();
            if let Some(decision) = d.wire_decisions.remove(&key) {
                self.ready.fetch_add(1, Ordering::Relaxed);
                return decision;
            }
            let (sender, receiver) = oneshot::channel();
            if d.wire_waiting.len() >= MAX_PENDING {
                d.wire_waiting.retain(|_, sender| !sender.is_closed());
            }
            d.wire_waiting.insert(key, sender);
            receiver
        };
        match self
            .await_decision(decided, wait, |d| d.wire_waiting.remove(&key).is_some())
            .await
        {
            Ok(decision) => decision,
            Err(_) => {
                self.wire_unknown.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Waits up to `wait` for the correlator's decision on a request the
    /// proxy registered as waiting. When the wait runs out, `unregister`
    /// takes the request out of its waiting table under the lock (true if
    /// it was still there); a decision sent meanwhile is still taken.
    /// Otherwise returns the lock, for the caller to decide under it.
    async fn await_decision<T>(
        &self,
        mut decided: oneshot::Receiver<T>,
        wait: Duration,
        unregister: impl FnOnce(&mut Decisions) -> bool,
    ) -> Result<T, std::sync::MutexGuard<'_, Decisions>> {
        if let Ok(Ok(decision)) = tokio::time::timeout(wait, &mut decided).await {
            self.waited.fetch_add(1, Ordering::Relaxed);
            return Ok(decision);
        }
        let mut d = self.lock();
        if !unregister(&mut d)
            && let Ok(decision) = decided.try_recv()
        {
            // The correlator decided while the wait was running out.
            self.waited.fetch_add(1, Ordering::Relaxed);
            return Ok(decision);
        }
        Err(d)
    }

    /// Proxy side: the context to inject into `key`. Waits up to `wait` for
    /// the correlator to see the application's request (its probes and the
    /// proxy race); then decides a new trace itself, which the correlator
    /// will adopt.
    pub async fn context_for(&self, key: ProxiedRequestKey, wait: Duration) -> PropagatedContext {
        let decided = {
            let mut d = self.lock();
            if let Some(by_correlator) = d.by_correlator.remove(&key) {
                self.ready.fetch_add(1, Ordering::Relaxed);
                return by_correlator;
            }
            let (sender, receiver) = oneshot::channel();
            if d.waiting.len() >= MAX_PENDING {
                // Only waiters whose requests were cancelled can be this
                // many; their senders are dead.
                d.waiting.retain(|_, sender| !sender.is_closed());
            }
            d.waiting.insert(key, sender);
            receiver
        };
        let mut d = match self
            .await_decision(decided, wait, |d| d.waiting.remove(&key).is_some())
            .await
        {
            Ok(by_correlator) => return by_correlator,
            Err(d) => d,
        };
        let decision = TraceParent {
            trace_id: d.ids.trace_id(),
            parent_id: d.ids.span_id(),
            flags: root_flags(true),
        };
        d.by_proxy.insert(key, decision, Instant::now());
        self.decided_by_proxy.fetch_add(1, Ordering::Relaxed);
        PropagatedContext::without_state(decision)
    }
}

/// How long the proxy waits for the probes' view of a request before it
/// decides the ids itself. The proxy usually asks first: the application's
/// bytes reach the proxy's socket within its write, while the probes' record
/// still has to cross the ring buffer and the correlator (measured: the
/// proxy waited for ~94 % of requests, tens of microseconds each; see
/// docs/benchmarks.md). This bounds the latency the agreement can add.
pub const AGREEMENT_WAIT: Duration = Duration::from_millis(10);

impl crate::proxy::context::TraceContextSource for ProxyContexts {
    fn context_for<'a>(
        &'a self,
        request: &'a crate::proxy::context::ProxiedRequest,
    ) -> std::pin::Pin<Box<dyn Future<Output = PropagatedContext> + Send + 'a>> {
        let key = ProxiedRequestKey {
            client: request.client,
            original_destination: request.original_destination,
            index: request.index,
        };
        Box::pin(ProxyContexts::context_for(self, key, AGREEMENT_WAIT))
    }

    fn forwarded_context_for<'a>(
        &'a self,
        request: &'a crate::proxy::context::ProxiedRequest,
        received: TraceParent,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<PropagatedContext>> + Send + 'a>> {
        let key = ProxiedRequestKey {
            client: request.client,
            original_destination: request.original_destination,
            index: request.index,
        };
        let _ = received;
        Box::pin(ProxyContexts::forwarded_context_for(
            self,
            key,
            AGREEMENT_WAIT,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::{SpanId, TraceId};

    fn key(index: u64) -> ProxiedRequestKey {
        ProxiedRequestKey {
            client: "10.241.1.2:40000".parse().unwrap(),
            original_destination: "10.241.2.2:8080".parse().unwrap(),
            index,
        }
    }

    #[test]
    fn unclaimed_decisions_age_out_and_a_full_table_keeps_its_newest() {
        let start = Instant::now();
        let mut table = AgingDecisions::<u64>::default();
        // Stale: made long ago, never claimed.
        for i in 0..10 {
            table.insert(key(i), i, start);
        }
        // A sweep runs every SWEEP_EVERY inserts: the stale ones go, the
        // fresh ones stay.
        let later = start + MAX_DECISION_AGE + Duration::from_secs(1);
        for i in 10..(10 + u64::from(SWEEP_EVERY)) {
            table.insert(key(i), i, later);
        }
        assert_eq!(table.remove(&key(0)), None, "aged out");
        assert_eq!(table.remove(&key(10)), Some(10), "young: kept");
        assert_eq!(table.len(), SWEEP_EVERY as usize - 1);

        // Full of young entries: the oldest quarter goes, not everything.
        let mut full = AgingDecisions::<u64>::default();
        for i in 0..MAX_PENDING as u64 {
            full.insert(key(i), i, start + Duration::from_millis(i / 1000));
        }
        full.insert(key(u64::MAX), 0, start + Duration::from_secs(1));
        assert!(full.len() >= MAX_PENDING / 2, "{}", full.len());
        assert!(full.len() <= MAX_PENDING, "{}", full.len());
        assert_eq!(full.remove(&key(u64::MAX)), Some(0), "the newest stays");
        assert_eq!(
            full.remove(&key(MAX_PENDING as u64 - 1)),
            Some(MAX_PENDING as u64 - 1)
        );
        assert_eq!(full.remove(&key(0)), None, "the oldest went");
    }

    fn context(n: u8) -> PropagatedContext {
        PropagatedContext {
            traceparent: TraceParent {
                trace_id: TraceId([n; 16]),
                parent_id: SpanId([n; 8]),
                flags: 1,
            },
            tracestate: format!("k{n}=v{n}"),
        }
    }

    #[tokio::test]
    async fn proxy_injects_what_the_correlator_decided_first() {
        let table = ProxyContexts::new();
        assert_eq!(table.settle_client_context(key(0), context(7)), context(7));
        assert_eq!(
            table.context_for(key(0), Duration::from_millis(10)).await,
            context(7)
        );
    }

    #[tokio::test]
    async fn proxy_waits_for_a_decision_made_while_it_waits() {
        let table = std::sync::Arc::new(ProxyContexts::new());
        let t = table.clone();
        let waiter =
            tokio::spawn(async move { t.context_for(key(1), Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        table.settle_client_context(key(1), context(9));
        assert_eq!(waiter.await.unwrap(), context(9));
    }

    #[tokio::test]
    async fn correlator_adopts_what_the_proxy_decided_after_waiting() {
        let table = ProxyContexts::new();
        let injected = table.context_for(key(2), Duration::from_millis(5)).await;
        assert!(
            injected.traceparent.trace_id.is_valid() && injected.traceparent.parent_id.is_valid()
        );
        assert_eq!(injected.tracestate, "", "a new trace continues no state");
        assert_eq!(
            table.settle_client_context(key(2), context(3)),
            injected,
            "the proxy's ids win"
        );
    }

    #[tokio::test]
    async fn a_forwarded_traceparent_is_replaced_by_the_correlators_context() {
        let table = ProxyContexts::new();
        // The application's own traceparent: unchanged.
        table.settle_wire_request(key(5), None);
        assert_eq!(
            table
                .forwarded_context_for(key(5), Duration::from_millis(5))
                .await,
            None
        );
        // A forward, decided before or while the proxy waits.
        table.settle_wire_request(key(6), Some(context(6)));
        assert_eq!(
            table
                .forwarded_context_for(key(6), Duration::from_millis(5))
                .await,
            Some(context(6))
        );
        let table = std::sync::Arc::new(table);
        let t = table.clone();
        let waiter = tokio::spawn(async move {
            t.forwarded_context_for(key(7), Duration::from_secs(5))
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        table.settle_wire_request(key(7), Some(context(7)));
        assert_eq!(waiter.await.unwrap(), Some(context(7)));
        // The wait runs out: unchanged, and counted.
        assert_eq!(
            table
                .forwarded_context_for(key(8), Duration::from_millis(5))
                .await,
            None
        );
        assert_eq!(table.counters().traceparent_unknown, 1);
    }

    #[tokio::test]
    async fn different_requests_do_not_mix() {
        let table = ProxyContexts::new();
        table.settle_client_context(key(0), context(1));
        let other = table.context_for(key(1), Duration::from_millis(5)).await;
        assert_ne!(other, context(1));
        assert_eq!(
            table.context_for(key(0), Duration::from_millis(5)).await,
            context(1)
        );
    }
}
