//! Kernel side of the capture: syscall tracepoints that copy the payload of
//! HTTP/1.x traffic on TCP sockets into a ring buffer.
//!
//! Data syscalls are copied at exit, where the return value says how many
//! bytes really moved (a non-blocking write may send fewer than asked).
//! Receives are traced at exit only: their arguments are still in the user
//! registers the kernel saved at the syscall's entry. Sends are also traced
//! at enter, for the time they began. A file descriptor is resolved to its socket once,
//! by following task -> files -> fdtable -> file -> socket -> sock with field
//! offsets user space took from BTF, and the result is cached per (pid, fd).
//!
//! In Python processes user space chose to watch, each data record also
//! carries the context current on the calling thread, read from the
//! interpreter's thread states, and two uprobes report context copies and
//! enters: what correlation needs to follow asyncio tasks.
#![no_std]
#![no_main]

use agent_common::{
    AF_INET, AF_INET6, CLASSIFY_ATTEMPTS, CaptureConfig, ConnInfo, ConnKey, ConnTuple, DataEvent,
    Direction, EVENT_HEADER_SIZE, EventHeader, EventKind, FLAG_NO_PAYLOAD, FLAG_TRUNCATED, FdKind,
    KernelOffsets, MAX_IOVECS, MAX_MESSAGE_BYTES, MAX_PYTHON_THREADS, Protocol, PythonProcess,
    Role, Syscall, WAKE_PORT_WORDS, counter,
};
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{
            bpf_get_current_task_btf, bpf_probe_read_user as raw_probe_read_user, bpf_task_pt_regs,
        },
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use aya_log_ebpf::warn;

/// Written once by user space before the programs attach.
#[map]
static CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// Records to user space. User space may resize it at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Destination ports whose client requests wake user space at once (see
/// `agent_common::WAKE_PORT_WORDS`).
#[map]
static WAKE_PORTS: Array<u64> = Array::with_max_entries(WAKE_PORT_WORDS, 0);

/// Per-CPU counters, indexed by `agent_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// TCP connections, by (pid, fd).
#[map]
static CONNS: LruHashMap<ConnKey, ConnInfo> = LruHashMap::with_max_entries(65536, 0);

/// File descriptors known not to be TCP sockets. Kept apart from `CONNS` so
/// that a node full of open files cannot evict live connections from it.
#[map]
static OTHER_FDS: LruHashMap<ConnKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// Sends and connects between enter and exit, by thread: one slot per
/// thread, written in place at enter and marked taken at exit. Inserting and deleting an
/// entry per syscall cost more than the rest of the probes (allocation,
/// bucket locks, RCU frees); the slots of threads that ended age out of
/// the LRU.
#[map]
static INFLIGHT: LruHashMap<u64, InflightCall> = LruHashMap::with_max_entries(16384, 0);

/// One record being built, per CPU (too large for the 512-byte BPF stack,
/// and for a per-CPU map's 32 KiB value limit): indexed by CPU number, and
/// sized by user space to the number of possible CPUs.
#[map]
static SCRATCH: Array<DataEvent> = Array::with_max_entries(256, 0);

/// Python processes whose threads' contexts are read, by pid: written by
/// user space when it attaches the context uprobes to the process.
#[map]
static PYTHON_PROCESSES: HashMap<u32, PythonProcess> = HashMap::with_max_entries(4096, 0);

/// Thread state address of each thread of a watched Python process, by
/// pid_tgid, found once by walking the interpreter's thread list.
#[map]
static PYTHON_THREADS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU sequence for connection ids.
#[map]
static CONN_SEQUENCE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// How a syscall's buffer argument is shaped.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum BufferShape {
    /// `(buf, len)`.
    Plain = 0,
    /// `(struct iovec *, count)`.
    Iovec = 1,
    /// `struct msghdr *`.
    Msghdr = 2,
    /// No buffer: connect/accept remember the fd only; sendfile moves file
    /// bytes the process never sees.
    None = 3,
}

/// A data syscall's call: what a send's enter probe leaves for its exit
/// probe, or what a receive's exit probe read from the saved registers.
#[repr(C)]
#[derive(Clone, Copy)]
struct InflightCall {
    /// Buffer, iovec array or msghdr pointer.
    buffer: u64,
    /// When the syscall began: a send's bytes are on their way from then.
    enter_ns: u64,
    /// Number of iovecs for `Iovec`.
    iov_count: u64,
    fd: i32,
    syscall: u8,
    shape: u8,
    /// 1 from the enter probe until the exit probe takes the call.
    live: u8,
    _pad: u8,
}

// Syscall tracepoint layout: 8 bytes of common fields, the syscall number,
// then each argument in an 8-byte slot; on exit the return value.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;

const MSG_PEEK: u64 = 2;
const EINPROGRESS: i64 = 115;
const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: u16 = 1;
const IPPROTO_TCP: u16 = 6;

// struct msghdr (64-bit): msg_iov at 16, msg_iovlen at 24.
const MSGHDR_IOV: u64 = 16;
const MSGHDR_IOVLEN: u64 = 24;

// `struct pt_regs` (x86_64): where the kernel saved the user registers
// that carry a syscall's first four arguments (rdi, rsi, rdx, r10).
const REGS_ARG0: usize = 112;
const REGS_ARG1: usize = 104;
const REGS_ARG2: usize = 96;
const REGS_ARG3: usize = 56;

