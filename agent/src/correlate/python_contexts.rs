//! Which inbound request each context of a watched Python event loop
//! serves, learned from the interpreter (see `capture::python`).
//!
//! Every asyncio callback and task runs in a `contextvars` context; a task
//! (or a callback, or a call a thread pool makes for a task) starts in a
//! copy of the context current where it was created. The rules, each exact
//! for the event loop it applies to:
//!
//! - **The reading callback.** A request is handed to the application by
//!   the callback that read it, synchronously. With the plain asyncio loop
//!   the socket is read inside that callback, in a context of the
//!   connection's own (its reader's): a request head completed by a read
//!   makes the context current at the read syscall *read for* that request,
//!   until the next request on the connection. A context seen reading for
//!   two connections is shared: it reads for none. uvloop reads first and
//!   then enters the callback's context through `PyContext_Enter`, a
//!   context it shares between the connections of a server: there, the
//!   first context the thread enters after the read reads for the request
//!   only until the thread enters another (the callback has returned).
//! - **The accepting callback.** The plain asyncio loop accepts a
//!   connection and at once creates the task that sets it up (transport,
//!   protocol, the server's per-connection task, as aiohttp's): the first
//!   copy a thread makes right after an accept, of the context current at
//!   the accept, *belongs to* that connection, and so do its copies.
//! - **Copies.** A context copied from one that reads for or serves a
//!   request whose response is not complete yet serves that request (the
//!   task a server creates for a request, the tasks and thread-pool calls it
//!   creates in turn). A copy made after the response is complete serves
//!   nothing: it is the next pipelined request's task, created by the
//!   previous one's. A copy of a context that belongs to a connection
//!   serves the connection's request when exactly one is open on it (a
//!   per-connection task handles its requests one by one), belongs to the
//!   connection when none is, and is unknown when several are.
//! - **Calls.** A call sent while its thread's current context serves (or
//!   reads for) a request is that request's child; so is a call sent from
//!   a context that belongs to a connection with exactly one request open
//!   (a per-connection handler, as `asyncio.start_server`'s).
//! - **Check.** A response written while a context serving another request
//!   is current contradicts the rules for this process: its calls get no
//!   parent from contexts from then on.
//!
//! Contexts are named by address, which a later context may reuse: every
//! copy names a new one and replaces what was known of that address.

use foldhash::{HashMap, HashSet};

use crate::capture::ConnectionId;

/// One request of a connection: the connection and the request's position
/// on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestKey {
    /// The server side's connection.
    pub connection: ConnectionId,
    /// The request's sequence on it.
    pub sequence: u64,
}

/// What a context is known to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Binding {
    /// A connection's reading callback runs in it; it reads for this request.
    Reads(RequestKey),
    /// Created for this request.
    Serves(RequestKey),
    /// Created for this connection (by its accepting callback, or a copy
    /// of such a context while no request was open on it).
    Connection(ConnectionId),
    /// Seen reading for two connections: no request's.
    Shared,
}

impl Binding {
    fn request(self) -> Option<RequestKey> {
        match self {
            Binding::Reads(key) | Binding::Serves(key) => Some(key),
            Binding::Connection(_) | Binding::Shared => None,
        }
    }

    fn connection(self) -> Option<ConnectionId> {
        match self {
            Binding::Reads(key) | Binding::Serves(key) => Some(key.connection),
            Binding::Connection(connection) => Some(connection),
            Binding::Shared => None,
        }
    }
}

/// The requests open (head read, response not complete) on a server
/// connection, as correlation knows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenRequests {
    /// None.
    None,
    /// Exactly this one.
    One(RequestKey),
    /// More than one (pipelined).
    Several,
}

/// What the contexts of a call's thread say about its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextParent {
    /// The call's context serves (or reads for) this request.
    Request(RequestKey),
    /// The thread's context was not read (process not watched yet, or
    /// unreadable).
    Unread,
    /// The context is known to serve no request.
    Unbound,
    /// This process's responses contradicted the rules.
    Distrusted,
}

/// Contexts remembered at most; when full, those of finished requests go
/// first, then everything (losing only parents, never giving wrong ones).
const MAX_CONTEXTS: usize = 200_000;
/// Finished requests remembered at most (for calls made after the response,
/// such as background tasks).
const MAX_FINISHED: usize = 50_000;

