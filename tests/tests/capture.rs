//! Privileged: the kernel capture against real servers and clients.
//!
//! Each test drives its own server on its own port and asserts on the events
//! of that port only, so the tests can share one capture and run in parallel.

use std::time::Duration;

use agent::capture::{CaptureEvent, Direction, Role, Syscall};
use tests::{
    ChildGuard, ScratchDir, bytes_of, capture, curl, find, fixtures, free_port, messages,
    moved_len, privileged, start_nginx, start_python, stream_mismatch, wait_listening,
};

/// Generous: the same tests run under qemu without acceleration.
const WAIT: Duration = Duration::from_secs(20);

fn recording_server(dir: &ScratchDir, port: u16, bind: &str) -> ChildGuard {
    let port_arg = port.to_string();
    let out = dir.path().to_str().unwrap().to_string();
    let server = start_python(
        dir,
        "recording_server.py",
        fixtures::RECORDING_SERVER,
        &[&port_arg, &out, bind],
    );
    let addr = if bind.contains(':') {
        format!("[{bind}]:{port}")
    } else {
        format!("{bind}:{port}")
    };
    wait_listening(addr.parse().unwrap());
    server
}

/// Runs `script` with python3 to its end; returns its pid and what it
/// printed. Fails the test when the script fails.
fn python_client(script: &str) -> (u32, Vec<u8>) {
    let client = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = client.id();
    let output = client.wait_with_output().unwrap();
    assert!(output.status.success(), "the client failed: {output:?}");
    (pid, output.stdout)
}

/// (received, sent) by the recording server on each connection that carried
/// data, in connection order.
fn recorded(dir: &ScratchDir) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for n in 0.. {
        let Ok(received) = std::fs::read(dir.path().join(format!("in-{n}.bin"))) else {
            break;
        };
        let sent = std::fs::read(dir.path().join(format!("out-{n}.bin"))).unwrap_or_default();
        if !received.is_empty() {
            out.push((received, sent));
        }
    }
    out
}

/// The first difference between what both ends of one exchange moved and
/// what the server recorded: the client sent what the server received, and
/// received what the server sent.
fn both_ends_mismatch(
    events: &[CaptureEvent],
    client_pid: u32,
    server_pid: u32,
    received: &[u8],
    sent: &[u8],
) -> Option<String> {
    stream_mismatch(events, server_pid, Direction::Ingress, received)
        .or_else(|| stream_mismatch(events, client_pid, Direction::Egress, received))
        .or_else(|| stream_mismatch(events, server_pid, Direction::Egress, sent))
        .or_else(|| stream_mismatch(events, client_pid, Direction::Ingress, sent))
}

fn assert_exact_both_ends(
    events: &[CaptureEvent],
    client_pid: u32,
    server_pid: u32,
    received: &[u8],
    sent: &[u8],
) {
    if let Some(difference) = both_ends_mismatch(events, client_pid, server_pid, received, sent) {
        panic!("captured bytes differ from the recorded exchange: {difference}");
    }
}

fn complete(
    events: &[CaptureEvent],
    client_pid: u32,
    server_pid: u32,
    received: &[u8],
    sent: &[u8],
) -> bool {
    both_ends_mismatch(events, client_pid, server_pid, received, sent).is_none()
}

