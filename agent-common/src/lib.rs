//! Types shared by the kernel programs (`agent-ebpf`) and the user-space
//! agent: the layout of ring-buffer records, map keys and values, and the
//! configuration user space writes before the programs attach.
//!
//! Everything here is `#[repr(C)]` plain data; both sides read the same bytes.
#![no_std]

/// Most bytes of one message (one syscall) that are copied: enough for a
/// 16 KiB request head to reach user space whole. A power of two, because
/// the kernel side masks offsets with it to satisfy the verifier.
pub const MAX_MESSAGE_BYTES: u32 = 16 * 1024;

/// iovec entries of one readv/writev/sendmsg/recvmsg that are copied; bytes
/// in later entries are counted as truncated.
pub const MAX_IOVECS: u32 = 8;

/// How many messages of a connection may fail to look like the start of an
/// HTTP/1.x message before the kernel stops copying that connection.
pub const CLASSIFY_ATTEMPTS: u8 = 4;

/// Which kind of record a ring-buffer entry is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Payload bytes of one syscall.
    Data = 1,
    /// A TCP connection was established by connect() or accept().
    Open = 2,
    /// A tracked TCP connection's file descriptor was closed.
    Close = 3,
    /// A watched Python interpreter copied the thread's current context
    /// (`PyContext_CopyCurrent`: asyncio task and callback creation,
    /// `contextvars.copy_context()`): `python_context` is the context that
    /// was copied, `python_context_copy` the new one. No connection fields.
    PythonContextCopy = 4,
    /// A watched Python interpreter entered a context (`PyContext_Enter`,
    /// as uvloop does around every callback): `python_context` is the
    /// context entered. No connection fields.
    PythonContextEnter = 5,
}

/// Which way bytes moved, seen from the traced process.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The process wrote or sent.
    Egress = 0,
    /// The process read or received.
    Ingress = 1,
}

/// Who opened the connection, when the kernel saw it happen.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Existed before the agent started, or was inherited.
    Unknown = 0,
    /// The process called connect().
    Client = 1,
    /// The process got it from accept().
    Server = 2,
}

/// Which syscall produced a record (diagnostics and tests).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syscall {
    /// Not a data syscall (open and close records).
    None = 0,
    /// read(2).
    Read = 1,
    /// write(2).
    Write = 2,
    /// readv(2).
    Readv = 3,
    /// writev(2).
    Writev = 4,
    /// recvfrom(2) (and recv).
    Recvfrom = 5,
    /// sendto(2) (and send).
    Sendto = 6,
    /// recvmsg(2).
    Recvmsg = 7,
    /// sendmsg(2).
    Sendmsg = 8,
    /// sendfile: bytes are counted, never copied (they come from a file).
    Sendfile = 9,
}

/// `flags` bit: the syscall moved more bytes than were copied.
pub const FLAG_TRUNCATED: u8 = 1;
/// `flags` bit: the payload is not copied at all (sendfile).
pub const FLAG_NO_PAYLOAD: u8 = 2;

/// `AF_INET`, as stored in [`ConnTuple::family`].
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as stored in [`ConnTuple::family`].
pub const AF_INET6: u16 = 10;

/// A TCP connection's addresses as the traced process sees them.
///
/// IPv4 addresses sit in the first four bytes of `local_addr`/`remote_addr`.
/// Ports are in host byte order.
// Aligned to 4 (its layout is unchanged): the kernel programs copy it into
// every record, and the eBPF backend turns a copy of a 2-aligned struct
// into a call to a byte-by-byte loop.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnTuple {
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Local port.
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,
    /// Padding (zero), so that the layout has no holes.
    pub _pad: u16,
    /// Local address in network byte order.
    pub local_addr: [u8; 16],
    /// Remote address in network byte order.
    pub remote_addr: [u8; 16],
}