/// The contexts of watched Python processes and the requests they serve.
#[derive(Default)]
pub struct PythonContexts {
    contexts: HashMap<(u32, u64), Binding>,
    /// Requests whose response is complete: copies no longer inherit them.
    finished: HashSet<RequestKey>,
    /// uvloop: the request whose head a thread's last read completed, until
    /// the thread's next event (an enter names its reading context).
    pending_reads: HashMap<(u32, u32), RequestKey>,
    /// uvloop: the reading callback running on a thread (its context and
    /// the request it reads for), from its enter to the thread's next
    /// event.
    callbacks: HashMap<(u32, u32), (u64, RequestKey)>,
    /// Plain loop: the connection a thread just accepted and the context
    /// current then, until the thread's next syscall or copy.
    accepts: HashMap<(u32, u32), (u64, ConnectionId)>,
    /// Processes whose responses contradicted the rules.
    distrusted: HashSet<u32>,
}

impl PythonContexts {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// A syscall of thread `tid`: a pending uvloop read is followed by
    /// something else than its enter, and a reading callback may have
    /// returned.
    pub fn thread_event(&mut self, pid: u32, tid: u32) {
        if !self.pending_reads.is_empty() {
            self.pending_reads.remove(&(pid, tid));
        }
        if !self.callbacks.is_empty() {
            self.callbacks.remove(&(pid, tid));
        }
        if !self.accepts.is_empty() {
            self.accepts.remove(&(pid, tid));
        }
    }

    /// Thread `tid` of a plain asyncio loop accepted `connection` while
    /// `context` (0: unread) was current.
    pub fn accepted(&mut self, pid: u32, tid: u32, context: u64, connection: ConnectionId) {
        if context == 0 {
            self.accepts.remove(&(pid, tid));
            return;
        }
        if self.accepts.len() >= MAX_CONTEXTS {
            self.accepts.clear();
        }
        self.accepts.insert((pid, tid), (context, connection));
    }

    /// A read by `tid` completed the head of request `key`. `context` is the
    /// context current at the read (0: unread); `enters_after_read` says
    /// the loop enters the reading context after the read (uvloop).
    pub fn request_read(
        &mut self,
        pid: u32,
        tid: u32,
        context: u64,
        key: RequestKey,
        enters_after_read: bool,
    ) {
        if enters_after_read {
            self.pending_reads.insert((pid, tid), key);
        } else if context != 0 {
            self.bind_reader(pid, context, key);
        }
    }

    /// `tid` entered `context`.
    pub fn entered(&mut self, pid: u32, tid: u32, context: u64) {
        match self.pending_reads.remove(&(pid, tid)) {
            Some(key) => {
                if self.callbacks.len() >= MAX_CONTEXTS {
                    self.callbacks.clear();
                }
                self.callbacks.insert((pid, tid), (context, key));
            }
            None => {
                self.callbacks.remove(&(pid, tid));
            }
        }
    }

    fn bind_reader(&mut self, pid: u32, context: u64, key: RequestKey) {
        let binding = match self.contexts.get(&(pid, context)) {
            Some(Binding::Shared) => Binding::Shared,
            Some(binding) if binding.connection() != Some(key.connection) => Binding::Shared,
            _ => Binding::Reads(key),
        };
        self.insert(pid, context, binding);
    }

    /// On thread `tid`, `parent` (0: unread) was copied into the new
    /// context `copy`. `open` tells which requests are open on a server
    /// connection.
    pub fn copied(
        &mut self,
        pid: u32,
        tid: u32,
        parent: u64,
        copy: u64,
        open: impl Fn(ConnectionId) -> OpenRequests,
    ) {
        // A new context at a reused address: what was known of the old one
        // is void, whatever comes next.
        self.contexts.remove(&(pid, copy));
        if parent == 0 {
            return;
        }
        if let Some((context, connection)) = self.accepts.remove(&(pid, tid))
            && context == parent
        {
            self.insert(pid, copy, Binding::Connection(connection));
            return;
        }
        let in_callback = self
            .callbacks
            .get(&(pid, tid))
            .filter(|(context, _)| *context == parent)
            .map(|(_, key)| Binding::Serves(*key));
        let Some(from) = in_callback.or_else(|| self.contexts.get(&(pid, parent)).copied()) else {
            return;
        };
        let inherited = match from {
            Binding::Reads(key) | Binding::Serves(key) => {
                (!self.finished.contains(&key)).then_some(Binding::Serves(key))
            }
            Binding::Connection(connection) => match open(connection) {
                OpenRequests::None => Some(Binding::Connection(connection)),
                OpenRequests::One(key) => Some(Binding::Serves(key)),
                OpenRequests::Several => None,
            },
            Binding::Shared => None,
        };
        if let Some(binding) = inherited {
            self.insert(pid, copy, binding);
        }
    }