#[test]
fn curl_to_python_server_is_captured_exactly_with_pids_ports_and_directions() {
    if !privileged() {
        return;
    }
    let capture = capture();
    let dir = ScratchDir::new("exact");
    let port = free_port();
    let server = recording_server(&dir, port, "127.0.0.1");
    let (curl_pid, body) = curl(&[&format!("http://127.0.0.1:{port}/exact?x=1")]);
    assert_eq!(body, b"you asked for /exact?x=1\n");

    let exchanges = recorded(&dir);
    assert_eq!(exchanges.len(), 1, "one connection carried data");
    let (received, sent) = &exchanges[0];
    let events = capture.wait_for_port(port, WAIT, |e| {
        complete(e, curl_pid, server.pid(), received, sent)
    });
    assert_exact_both_ends(&events, curl_pid, server.pid(), received, sent);
    assert!(
        received.starts_with(
            format!("GET /exact?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n").as_bytes()
        )
    );

    for m in messages(&events) {
        let c = &m.connection;
        if c.pid == server.pid() {
            assert_eq!(c.local.port(), port, "server's local port");
            assert_eq!(c.role, Role::Server);
            assert_eq!(c.local.ip().to_string(), "127.0.0.1");
        } else {
            assert_eq!(
                c.pid, curl_pid,
                "only curl and the server talk on this port"
            );
            assert_eq!(c.remote.port(), port, "client's remote port");
            assert_eq!(c.role, Role::Client);
        }
        assert!(!m.truncated);
        assert_eq!(m.bytes.len(), m.len as usize);
    }
    // Both ends name the same connection.
    let client_port = messages(&events)
        .iter()
        .find(|m| m.connection.pid == curl_pid)
        .unwrap()
        .connection
        .local
        .port();
    assert!(
        messages(&events)
            .iter()
            .filter(|m| m.connection.pid == server.pid())
            .all(|m| m.connection.remote.port() == client_port)
    );
    // connect() and accept() were seen as they happened.
    assert!(events.iter().any(
        |e| matches!(e, CaptureEvent::Opened { connection: c, .. } if c.pid == curl_pid && c.role == Role::Client)
    ));
    assert!(events.iter().any(
        |e| matches!(e, CaptureEvent::Opened { connection: c, .. } if c.pid == server.pid() && c.role == Role::Server)
    ));
}

#[test]
fn keep_alive_connection_with_several_requests_is_captured_in_order() {
    if !privileged() {
        return;
    }
    let capture = capture();
    let dir = ScratchDir::new("keepalive");
    let port = free_port();
    let server = recording_server(&dir, port, "127.0.0.1");
    let urls: Vec<String> = (1..=3)
        .map(|i| format!("http://127.0.0.1:{port}/ka/{i}"))
        .collect();
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (curl_pid, body) = curl(&args);
    assert_eq!(
        body,
        b"you asked for /ka/1\nyou asked for /ka/2\nyou asked for /ka/3\n"
    );

    let exchanges = recorded(&dir);
    assert_eq!(
        exchanges.len(),
        1,
        "curl reused one connection for three requests"
    );
    let (received, sent) = &exchanges[0];
    let events = capture.wait_for_port(port, WAIT, |e| {
        complete(e, curl_pid, server.pid(), received, sent)
    });
    assert_exact_both_ends(&events, curl_pid, server.pid(), received, sent);

    let requests: Vec<_> = messages(&events)
        .into_iter()
        .filter(|m| m.connection.pid == curl_pid && m.direction == Direction::Egress)
        .collect();
    assert_eq!(requests.len(), 3);
    for (i, m) in requests.iter().enumerate() {
        assert!(
            m.bytes
                .starts_with(format!("GET /ka/{} HTTP/1.1\r\n", i + 1).as_bytes())
        );
        assert_eq!(
            m.connection.id, requests[0].connection.id,
            "one connection id"
        );
    }
}

/// A client that writes its request head in pieces, the first only
/// `GET ` (4 bytes): the connection is still recognised as HTTP, and the
/// whole head captured on both ends. (Before, a first message under 8
/// bytes left the connection unclassified, and about a third of such
/// requests went untraced, counted as "not HTTP"; found by the fault tests.)
#[test]
fn request_head_written_in_small_pieces_is_captured() {
    if !privileged() {
        return;
    }
    let capture = capture();
    let dir = ScratchDir::new("pieces");
    let port = free_port();
    let server = recording_server(&dir, port, "127.0.0.1");
    let pieces: [&[u8]; 5] = [
        b"GET ",
        b"/pie",
        b"ces",
        b" HTTP/1.1\r\nHost: t\r\n",
        b"Connection: close\r\n\r\n",
    ];
    // A process of its own (the capture leaves this test process out),
    // one send per piece, apart, so that the server's reads are apart too.
    let script = format!(
        "import socket, sys, time\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n\
         for piece in {pieces:?}:\n    s.send(bytes(piece)); time.sleep(0.02)\n\
         answer = b''\n\
         while True:\n    b = s.recv(4096)\n    if not b: break\n    answer += b\n\
         sys.stdout.buffer.write(answer)\n",
        pieces = pieces.iter().map(|p| p.to_vec()).collect::<Vec<_>>()
    );
    let (client_pid, answer) = python_client(&script);
    assert!(answer.ends_with(b"you asked for /pieces\n"), "{answer:?}");
    let head = pieces.concat();
    let events = capture.wait_for_port(port, WAIT, |e| {
        bytes_of(e, client_pid, Direction::Egress) == head
            && bytes_of(e, server.pid(), Direction::Ingress) == head
    });
    assert_eq!(bytes_of(&events, client_pid, Direction::Egress), head);
    assert_eq!(bytes_of(&events, server.pid(), Direction::Ingress), head);
}