/// The first four arguments of the syscall the current thread is in, read
/// from the user registers the kernel saved at its entry, which it restores
/// unchanged at its exit. An exit probe reads them there instead of from
/// an enter probe's record: one program and two map lookups fewer per
/// syscall.
#[inline(always)]
fn syscall_args() -> [u64; 4] {
    // SAFETY: helper calls on the current task, which the kernel checks;
    // `bpf_task_pt_regs` returns a BTF pointer to its `struct pt_regs`, and
    // the verifier checks each load against that type (a fault reads 0).
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        let load = |offset: usize| core::ptr::read_volatile(regs.add(offset) as *const u64);
        [
            load(REGS_ARG0),
            load(REGS_ARG1),
            load(REGS_ARG2),
            load(REGS_ARG3),
        ]
    }
}

/// Reads the syscall tracepoint field at `offset` straight from the
/// record the kernel passes in: the verifier allows aligned loads from a
/// tracepoint's context, and `read_at` would go through
/// `bpf_probe_read_kernel`, a helper call with its own fault handling, on
/// every syscall.
#[inline(always)]
fn tp_field(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: `offset` is one of the 8-byte aligned slots above, inside the
    // syscall tracepoint record.
    unsafe { *((ctx.as_ptr() as *const u8).add(offset) as *const u64) }
}

#[inline(always)]
fn count(index: u32, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; programs on one CPU do not run concurrently.
        unsafe { *slot += n };
    }
}

#[inline(always)]
fn config() -> Option<&'static CaptureConfig> {
    CONFIG.get(0)
}

/// Reads a kernel value at `base + offset`.
#[inline(always)]
fn kread<T>(base: u64, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; failure is an Err.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

/// Follows the current task's fd table to the socket behind `fd`.
/// Returns None for anything that is not an IPv4/IPv6 TCP socket.
#[inline(always)]
fn resolve_tcp_socket(fd: i32, off: &KernelOffsets) -> Result<Option<ConnTuple>, ()> {
    if fd < 0 {
        return Ok(None);
    }
    // SAFETY: helper call with no arguments.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = kread(task, off.task_struct_files).ok_or(())?;
    let fdt: u64 = kread(files, off.files_struct_fdt).ok_or(())?;
    let max_fds: u32 = kread(fdt, off.fdtable_max_fds).ok_or(())?;
    if fd as u32 >= max_fds {
        return Ok(None);
    }
    let fd_array: u64 = kread(fdt, off.fdtable_fd).ok_or(())?;
    let file: u64 = kread(fd_array + fd as u64 * 8, 0).ok_or(())?;
    if file == 0 {
        return Ok(None);
    }
    let inode: u64 = kread(file, off.file_f_inode).ok_or(())?;
    let mode: u16 = kread(inode, off.inode_i_mode).ok_or(())?;
    if mode & S_IFMT != S_IFSOCK {
        return Ok(None);
    }
    let socket: u64 = kread(file, off.file_private_data).ok_or(())?;
    let sk: u64 = kread(socket, off.socket_sk).ok_or(())?;
    if sk == 0 {
        return Ok(None);
    }
    let family: u16 = kread(sk, off.sock_family).ok_or(())?;
    let sk_type: u16 = kread(sk, off.sock_type).ok_or(())?;
    let protocol: u16 = kread(sk, off.sock_protocol).ok_or(())?;
    if sk_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return Ok(None);
    }
    let mut tuple = ConnTuple {
        family,
        local_port: kread(sk, off.sock_num).ok_or(())?,
        remote_port: u16::from_be(kread(sk, off.sock_dport).ok_or(())?),
        ..ConnTuple::default()
    };
    if family == AF_INET {
        let local: [u8; 4] = kread(sk, off.sock_rcv_saddr).ok_or(())?;
        let remote: [u8; 4] = kread(sk, off.sock_daddr).ok_or(())?;
        tuple.local_addr[..4].copy_from_slice(&local);
        tuple.remote_addr[..4].copy_from_slice(&remote);
    } else if family == AF_INET6 {
        tuple.local_addr = kread(sk, off.sock_v6_rcv_saddr).ok_or(())?;
        tuple.remote_addr = kread(sk, off.sock_v6_daddr).ok_or(())?;
    } else {
        return Ok(None);
    }
    Ok(Some(tuple))
}

#[inline(always)]
fn next_conn_id() -> u64 {
    // SAFETY: helper call with no arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    let seq = match CONN_SEQUENCE.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        Some(slot) => unsafe {
            *slot += 1;
            *slot
        },
        None => 0,
    };
    (cpu << 48) | (seq & 0xffff_ffff_ffff)
}

/// Resolves `key.fd` and records the result in `CONNS` or `OTHER_FDS`.
/// Returns the connection when it is TCP.
#[inline(always)]
fn track_fd<C: EbpfContext>(
    ctx: &C,
    key: &ConnKey,
    cfg: &CaptureConfig,
    role: Role,
) -> Option<*mut ConnInfo> {
    let tuple = match resolve_tcp_socket(key.fd, &cfg.offsets) {
        Ok(Some(tuple)) => tuple,
        Ok(None) => {
            let _ = OTHER_FDS.insert(key, &0, 0);
            return None;
        }
        Err(()) => {
            count(counter::DROP_KERNEL_READ_FAILED, 1);
            return None;
        }
    };
    let info = ConnInfo {
        conn_id: next_conn_id(),
        tuple,
        kind: FdKind::Tcp as u8,
        protocol: Protocol::Unknown as u8,
        role: role as u8,
        failed_classifications: 0,
        _pad: [0; 4],
    };
    if CONNS.insert(key, &info, 0).is_err() {
        count(counter::DROP_CONN_TABLE_FULL, 1);
        warn!(
            ctx,
            "connection table insert failed for pid {} fd {}", key.pid, key.fd
        );
        return None;
    }
    CONNS.get_ptr_mut(key)
}