/// The fixed part of every ring-buffer record. Data records are followed by
/// `captured_len` payload bytes: the first bytes of the message.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// Kernel monotonic time (`bpf_ktime_get_ns`) the bytes were seen: when
    /// a send syscall began, when a receive syscall returned (for open and
    /// close records: when the syscall ran).
    pub timestamp_ns: u64,
    /// Unique for the life of the loaded programs; changes when an fd number
    /// is reused for a new connection.
    pub conn_id: u64,
    /// Process id (thread group id).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// File descriptor in `pid`.
    pub fd: i32,
    /// Bytes the syscall moved (its return value); 0 for open/close.
    pub message_len: u32,
    /// Payload bytes after this header.
    pub captured_len: u32,
    /// [`EventKind`] as u8.
    pub kind: u8,
    /// [`Direction`] as u8.
    pub direction: u8,
    /// [`Role`] as u8.
    pub role: u8,
    /// [`Syscall`] as u8.
    pub syscall: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Padding (zero), so that the layout has no holes.
    pub _pad: [u8; 3],
    /// The connection's addresses.
    pub tuple: ConnTuple,
    /// In a watched Python interpreter ([`PythonProcess`]), the address of
    /// the context (`PyThreadState.context`) current on the thread when the
    /// syscall ran; 0 when not watched or unreadable.
    pub python_context: u64,
    /// [`EventKind::PythonContextCopy`] records only: the new context.
    pub python_context_copy: u64,
}

/// Size of [`EventHeader`] in bytes.
pub const EVENT_HEADER_SIZE: usize = size_of::<EventHeader>();

// The layout is part of the kernel/user contract (and of docs/architecture.md).
const _: () = assert!(EVENT_HEADER_SIZE == 104);

/// A data record as the kernel builds it in a per-CPU scratch slot before
/// sending only `EVENT_HEADER_SIZE + captured_len` bytes of it.
#[repr(C)]
pub struct DataEvent {
    /// Fixed part.
    pub header: EventHeader,
    /// Payload; only `header.captured_len` bytes are meaningful. Twice the
    /// copy limit so that "offset < limit" plus "length <= limit" provably
    /// stays inside, which is what the verifier can check.
    pub data: [u8; 2 * MAX_MESSAGE_BYTES as usize],
}

/// Key of the connection table: one entry per (process, fd).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Process id (thread group id).
    pub pid: u32,
    /// File descriptor.
    pub fd: i32,
}

/// What the kernel learned about a file descriptor.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    /// A file, pipe, unix socket, UDP socket...: never copied.
    Other = 0,
    /// An IPv4 or IPv6 TCP socket.
    Tcp = 1,
}

/// What the kernel believes a TCP connection carries.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// No message has looked like HTTP/1.x yet (nor failed often enough).
    Unknown = 0,
    /// A message started like an HTTP/1.x request or response.
    Http = 1,
    /// [`CLASSIFY_ATTEMPTS`] messages did not: payload is no longer copied.
    NotHttp = 2,
}

/// Value of the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    /// See [`EventHeader::conn_id`].
    pub conn_id: u64,
    /// Addresses (zero unless `kind` is Tcp).
    pub tuple: ConnTuple,
    /// [`FdKind`] as u8.
    pub kind: u8,
    /// [`Protocol`] as u8.
    pub protocol: u8,
    /// [`Role`] as u8.
    pub role: u8,
    /// Messages that did not look like HTTP while `protocol` was Unknown.
    pub failed_classifications: u8,
    /// Padding (zero), so that the layout has no holes.
    pub _pad: [u8; 4],
}

/// Byte offsets of the kernel struct fields the programs follow from a file
/// descriptor to its socket. rustc emits no CO-RE relocations, so user space
/// reads them from the running kernel's BTF and writes them here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.files`.
    pub task_struct_files: u32,
    /// `files_struct.fdt`.
    pub files_struct_fdt: u32,
    /// `fdtable.max_fds`.
    pub fdtable_max_fds: u32,
    /// `fdtable.fd`.
    pub fdtable_fd: u32,
    /// `file.f_inode`.
    pub file_f_inode: u32,
    /// `file.private_data` (the `socket` of a socket file).
    pub file_private_data: u32,
    /// `inode.i_mode`.
    pub inode_i_mode: u32,
    /// `socket.sk`.
    pub socket_sk: u32,
    /// `sock.__sk_common.skc_family`.
    pub sock_family: u32,
    /// `sock.__sk_common.skc_num` (local port).
    pub sock_num: u32,
    /// `sock.__sk_common.skc_dport`.
    pub sock_dport: u32,
    /// `sock.__sk_common.skc_rcv_saddr`.
    pub sock_rcv_saddr: u32,
    /// `sock.__sk_common.skc_daddr`.
    pub sock_daddr: u32,
    /// `sock.__sk_common.skc_v6_rcv_saddr`.
    pub sock_v6_rcv_saddr: u32,
    /// `sock.__sk_common.skc_v6_daddr`.
    pub sock_v6_daddr: u32,
    /// `sock.sk_protocol`.
    pub sock_protocol: u32,
    /// `sock.sk_type`.
    pub sock_type: u32,
}

