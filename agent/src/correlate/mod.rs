//! Correlate stage: captured messages in, finished spans out.
//!
//! Per connection, the [`http`](crate::http) parser turns messages into
//! request/response exchanges (paired first-in first-out, so keep-alive and
//! pipelining work). Each request gets its trace context the moment its head
//! is parsed, not when its response ends, because that is when the thread
//! serving an inbound request makes its outbound calls:
//!
//! - inbound request (SERVER span) with a valid `traceparent`: continue that
//!   trace, the parent is the traceparent's parent-id; without one: a new
//!   random trace. The thread that read the request is remembered as serving
//!   it until its response is sent.
//! - outbound request (CLIENT span) carrying a `traceparent` on the wire: the
//!   span takes that trace-id and its span-id is exactly the wire parent-id,
//!   so the downstream SERVER span links to it. Without one, it gets a
//!   parent only from a signal that is exact for the sending process's
//!   runtime, and otherwise none (a new trace): a wrong parent sends a
//!   person debugging to the wrong request, a missing one only leaves a gap.
//!   The thread signal (the thread that sent it serves exactly one inbound
//!   request, from the read of its head to the end of its response) is
//!   exact for thread-per-request servers only: never for the runtimes
//!   [`runtime`] recognizes as multiplexing, and never again for a process
//!   once one of its threads is seen with two inbound requests in flight, or
//!   answering a request another thread read. Every span says how its parent
//!   was decided ([`ParentDecision`], attribute `trace.parent.decision`).
//! - both ends on this node: the agent sees the client's and the server's
//!   side of the same TCP connection (the same 4-tuple, reversed). A SERVER
//!   span without an inbound `traceparent` becomes the child of the CLIENT
//!   span of the same request (same position on the connection), so a chain
//!   of uninstrumented local services forms one trace. Either side may be
//!   seen first: the server side's context is patched until its span ends.

pub mod attributes;
pub mod container;
pub mod process;
pub mod proxy_contexts;
pub mod python_contexts;
pub mod runtime;
pub mod secrets;

use foldhash::{HashMap, HashSet};
use std::collections::VecDeque;
use std::net::SocketAddr;

use crate::capture::{
    CaptureEvent, Connection, ConnectionId, Direction, Message, PythonContextEvent, Role,
};
use crate::http::{self, HttpConnection, RequestHead, StreamDirection};
use crate::metrics::Reading;
use crate::sampling::Sampler;
use crate::span::{Attribute, Span, SpanId, SpanKind, TraceId, flags};
use crate::tracecontext::{self, IdGenerator};

pub use attributes::{SpanSettings, SpanSettingsError};
pub use process::{ProcessFilter, ProcessFilterError, ProcessTable};
pub use proxy_contexts::{AgreementCounters, ProxiedRequestKey, ProxyContexts};
pub use python_contexts::{ContextParent, OpenRequests, PythonContexts, RequestKey};
pub use runtime::{Multiplexer, Runtime};

/// The span attribute that says how the span's parent was decided.
pub const PARENT_DECISION_ATTRIBUTE: &str = "trace.parent.decision";

/// How a span's parent was decided (or why it has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParentDecision {
    /// From a `traceparent` on the wire: received (SERVER), or sent by the
    /// application or an upstream hop (CLIENT, whose id it then is).
    Wire,
    /// SERVER without a `traceparent`: the child of the CLIENT span of the
    /// same request, both ends of the connection being on this node.
    LocalPeer,
    /// CLIENT: the sending thread serves exactly one inbound request, in a
    /// process whose runtime makes that exact.
    Thread,
    /// SERVER: nothing came in to continue; a new trace.
    Root,
    /// CLIENT: the sending thread serves no inbound request.
    NoInbound,
    /// CLIENT: the process multiplexes requests on its threads.
    Multiplexing(Multiplexer),
    /// CLIENT: a thread of this process was seen serving two requests at
    /// once, or answering one another thread read.
    ConcurrentThread,
    /// CLIENT: the process's runtime could not be read.
    RuntimeUnknown,
    /// CLIENT: the proxy had to decide before the probes did (a new trace).
    ProxyFirst,
    /// CLIENT: the inbound request's client is on this node but its side
    /// was not seen yet, so the inbound trace may still change.
    TracePending,
    /// CLIENT: a Python event loop's context current when the call was
    /// sent serves exactly this inbound request ([`python_contexts`]).
    PythonContext,
    /// CLIENT: a Python event loop whose thread's context was not read.
    PythonContextUnread,
    /// CLIENT: the Python context current when the call was sent serves no
    /// inbound request known to the agent.
    PythonContextUnbound,
    /// CLIENT: this Python process once answered a request from a context
    /// serving another; its contexts give no parent any more.
    PythonContextDistrusted,
    /// CLIENT: the context serves an inbound request already answered.
    PythonRequestFinished,
    /// CLIENT: the process forwards the `traceparent` exactly one of its
    /// inbound requests in flight brought: that request's child, with an id
    /// of its own.
    Forwarded,
    /// CLIENT: the forwarded `traceparent` came with several inbound
    /// requests in flight (a client retrying): an id of its own, no parent.
    ForwardedAmbiguous,
    /// SERVER: its `traceparent` is one a CLIENT on this node forwarded
    /// (whatever carried it there, the proxy included): that CLIENT's child.
    ViaForwarder,
}