/// The TCP connection behind `key`, resolving it the first time it is seen.
#[inline(always)]
fn lookup_conn<C: EbpfContext>(
    ctx: &C,
    key: &ConnKey,
    cfg: &CaptureConfig,
) -> Option<*mut ConnInfo> {
    if let Some(conn) = CONNS.get_ptr_mut(key) {
        return Some(conn);
    }
    // SAFETY: the value is a plain u8 and only its presence matters.
    if unsafe { OTHER_FDS.get(key) }.is_some() {
        return None;
    }
    track_fd(ctx, key, cfg, Role::Unknown)
}

/// The pid of the caller, or None for the agent itself.
#[inline(always)]
fn traced_pid(cfg: &CaptureConfig) -> Option<(u64, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    if pid == cfg.agent_pid {
        return None;
    }
    Some((pid_tgid, pid))
}

/// A send's enter probe: remembers the call and when it began, for its exit
/// probe.
#[inline(always)]
fn on_send_enter(ctx: &TracePointContext, syscall: Syscall, shape: BufferShape) {
    let Some(cfg) = config() else { return };
    let Some((pid_tgid, pid)) = traced_pid(cfg) else {
        return;
    };
    let fd = tp_field(ctx, ARG0) as i64;
    let key = ConnKey { pid, fd: fd as i32 };
    let Some(conn) = lookup_conn(ctx, &key, cfg) else {
        return;
    };
    // SAFETY: map value pointer valid for this program run.
    if unsafe { (*conn).protocol } == Protocol::NotHttp as u8 {
        count(counter::MESSAGES_NOT_HTTP, 1);
        return;
    }
    let call = InflightCall {
        buffer: tp_field(ctx, ARG1),
        // SAFETY: helper call with no arguments.
        enter_ns: unsafe { bpf_ktime_get_ns() },
        iov_count: if shape == BufferShape::Iovec {
            tp_field(ctx, ARG2)
        } else {
            0
        },
        fd: fd as i32,
        syscall: syscall as u8,
        shape: shape as u8,
        live: 1,
        _pad: 0,
    };
    put_inflight(pid_tgid, &call);
}

/// Leaves `call` for this thread's exit probe, in its slot if it has one.
#[inline(always)]
fn put_inflight(pid_tgid: u64, call: &InflightCall) {
    if let Some(slot) = INFLIGHT.get_ptr_mut(&pid_tgid) {
        // SAFETY: map value pointer valid for this run; only this thread
        // uses its slot.
        unsafe { *slot = *call };
    } else if INFLIGHT.insert(&pid_tgid, call, 0).is_err() {
        count(counter::DROP_INFLIGHT_TABLE_FULL, 1);
    }
}

/// Takes what the enter probe left for this thread.
#[inline(always)]
fn take_inflight(pid_tgid: u64) -> Option<InflightCall> {
    let slot = INFLIGHT.get_ptr_mut(&pid_tgid)?;
    // SAFETY: map value pointer valid for this run; only this thread uses
    // its slot.
    unsafe {
        if (*slot).live == 0 {
            return None;
        }
        (*slot).live = 0;
        Some(*slot)
    }
}

/// Does this look like the first bytes of an HTTP/1.x request or response?
#[inline(always)]
fn starts_like_http(b: &[u8; 8]) -> bool {
    let word = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    const fn w(s: &[u8; 4]) -> u32 {
        u32::from_le_bytes(*s)
    }
    match word {
        x if x == w(b"HTTP") => b[4] == b'/' && b[5] == b'1' && b[6] == b'.',
        x if x == w(b"GET ") || x == w(b"PUT ") => true,
        x if x == w(b"POST") || x == w(b"HEAD") => b[4] == b' ',
        x if x == w(b"DELE") || x == w(b"OPTI") || x == w(b"PATC") => true,
        x if x == w(b"CONN") || x == w(b"TRAC") => true,
        _ => false,
    }
}

/// Starts of HTTP/1.x request and status lines, as little-endian words
/// of at most 8 bytes, and their lengths.
const HTTP_STARTS: [(u64, u32); 10] = [
    (u64::from_le_bytes(*b"GET \0\0\0\0"), 4),
    (u64::from_le_bytes(*b"PUT \0\0\0\0"), 4),
    (u64::from_le_bytes(*b"POST \0\0\0"), 5),
    (u64::from_le_bytes(*b"HEAD \0\0\0"), 5),
    (u64::from_le_bytes(*b"PATCH \0\0"), 6),
    (u64::from_le_bytes(*b"TRACE \0\0"), 6),
    (u64::from_le_bytes(*b"DELETE \0"), 7),
    (u64::from_le_bytes(*b"HTTP/1.\0"), 7),
    (u64::from_le_bytes(*b"OPTIONS "), 8),
    (u64::from_le_bytes(*b"CONNECT "), 8),
];

/// Fewest bytes of a short first message taken as the start of an HTTP
/// head: fewer could be anything.
const MIN_HTTP_PREFIX: u64 = 3;