    /// The request a call sent while `context` was current belongs to.
    /// `open` tells which requests are open on a server connection.
    pub fn parent(
        &self,
        pid: u32,
        context: u64,
        open: impl Fn(ConnectionId) -> OpenRequests,
    ) -> ContextParent {
        if self.distrusted.contains(&pid) {
            return ContextParent::Distrusted;
        }
        if context == 0 {
            return ContextParent::Unread;
        }
        match self.contexts.get(&(pid, context)) {
            Some(Binding::Reads(key) | Binding::Serves(key)) => ContextParent::Request(*key),
            Some(Binding::Connection(connection)) => match open(*connection) {
                OpenRequests::One(key) => ContextParent::Request(key),
                OpenRequests::None | OpenRequests::Several => ContextParent::Unbound,
            },
            Some(Binding::Shared) | None => ContextParent::Unbound,
        }
    }

    /// Request `key`'s response is being written while `context` is current
    /// (0: unread): a context serving another request contradicts the rules.
    pub fn responding(&mut self, pid: u32, context: u64, key: RequestKey) {
        if context == 0 {
            return;
        }
        let contradicts = match self.contexts.get(&(pid, context)) {
            Some(Binding::Reads(other)) | Some(Binding::Serves(other)) => *other != key,
            Some(Binding::Connection(other)) => *other != key.connection,
            Some(Binding::Shared) | None => false,
        };
        if contradicts {
            log::debug!("pid {pid}: response to {key:?} written by a context bound elsewhere");
            self.distrusted.insert(pid);
        }
    }

    /// Request `key`'s response is complete.
    pub fn finished(&mut self, key: RequestKey) {
        if self.finished.len() >= MAX_FINISHED {
            // Forget the finished requests and every context bound to them.
            let finished = std::mem::take(&mut self.finished);
            self.contexts
                .retain(|_, b| b.request().is_none_or(|k| !finished.contains(&k)));
        }
        self.finished.insert(key);
    }

    /// Whether the rules were contradicted in `pid`.
    pub fn is_distrusted(&self, pid: u32) -> bool {
        self.distrusted.contains(&pid)
    }

    fn insert(&mut self, pid: u32, context: u64, binding: Binding) {
        if self.contexts.len() >= MAX_CONTEXTS && !self.contexts.contains_key(&(pid, context)) {
            let finished = &self.finished;
            self.contexts
                .retain(|_, b| b.request().is_some_and(|k| !finished.contains(&k)));
            if self.contexts.len() >= MAX_CONTEXTS {
                self.contexts.clear();
            }
        }
        self.contexts.insert((pid, context), binding);
    }

    /// Contexts remembered (for tests and counters).
    pub fn len(&self) -> usize {
        self.contexts.len()
    }