impl ParentDecision {
    /// The attribute value.
    pub fn name(self) -> &'static str {
        match self {
            ParentDecision::Wire => "wire",
            ParentDecision::LocalPeer => "local-peer",
            ParentDecision::Thread => "thread",
            ParentDecision::Root => "root",
            ParentDecision::NoInbound => "none-no-inbound",
            ParentDecision::Multiplexing(m) => match m {
                Multiplexer::JavaScript => "none-event-loop-javascript",
                Multiplexer::PythonAsyncio => "none-event-loop-python-asyncio",
                Multiplexer::PythonUvloop => "none-event-loop-python-uvloop",
                Multiplexer::EventDrivenServer => "none-event-loop-server",
                Multiplexer::Go => "none-go-scheduler",
            },
            ParentDecision::ConcurrentThread => "none-concurrent-thread",
            ParentDecision::RuntimeUnknown => "none-runtime-unknown",
            ParentDecision::ProxyFirst => "none-proxy-first",
            ParentDecision::TracePending => "none-trace-pending",
            ParentDecision::PythonContext => "python-context",
            ParentDecision::PythonContextUnread => "none-python-context-unread",
            ParentDecision::PythonContextUnbound => "none-python-context-unbound",
            ParentDecision::PythonContextDistrusted => "none-python-context-distrusted",
            ParentDecision::PythonRequestFinished => "none-python-request-finished",
            ParentDecision::Forwarded => "forwarded",
            ParentDecision::ForwardedAmbiguous => "none-forwarded-ambiguous",
            ParentDecision::ViaForwarder => "via-forwarder",
        }
    }
}

/// The trace context a request got when its head was parsed.
#[derive(Clone, Debug)]
struct RequestContext {
    /// The request's [`http::Exchange::sequence`].
    sequence: u64,
    kind: SpanKind,
    trace_id: TraceId,
    span_id: SpanId,
    parent_span_id: Option<SpanId>,
    flags: u8,
    trace_state: String,
    /// Thread that read (server) or wrote (client) the request head.
    tid: u32,
    /// A server context chosen without a parent, which the client side of
    /// the same connection on this node may still adopt.
    awaiting_local_client: bool,
    /// The ids came from a `traceparent` on the wire.
    from_wire: bool,
    /// CLIENT: the request carries the `traceparent` an inbound request of
    /// the same process brought, forwarded as it was (a gateway, nginx's
    /// `proxy_pass`): its parent-id, which the span does not take as its own.
    forwarded_parent: Option<SpanId>,
    /// SERVER: the parent-id its `traceparent` named (before a forwarder
    /// on this node is found to be its parent).
    wire_parent: Option<SpanId>,
    /// How the parent was decided.
    decision: ParentDecision,
    /// The connection's (local, remote) addresses, to find its other end.
    addresses: (SocketAddr, SocketAddr),
}

/// The inbound requests in flight of one process that brought the same
/// `traceparent`.
#[derive(Clone, Debug)]
enum InboundWithTraceparent {
    /// One: its SERVER span.
    One(SpanId),
    /// Several (a client that retried, or reused its span id).
    Several,
}

/// Inbound requests with a traceparent remembered at most; when full, the
/// table starts over (calls forwarding the ones forgotten are then taken
/// for the application's own: their span takes the wire parent-id).
const MAX_INBOUND_FROM_WIRE: usize = 100_000;

/// One TCP connection being followed.
struct ConnectionState {
    connection: Connection,
    http: HttpConnection,
    /// Which direction carries requests, once known.
    request_direction: Option<Direction>,
    /// Contexts of requests whose exchange has not completed, by sequence.
    requests: VecDeque<RequestContext>,
    /// Request heads the parser had produced before the last message.
    heads_seen: u64,
    last_activity_ns: u64,
}

/// Counters of the correlate stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CorrelateCounters {
    /// Spans produced (sampled in).
    pub spans: u64,
    /// Exchanges not exported because their trace was sampled out.
    pub sampled_out: u64,
    /// Exchanges of processes the filter excludes.
    pub filtered_out: u64,
    /// Connections dropped because they stopped looking like HTTP/1.x.
    pub broken_connections: u64,
    /// Connections forgotten because the table was full of idle ones.
    pub evicted_connections: u64,
}

impl CorrelateCounters {
    /// The counters as metrics.
    pub fn readings(&self) -> Vec<Reading> {
        vec![
            Reading::counter("agent_spans", "Spans built (sampled in)", self.spans),
            Reading::counter(
                "agent_exchanges_sampled_out",
                "Exchanges not exported because their trace was sampled out",
                self.sampled_out,
            ),
            Reading::counter(
                "agent_exchanges_filtered_out",
                "Exchanges of processes the process filter excludes",
                self.filtered_out,
            ),
            Reading::counter(
                "agent_connections_broken",
                "Connections given up because they stopped looking like HTTP/1.x",
                self.broken_connections,
            ),
            Reading::counter(
                "agent_connections_evicted",
                "Connections forgotten because the table was full of idle ones",
                self.evicted_connections,
            ),
        ]
    }
}

/// Placeholder addresses of a context until its connection's are set.
const UNSPECIFIED_ADDRESSES: (SocketAddr, SocketAddr) = (
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0),
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0),
);

/// Connections followed at most before idle ones are evicted.
const MAX_CONNECTIONS: usize = 100_000;
/// Idle time after which a connection may be evicted when the table is full.
const IDLE_EVICTION_NS: u64 = 120 * 1_000_000_000;