/// Requests written from several buffers at once: `writev` with one to
/// eight iovecs (the probe reads them two at a time, so odd and even counts
/// take different paths) and `sendmsg` with three. Every head is captured
/// whole, in order, on both ends.
#[test]
fn request_heads_written_from_several_buffers_are_captured() {
    if !privileged() {
        return;
    }
    let capture = capture();
    let dir = ScratchDir::new("iovecs");
    let port = free_port();
    let server = recording_server(&dir, port, "127.0.0.1");
    // (system call, buffers) per request, one connection each.
    let calls: [(&str, usize); 6] = [
        ("writev", 1),
        ("writev", 2),
        ("writev", 3),
        ("writev", 5),
        ("writev", 8),
        ("sendmsg", 3),
    ];
    let heads: Vec<String> = calls
        .iter()
        .map(|(call, n)| {
            format!("GET /{call}-{n} HTTP/1.1\r\nHost: t\r\nX-Pad: abcdefgh\r\nConnection: close\r\n\r\n")
        })
        .collect();
    let script = format!(
        "import os, socket, sys\n\
         for (call, n), head in zip({calls:?}, {heads:?}):\n\
         \x20   head = head.encode()\n\
         \x20   cut = [len(head) * i // n for i in range(n + 1)]\n\
         \x20   parts = [head[cut[i]:cut[i + 1]] for i in range(n)]\n\
         \x20   s = socket.create_connection(('127.0.0.1', {port}))\n\
         \x20   sent = os.writev(s.fileno(), parts) if call == 'writev' else s.sendmsg(parts)\n\
         \x20   assert sent == len(head), (sent, len(head))\n\
         \x20   while s.recv(4096): pass\n\
         \x20   s.close()\n\
         print('done')\n",
        calls = calls
            .iter()
            .map(|(c, n)| (c.to_string(), *n))
            .collect::<Vec<_>>(),
    );
    let (client_pid, _) = python_client(&script);
    let all: Vec<u8> = heads.concat().into_bytes();
    let events = capture.wait_for_port(port, WAIT, |e| {
        bytes_of(e, client_pid, Direction::Egress) == all
            && bytes_of(e, server.pid(), Direction::Ingress) == all
    });
    assert_eq!(
        String::from_utf8_lossy(&bytes_of(&events, client_pid, Direction::Egress)),
        String::from_utf8_lossy(&all)
    );
    assert_eq!(
        String::from_utf8_lossy(&bytes_of(&events, server.pid(), Direction::Ingress)),
        String::from_utf8_lossy(&all)
    );
    let syscalls: Vec<Syscall> = messages(&events)
        .into_iter()
        .filter(|m| m.connection.pid == client_pid && m.direction == Direction::Egress)
        .map(|m| m.syscall)
        .collect();
    assert!(
        syscalls.contains(&Syscall::Writev) && syscalls.contains(&Syscall::Sendmsg),
        "{syscalls:?}"
    );
}

