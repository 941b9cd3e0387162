//! Where the traceparent the proxy injects comes from.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};

use crate::tracecontext::{IdGenerator, PropagatedContext, TraceParent};

/// A request the proxy is about to forward without a valid traceparent.
///
/// The proxy keeps one per connection and refills it for each request, so
/// the strings do not cost an allocation per request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxiedRequest {
    /// The client's address (the redirected connection's peer).
    pub client: SocketAddr,
    /// Where the client was connecting before the redirect.
    pub original_destination: SocketAddr,
    /// 0-based position of the request on its connection.
    pub index: u64,
    /// Request method, e.g. `GET`.
    pub method: String,
    /// Request target as sent (usually path and query).
    pub target: String,
}

/// Supplies the context injected into requests that arrive without one.
pub trait TraceContextSource: Send + Sync {
    /// The traceparent (a new CLIENT span's context) and tracestate to
    /// inject into this request. May wait briefly (bounded) for the agent
    /// to learn of the request.
    fn context_for<'a>(
        &'a self,
        request: &'a ProxiedRequest,
    ) -> Pin<Box<dyn Future<Output = PropagatedContext> + Send + 'a>>;

    /// For a request that carries a valid `received` traceparent: the
    /// context to write instead when its sender forwards a traceparent it
    /// received itself (a gateway), so that the next service becomes the
    /// child of the sender's own CLIENT span; None to pass it unchanged.
    /// Decides nothing of its own: without the agent's view it is None.
    fn forwarded_context_for<'a>(
        &'a self,
        _request: &'a ProxiedRequest,
        _received: TraceParent,
    ) -> Pin<Box<dyn Future<Output = Option<PropagatedContext>> + Send + 'a>> {
        Box::pin(std::future::ready(None))
    }
}

/// Contexts for the proxy running alone (`agent proxy` without the
/// capture): every request starts a new sampled trace, with no waiting.
#[derive(Debug)]
pub struct StandaloneContexts {
    // One generator for all connections: ids cost no syscall, and the lock
    // is held only while drawing two numbers.
    ids: Mutex<IdGenerator>,
}

impl StandaloneContexts {
    /// A source seeded from the OS.
    pub fn new() -> Self {
        Self {
            ids: Mutex::new(IdGenerator::new()),
        }
    }

    /// A source with a fixed seed: the same ids every run, for tests.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            ids: Mutex::new(IdGenerator::with_seed(seed)),
        }
    }

    /// The next root context.
    pub fn next_context(&self) -> TraceParent {
        // A panic elsewhere while holding the lock cannot leave the
        // generator in a state that matters: any state gives random ids.
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        let (trace_id, span_id) = (ids.trace_id(), ids.span_id());
        TraceParent::root(trace_id, span_id, true)
    }
}

impl Default for StandaloneContexts {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceContextSource for StandaloneContexts {
    fn context_for<'a>(
        &'a self,
        _request: &'a ProxiedRequest,
    ) -> Pin<Box<dyn Future<Output = PropagatedContext> + Send + 'a>> {
        Box::pin(std::future::ready(PropagatedContext::without_state(
            self.next_context(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracecontext::root_flags;

    #[test]
    fn standalone_contexts_are_new_sampled_roots() {
        let contexts = StandaloneContexts::with_seed(7);
        let (a, b) = (contexts.next_context(), contexts.next_context());
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(a.flags, root_flags(true));
        assert!(a.trace_id.is_valid() && a.parent_id.is_valid());
    }
}