/// The correlate stage's state: connections, the threads serving inbound
/// requests, id generation, sampling and process resources.
pub struct Correlator {
    /// Boxed: a state moves out of the table and back for every message.
    connections: HashMap<ConnectionId, Box<ConnectionState>>,
    /// (local, remote) -> connection, to find the other end of a local connection.
    by_addresses: HashMap<(SocketAddr, SocketAddr), ConnectionId>,
    /// (pid, tid) -> context of the inbound request that thread serves.
    serving: HashMap<(u32, u32), RequestContext>,
    /// Processes seen serving two requests on one thread at once, or
    /// answering on another thread than the one that read: their threads
    /// never give a parent again.
    concurrent: HashSet<u32>,
    /// The requests the contexts of Python event loops serve.
    python: PythonContexts,
    /// Inbound requests in flight that brought a `traceparent`, by (pid,
    /// trace-id, parent-id): a call carrying the same one forwards it.
    inbound_from_wire: HashMap<(u32, TraceId, SpanId), InboundWithTraceparent>,
    /// Calls in flight that forward a `traceparent`, by the (trace-id,
    /// parent-id) they forward: a server receiving it is their child.
    forwarding_calls: HashMap<(TraceId, SpanId), InboundWithTraceparent>,
    ids: IdGenerator,
    sampler: Sampler,
    processes: ProcessTable,
    settings: SpanSettings,
    /// Unix time minus kernel monotonic time, in ns.
    monotonic_to_unix_ns: i128,
    counters: CorrelateCounters,
    exchanges: Vec<http::Exchange>,
    /// Shared with the proxy, when it runs: requests its rules redirect
    /// (the scope) go through it, and it injects the ids agreed here.
    proxy: Option<(std::sync::Arc<ProxyContexts>, crate::proxy::RedirectScope)>,
    /// SERVER spans that finished before their client's request on this
    /// node was seen (see [`HeldServer`]).
    held: Vec<HeldServer>,
    /// Held spans whose client's request arrived: out with the next event.
    released: Vec<Span>,
}

/// A SERVER span that finished before the request of its client, a
/// connection on this node, was seen. That happens when the client's thread
/// loses its CPU between sending and its syscall's return (the probes
/// report a send at the return): the server reads, answers and is reported
/// first. The span waits, at most [`HOLD_NS`] after it ended, for that
/// request, and then joins the client's trace as its child; otherwise it
/// goes out as it is (a root of its own).
struct HeldServer {
    /// The server connection's (local, remote) addresses.
    addresses: (SocketAddr, SocketAddr),
    sequence: u64,
    /// Kernel monotonic time after which the span goes out unchanged.
    until_ns: u64,
    span: Span,
}

/// How long a SERVER span waits for its local client's request (see
/// [`HeldServer`]).
const HOLD_NS: u64 = 200_000_000;

impl Correlator {
    /// A correlator with the given sampling, span settings and process table.
    pub fn new(sampler: Sampler, settings: SpanSettings, processes: ProcessTable) -> Self {
        Self {
            connections: HashMap::default(),
            by_addresses: HashMap::default(),
            serving: HashMap::default(),
            concurrent: HashSet::default(),
            python: PythonContexts::new(),
            inbound_from_wire: HashMap::default(),
            forwarding_calls: HashMap::default(),
            ids: IdGenerator::new(),
            sampler,
            processes,
            settings,
            monotonic_to_unix_ns: crate::clock::monotonic_to_unix_offset_ns(),
            counters: CorrelateCounters::default(),
            exchanges: Vec::new(),
            proxy: None,
            held: Vec::new(),
            released: Vec::new(),
        }
    }

    /// Sends out the held SERVER spans whose wait is over (call it now and
    /// then: the wait ends by time, not by an event).
    pub fn release_held(&mut self, out: &mut Vec<Span>) {
        out.append(&mut self.released);
        if self.held.is_empty() {
            return;
        }
        let now = crate::clock::monotonic_ns();
        let mut index = 0;
        while index < self.held.len() {
            if self.held[index].until_ns <= now {
                out.push(self.held.swap_remove(index).span);
            } else {
                index += 1;
            }
        }
    }

    /// Sends out every held SERVER span: at the end of the input.
    pub fn finish(&mut self, out: &mut Vec<Span>) {
        out.append(&mut self.released);
        out.extend(self.held.drain(..).map(|held| held.span));
    }

    /// The held SERVER span of request `sequence` on the other end of
    /// `connection` (a client's), if one waits for it: made the child of
    /// `client` and released, or dropped if that trace is not sampled.
    fn adopt_held(&mut self, connection: &Connection, client: &RequestContext) {
        let Some(index) = self.held.iter().position(|held| {
            held.addresses == (connection.remote, connection.local)
                && held.sequence == client.sequence
        }) else {
            return;
        };
        let mut span = self.held.swap_remove(index).span;
        let sampled = self
            .sampler
            .should_sample(client.trace_id, Some(client.flags & flags::SAMPLED != 0));
        if !sampled {
            self.counters.spans -= 1;
            self.counters.sampled_out += 1;
            return;
        }
        span.trace_id = client.trace_id;
        span.parent_span_id = Some(client.span_id);
        span.flags = tracecontext::child_flags(client.flags, sampled);
        span.trace_state = client.trace_state.clone();
        for attribute in &mut span.attributes {
            if attribute.key == PARENT_DECISION_ATTRIBUTE {
                *attribute =
                    Attribute::string(PARENT_DECISION_ATTRIBUTE, ParentDecision::LocalPeer.name());
            }
        }
        self.released.push(span);
    }

    /// Agrees with the proxy on the ids of requests its rules redirect
    /// (`scope`: [`crate::proxy::rules::RedirectRules::scope`]), so each
    /// proxied request has exactly one CLIENT span and it is the parent the
    /// proxy injects.
    pub fn share_with_proxy(
        &mut self,
        contexts: std::sync::Arc<ProxyContexts>,
        scope: crate::proxy::RedirectScope,
    ) {
        self.proxy = Some((contexts, scope));
    }

    /// The stage's counters.
    pub fn counters(&self) -> CorrelateCounters {
        self.counters
    }