/// Responses read every way a receive can: `readv` into two buffers,
/// `recvmsg`, and `recv`/`recvmsg` with `MSG_PEEK` before the real read.
/// The receive probes read these arguments (buffer, iovecs, flags) from the
/// registers the kernel saved at the syscall's entry: every byte the
/// client read is captured once, in order, and a peek is never copied.
#[test]
fn responses_read_with_readv_recvmsg_and_peeks_are_captured_once() {
    if !privileged() {
        return;
    }
    let capture = capture();
    let dir = ScratchDir::new("receives");
    let port = free_port();
    let _server = recording_server(&dir, port, "127.0.0.1");
    let ways = ["readv", "recvmsg", "peek-recv", "peek-recvmsg"];
    let script = format!(
        "import os, socket, sys\n\
         got = b''\n\
         for way in {ways:?}:\n\
         \x20   s = socket.create_connection(('127.0.0.1', {port}))\n\
         \x20   s.sendall(('GET /' + way + ' HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n').encode())\n\
         \x20   if way.startswith('peek'):\n\
         \x20       peeked = s.recv(4096, socket.MSG_PEEK) if way == 'peek-recv' else s.recvmsg(4096, 0, socket.MSG_PEEK)[0]\n\
         \x20       assert peeked, way\n\
         \x20   while True:\n\
         \x20       if way == 'readv':\n\
         \x20           a, b = bytearray(7), bytearray(4096)\n\
         \x20           n = os.readv(s.fileno(), [a, b])\n\
         \x20           data = bytes((a + b)[:n])\n\
         \x20       elif way == 'recvmsg':\n\
         \x20           data = s.recvmsg(4096)[0]\n\
         \x20       else:\n\
         \x20           data = s.recv(4096)\n\
         \x20       if not data: break\n\
         \x20       got += data\n\
         \x20   s.close()\n\
         sys.stdout.write(got.hex())\n"
    );
    let (client_pid, output) = python_client(&script);
    let hex = String::from_utf8(output).unwrap();
    let read: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(
        read.windows(9).filter(|w| w == b"HTTP/1.1 ").count(),
        ways.len(),
        "one response per way: {}",
        String::from_utf8_lossy(&read)
    );
    let events = capture.wait_for_port(port, WAIT, |e| {
        bytes_of(e, client_pid, Direction::Ingress).len() >= read.len()
    });
    assert_eq!(
        String::from_utf8_lossy(&bytes_of(&events, client_pid, Direction::Ingress)),
        String::from_utf8_lossy(&read)
    );
    let syscalls: Vec<Syscall> = messages(&events)
        .into_iter()
        .filter(|m| m.connection.pid == client_pid && m.direction == Direction::Ingress)
        .map(|m| m.syscall)
        .collect();
    for expected in [Syscall::Readv, Syscall::Recvmsg, Syscall::Recvfrom] {
        assert!(syscalls.contains(&expected), "{expected:?} in {syscalls:?}");
    }
}

#[test]
fn twelve_kib_request_head_arrives_complete() {
    if !privileged() {
        return;
    }
    let capture = capture();
    let dir = ScratchDir::new("bighead");
    let port = free_port();
    let server = recording_server(&dir, port, "127.0.0.1");
    let big_value = "v".repeat(12 * 1024);
    let header = format!("X-Big: {big_value}");
    let (curl_pid, _) = curl(&["-H", &header, &format!("http://127.0.0.1:{port}/big")]);

    let exchanges = recorded(&dir);
    let (received, sent) = &exchanges[0];
    assert!(received.len() > 12 * 1024);
    let events = capture.wait_for_port(port, WAIT, |e| {
        complete(e, curl_pid, server.pid(), received, sent)
    });
    assert_exact_both_ends(&events, curl_pid, server.pid(), received, sent);

    // The head left curl in one message and reached user space whole.
    let head = messages(&events)
        .into_iter()
        .find(|m| m.connection.pid == curl_pid && m.direction == Direction::Egress)
        .unwrap();
    assert!(
        !head.truncated,
        "a {} byte head must not be truncated",
        head.len
    );
    let end = find(&head.bytes, b"\r\n\r\n").expect("the whole head is in the first message");
    assert!(end > 12 * 1024);
    assert!(find(&head.bytes, big_value.as_bytes()).is_some());
}