/// Is this short first message (`n` < 8 bytes of `b`) the beginning of an
/// HTTP/1.x request or status line, from a peer that writes its head in
/// pieces (`GET `, then the target, then the rest)? Without this, such a
/// connection was never copied.
#[inline(always)]
fn starts_like_http_prefix(b: &[u8; 8], n: u64) -> bool {
    if !(MIN_HTTP_PREFIX..8).contains(&n) {
        return false;
    }
    let word = u64::from_le_bytes(*b);
    let mask_of = |bytes: u64| (1u64 << (8 * bytes)) - 1;
    let mut i = 0;
    while i < HTTP_STARTS.len() {
        let (start, len) = HTTP_STARTS[i];
        // Compare what both have: the message's bytes, at most the start's.
        let mask = if n < len as u64 {
            mask_of(n)
        } else {
            mask_of(len as u64)
        };
        if word & mask == start & mask {
            return true;
        }
        i += 1;
    }
    false
}

/// The first segment (pointer, length) of a message.
#[inline(always)]
fn first_segment(call: &InflightCall, shape: BufferShape) -> Option<(u64, u64)> {
    match shape {
        BufferShape::Plain => Some((call.buffer, u64::MAX)),
        _ => {
            let (iov, count) = iovec_array(call, shape)?;
            if count == 0 {
                return None;
            }
            // SAFETY: user pointer read through the checked helper.
            let [base, len]: [u64; 2] =
                unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }.ok()?;
            Some((base, len))
        }
    }
}

/// The iovec array and its length for iovec- and msghdr-shaped calls.
#[inline(always)]
fn iovec_array(call: &InflightCall, shape: BufferShape) -> Option<(u64, u64)> {
    if shape == BufferShape::Iovec {
        return Some((call.buffer, call.iov_count));
    }
    // SAFETY: user pointers read through the checked helper.
    let iov: u64 = unsafe { bpf_probe_read_user((call.buffer + MSGHDR_IOV) as *const u64) }.ok()?;
    let count: u64 =
        unsafe { bpf_probe_read_user((call.buffer + MSGHDR_IOVLEN) as *const u64) }.ok()?;
    Some((iov, count))
}

/// Decides, on a connection whose protocol is still unknown, whether this
/// message starts an HTTP/1.x exchange. Returns whether to copy it.
#[inline(always)]
fn classify(conn: *mut ConnInfo, call: &InflightCall, shape: BufferShape, moved: u64) -> bool {
    // SAFETY: map value pointer valid for this program run.
    let info = unsafe { &mut *conn };
    if info.protocol == Protocol::Http as u8 {
        return true;
    }
    let looks_http = moved >= MIN_HTTP_PREFIX
        && match first_segment(call, shape) {
            Some((ptr, len)) if len >= moved.min(8) => {
                // Eight bytes even of a shorter message: what follows it in
                // the caller's buffer is masked off (a read that faults at
                // the end of a mapping classifies nothing).
                // SAFETY: user pointer read through the checked helper.
                match unsafe { bpf_probe_read_user(ptr as *const [u8; 8]) } {
                    Ok(head) if moved >= 8 => starts_like_http(&head),
                    Ok(head) => starts_like_http_prefix(&head, moved),
                    Err(_) => false,
                }
            }
            _ => false,
        };
    if looks_http {
        info.protocol = Protocol::Http as u8;
        return true;
    }
    info.failed_classifications = info.failed_classifications.saturating_add(1);
    if info.failed_classifications >= CLASSIFY_ATTEMPTS {
        info.protocol = Protocol::NotHttp as u8;
    }
    count(counter::MESSAGES_NOT_HTTP, 1);
    false
}

/// Clamps a length to the copy limit in a way the verifier can follow.
#[inline(always)]
fn clamp_len(len: u64) -> u32 {
    if len > MAX_MESSAGE_BYTES as u64 {
        MAX_MESSAGE_BYTES
    } else {
        len as u32
    }
}

/// Returns `value` unchanged, but hides it from the optimiser, so that a
/// bounds check after it stays in the program: LLVM otherwise drops checks it
/// can prove redundant, and older verifiers (6.1) cannot re-derive the bound
/// from the earlier comparisons LLVM relied on.
#[inline(always)]
fn opaque(value: u64) -> u64 {
    // SAFETY: reads a local through a valid pointer.
    unsafe { core::ptr::read_volatile(&value) }
}

/// Copies `len` bytes at user address `src` to `at` in the scratch payload.
#[inline(always)]
fn copy_user(event: *mut DataEvent, at: u32, src: u64, len: u32) -> bool {
    // `at` below the limit and `len` at most the limit keep the copy inside
    // the payload, which is twice the limit long.
    let at = opaque(at as u64) & (MAX_MESSAGE_BYTES as u64 - 1);
    // The mask (a no-op: `len` is at most the limit) gives 6.1's verifier
    // a length it knows is not negative: it tracks the signed range apart,
    // and after the iovec copy's arithmetic the clamp alone left it
    // unbounded below ("R2 min value is negative").
    let mut len = opaque(len as u64) & (2 * MAX_MESSAGE_BYTES as u64 - 1);
    if len > MAX_MESSAGE_BYTES as u64 {
        len = MAX_MESSAGE_BYTES as u64;
    }
    // SAFETY: `event` is a scratch map value; the bounds are shown above.
    let rc = unsafe {
        let dst = (*event).data.as_mut_ptr().add(at as usize);
        raw_probe_read_user(dst.cast(), len as u32, src as *const _)
    };
    rc == 0
}