    /// Connections currently followed.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Feeds one capture event; finished spans are pushed to `out`.
    pub fn handle(&mut self, event: &CaptureEvent, out: &mut Vec<Span>) {
        match event {
            CaptureEvent::Opened {
                connection,
                tid,
                python_context,
                process_name,
            } => {
                if connection.role == Role::Server
                    && *python_context != 0
                    && self.processes.runtime(connection.pid)
                        == Runtime::Multiplexing(Multiplexer::PythonAsyncio)
                {
                    // The accepting thread: the set-up task it creates next
                    // is this connection's (plain asyncio loop only).
                    self.python
                        .accepted(connection.pid, *tid, *python_context, connection.id);
                }
                // Read the process now: a short-lived client (curl) may be
                // gone by the time its first request is read, and may be
                // gone already (then the kernel's name for it names it).
                let _ = self
                    .processes
                    .resource_named(connection.pid, process_name.as_str());
                // A reused id cannot happen (ids are unique); a stale entry
                // for the same fd is keyed by another id and ages out.
                self.connections.insert(
                    connection.id,
                    Box::new(ConnectionState::new(*connection, 0)),
                );
                // Known at once, so the other end on this node can tell a
                // local client will come (see `thread_parent`).
                self.by_addresses
                    .insert((connection.local, connection.remote), connection.id);
            }
            CaptureEvent::Data(message) => self.on_message(message, out),
            CaptureEvent::PythonContext {
                pid, tid, event, ..
            } => match *event {
                PythonContextEvent::Copied { parent, copy } => {
                    let connections = &self.connections;
                    self.python.copied(*pid, *tid, parent, copy, |id| {
                        open_server_requests(connections, id)
                    })
                }
                PythonContextEvent::Entered { context } => self.python.entered(*pid, *tid, context),
            },
            CaptureEvent::Closed(connection) => {
                if let Some(mut state) = self.untrack(connection.id) {
                    let now = state.last_activity_ns;
                    state.http.close(now, &mut self.exchanges);
                    self.finish_exchanges(&mut state, out);
                    self.release_all(&state);
                }
            }
        }
        // Held SERVER spans whose client's request this event brought.
        out.append(&mut self.released);
    }

    fn on_message(&mut self, message: &Message, out: &mut Vec<Span>) {
        self.python
            .thread_event(message.connection.pid, message.tid);
        let id = message.connection.id;
        // Out of the table while it is worked on (its address entry stays).
        let (mut state, known) = match self.connections.remove(&id) {
            Some(state) => (state, true),
            None => {
                self.make_room(message.timestamp_ns);
                let state = ConnectionState::new(message.connection, message.timestamp_ns);
                (Box::new(state), false)
            }
        };
        state.last_activity_ns = message.timestamp_ns;

        let Some(request_direction) = state.request_direction_for(message) else {
            // Not yet known which side asks: wait for a message that starts
            // with a request line.
            self.keep(state, known);
            return;
        };
        let stream = if message.direction == request_direction {
            StreamDirection::Requests
        } else {
            StreamDirection::Responses
        };
        state.http.feed(
            stream,
            &message.bytes,
            message.len as usize,
            message.timestamp_ns,
            &mut self.exchanges,
        );
        if stream == StreamDirection::Requests {
            self.start_new_requests(&mut state, message);
        } else if let Some(oldest) = state.requests.front()
            && oldest.kind == SpanKind::Server
        {
            if oldest.tid != message.tid {
                // Answered by another thread than the one that read it: the
                // reading thread may have moved on to other work.
                self.mark_concurrent(message.connection.pid);
            }
            if message.python_context != 0 {
                let key = RequestKey {
                    connection: id,
                    sequence: oldest.sequence,
                };
                self.python
                    .responding(message.connection.pid, message.python_context, key);
            }
        }
        self.finish_exchanges(&mut state, out);

        if state.http.is_broken() {
            self.counters.broken_connections += 1;
            self.release_all(&state);
            self.forget_addresses(&state.connection);
            return; // forgotten: nothing more to learn from it
        }
        self.keep(state, known);
    }

    /// Puts a connection's state (back) in the table; `known`: it was
    /// there (or opened) before this message, with its address entry.
    fn keep(&mut self, state: Box<ConnectionState>, known: bool) {
        let c = state.connection;
        if !known {
            // Read the process now: a short-lived client (curl) may be gone
            // by the time its span ends.
            let _ = self.processes.resource(c.pid);
            self.by_addresses.insert((c.local, c.remote), c.id);
        }
        self.connections.insert(c.id, state);
    }

    fn untrack(&mut self, id: ConnectionId) -> Option<Box<ConnectionState>> {
        let state = self.connections.remove(&id)?;
        self.forget_addresses(&state.connection);
        Some(state)
    }

    /// Removes the address entry of `connection`, unless a newer
    /// connection took its addresses since.
    fn forget_addresses(&mut self, connection: &Connection) {
        let key = (connection.local, connection.remote);
        if self.by_addresses.get(&key) == Some(&connection.id) {
            self.by_addresses.remove(&key);
        }
    }

    /// Whether both ends of `connection` were seen from their start, so
    /// that their request positions agree and they can be linked.
    fn linkable_peer(&self, connection: &Connection) -> bool {
        connection.role != Role::Unknown
            && self
                .by_addresses
                .get(&(connection.remote, connection.local))
                .and_then(|peer| self.connections.get(peer))
                .is_some_and(|peer| peer.connection.role != Role::Unknown)
    }

    /// The context of request `sequence` on the other end of `connection`,
    /// when both ends are on this node and were seen from their start (so
    /// that request positions agree).
    fn local_peer_request(
        &mut self,
        connection: &Connection,
        sequence: u64,
    ) -> Option<&mut RequestContext> {
        if connection.role == Role::Unknown {
            return None;
        }
        let peer_id = *self
            .by_addresses
            .get(&(connection.remote, connection.local))?;
        let peer = self.connections.get_mut(&peer_id)?;
        if peer.connection.role == Role::Unknown {
            return None;
        }
        peer.requests.iter_mut().find(|c| c.sequence == sequence)
    }

