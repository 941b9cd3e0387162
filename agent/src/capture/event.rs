//! Decoding ring-buffer records into [`CaptureEvent`]s. Plain data in, plain
//! data out: no kernel needed to test.
//!
//! An event borrows its bytes from the record it was decoded from: the
//! reader hands each one over while the ring still holds the record, so
//! bytes nobody reads (most of a response body, skipped by its length) are
//! never copied or even touched (docs/benchmarks.md).

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agent_common::{AF_INET, AF_INET6, ConnTuple, EVENT_HEADER_SIZE, EventHeader, FLAG_TRUNCATED};

pub use agent_common::{Direction, Role, Syscall};

/// Identifies one TCP connection for the life of the loaded probes (the
/// kernel gives a new one when a file descriptor number is reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// A TCP connection as one traced process sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// See [`ConnectionId`].
    pub id: ConnectionId,
    /// Process id (thread group id) owning the file descriptor.
    pub pid: u32,
    /// The file descriptor.
    pub fd: i32,
    /// Who opened it, when the kernel saw that happen.
    pub role: Role,
    /// This process's end.
    pub local: SocketAddr,
    /// The peer's end.
    pub remote: SocketAddr,
}

/// The bytes one send or receive syscall moved on a connection, borrowed
/// from its record (`'a`) or owned (`'static`, see
/// [`CaptureEvent::into_owned`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// The connection.
    pub connection: Connection,
    /// Thread that made the syscall.
    pub tid: u32,
    /// Sent or received.
    pub direction: Direction,
    /// Which syscall.
    pub syscall: Syscall,
    /// Kernel monotonic clock when the bytes were seen: a send's start, a
    /// receive's return.
    pub timestamp_ns: u64,
    /// Bytes the syscall moved.
    pub len: u32,
    /// The first bytes of the message, as copied. Shorter than `len` when the
    /// message exceeded the copy limit (`truncated`), came from sendfile (no
    /// bytes at all), or was spread over more iovecs than are copied.
    pub bytes: Cow<'a, [u8]>,
    /// The kernel stopped copying at its limit.
    pub truncated: bool,
    /// In a watched Python interpreter, the context current on the thread
    /// (see [`PythonContextEvent`]); 0 otherwise.
    pub python_context: u64,
}

/// What a watched Python interpreter did with its contexts (`contextvars`;
/// every asyncio task runs in one). Contexts are named by address, which a
/// context created later may reuse: a copy always names a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PythonContextEvent {
    /// `parent`, current on the thread, was copied into the new `copy`.
    Copied {
        /// The context current when the copy was made (0: unreadable).
        parent: u64,
        /// The new context.
        copy: u64,
    },
    /// The thread entered `context` (uvloop does, around each callback).
    Entered {
        /// The context entered.
        context: u64,
    },
}

/// A process's name as the kernel keeps it (`comm`, at most 15 bytes),
/// taken when the process opened a connection: it names a process that
/// exits before the agent reads /proc (a short-lived client such as curl).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessName([u8; 16]);

impl ProcessName {
    /// From the kernel's bytes (NUL-padded; longer input is cut).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut name = [0u8; 16];
        let len = bytes.len().min(15);
        name[..len].copy_from_slice(&bytes[..len]);
        Self(name)
    }

    /// The name, if there is one and it is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        let len = self.0.iter().position(|b| *b == 0).unwrap_or(16);
        std::str::from_utf8(&self.0[..len])
            .ok()
            .filter(|name| !name.is_empty())
    }
}

/// What the capture reports. A message's bytes are borrowed from the
/// record for `'a`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaptureEvent<'a> {
    /// connect() or accept() produced a TCP connection.
    Opened {
        /// The connection.
        connection: Connection,
        /// The thread that connected or accepted.
        tid: u32,
        /// In a watched Python interpreter, the context current on the
        /// thread that connected or accepted; 0 otherwise.
        python_context: u64,
        /// The process's name when it connected or accepted.
        process_name: ProcessName,
    },
    /// Bytes moved.
    Data(Message<'a>),
    /// The process closed a connection that carried HTTP (or was not yet
    /// classified).
    Closed(Connection),
    /// A watched Python interpreter copied or entered a context.
    PythonContext {
        /// Process id.
        pid: u32,
        /// Thread id.
        tid: u32,
        /// Kernel monotonic time.
        timestamp_ns: u64,
        /// What happened.
        event: PythonContextEvent,
    },
}