#[test]
fn binary_protocol_yields_no_data_records() {
    if !privileged() {
        return;
    }
    let capture = capture();
    let dir = ScratchDir::new("binary");
    let port = free_port();
    let port_arg = port.to_string();
    let _server = start_python(
        &dir,
        "binary_echo.py",
        fixtures::BINARY_ECHO,
        &["server", &port_arg],
    );
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap());
    let client = start_python(
        &dir,
        "binary_echo.py",
        fixtures::BINARY_ECHO,
        &["client", &port_arg, "20"],
    );
    let output = client.wait_stdout(WAIT);
    assert_eq!(output.trim(), "done", "the echo exchange completed");

    let events = capture.settle_port(port, Duration::from_millis(500), WAIT);
    let data = messages(&events);
    assert!(
        data.is_empty(),
        "non-HTTP payload must not be copied, got {} messages: {:?}",
        data.len(),
        data.first()
    );
}

#[test]
fn ipv6_loopback_is_captured() {
    if !privileged() {
        return;
    }
    let capture = capture();
    let dir = ScratchDir::new("ipv6");
    let port = free_port();
    let server = recording_server(&dir, port, "::1");
    let (curl_pid, body) = curl(&["-g", &format!("http://[::1]:{port}/six")]);
    assert_eq!(body, b"you asked for /six\n");

    let exchanges = recorded(&dir);
    let (received, sent) = &exchanges[0];
    let events = capture.wait_for_port(port, WAIT, |e| {
        complete(e, curl_pid, server.pid(), received, sent)
    });
    assert_exact_both_ends(&events, curl_pid, server.pid(), received, sent);
    for m in messages(&events) {
        assert_eq!(m.connection.local.ip().to_string(), "::1");
        assert_eq!(m.connection.remote.ip().to_string(), "::1");
    }
}

#[test]
fn nginx_static_file_head_is_copied_and_sendfile_body_is_counted() {
    if !privileged() {
        return;
    }
    let capture = capture();
    let dir = ScratchDir::new("nginx");
    let port = free_port();
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    let content: Vec<u8> = (0..50_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    dir.write("www/file.txt", &content);
    let nginx = start_nginx(&dir, port, 1, "default_type text/plain;\n  sendfile on;");
    let (curl_pid, body) = curl(&[&format!("http://127.0.0.1:{port}/file.txt")]);
    assert_eq!(body, content);

    let events = capture.wait_for_port(port, WAIT, |e| {
        let sendfile = messages(e).iter().any(|m| m.syscall == Syscall::Sendfile);
        sendfile && moved_len(e, curl_pid, Direction::Ingress) >= content.len() as u64
    });
    let worker = messages(&events)
        .into_iter()
        .find(|m| m.connection.local.port() == port)
        .expect("nginx's side was captured");
    let worker_pid = worker.connection.pid;
    assert_ne!(worker_pid, nginx.pid(), "a worker, not the master, serves");
    let stat = std::fs::read_to_string(format!("/proc/{worker_pid}/stat")).unwrap();
    let ppid: u32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        ppid,
        nginx.pid(),
        "the serving process is the nginx master's child"
    );

    let request = bytes_of(&events, worker_pid, Direction::Ingress);
    assert!(stream_mismatch(&events, curl_pid, Direction::Egress, &request).is_none());
    assert!(request.starts_with(b"GET /file.txt HTTP/1.1\r\n"));

    // nginx copies its head with writev and the body with sendfile; curl
    // reads both. Rebuild the response from nginx's head and the file.
    let worker_head = bytes_of(&events, worker_pid, Direction::Egress);
    assert!(worker_head.starts_with(b"HTTP/1.1 200 OK\r\n") && worker_head.ends_with(b"\r\n\r\n"));
    let response = [&worker_head[..], &content[..]].concat();
    if let Some(difference) = stream_mismatch(&events, curl_pid, Direction::Ingress, &response) {
        panic!("curl's received bytes: {difference}");
    }
    let sendfile = messages(&events)
        .into_iter()
        .find(|m| m.syscall == Syscall::Sendfile)
        .unwrap();
    assert_eq!(sendfile.connection.pid, worker_pid);
    assert!(
        sendfile.bytes.is_empty(),
        "sendfile bytes come from a file and are not copied"
    );
    assert_eq!(
        moved_len(&events, worker_pid, Direction::Egress),
        response.len() as u64
    );
    assert_eq!(
        moved_len(&events, curl_pid, Direction::Ingress),
        response.len() as u64
    );
}