/// Settings user space writes into the `CONFIG` map before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptureConfig {
    /// The agent's own pid: its syscalls are never traced, or its own logging
    /// would feed the ring buffer.
    pub agent_pid: u32,
    /// Bytes copied per message, at most [`MAX_MESSAGE_BYTES`].
    pub max_message_bytes: u32,
    /// Field offsets from BTF.
    pub offsets: KernelOffsets,
    /// Records wake user space once each time the bytes waiting in the ring
    /// cross a multiple of this (and for the requests of
    /// [`WAKE_PORT_WORDS`]' ports); user space also drains the ring on a
    /// short timer.
    pub wakeup_bytes: u32,
    /// Padding (zero), so that the layout has no holes.
    pub _pad: u32,
}

/// Words of the `WAKE_PORTS` bitmap (bit `p % 64` of word `p / 64` for
/// port `p`): client requests to these destination ports wake user space
/// at once, because the proxy waits for the agent's view of them.
pub const WAKE_PORT_WORDS: u32 = 1024;

/// Most threads of one Python interpreter searched for the calling thread's
/// state; a thread further down the interpreter's list reads as unknown
/// (its calls get no parent from the interpreter).
pub const MAX_PYTHON_THREADS: u32 = 128;

/// Where, in a watched Python process, the kernel finds the current
/// context of a thread: the `PYTHON_PROCESSES` map's value, by pid.
///
/// The kernel follows `*interpreters_head` (the main interpreter) ->
/// `threads_head` -> each thread state's `next` until `native_thread_id`
/// is the calling thread, then reads its `context`. The offsets depend on
/// the interpreter's version; user space takes them from a table checked
/// against the version's headers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonProcess {
    /// Address of `_PyRuntime.interpreters.head` in the process.
    pub interpreters_head: u64,
    /// `PyInterpreterState.threads.head`.
    pub interpreter_threads_head: u32,
    /// `PyThreadState.next`.
    pub thread_next: u32,
    /// `PyThreadState.native_thread_id` (the kernel's thread id).
    pub thread_native_id: u32,
    /// `PyThreadState.context`.
    pub thread_context: u32,
}

/// Indices of the per-CPU `COUNTERS` map. The `DROP_*` ones count places
/// where data is lost; the rest describe normal operation.
pub mod counter {
    /// A record did not fit in the ring buffer.
    pub const DROP_RINGBUF_FULL: u32 = 0;
    /// Copying payload from user memory failed (the message is dropped).
    pub const DROP_READ_USER_FAILED: u32 = 1;
    /// Messages longer than the capture limit (their tail is not copied).
    pub const DROP_TRUNCATED_MESSAGES: u32 = 2;
    /// Messages whose bytes spread over more than `MAX_IOVECS` iovecs.
    pub const DROP_IOVEC_OVERFLOW: u32 = 3;
    /// The connection table was full.
    pub const DROP_CONN_TABLE_FULL: u32 = 4;
    /// The in-flight syscall table was full.
    pub const DROP_INFLIGHT_TABLE_FULL: u32 = 5;
    /// Reading a kernel struct on the fd-to-socket path failed.
    pub const DROP_KERNEL_READ_FAILED: u32 = 6;
    /// Records written to the ring buffer.
    pub const RECORDS_SENT: u32 = 7;
    /// Messages on TCP connections not copied because they are not HTTP.
    pub const MESSAGES_NOT_HTTP: u32 = 8;
    /// Messages of a watched Python process whose thread's context could not
    /// be read (its thread state was not found or not readable).
    pub const PYTHON_CONTEXT_UNREAD: u32 = 9;
    /// Number of counters.
    pub const COUNT: u32 = 10;

    /// Names, by index, as user space exposes them.
    pub const NAMES: [&str; COUNT as usize] = [
        "drop_ringbuf_full",
        "drop_read_user_failed",
        "drop_truncated_messages",
        "drop_iovec_overflow",
        "drop_conn_table_full",
        "drop_inflight_table_full",
        "drop_kernel_read_failed",
        "records_sent",
        "messages_not_http",
        "python_context_unread",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) plain data with explicit padding.
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::PythonProcess {}
}
