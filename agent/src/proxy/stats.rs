//! What the proxy counts.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of a running proxy; shared, updated without locks.
#[derive(Debug, Default)]
pub struct ProxyStats {
    connections_http: AtomicU64,
    connections_opaque: AtomicU64,
    connections_refused: AtomicU64,
    connections_active: AtomicU64,
    requests_injected: AtomicU64,
    requests_unchanged: AtomicU64,
    requests_reparented: AtomicU64,
    fallbacks: AtomicU64,
    errors: AtomicU64,
    sources_remapped: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyCounters {
    /// Connections whose client opened with an HTTP/1.x request line.
    pub connections_http: u64,
    /// Connections copied opaquely from the start (TLS, HTTP/2, binary,
    /// server-first, silent clients).
    pub connections_opaque: u64,
    /// Connections closed without forwarding: not redirected (their
    /// original destination is the proxy itself) or without one.
    pub connections_refused: u64,
    /// Connections open now.
    pub connections_active: u64,
    /// Requests that got a traceparent from the proxy.
    pub requests_injected: u64,
    /// Requests that already had a valid traceparent and passed unchanged.
    pub requests_unchanged: u64,
    /// Requests forwarding a traceparent their sender received (a
    /// gateway): the proxy wrote the sender's own CLIENT span as parent.
    pub requests_reparented: u64,
    /// HTTP connections that stopped being interpreted (a head or body the
    /// proxy could not follow) and were copied unchanged from there on.
    pub fallbacks: u64,
    /// Accept and upstream connect failures, resets, timeouts, aborts.
    pub errors: u64,
    /// HTTP connections whose client's source port NAT had changed (the
    /// proxy named their requests by the client's own address, from
    /// conntrack; see `proxy::conntrack`).
    pub sources_remapped: u64,
    /// New connections the REDIRECT rules let through to their destination,
    /// untraced, because the proxy had not renewed its lease in time
    /// (stalled, starved of CPU). The guard counts them in the kernel:
    /// [`ProxyStats::snapshot`] leaves this 0, `RunningProxy::counters`
    /// reads it.
    pub connections_bypassed: u64,
}

impl ProxyCounters {
    /// The counters as metrics.
    pub fn readings(&self) -> Vec<crate::metrics::Reading> {
        use crate::metrics::Reading;
        const CONNECTIONS: &str = "agent_proxy_connections";
        const CONNECTIONS_HELP: &str = "Connections the proxy accepted, by how it handled them";
        const REQUESTS: &str = "agent_proxy_requests";
        const REQUESTS_HELP: &str =
            "Requests the proxy forwarded, by what it did to their trace context";
        vec![
            Reading::counter(CONNECTIONS, CONNECTIONS_HELP, self.connections_http)
                .with("handling", "http"),
            Reading::counter(CONNECTIONS, CONNECTIONS_HELP, self.connections_opaque)
                .with("handling", "opaque"),
            Reading::counter(CONNECTIONS, CONNECTIONS_HELP, self.connections_refused)
                .with("handling", "refused"),
            Reading::gauge(
                "agent_proxy_connections_active",
                "Connections the proxy has open now",
                self.connections_active,
            ),
            Reading::counter(REQUESTS, REQUESTS_HELP, self.requests_injected)
                .with("context", "injected"),
            Reading::counter(REQUESTS, REQUESTS_HELP, self.requests_unchanged)
                .with("context", "unchanged"),
            Reading::counter(REQUESTS, REQUESTS_HELP, self.requests_reparented)
                .with("context", "reparented"),
            Reading::counter(
                "agent_proxy_fallbacks",
                "HTTP connections copied unchanged from a point the proxy could not follow",
                self.fallbacks,
            ),
            Reading::counter(
                "agent_proxy_errors",
                "Accept and upstream connect failures, resets, timeouts, aborts",
                self.errors,
            ),
            Reading::counter(
                "agent_proxy_sources_remapped",
                "HTTP connections whose client's source port NAT had changed",
                self.sources_remapped,
            ),
            Reading::counter(
                "agent_proxy_connections_bypassed",
                "New connections the REDIRECT rules let through untraced because the proxy had not renewed its lease",
                self.connections_bypassed,
            ),
        ]
    }
}

/// Which counter to bump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Counter {
    ConnectionsHttp,
    ConnectionsOpaque,
    ConnectionsRefused,
    RequestsInjected,
    RequestsUnchanged,
    RequestsReparented,
    Fallbacks,
    Errors,
    SourcesRemapped,
}

impl ProxyStats {
    /// The counters now.
    pub fn snapshot(&self) -> ProxyCounters {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ProxyCounters {
            connections_http: get(&self.connections_http),
            connections_opaque: get(&self.connections_opaque),
            connections_refused: get(&self.connections_refused),
            connections_active: get(&self.connections_active),
            requests_injected: get(&self.requests_injected),
            requests_unchanged: get(&self.requests_unchanged),
            requests_reparented: get(&self.requests_reparented),
            fallbacks: get(&self.fallbacks),
            errors: get(&self.errors),
            sources_remapped: get(&self.sources_remapped),
            connections_bypassed: 0,
        }
    }

    pub(crate) fn add(&self, counter: Counter) {
        let counter = match counter {
            Counter::ConnectionsHttp => &self.connections_http,
            Counter::ConnectionsOpaque => &self.connections_opaque,
            Counter::ConnectionsRefused => &self.connections_refused,
            Counter::RequestsInjected => &self.requests_injected,
            Counter::RequestsUnchanged => &self.requests_unchanged,
            Counter::RequestsReparented => &self.requests_reparented,
            Counter::Fallbacks => &self.fallbacks,
            Counter::Errors => &self.errors,
            Counter::SourcesRemapped => &self.sources_remapped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_active.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns how many connections remain open.
    pub(crate) fn connection_closed(&self) -> u64 {
        self.connections_active
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1)
    }

    pub(crate) fn active(&self) -> u64 {
        self.connections_active.load(Ordering::Relaxed)
    }
}

impl fmt::Display for ProxyCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connections: {} http, {} opaque, {} refused, {} active; \
             requests: {} injected, {} unchanged, {} reparented; {} fallbacks, {} errors; \
             {} sources remapped; {} connections bypassed (lease run out)",
            self.connections_http,
            self.connections_opaque,
            self.connections_refused,
            self.connections_active,
            self.requests_injected,
            self.requests_unchanged,
            self.requests_reparented,
            self.fallbacks,
            self.errors,
            self.sources_remapped,
            self.connections_bypassed
        )
    }
}