/// Copies the segment (`base`, `len`) of an iovec array to `copied` in the
/// scratch payload, at most up to `captured` bytes in all. Returns the new
/// total.
#[inline(always)]
fn copy_segment(
    event: *mut DataEvent,
    copied: u32,
    base: u64,
    len: u64,
    captured: u32,
) -> Option<u32> {
    let remaining = captured.saturating_sub(copied) as u64;
    let take = clamp_len(if len > remaining { remaining } else { len });
    if take > 0 && !copy_user(event, copied, base, take) {
        return None;
    }
    Some(copied + take)
}

/// Gathers up to `captured` bytes from an iovec array into the scratch
/// payload. Returns how many were copied.
#[inline(always)]
fn copy_iovecs(event: *mut DataEvent, iov: u64, iov_count: u64, captured: u32) -> Option<u32> {
    let mut copied = 0u32;
    let mut index = 0u64;
    for _ in 0..MAX_IOVECS / 2 {
        if copied >= captured || index >= iov_count {
            break;
        }
        // `struct iovec { base, len }`s are read two at a time while two
        // remain (a header and a body, as servers write a response): each
        // helper call costs more than the bytes it moves. One past the
        // array's end is never read, since it may be unmapped.
        if index + 1 < iov_count {
            // SAFETY: user pointers read through the checked helper.
            let [base0, len0, base1, len1]: [u64; 4] =
                unsafe { bpf_probe_read_user((iov + index * 16) as *const [u64; 4]) }.ok()?;
            copied = copy_segment(event, copied, base0, len0, captured)?;
            copied = copy_segment(event, copied, base1, len1, captured)?;
            index += 2;
        } else {
            // SAFETY: user pointers read through the checked helper.
            let [base, len]: [u64; 2] =
                unsafe { bpf_probe_read_user((iov + index * 16) as *const [u64; 2]) }.ok()?;
            copied = copy_segment(event, copied, base, len, captured)?;
            index += 1;
        }
    }
    if copied < captured {
        count(counter::DROP_IOVEC_OVERFLOW, 1);
    }
    Some(copied)
}

/// `bpf_ringbuf_output` flags for a record of `len` bytes: wake user space
/// once per `wakeup_bytes` written into the ring (when the data waiting
/// crosses a multiple of it), or for a record the proxy waits on. A wake-up
/// is an interrupt on this CPU (in a VM, an exit to the hypervisor each):
/// one per record, or one per record while the ring holds more than the
/// threshold, costs more than the rest of the probe. User space drains the
/// rest on a short timer, so a wake-up lost to a race with another CPU only
/// delays records by that timer.
#[inline(always)]
fn wakeup_flags(urgent: bool, len: u64) -> u64 {
    const NO_WAKEUP: u64 = 1; // BPF_RB_NO_WAKEUP
    const FORCE_WAKEUP: u64 = 2; // BPF_RB_FORCE_WAKEUP
    const AVAIL_DATA: u64 = 0; // BPF_RB_AVAIL_DATA
    if urgent {
        return FORCE_WAKEUP;
    }
    let threshold = config().map_or(0, |c| c.wakeup_bytes) as u64;
    if threshold == 0 {
        return FORCE_WAKEUP;
    }
    let waiting = EVENTS.query(AVAIL_DATA);
    if waiting / threshold != (waiting + len) / threshold {
        FORCE_WAKEUP
    } else {
        NO_WAKEUP
    }
}

/// Whether a record wakes the reader at once: a new connection (user space
/// reads the process's name then, before a short-lived client such as curl
/// is gone), or a client's request to a port in `WAKE_PORTS`.
#[inline(always)]
fn wakes_at_once(header: &EventHeader) -> bool {
    if header.kind == EventKind::Open as u8 {
        return true;
    }
    if header.direction != Direction::Egress as u8 || header.role != Role::Client as u8 {
        return false;
    }
    let port = header.tuple.remote_port as u32;
    WAKE_PORTS
        .get(port / 64)
        .is_some_and(|word| word & (1u64 << (port % 64)) != 0)
}

/// Sends the header and the first `payload_len` payload bytes of the
/// scratch record.
#[inline(always)]
fn send_record(event: *mut DataEvent, payload_len: u32) {
    let payload_len = clamp_len(opaque(payload_len as u64));
    // SAFETY: the scratch value is EVENT_HEADER_SIZE + 2 * limit bytes long.
    let record = unsafe {
        core::slice::from_raw_parts(event as *const u8, EVENT_HEADER_SIZE + payload_len as usize)
    };
    // SAFETY: the header is at the start of the scratch value.
    let urgent = wakes_at_once(unsafe { &(*event).header });
    if EVENTS
        .output(record, wakeup_flags(urgent, record.len() as u64))
        .is_err()
    {
        count(counter::DROP_RINGBUF_FULL, 1);
    } else {
        count(counter::RECORDS_SENT, 1);
    }
}

/// This CPU's scratch record.
#[inline(always)]
fn scratch() -> Option<*mut DataEvent> {
    // SAFETY: helper call with no arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    SCRATCH.get_ptr_mut(cpu)
}

/// Reads a user-space value at `address`.
#[inline(always)]
fn uread<T>(address: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user checks the address; failure is an Err.
    unsafe { bpf_probe_read_user(address as *const T).ok() }
}