impl CaptureEvent<'_> {
    /// The event with its bytes copied out of the record, to keep after
    /// the record is gone (tests keep what they captured).
    pub fn into_owned(self) -> CaptureEvent<'static> {
        match self {
            Self::Data(m) => CaptureEvent::Data(Message {
                bytes: Cow::Owned(m.bytes.into_owned()),
                ..m
            }),
            Self::Opened {
                connection,
                tid,
                python_context,
                process_name,
            } => CaptureEvent::Opened {
                connection,
                tid,
                python_context,
                process_name,
            },
            Self::Closed(c) => CaptureEvent::Closed(c),
            Self::PythonContext {
                pid,
                tid,
                timestamp_ns,
                event,
            } => CaptureEvent::PythonContext {
                pid,
                tid,
                timestamp_ns,
                event,
            },
        }
    }

    /// The connection the event is about, if it is about one.
    pub fn connection(&self) -> Option<&Connection> {
        match self {
            Self::Opened { connection: c, .. } | Self::Closed(c) => Some(c),
            Self::Data(m) => Some(&m.connection),
            Self::PythonContext { .. } => None,
        }
    }

    /// The process the event comes from.
    pub fn pid(&self) -> u32 {
        match self {
            Self::Opened { connection: c, .. } | Self::Closed(c) => c.pid,
            Self::Data(m) => m.connection.pid,
            Self::PythonContext { pid, .. } => *pid,
        }
    }
}

/// Why a record could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than its header says.
    #[error("record of {len} bytes is shorter than its header says")]
    Short {
        /// The record's length.
        len: usize,
    },
    /// An unknown kind, direction or family.
    #[error("record has an invalid {0}")]
    Invalid(&'static str),
}

/// Lays out a record the way the kernel does (header, then the first
/// `header.captured_len` bytes of `payload`), appending it to `out`. For
/// tests and benchmarks that replay traffic without a kernel.
pub fn encode_record(header: &EventHeader, payload: &[u8], out: &mut Vec<u8>) {
    // SAFETY: EventHeader is repr(C) plain data; viewing it as bytes is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (header as *const EventHeader).cast::<u8>(),
            EVENT_HEADER_SIZE,
        )
    };
    out.extend_from_slice(bytes);
    out.extend_from_slice(&payload[..header.captured_len as usize]);
}

/// Decodes one ring-buffer record; a message's bytes are borrowed from it.
pub fn decode_record(record: &[u8]) -> Result<CaptureEvent<'_>, DecodeError> {
    if record.len() < EVENT_HEADER_SIZE {
        return Err(DecodeError::Short { len: record.len() });
    }
    // SAFETY: EventHeader is repr(C) plain data of EVENT_HEADER_SIZE
    // bytes, and read_unaligned accepts any alignment.
    let header = unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<EventHeader>()) };
    let end = EVENT_HEADER_SIZE + header.captured_len as usize;
    let payload = record
        .get(EVENT_HEADER_SIZE..end)
        .ok_or(DecodeError::Short { len: record.len() })?;
    let python = |event| {
        Ok(CaptureEvent::PythonContext {
            pid: header.pid,
            tid: header.tid,
            timestamp_ns: header.timestamp_ns,
            event,
        })
    };
    match header.kind {
        4 => {
            return python(PythonContextEvent::Copied {
                parent: header.python_context,
                copy: header.python_context_copy,
            });
        }
        5 => {
            return python(PythonContextEvent::Entered {
                context: header.python_context,
            });
        }
        _ => {}
    }
    let connection = connection(&header)?;
    match header.kind {
        1 => {}
        2 => {
            return Ok(CaptureEvent::Opened {
                connection,
                tid: header.tid,
                python_context: header.python_context,
                process_name: ProcessName::from_bytes(payload),
            });
        }
        3 => return Ok(CaptureEvent::Closed(connection)),
        _ => return Err(DecodeError::Invalid("kind")),
    }
    let direction = match header.direction {
        0 => Direction::Egress,
        1 => Direction::Ingress,
        _ => return Err(DecodeError::Invalid("direction")),
    };
    Ok(CaptureEvent::Data(Message {
        connection,
        tid: header.tid,
        direction,
        syscall: syscall(header.syscall),
        timestamp_ns: header.timestamp_ns,
        len: header.message_len,
        bytes: Cow::Borrowed(payload),
        truncated: header.flags & FLAG_TRUNCATED != 0,
        python_context: header.python_context,
    }))
}