    /// Gives every request head parsed from the last message its context.
    fn start_new_requests(&mut self, state: &mut ConnectionState, message: &Message) {
        let parsed = state.http.requests_parsed();
        let kind = if message.direction == Direction::Ingress {
            SpanKind::Server
        } else {
            SpanKind::Client
        };
        let pid = message.connection.pid;
        let python_loop = match self.processes.runtime(pid) {
            Runtime::Multiplexing(m) if kind == SpanKind::Server && m.is_python() => Some(m),
            _ => None,
        };
        for sequence in state.heads_seen..parsed {
            // A request the parser already gave up (bounded queue) has no head.
            let Some(head) = state.http.request_head(sequence) else {
                continue;
            };
            let mut context = match kind {
                SpanKind::Server => self.server_context(head, message.tid),
                SpanKind::Client => {
                    self.client_context(head, pid, message.tid, message.python_context)
                }
            };
            context.sequence = sequence;
            context.addresses = (state.connection.local, state.connection.remote);
            // One read completing several heads (pipelining) would bind the
            // reading context to the last one while tasks for the first are
            // still being created: bind only a read that completed one.
            if let Some(multiplexer) = python_loop
                && parsed - state.heads_seen == 1
            {
                let key = RequestKey {
                    connection: state.connection.id,
                    sequence,
                };
                self.python.request_read(
                    pid,
                    message.tid,
                    message.python_context,
                    key,
                    multiplexer == Multiplexer::PythonUvloop,
                );
            }
            self.link_local_ends(&state.connection, &mut context);
            if kind == SpanKind::Client {
                self.agree_with_proxy(&state.connection, &mut context);
            }
            if kind == SpanKind::Server && context.from_wire {
                self.adopt_forwarder(&mut context);
                self.note_inbound_from_wire(pid, &context);
            }
            if let Some(forwarded) = context.forwarded_parent {
                if self.forwarding_calls.len() >= MAX_INBOUND_FROM_WIRE {
                    self.forwarding_calls.clear();
                }
                self.forwarding_calls
                    .entry((context.trace_id, forwarded))
                    .and_modify(|e| *e = InboundWithTraceparent::Several)
                    .or_insert(InboundWithTraceparent::One(context.span_id));
            }
            if kind == SpanKind::Server
                && self
                    .serving
                    .insert((pid, message.tid), context.clone())
                    .is_some()
            {
                // The thread already served a request that is not answered
                // yet: it multiplexes.
                self.mark_concurrent(pid);
            }
            state.requests.push_back(context);
        }
        state.heads_seen = parsed;
    }

    /// For a request the proxy will see: settle its ids with the proxy.
    fn agree_with_proxy(&mut self, connection: &Connection, context: &mut RequestContext) {
        let Some((contexts, scope)) = &self.proxy else {
            return;
        };
        if connection.role != Role::Client || !scope.redirects(connection.remote) {
            return;
        }
        let key = ProxiedRequestKey {
            client: connection.local,
            original_destination: connection.remote,
            index: context.sequence,
        };
        let chosen = tracecontext::TraceParent {
            trace_id: context.trace_id,
            parent_id: context.span_id,
            flags: context.flags,
        };
        if context.from_wire || context.forwarded_parent.is_some() {
            // The request carries a traceparent: the proxy leaves the
            // application's own, and writes a forwarder's own span instead
            // of the one it forwards.
            let forward =
                context
                    .forwarded_parent
                    .is_some()
                    .then(|| tracecontext::PropagatedContext {
                        traceparent: chosen,
                        tracestate: context.trace_state.clone(),
                    });
            contexts.settle_wire_request(key, forward);
            return;
        }
        let agreed = contexts.settle_client_context(
            key,
            tracecontext::PropagatedContext {
                traceparent: chosen,
                tracestate: context.trace_state.clone(),
            },
        );
        if agreed.traceparent != chosen {
            // The proxy could not wait and started a trace of its own.
            context.trace_id = agreed.traceparent.trace_id;
            context.span_id = agreed.traceparent.parent_id;
            context.flags = agreed.traceparent.flags;
            context.parent_span_id = None;
            context.trace_state = String::new();
            context.decision = ParentDecision::ProxyFirst;
        }
    }

    /// Stops trusting the threads of `pid` for parents. Bounded like the
    /// process table: when full it starts over (losing only distrust that
    /// the next concurrent request restores).
    fn mark_concurrent(&mut self, pid: u32) {
        if self.concurrent.len() >= process::MAX_PROCESSES {
            self.concurrent.clear();
        }
        self.concurrent.insert(pid);
    }

    /// The parent of a call that `tid` of `pid` sends (with `python_context`
    /// current, in a watched Python process), from the signal exact for the
    /// process's runtime, and the decision either way.
    fn call_parent(
        &mut self,
        pid: u32,
        tid: u32,
        python_context: u64,
    ) -> (Option<RequestContext>, ParentDecision) {
        match self.processes.runtime(pid) {
            Runtime::Multiplexing(m) if m.is_python() => self.python_parent(pid, python_context),
            // Said first: whatever the threads show, they are not the signal.
            Runtime::Multiplexing(m) => (None, ParentDecision::Multiplexing(m)),
            Runtime::Threads | Runtime::Unknown => self.thread_parent(pid, tid),
        }
    }

    /// The parent a Python event loop's current context gives a call.
    fn python_parent(
        &mut self,
        pid: u32,
        python_context: u64,
    ) -> (Option<RequestContext>, ParentDecision) {
        let connections = &self.connections;
        let key = match self.python.parent(pid, python_context, |id| {
            open_server_requests(connections, id)
        }) {
            ContextParent::Request(key) => key,
            ContextParent::Unread => return (None, ParentDecision::PythonContextUnread),
            ContextParent::Unbound => return (None, ParentDecision::PythonContextUnbound),
            ContextParent::Distrusted => {
                return (None, ParentDecision::PythonContextDistrusted);
            }
        };
        let Some(server) = self.connections.get(&key.connection).and_then(|c| {
            c.requests
                .iter()
                .find(|r| r.sequence == key.sequence && r.kind == SpanKind::Server)
        }) else {
            return (None, ParentDecision::PythonRequestFinished);
        };
        let server = server.clone();
        if self.trace_pending(&server) {
            return (None, ParentDecision::TracePending);
        }
        (Some(server), ParentDecision::PythonContext)
    }