/// The thread state of the calling thread in a watched interpreter.
#[inline(always)]
fn python_thread_state(pid_tgid: u64, process: &PythonProcess) -> Option<u64> {
    let tid = pid_tgid as u32 as u64;
    // SAFETY: the value is a plain u64, copied out.
    if let Some(&cached) = unsafe { PYTHON_THREADS.get(&pid_tgid) } {
        // A thread state is freed when its thread ends and may be reused
        // by another thread: trust the cache only while it names us.
        if uread::<u64>(cached + process.thread_native_id as u64) == Some(tid) {
            return Some(cached);
        }
    }
    let interpreter: u64 = uread(process.interpreters_head)?;
    let mut state: u64 = uread(interpreter + process.interpreter_threads_head as u64)?;
    for _ in 0..MAX_PYTHON_THREADS {
        if state == 0 {
            return None;
        }
        if uread::<u64>(state + process.thread_native_id as u64) == Some(tid) {
            let _ = PYTHON_THREADS.insert(&pid_tgid, &state, 0);
            return Some(state);
        }
        state = uread(state + process.thread_next as u64)?;
    }
    None
}

/// The context current on the calling thread, when its process is a
/// watched Python interpreter; 0 otherwise or when it cannot be read.
#[inline(always)]
fn python_context(pid_tgid: u64) -> u64 {
    let pid = (pid_tgid >> 32) as u32;
    // SAFETY: the value is plain data, copied out.
    let Some(process) = (unsafe { PYTHON_PROCESSES.get(&pid) }).copied() else {
        return 0;
    };
    let context = python_thread_state(pid_tgid, &process)
        .and_then(|state| uread::<u64>(state + process.thread_context as u64));
    match context {
        Some(context) => context,
        None => {
            count(counter::PYTHON_CONTEXT_UNREAD, 1);
            0
        }
    }
}

/// Sends a context record (no connection, no payload) of a watched Python
/// process.
#[inline(always)]
fn send_python_record(kind: EventKind, context: u64, copy: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let header = EventHeader {
        // SAFETY: helper call with no arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        conn_id: 0,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd: -1,
        message_len: 0,
        captured_len: 0,
        kind: kind as u8,
        direction: Direction::Egress as u8,
        role: Role::Unknown as u8,
        syscall: Syscall::None as u8,
        flags: 0,
        _pad: [0; 3],
        tuple: ConnTuple::default(),
        python_context: context,
        python_context_copy: copy,
    };
    if EVENTS
        .output(&header, wakeup_flags(false, EVENT_HEADER_SIZE as u64))
        .is_err()
    {
        count(counter::DROP_RINGBUF_FULL, 1);
    } else {
        count(counter::RECORDS_SENT, 1);
    }
}

/// `PyContext_CopyCurrent` returned: the new context and, still current,
/// the one it copies.
#[uretprobe]
pub fn python_context_copy(ctx: RetProbeContext) -> u32 {
    let copy: u64 = ctx.ret();
    if copy == 0 {
        return 0; // failed (out of memory): nothing was created
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: presence check only.
    if unsafe { PYTHON_PROCESSES.get(&((pid_tgid >> 32) as u32)) }.is_none() {
        return 0;
    }
    send_python_record(EventKind::PythonContextCopy, python_context(pid_tgid), copy);
    0
}

/// `PyContext_Enter(context)` is called.
#[uprobe]
pub fn python_context_enter(ctx: ProbeContext) -> u32 {
    let Some(context) = ctx.arg::<u64>(0) else {
        return 0;
    };
    // SAFETY: presence check only.
    if unsafe { PYTHON_PROCESSES.get(&((bpf_get_current_pid_tgid() >> 32) as u32)) }.is_none() {
        return 0;
    }
    send_python_record(EventKind::PythonContextEnter, context, 0);
    0
}

/// Copies a connection's tuple word by word. A plain assignment becomes a
/// call to the eBPF `memmove`, a loop of 40 byte copies on every record; the
/// volatile accesses keep LLVM from turning the words back into that call.
#[inline(always)]
fn copy_tuple(dst: &mut ConnTuple, src: &ConnTuple) {
    const WORDS: usize = core::mem::size_of::<ConnTuple>() / 4;
    let dst = dst as *mut ConnTuple as *mut u32;
    let src = src as *const ConnTuple as *const u32;
    for word in 0..WORDS {
        // SAFETY: `ConnTuple` is 4-aligned and WORDS words long.
        unsafe {
            core::ptr::write_volatile(dst.add(word), core::ptr::read_volatile(src.add(word)))
        };
    }
}

/// Fills the common header fields of a record.
#[inline(always)]
fn fill_header(
    header: &mut EventHeader,
    kind: EventKind,
    key: &ConnKey,
    conn: &ConnInfo,
    direction: Direction,
    syscall: u8,
) {
    // SAFETY: helper calls with no arguments.
    header.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    header.conn_id = conn.conn_id;
    header.pid = key.pid;
    header.tid = bpf_get_current_pid_tgid() as u32;
    header.fd = key.fd;
    header.kind = kind as u8;
    header.direction = direction as u8;
    header.role = conn.role;
    header.syscall = syscall;
    header.flags = 0;
    header._pad = [0; 3];
    copy_tuple(&mut header.tuple, &conn.tuple);
    header.message_len = 0;
    header.captured_len = 0;
    // Volatile for the reason of `copy_tuple` (here a call to `memset`).
    // SAFETY: plain stores through valid references.
    unsafe {
        core::ptr::write_volatile(&mut header.python_context, 0);
        core::ptr::write_volatile(&mut header.python_context_copy, 0);
    }
}

/// A send's exit probe: copies what the call its enter probe remembered
/// really sent.
#[inline(always)]
fn on_send_exit(ctx: &TracePointContext, shape: BufferShape) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = take_inflight(pid_tgid) else {
        return;
    };
    let ret = tp_field(ctx, RET) as i64;
    if ret <= 0 {
        return;
    }
    let Some(cfg) = config() else { return };
    let key = ConnKey {
        pid: (pid_tgid >> 32) as u32,
        fd: call.fd,
    };
    let Some(conn) = CONNS.get_ptr_mut(&key) else {
        return;
    };
    send_data(
        cfg,
        pid_tgid,
        &key,
        conn,
        &call,
        ret as u64,
        Direction::Egress,
        shape,
    );
}