fn socket_addr(family: u16, addr: &[u8; 16], port: u16) -> Result<SocketAddr, DecodeError> {
    let ip = match family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        // IPv4-mapped addresses of dual-stack sockets read as plain IPv4.
        AF_INET6 => Ipv6Addr::from(*addr).to_canonical(),
        _ => return Err(DecodeError::Invalid("address family")),
    };
    Ok(SocketAddr::new(ip, port))
}

fn connection(header: &EventHeader) -> Result<Connection, DecodeError> {
    let ConnTuple {
        family,
        local_port,
        remote_port,
        local_addr,
        remote_addr,
        ..
    } = header.tuple;
    Ok(Connection {
        id: ConnectionId(header.conn_id),
        pid: header.pid,
        fd: header.fd,
        role: match header.role {
            1 => Role::Client,
            2 => Role::Server,
            _ => Role::Unknown,
        },
        local: socket_addr(family, &local_addr, local_port)?,
        remote: socket_addr(family, &remote_addr, remote_port)?,
    })
}

fn syscall(value: u8) -> Syscall {
    match value {
        1 => Syscall::Read,
        2 => Syscall::Write,
        3 => Syscall::Readv,
        4 => Syscall::Writev,
        5 => Syscall::Recvfrom,
        6 => Syscall::Sendto,
        7 => Syscall::Recvmsg,
        8 => Syscall::Sendmsg,
        9 => Syscall::Sendfile,
        _ => Syscall::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::EventKind;

    /// Builds a record the way the kernel lays it out.
    fn record(kind: EventKind, message: &[u8], captured: usize) -> Vec<u8> {
        let mut tuple = ConnTuple {
            family: AF_INET,
            local_port: 8080,
            remote_port: 40000,
            ..ConnTuple::default()
        };
        tuple.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        tuple.remote_addr[..4].copy_from_slice(&[127, 0, 0, 2]);
        let header = EventHeader {
            timestamp_ns: 42,
            conn_id: 5,
            pid: 7,
            tid: 9,
            fd: 3,
            message_len: message.len() as u32,
            captured_len: captured as u32,
            kind: kind as u8,
            direction: Direction::Ingress as u8,
            role: Role::Server as u8,
            syscall: Syscall::Read as u8,
            flags: if captured < message.len() {
                FLAG_TRUNCATED
            } else {
                0
            },
            _pad: [0; 3],
            tuple,
            python_context: 0x7f00_0000_1000,
            python_context_copy: 0,
        };
        let mut out = Vec::new();
        encode_record(&header, message, &mut out);
        out
    }

    fn data(event: CaptureEvent<'_>) -> Message<'_> {
        match event {
            CaptureEvent::Data(m) => m,
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[test]
    fn data_record_decodes_addresses_ids_and_bytes() {
        let msg = b"GET / HTTP/1.1\r\n\r\n";
        let record = record(EventKind::Data, msg, msg.len());
        let m = data(decode_record(&record).unwrap());
        assert_eq!(&m.bytes[..], msg);
        assert!(!m.truncated);
        assert_eq!(m.connection.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(m.connection.remote, "127.0.0.2:40000".parse().unwrap());
        assert_eq!((m.connection.pid, m.tid, m.connection.fd), (7, 9, 3));
        assert_eq!(m.connection.id, ConnectionId(5));
        assert_eq!(m.direction, Direction::Ingress);
        assert_eq!(m.connection.role, Role::Server);
        assert_eq!(m.syscall, Syscall::Read);
        assert_eq!(m.python_context, 0x7f00_0000_1000);
    }

    #[test]
    fn a_message_borrows_its_bytes_from_the_record_until_made_owned() {
        let record = record(EventKind::Data, b"GET / HTTP/1.1\r\n\r\n", 18);
        let event = decode_record(&record).unwrap();
        let CaptureEvent::Data(m) = &event else {
            panic!("{event:?}")
        };
        // No copy: the bytes are the record's own, after its header.
        assert!(matches!(m.bytes, Cow::Borrowed(_)));
        assert_eq!(m.bytes.as_ptr(), record[EVENT_HEADER_SIZE..].as_ptr());
        let owned = event.clone().into_owned();
        drop(record);
        let CaptureEvent::Data(kept) = &owned else {
            panic!("{owned:?}")
        };
        assert!(matches!(kept.bytes, Cow::Owned(_)));
        assert_eq!(&kept.bytes[..], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(kept.connection.id, ConnectionId(5));
    }

    #[test]
    fn python_context_records_decode_without_a_connection() {
        let mut copy = record(EventKind::PythonContextCopy, b"", 0);
        let at = std::mem::offset_of!(EventHeader, python_context_copy);
        copy[at..at + 8].copy_from_slice(&0x7f00_0000_2000u64.to_ne_bytes());
        // No address family: a context record names no connection.
        copy[std::mem::offset_of!(EventHeader, tuple)] = 0;
        let event = decode_record(&copy).unwrap();
        assert_eq!(
            event,
            CaptureEvent::PythonContext {
                pid: 7,
                tid: 9,
                timestamp_ns: 42,
                event: PythonContextEvent::Copied {
                    parent: 0x7f00_0000_1000,
                    copy: 0x7f00_0000_2000
                }
            }
        );
        assert_eq!(event.connection(), None);
        assert_eq!(event.pid(), 7);
        let enter = record(EventKind::PythonContextEnter, b"", 0);
        let enter = decode_record(&enter).unwrap();
        assert!(matches!(
            enter,
            CaptureEvent::PythonContext {
                event: PythonContextEvent::Entered {
                    context: 0x7f00_0000_1000
                },
                ..
            }
        ));
    }

    #[test]
    fn truncated_record_keeps_full_length_and_copied_prefix() {
        let big = vec![b'x'; 20_000];
        let record = record(EventKind::Data, &big, 16_384);
        let m = data(decode_record(&record).unwrap());
        assert_eq!(m.len, 20_000);
        assert_eq!(m.bytes.len(), 16_384);
        assert!(m.truncated);
    }

    #[test]
    fn open_records_carry_the_process_name() {
        let open = record(EventKind::Open, b"curl\0\0\0\0\0\0\0\0\0\0\0\0", 16);
        let opened = decode_record(&open).unwrap();
        let CaptureEvent::Opened { process_name, .. } = opened else {
            panic!("{opened:?}")
        };
        assert_eq!(process_name.as_str(), Some("curl"));
        assert_eq!(ProcessName::default().as_str(), None);
        assert_eq!(
            ProcessName::from_bytes(b"a-very-long-process-name").as_str(),
            Some("a-very-long-pro")
        );
    }

    #[test]
    fn open_and_close_records_carry_the_connection() {
        let open = record(EventKind::Open, b"", 0);
        let opened = decode_record(&open).unwrap();
        assert!(matches!(
            opened,
            CaptureEvent::Opened { connection: c, tid: 9, python_context: 0x7f00_0000_1000, .. }
                if c.id == ConnectionId(5)
        ));
        let close = record(EventKind::Close, b"", 0);
        let closed = decode_record(&close).unwrap();
        assert_eq!(
            closed.connection().unwrap().remote,
            "127.0.0.2:40000".parse().unwrap()
        );
    }

    #[test]
    fn short_and_invalid_records_are_errors_not_panics() {
        assert_eq!(
            decode_record(&[0u8; 10]),
            Err(DecodeError::Short { len: 10 })
        );
        let mut r = record(EventKind::Data, b"abc", 3);
        r.truncate(r.len() - 1);
        assert!(matches!(decode_record(&r), Err(DecodeError::Short { .. })));
        let mut r = record(EventKind::Data, b"abc", 3);
        r[std::mem::offset_of!(EventHeader, kind)] = 99;
        assert_eq!(decode_record(&r), Err(DecodeError::Invalid("kind")));
        let mut r = record(EventKind::Data, b"abc", 3);
        r[std::mem::offset_of!(EventHeader, tuple)] = 1; // family AF_UNIX
        assert_eq!(
            decode_record(&r),
            Err(DecodeError::Invalid("address family"))
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_reads_as_ipv4() {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(
            socket_addr(AF_INET6, &addr, 80).unwrap(),
            "10.1.2.3:80".parse().unwrap()
        );
        let loopback6 = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(
            socket_addr(AF_INET6, &loopback6, 80).unwrap(),
            "[::1]:80".parse().unwrap()
        );
    }
}