    /// Whether `server`'s client is a connection on this node whose request
    /// was not seen yet: when it is, the server's trace becomes the
    /// client's, and a call given the current one would point into another
    /// trace.
    fn trace_pending(&self, server: &RequestContext) -> bool {
        let (local, remote) = server.addresses;
        server.awaiting_local_client && self.by_addresses.contains_key(&(remote, local))
    }

    /// The parent the thread signal gives a call that `tid` of `pid` sends,
    /// if that signal is exact for this process, and the decision either way.
    fn thread_parent(&mut self, pid: u32, tid: u32) -> (Option<RequestContext>, ParentDecision) {
        let Some(server) = self.serving.get(&(pid, tid)) else {
            return (None, ParentDecision::NoInbound);
        };
        let server = server.clone();
        if self.concurrent.contains(&pid) {
            return (None, ParentDecision::ConcurrentThread);
        }
        if self.trace_pending(&server) {
            return (None, ParentDecision::TracePending);
        }
        match self.processes.runtime(pid) {
            Runtime::Threads => (Some(server), ParentDecision::Thread),
            Runtime::Multiplexing(kind) => (None, ParentDecision::Multiplexing(kind)),
            Runtime::Unknown => (None, ParentDecision::RuntimeUnknown),
        }
    }

    /// Joins the two ends of a connection seen on this node (see the module
    /// documentation). `context` is the end just parsed.
    fn link_local_ends(&mut self, connection: &Connection, context: &mut RequestContext) {
        let sampler = self.sampler;
        match context.kind {
            SpanKind::Server if context.awaiting_local_client => {
                let Some(client) = self.local_peer_request(connection, context.sequence) else {
                    return;
                };
                let client = client.clone();
                adopt_client(context, &client, &sampler);
            }
            SpanKind::Server if context.from_wire => {
                // The request's client on this node forwarded a traceparent
                // it received: the server is its CLIENT span's child, not
                // the caller's the parent-id names.
                let Some(client) = self.local_peer_request(connection, context.sequence) else {
                    return;
                };
                if let Some(parent) = forwarder_of(client, context) {
                    context.parent_span_id = Some(parent);
                    context.decision = ParentDecision::LocalPeer;
                }
            }
            SpanKind::Client if context.forwarded_parent.is_some() => {
                let client = context.clone();
                let Some(server) = self.local_peer_request(connection, context.sequence) else {
                    return;
                };
                if let Some(parent) = forwarder_of(&client, server) {
                    server.parent_span_id = Some(parent);
                    server.decision = ParentDecision::LocalPeer;
                }
            }
            SpanKind::Client => {
                let client = context.clone();
                let Some(server) = self.local_peer_request(connection, context.sequence) else {
                    // The server may have answered already (see HeldServer).
                    self.adopt_held(connection, &client);
                    return;
                };
                if !server.awaiting_local_client {
                    return;
                }
                let before = server.span_id;
                adopt_client(server, &client, &sampler);
                let (server_tid, patched) = (server.tid, server.clone());
                // The server's thread may already be serving it: its later
                // outbound calls must join the adopted trace.
                if let Some(peer) = self
                    .by_addresses
                    .get(&(connection.remote, connection.local))
                    .copied()
                    && let Some(pid) = self.connections.get(&peer).map(|p| p.connection.pid)
                    && let Some(serving) = self.serving.get_mut(&(pid, server_tid))
                    && serving.span_id == before
                {
                    *serving = patched;
                }
            }
            SpanKind::Server => {}
        }
    }

    fn server_context(&mut self, head: &RequestHead, tid: u32) -> RequestContext {
        let span_id = self.ids.span_id();
        match tracecontext::extract(head.headers.iter_bytes()) {
            Some(parent) => {
                let sampled = self.sampler.should_sample(
                    parent.traceparent.trace_id,
                    Some(parent.traceparent.is_sampled()),
                );
                RequestContext {
                    sequence: 0,
                    kind: SpanKind::Server,
                    trace_id: parent.traceparent.trace_id,
                    span_id,
                    parent_span_id: Some(parent.traceparent.parent_id),
                    flags: tracecontext::child_flags(parent.traceparent.flags, sampled),
                    trace_state: parent.tracestate.to_header_value(),
                    tid,
                    awaiting_local_client: false,
                    from_wire: true,
                    forwarded_parent: None,
                    wire_parent: Some(parent.traceparent.parent_id),
                    decision: ParentDecision::Wire,
                    addresses: UNSPECIFIED_ADDRESSES,
                }
            }
            None => RequestContext {
                awaiting_local_client: true,
                ..self.root_context(SpanKind::Server, span_id, tid, ParentDecision::Root)
            },
        }
    }