/// A receive's only probe, at exit: its arguments are read from the saved
/// user registers (see `syscall_args`). `peek_arg` is the index of the
/// flags argument, for the calls that have one.
#[inline(always)]
fn on_receive_exit(
    ctx: &TracePointContext,
    syscall: Syscall,
    shape: BufferShape,
    peek_arg: Option<usize>,
) {
    let ret = tp_field(ctx, RET) as i64;
    if ret <= 0 {
        return;
    }
    let Some(cfg) = config() else { return };
    let Some((pid_tgid, pid)) = traced_pid(cfg) else {
        return;
    };
    let args = syscall_args();
    let key = ConnKey {
        pid,
        fd: args[0] as i32,
    };
    let Some(conn) = lookup_conn(ctx, &key, cfg) else {
        return;
    };
    // SAFETY: map value pointer valid for this program run.
    if unsafe { (*conn).protocol } == Protocol::NotHttp as u8 {
        count(counter::MESSAGES_NOT_HTTP, 1);
        return;
    }
    // A peek is read again later; copying it would duplicate bytes.
    if let Some(flags) = peek_arg
        && args[flags] & MSG_PEEK != 0
    {
        return;
    }
    let call = InflightCall {
        buffer: args[1],
        enter_ns: 0,
        iov_count: if shape == BufferShape::Iovec {
            args[2]
        } else {
            0
        },
        fd: key.fd,
        syscall: syscall as u8,
        shape: shape as u8,
        live: 0,
        _pad: 0,
    };
    send_data(
        cfg,
        pid_tgid,
        &key,
        conn,
        &call,
        ret as u64,
        Direction::Ingress,
        shape,
    );
}

/// Copies the bytes a data syscall moved (`moved`, its return value) on a
/// tracked connection into a record, once the connection is known to carry
/// HTTP.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn send_data(
    cfg: &CaptureConfig,
    pid_tgid: u64,
    key: &ConnKey,
    conn: *mut ConnInfo,
    call: &InflightCall,
    moved: u64,
    direction: Direction,
    shape: BufferShape,
) {
    if shape == BufferShape::None {
        // Counted bytes only make sense on a connection already seen as HTTP.
        // SAFETY: map value pointer valid for this program run.
        if unsafe { (*conn).protocol } != Protocol::Http as u8 {
            return;
        }
    } else if !classify(conn, call, shape, moved) {
        return;
    }
    let Some(event) = scratch() else { return };

    let mut limit = cfg.max_message_bytes;
    if limit > MAX_MESSAGE_BYTES {
        limit = MAX_MESSAGE_BYTES;
    }
    let message_len = if moved > u32::MAX as u64 {
        u32::MAX
    } else {
        moved as u32
    };
    let captured = if shape == BufferShape::None {
        0
    } else if message_len > limit {
        limit
    } else {
        message_len
    };
    // SAFETY: scratch value and map value pointers valid for this run.
    unsafe {
        let header = &mut (*event).header;
        fill_header(
            header,
            EventKind::Data,
            key,
            &*conn,
            direction,
            call.syscall,
        );
        header.message_len = message_len;
        header.captured_len = captured;
        header.python_context = python_context(pid_tgid);
        // Sends are stamped when they began and receives when they ended, so
        // that a client's span always encloses its server's, even when the
        // server's read returns before the client's write does.
        if direction == Direction::Egress {
            header.timestamp_ns = call.enter_ns;
        }
        if shape == BufferShape::None {
            header.flags = FLAG_NO_PAYLOAD;
        } else if captured < message_len {
            header.flags = FLAG_TRUNCATED;
            count(counter::DROP_TRUNCATED_MESSAGES, 1);
        }
    }

    let copied = match shape {
        BufferShape::None => Some(0),
        BufferShape::Plain => copy_user(event, 0, call.buffer, captured).then_some(captured),
        _ => match iovec_array(call, shape) {
            Some((iov, iov_count)) => copy_iovecs(event, iov, iov_count, captured),
            None => None,
        },
    };
    let Some(copied) = copied else {
        count(counter::DROP_READ_USER_FAILED, 1);
        return;
    };
    // SAFETY: scratch value pointer valid for this run.
    unsafe { (*event).header.captured_len = copied };
    send_record(event, copied);
}