    /// Whether no context is remembered.
    pub fn is_empty(&self) -> bool {
        self.contexts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PID: u32 = 10;
    const LOOP_TID: u32 = 10;

    fn none_open(_: ConnectionId) -> OpenRequests {
        OpenRequests::None
    }

    fn key(connection: u64, sequence: u64) -> RequestKey {
        RequestKey {
            connection: ConnectionId(connection),
            sequence,
        }
    }

    #[test]
    fn a_task_copied_from_the_reading_callback_serves_the_request_read() {
        let mut p = PythonContexts::new();
        // Plain loop: the reading callback's context is current at the read.
        p.request_read(PID, LOOP_TID, 0xA0, key(1, 0), false);
        p.copied(PID, LOOP_TID, 0xA0, 0xB0, none_open); // the request's task
        p.copied(PID, LOOP_TID, 0xB0, 0xC0, none_open); // a thread-pool call it makes
        assert_eq!(
            p.parent(PID, 0xB0, none_open),
            ContextParent::Request(key(1, 0))
        );
        assert_eq!(
            p.parent(PID, 0xC0, none_open),
            ContextParent::Request(key(1, 0))
        );
        // Another connection's request, concurrently.
        p.request_read(PID, LOOP_TID, 0xA1, key(2, 0), false);
        p.copied(PID, LOOP_TID, 0xA1, 0xB1, none_open);
        assert_eq!(
            p.parent(PID, 0xB1, none_open),
            ContextParent::Request(key(2, 0))
        );
        assert_eq!(
            p.parent(PID, 0xB0, none_open),
            ContextParent::Request(key(1, 0))
        );
        // Keep-alive: the next request on connection 1 rebinds its reader.
        p.finished(key(1, 0));
        p.request_read(PID, LOOP_TID, 0xA0, key(1, 1), false);
        p.copied(PID, LOOP_TID, 0xA0, 0xB2, none_open);
        assert_eq!(
            p.parent(PID, 0xB2, none_open),
            ContextParent::Request(key(1, 1))
        );
    }

    #[test]
    fn uvloop_reading_callback_is_the_first_enter_after_the_read_until_the_next() {
        let mut p = PythonContexts::new();
        // The read happens in the loop's base context; the callback runs in
        // the server's context, the same for every connection.
        p.request_read(PID, LOOP_TID, 0x50, key(1, 0), true);
        p.entered(PID, LOOP_TID, 0xA0);
        p.copied(PID, LOOP_TID, 0xA0, 0xB0, none_open);
        assert_eq!(
            p.parent(PID, 0xB0, none_open),
            ContextParent::Request(key(1, 0))
        );
        // Neither the base context nor the callback's is bound.
        assert_eq!(p.parent(PID, 0x50, none_open), ContextParent::Unbound);
        assert_eq!(p.parent(PID, 0xA0, none_open), ContextParent::Unbound);
        // The callback returned: the next task's enter ends it, and a later
        // copy of the server's context (another callback) serves nothing.
        p.entered(PID, LOOP_TID, 0xB0);
        p.copied(PID, LOOP_TID, 0xA0, 0xB1, none_open);
        assert_eq!(p.parent(PID, 0xB1, none_open), ContextParent::Unbound);
        // The next connection's request, through the same context.
        p.request_read(PID, LOOP_TID, 0x50, key(2, 0), true);
        p.entered(PID, LOOP_TID, 0xA0);
        p.copied(PID, LOOP_TID, 0xA0, 0xB2, none_open);
        assert_eq!(
            p.parent(PID, 0xB2, none_open),
            ContextParent::Request(key(2, 0))
        );
        assert_eq!(
            p.parent(PID, 0xB0, none_open),
            ContextParent::Request(key(1, 0))
        );
        // A read followed by another syscall before any enter binds nothing.
        p.request_read(PID, LOOP_TID, 0x50, key(3, 0), true);
        p.thread_event(PID, LOOP_TID);
        p.entered(PID, LOOP_TID, 0xA0);
        p.copied(PID, LOOP_TID, 0xA0, 0xB3, none_open);
        assert_eq!(p.parent(PID, 0xB3, none_open), ContextParent::Unbound);
        // Copies on another thread are not the callback's.
        p.request_read(PID, LOOP_TID, 0x50, key(4, 0), true);
        p.entered(PID, LOOP_TID, 0xA0);
        p.copied(PID, LOOP_TID + 1, 0xA0, 0xB4, none_open);
        assert_eq!(p.parent(PID, 0xB4, none_open), ContextParent::Unbound);
    }

    #[test]
    fn a_context_reading_for_two_connections_reads_for_none() {
        let mut p = PythonContexts::new();
        p.request_read(PID, LOOP_TID, 0x50, key(1, 0), false);
        p.request_read(PID, LOOP_TID, 0x50, key(2, 0), false);
        p.copied(PID, LOOP_TID, 0x50, 0xB0, none_open);
        assert_eq!(p.parent(PID, 0x50, none_open), ContextParent::Unbound);
        assert_eq!(p.parent(PID, 0xB0, none_open), ContextParent::Unbound);
    }

    #[test]
    fn copies_after_the_response_serve_nothing() {
        let mut p = PythonContexts::new();
        p.request_read(PID, LOOP_TID, 0xA0, key(1, 0), false);
        p.copied(PID, LOOP_TID, 0xA0, 0xB0, none_open);
        p.finished(key(1, 0));
        // The pipelined next request's task, created by the previous one.
        p.copied(PID, LOOP_TID, 0xB0, 0xB1, none_open);
        assert_eq!(p.parent(PID, 0xB1, none_open), ContextParent::Unbound);
        // The finished request's own context still names it (work it does
        // after responding, such as background tasks, is its own).
        assert_eq!(
            p.parent(PID, 0xB0, none_open),
            ContextParent::Request(key(1, 0))
        );
    }

    #[test]
    fn a_reused_address_forgets_the_old_context() {
        let mut p = PythonContexts::new();
        p.request_read(PID, LOOP_TID, 0xA0, key(1, 0), false);
        p.copied(PID, LOOP_TID, 0xA0, 0xB0, none_open);
        // 0xB0 freed, and a copy of an unbound context lands there.
        p.copied(PID, LOOP_TID, 0x99, 0xB0, none_open);
        assert_eq!(p.parent(PID, 0xB0, none_open), ContextParent::Unbound);
        // Unread parents give nothing either.
        p.copied(PID, LOOP_TID, 0, 0xB1, none_open);
        assert_eq!(p.parent(PID, 0xB1, none_open), ContextParent::Unbound);
        assert_eq!(p.parent(PID, 0, none_open), ContextParent::Unread);
    }

    #[test]
    fn a_response_written_by_another_requests_context_distrusts_the_process() {
        let mut p = PythonContexts::new();
        p.request_read(PID, LOOP_TID, 0xA0, key(1, 0), false);
        p.copied(PID, LOOP_TID, 0xA0, 0xB0, none_open);
        p.request_read(PID, LOOP_TID, 0xA1, key(2, 0), false);
        p.copied(PID, LOOP_TID, 0xA1, 0xB1, none_open);
        p.responding(PID, 0xB0, key(1, 0));
        assert!(!p.is_distrusted(PID));
        p.responding(PID, 0xB0, key(2, 0));
        assert!(p.is_distrusted(PID));
        assert_eq!(p.parent(PID, 0xB1, none_open), ContextParent::Distrusted);
        assert_eq!(
            p.parent(PID + 1, 0xB1, none_open),
            ContextParent::Unbound,
            "other processes are not affected"
        );
    }

    #[test]
    fn a_per_connection_task_serves_its_connections_requests_one_by_one() {
        let mut p = PythonContexts::new();
        let conn = ConnectionId(7);
        // Accepted in the listening callback's context; the set-up task.
        p.accepted(PID, LOOP_TID, 0x40, conn);
        p.copied(PID, LOOP_TID, 0x40, 0x41, none_open);
        // A second copy of the listening context is not the connection's.
        p.copied(PID, LOOP_TID, 0x40, 0x42, none_open);
        // The set-up task creates the connection's task (nothing open yet).
        p.copied(PID, LOOP_TID, 0x41, 0x43, none_open);
        // The connection's task calls out itself while its one request is
        // open (a per-connection handler).
        assert_eq!(
            p.parent(PID, 0x43, |_| OpenRequests::One(key(7, 0))),
            ContextParent::Request(key(7, 0))
        );
        assert_eq!(
            p.parent(PID, 0x43, |_| OpenRequests::Several),
            ContextParent::Unbound
        );
        assert_eq!(
            p.parent(PID, 0x43, none_open),
            ContextParent::Unbound,
            "no request yet"
        );
        // A request is open: the task it creates serves it.
        let one = |_: ConnectionId| OpenRequests::One(key(7, 0));
        p.copied(PID, LOOP_TID, 0x43, 0x44, one);
        assert_eq!(
            p.parent(PID, 0x44, none_open),
            ContextParent::Request(key(7, 0))
        );
        assert_eq!(p.parent(PID, 0x42, none_open), ContextParent::Unbound);
        // Two open (pipelined): which one is unknown.
        let several = |_: ConnectionId| OpenRequests::Several;
        p.copied(PID, LOOP_TID, 0x43, 0x45, several);
        assert_eq!(p.parent(PID, 0x45, none_open), ContextParent::Unbound);
        // A syscall between the accept and the copy ends the accept.
        p.accepted(PID, LOOP_TID, 0x40, ConnectionId(8));
        p.thread_event(PID, LOOP_TID);
        p.copied(PID, LOOP_TID, 0x40, 0x46, none_open);
        p.copied(PID, LOOP_TID, 0x46, 0x47, |_| OpenRequests::One(key(8, 0)));
        assert_eq!(p.parent(PID, 0x47, none_open), ContextParent::Unbound);
        // Its response written by a context of another connection: distrust.
        p.responding(PID, 0x44, key(7, 0));
        assert!(!p.is_distrusted(PID));
        p.responding(PID, 0x43, key(9, 0));
        assert!(p.is_distrusted(PID));
    }

    #[test]
    fn the_tables_stay_bounded() {
        let mut p = PythonContexts::new();
        for n in 0..(MAX_FINISHED as u64 + 10) {
            p.request_read(PID, LOOP_TID, 0x1000 + n, key(n, 0), false);
            p.copied(PID, LOOP_TID, 0x1000 + n, 0x10_0000_0000 + n, none_open);
            p.finished(key(n, 0));
        }
        assert!(p.finished.len() <= MAX_FINISHED);
        assert!(p.len() <= MAX_CONTEXTS);
    }
}