    fn client_context(
        &mut self,
        head: &RequestHead,
        pid: u32,
        tid: u32,
        python_context: u64,
    ) -> RequestContext {
        if let Some(wire) = tracecontext::extract(head.headers.iter_bytes()) {
            let received = (wire.traceparent.trace_id, wire.traceparent.parent_id);
            if let Some(forwarded) = self.inbound_from_wire.get(&(pid, received.0, received.1)) {
                // The process forwards the traceparent one of its inbound
                // requests brought: the call is that request's child, with
                // an id of its own (the wire parent-id is the caller's).
                let (parent, decision) = match forwarded {
                    InboundWithTraceparent::One(server) => {
                        (Some(*server), ParentDecision::Forwarded)
                    }
                    InboundWithTraceparent::Several => (None, ParentDecision::ForwardedAmbiguous),
                };
                return RequestContext {
                    sequence: 0,
                    kind: SpanKind::Client,
                    trace_id: wire.traceparent.trace_id,
                    span_id: self.ids.span_id(),
                    parent_span_id: parent,
                    flags: wire.traceparent.flags,
                    trace_state: wire.tracestate.to_header_value(),
                    tid,
                    awaiting_local_client: false,
                    from_wire: false,
                    forwarded_parent: Some(wire.traceparent.parent_id),
                    wire_parent: None,
                    decision,
                    addresses: UNSPECIFIED_ADDRESSES,
                };
            }
            // Someone (the application or our proxy) already chose this
            // call's id: the downstream server's parent is the wire parent-id.
            // Its own parent: the thread's request, if the thread signal is
            // exact here and names the same trace.
            let parent = self
                .call_parent(pid, tid, python_context)
                .0
                .filter(|s| s.trace_id == wire.traceparent.trace_id)
                .map(|s| s.span_id);
            return RequestContext {
                sequence: 0,
                kind: SpanKind::Client,
                trace_id: wire.traceparent.trace_id,
                span_id: wire.traceparent.parent_id,
                parent_span_id: parent,
                flags: wire.traceparent.flags,
                trace_state: wire.tracestate.to_header_value(),
                tid,
                awaiting_local_client: false,
                from_wire: true,
                forwarded_parent: None,
                wire_parent: None,
                decision: ParentDecision::Wire,
                addresses: UNSPECIFIED_ADDRESSES,
            };
        }
        let span_id = self.ids.span_id();
        let (serving, decision) = self.call_parent(pid, tid, python_context);
        match serving {
            Some(server) => RequestContext {
                sequence: 0,
                kind: SpanKind::Client,
                trace_id: server.trace_id,
                span_id,
                parent_span_id: Some(server.span_id),
                flags: server.flags,
                trace_state: server.trace_state,
                tid,
                awaiting_local_client: false,
                from_wire: false,
                forwarded_parent: None,
                wire_parent: None,
                decision,
                addresses: UNSPECIFIED_ADDRESSES,
            },
            None => self.root_context(SpanKind::Client, span_id, tid, decision),
        }
    }

    fn root_context(
        &mut self,
        kind: SpanKind,
        span_id: SpanId,
        tid: u32,
        decision: ParentDecision,
    ) -> RequestContext {
        let trace_id = self.ids.trace_id();
        let sampled = self.sampler.should_sample(trace_id, None);
        RequestContext {
            sequence: 0,
            kind,
            trace_id,
            span_id,
            parent_span_id: None,
            flags: tracecontext::root_flags(sampled),
            trace_state: String::new(),
            tid,
            awaiting_local_client: false,
            from_wire: false,
            forwarded_parent: None,
            wire_parent: None,
            decision,
            addresses: UNSPECIFIED_ADDRESSES,
        }
    }

    /// Turns the exchanges the parser completed into spans.
    fn finish_exchanges(&mut self, state: &mut ConnectionState, out: &mut Vec<Span>) {
        // Taken out and put back so its allocation is reused.
        let mut exchanges = std::mem::take(&mut self.exchanges);
        for exchange in exchanges.drain(..) {
            // Exchanges complete in request order, as contexts were queued;
            // contexts of requests the parser gave up are skipped.
            while state
                .requests
                .front()
                .is_some_and(|c| c.sequence < exchange.sequence)
            {
                if let Some(given_up) = state.requests.pop_front() {
                    self.release(state.connection.pid, &given_up);
                    self.python_finished(&state.connection, &given_up);
                }
            }
            if state
                .requests
                .front()
                .is_none_or(|c| c.sequence != exchange.sequence)
            {
                continue;
            }
            let Some(context) = state.requests.pop_front() else {
                continue;
            };
            let pid = state.connection.pid;
            self.release(pid, &context);
            self.python_finished(&state.connection, &context);
            if context.flags & flags::SAMPLED == 0 {
                self.counters.sampled_out += 1;
                continue;
            }
            let Some(resource) = self.processes.resource(pid) else {
                self.counters.filtered_out += 1;
                continue;
            };
            let ends = attributes::Endpoints {
                local: state.connection.local,
                remote: state.connection.remote,
            };
            let end_ns = exchange.response_end_ns.unwrap_or(exchange.request_end_ns);
            let mut attributes =
                attributes::attributes(&exchange, context.kind, ends, &self.settings);
            attributes.push(Attribute::string(
                PARENT_DECISION_ATTRIBUTE,
                context.decision.name(),
            ));
            // Decided before the context's strings move into the span.
            let hold = context.kind == SpanKind::Server
                && self.trace_pending(&context)
                && self.linkable_peer(&state.connection);
            let span = Span {
                trace_id: context.trace_id,
                span_id: context.span_id,
                parent_span_id: context.parent_span_id,
                trace_state: context.trace_state,
                flags: context.flags,
                name: attributes::span_name_from(&attributes),
                kind: context.kind,
                start_unix_nano: self.to_unix(exchange.request_start_ns),
                end_unix_nano: self.to_unix(end_ns),
                attributes,
                status: attributes::status(&exchange, context.kind),
                resource,
            };
            self.counters.spans += 1;
            if hold {
                self.held.push(HeldServer {
                    addresses: context.addresses,
                    sequence: context.sequence,
                    until_ns: end_ns.saturating_add(HOLD_NS),
                    span,
                });
            } else {
                out.push(span);
            }
        }
        self.exchanges = exchanges;
    }

    /// A server's traceparent that a call in flight on this node forwarded
    /// (through the proxy too, when it could not rewrite it in time): the
    /// server is that call's child, not the child of the span the
    /// parent-id names (the caller of the forwarder).
    fn adopt_forwarder(&self, server: &mut RequestContext) {
        let Some(parent) = server.wire_parent else {
            return;
        };
        if let Some(InboundWithTraceparent::One(forwarder)) =
            self.forwarding_calls.get(&(server.trace_id, parent))
        {
            server.parent_span_id = Some(*forwarder);
            server.decision = ParentDecision::ViaForwarder;
        }
    }