/// Sends an open or close record for a tracked connection, with the Python
/// context current on the thread (0 when not watched). An open record's
/// payload is the process's name (`comm`, 16 bytes): it names a process
/// that exits before user space reads it.
#[inline(always)]
fn send_lifecycle(kind: EventKind, key: &ConnKey, conn: &ConnInfo, python_context: u64) {
    let Some(event) = scratch() else { return };
    let name = if kind == EventKind::Open {
        bpf_get_current_comm().ok()
    } else {
        None
    };
    // SAFETY: scratch value pointer valid for this run; the payload holds
    // far more than 16 bytes.
    unsafe {
        fill_header(
            &mut (*event).header,
            kind,
            key,
            conn,
            Direction::Egress,
            Syscall::None as u8,
        );
        (*event).header.python_context = python_context;
        if let Some(name) = name {
            (*event).data.as_mut_ptr().cast::<[u8; 16]>().write(name);
            (*event).header.captured_len = 16;
        }
    };
    send_record(event, if name.is_some() { 16 } else { 0 });
}

/// connect() and accept() remember the fd at enter (accept: none needed) and
/// resolve the connection at exit, when its addresses are set.
#[inline(always)]
fn on_connect_enter(ctx: &TracePointContext) {
    let Some(cfg) = config() else { return };
    let Some((pid_tgid, _)) = traced_pid(cfg) else {
        return;
    };
    let fd = tp_field(ctx, ARG0) as i64;
    let call = InflightCall {
        buffer: 0,
        enter_ns: 0,
        iov_count: 0,
        fd: fd as i32,
        syscall: Syscall::None as u8,
        shape: BufferShape::None as u8,
        live: 1,
        _pad: 0,
    };
    put_inflight(pid_tgid, &call);
}

#[inline(always)]
fn on_connection_established(ctx: &TracePointContext, fd: i32, role: Role) {
    let Some(cfg) = config() else { return };
    let Some((_, pid)) = traced_pid(cfg) else {
        return;
    };
    let key = ConnKey { pid, fd };
    let _ = OTHER_FDS.remove(&key);
    if let Some(conn) = track_fd(ctx, &key, cfg, role) {
        // SAFETY: map value pointer valid for this run.
        send_lifecycle(
            EventKind::Open,
            &key,
            unsafe { &*conn },
            python_context(bpf_get_current_pid_tgid()),
        );
    }
}

#[inline(always)]
fn on_connect_exit(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = take_inflight(pid_tgid) else {
        return;
    };
    let ret = tp_field(ctx, RET) as i64;
    if ret == 0 || ret == -EINPROGRESS {
        on_connection_established(ctx, call.fd, Role::Client);
    }
}

#[inline(always)]
fn on_accept_exit(ctx: &TracePointContext) {
    let ret = tp_field(ctx, RET) as i64;
    if ret >= 0 {
        on_connection_established(ctx, ret as i32, Role::Server);
    }
}

#[inline(always)]
fn on_close_enter(ctx: &TracePointContext) {
    let Some(cfg) = config() else { return };
    let Some((_, pid)) = traced_pid(cfg) else {
        return;
    };
    let fd = tp_field(ctx, ARG0) as i64;
    let key = ConnKey { pid, fd: fd as i32 };
    if let Some(conn) = CONNS.get_ptr(&key) {
        // SAFETY: map value pointer valid for this run.
        let info = unsafe { *conn };
        if info.protocol != Protocol::NotHttp as u8 {
            send_lifecycle(EventKind::Close, &key, &info, 0);
        }
        let _ = CONNS.remove(&key);
    } else {
        // Most closes on a node are of files the probes never saw: a lookup
        // is lock-free, a delete takes the bucket's lock even when the key
        // is absent.
        // SAFETY: the value is a plain u8 and only its presence matters.
        if unsafe { OTHER_FDS.get(&key) }.is_some() {
            let _ = OTHER_FDS.remove(&key);
        }
    }
}

macro_rules! send_probes {
    ($enter:ident, $exit:ident, $syscall:expr, $shape:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            on_send_enter(&ctx, $syscall, $shape);
            0
        }

        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            on_send_exit(&ctx, $shape);
            0
        }
    };
}

macro_rules! receive_probe {
    ($exit:ident, $syscall:expr, $shape:expr, $peek_arg:expr) => {
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            on_receive_exit(&ctx, $syscall, $shape, $peek_arg);
            0
        }
    };
}

send_probes!(
    sys_enter_write,
    sys_exit_write,
    Syscall::Write,
    BufferShape::Plain
);
send_probes!(
    sys_enter_writev,
    sys_exit_writev,
    Syscall::Writev,
    BufferShape::Iovec
);
send_probes!(
    sys_enter_sendto,
    sys_exit_sendto,
    Syscall::Sendto,
    BufferShape::Plain
);
send_probes!(
    sys_enter_sendmsg,
    sys_exit_sendmsg,
    Syscall::Sendmsg,
    BufferShape::Msghdr
);
send_probes!(
    sys_enter_sendfile64,
    sys_exit_sendfile64,
    Syscall::Sendfile,
    BufferShape::None
);
receive_probe!(sys_exit_read, Syscall::Read, BufferShape::Plain, None);
receive_probe!(sys_exit_readv, Syscall::Readv, BufferShape::Iovec, None);
// recvfrom(fd, buf, len, flags, ...), recvmsg(fd, msg, flags).
receive_probe!(
    sys_exit_recvfrom,
    Syscall::Recvfrom,
    BufferShape::Plain,
    Some(3)
);
receive_probe!(
    sys_exit_recvmsg,
    Syscall::Recvmsg,
    BufferShape::Msghdr,
    Some(2)
);

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    on_connect_enter(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    on_connect_exit(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    on_accept_exit(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    on_accept_exit(&ctx);
    0
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    on_close_enter(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