    /// An inbound request brought a traceparent: calls of `pid` carrying
    /// it are forwarding it.
    fn note_inbound_from_wire(&mut self, pid: u32, context: &RequestContext) {
        let Some(parent) = context.wire_parent else {
            return;
        };
        if self.inbound_from_wire.len() >= MAX_INBOUND_FROM_WIRE {
            self.inbound_from_wire.clear();
        }

        self.inbound_from_wire
            .entry((pid, context.trace_id, parent))
            .and_modify(|e| *e = InboundWithTraceparent::Several)
            .or_insert(InboundWithTraceparent::One(context.span_id));
    }

    /// A server request is answered (or given up): its thread no longer
    /// serves it.
    fn release(&mut self, pid: u32, context: &RequestContext) {
        if let Some(forwarded) = context.forwarded_parent {
            let key = (context.trace_id, forwarded);
            if let Some(InboundWithTraceparent::One(one)) = self.forwarding_calls.get(&key)
                && *one == context.span_id
            {
                self.forwarding_calls.remove(&key);
            }
        }
        if context.kind == SpanKind::Server
            && context.from_wire
            && let Some(parent) = context.wire_parent
        {
            // A Several entry stays until the table starts over: which of
            // its requests remain is not counted.
            let key = (pid, context.trace_id, parent);
            if let Some(InboundWithTraceparent::One(one)) = self.inbound_from_wire.get(&key)
                && *one == context.span_id
            {
                self.inbound_from_wire.remove(&key);
            }
        }
        if context.kind == SpanKind::Server
            && self
                .serving
                .get(&(pid, context.tid))
                .is_some_and(|s| s.span_id == context.span_id)
        {
            self.serving.remove(&(pid, context.tid));
        }
    }

    /// A connection is forgotten: its unanswered requests are served no more.
    fn release_all(&mut self, state: &ConnectionState) {
        for context in &state.requests {
            self.release(state.connection.pid, context);
            self.python_finished(&state.connection, context);
        }
    }

    /// A server request of a Python event loop is answered or given up:
    /// contexts copied from now on do not serve it.
    fn python_finished(&mut self, connection: &Connection, context: &RequestContext) {
        if context.kind != SpanKind::Server {
            return;
        }
        if let Runtime::Multiplexing(m) = self.processes.runtime(connection.pid)
            && m.is_python()
        {
            self.python.finished(RequestKey {
                connection: connection.id,
                sequence: context.sequence,
            });
        }
    }

    fn to_unix(&self, monotonic_ns: u64) -> u64 {
        (monotonic_ns as i128 + self.monotonic_to_unix_ns).max(0) as u64
    }

    /// Evicts idle connections when the table is full.
    fn make_room(&mut self, now_ns: u64) {
        if self.connections.len() < MAX_CONNECTIONS {
            return;
        }
        let before = self.connections.len();
        self.connections
            .retain(|_, s| now_ns.saturating_sub(s.last_activity_ns) < IDLE_EVICTION_NS);
        if self.connections.len() >= MAX_CONNECTIONS {
            // Everything is busy: forget the oldest half.
            let mut ages: Vec<u64> = self
                .connections
                .values()
                .map(|s| s.last_activity_ns)
                .collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            self.connections.retain(|_, s| s.last_activity_ns > cut);
        }
        self.counters.evicted_connections += (before - self.connections.len()) as u64;
        let connections = &self.connections;
        self.by_addresses
            .retain(|_, id| connections.contains_key(id));
    }
}

impl ConnectionState {
    fn new(connection: Connection, now_ns: u64) -> Self {
        let request_direction = match connection.role {
            Role::Server => Some(Direction::Ingress),
            Role::Client => Some(Direction::Egress),
            Role::Unknown => None,
        };
        Self {
            connection,
            http: HttpConnection::new(),
            request_direction,
            requests: VecDeque::new(),
            heads_seen: 0,
            last_activity_ns: now_ns,
        }
    }

    /// The request direction, learning it from the first request line seen
    /// when connect/accept happened before the agent started.
    fn request_direction_for(&mut self, message: &Message) -> Option<Direction> {
        if self.request_direction.is_none()
            && matches!(
                http::start_line(&message.bytes),
                Some(http::StartLine::Request { .. })
            )
        {
            self.request_direction = Some(message.direction);
        }
        self.request_direction
    }
}

/// The span a server whose request came from `client` (the other end of
/// its connection, on this node) is the child of, when `client` forwarded
/// the traceparent the server received.
fn forwarder_of(client: &RequestContext, server: &RequestContext) -> Option<SpanId> {
    let forwarded = client.forwarded_parent?;
    (server.from_wire
        && server.trace_id == client.trace_id
        && server.wire_parent == Some(forwarded))
    .then_some(client.span_id)
}

/// The requests open on server connection `id`.
fn open_server_requests(
    connections: &HashMap<ConnectionId, Box<ConnectionState>>,
    id: ConnectionId,
) -> OpenRequests {
    let Some(state) = connections.get(&id) else {
        return OpenRequests::None;
    };
    let mut open = state.requests.iter().filter(|r| r.kind == SpanKind::Server);
    match (open.next(), open.next()) {
        (None, _) => OpenRequests::None,
        (Some(one), None) => OpenRequests::One(RequestKey {
            connection: id,
            sequence: one.sequence,
        }),
        (Some(_), Some(_)) => OpenRequests::Several,
    }
}

/// Makes a server context the child of the client context of the same
/// request, keeping the server's own span id.
fn adopt_client(server: &mut RequestContext, client: &RequestContext, sampler: &Sampler) {
    let sampled = sampler.should_sample(client.trace_id, Some(client.flags & flags::SAMPLED != 0));
    server.trace_id = client.trace_id;
    server.parent_span_id = Some(client.span_id);
    server.flags = tracecontext::child_flags(client.flags, sampled);
    server.trace_state = client.trace_state.clone();
    server.awaiting_local_client = false;
    server.decision = ParentDecision::LocalPeer;
}

#[cfg(test)]
mod tests;
