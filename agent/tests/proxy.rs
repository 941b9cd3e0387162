//! The proxy on real sockets. Each test gets a network namespace of its own
//! with the REDIRECT rules the agent installs (ports 20000-20999 to the
//! proxy on 15001, except connections marked 0x1e7), runs the proxy
//! in-process on a thread inside that namespace, and drives real clients
//! (curl, raw sockets, python) and servers (a python server that records
//! the exact bytes it receives, raw sockets) in it. The namespace is
//! deleted when the test ends, however it ends.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use agent::proxy::{Proxy, ProxyCounters, ProxySettings, ProxyStats, StandaloneContexts};
use agent::tracecontext::TraceParent;

const PROXY_PORT: u16 = 15001;
const MARK: &str = "0x1e7";
/// Destination ports the namespace redirects to the proxy.
const REDIRECTED_PORTS: &str = "20000:20999";
/// Longest any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(30);

fn is_root() -> bool {
    // SAFETY: no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// Privileged tests skip without root, except under CI=true, where a skip
/// would hide that they never ran.
fn privileged() -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "privileged test cannot run: not root under CI=true"
    );
    eprintln!("SKIPPED: needs root");
    false
}

fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "pxt{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        // From here on the guard deletes the namespace, even if setting it
        // up fails.
        let netns = Netns { name };
        run("ip", &["-n", &netns.name, "link", "set", "lo", "up"]);
        for tool in ["iptables", "ip6tables"] {
            let port = PROXY_PORT.to_string();
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &netns.name,
                    tool,
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "--dport",
                    REDIRECTED_PORTS,
                    "-m",
                    "mark",
                    "!",
                    "--mark",
                    MARK,
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    &port,
                ],
            );
        }
        netns
    }

    /// Moves the calling thread (only) into the namespace; sockets it
    /// creates, threads and processes it starts, are in the namespace.
    fn enter(&self) {
        enter_netns(&self.name);
    }

    /// `program` run inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A namespace with the proxy running in it.
struct Lab {
    netns: Netns,
    stats: Arc<ProxyStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    proxy: Option<thread::JoinHandle<()>>,
}

fn test_settings() -> ProxySettings {
    ProxySettings {
        idle_timeout: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(1),
        ..ProxySettings::default()
    }
}

impl Lab {
    fn start() -> Lab {
        Lab::with(test_settings())
    }

    fn with(settings: ProxySettings) -> Lab {
        let netns = Netns::new();
        let name = netns.name.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let proxy = thread::spawn(move || {
            enter_netns(&name);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let proxy = Proxy::bind(settings).expect("proxy binds");
                let _ = ready_tx.send(proxy.stats());
                let contexts = Arc::new(StandaloneContexts::new());
                proxy
                    .run(contexts, async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("proxy runs");
            });
        });
        let stats = ready_rx.recv_timeout(WAIT).expect("the proxy started");
        Lab {
            netns,
            stats,
            stop: Some(stop_tx),
            proxy: Some(proxy),
        }
    }

    /// Runs `body` on a thread inside the namespace.
    fn run<T: Send>(&self, body: impl FnOnce() -> T + Send) -> T {
        thread::scope(|scope| {
            let handle = scope.spawn(|| {
                self.netns.enter();
                body()
            });
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn counters(&self) -> ProxyCounters {
        self.stats.snapshot()
    }

    /// Starts the recording server on `port` (`host` 127.0.0.1 or ::1).
    fn recorder(&self, host: &str, port: u16) -> Recorder {
        let mut child = KillOnDrop(
            self.netns
                .command("python3")
                .args(["-c", RECORDER, host, &port.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("python3"),
        );
        let lines = lines(child.0.stdout.take().expect("stdout"));
        let ready = lines.recv_timeout(WAIT).expect("recorder starts");
        assert_eq!(ready, "READY");
        Recorder {
            _child: child,
            lines,
        }
    }
}

fn enter_netns(name: &str) {
    let file = File::open(format!("/run/netns/{name}")).expect("namespace file");
    // SAFETY: a valid descriptor of a network namespace file.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(proxy) = self.proxy.take() {
            // Bounded by the shutdown grace plus the abort wait.
            let _ = proxy.join();
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a child's pipe, read on a thread so the test can wait with a
/// deadline.
fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// HTTP/1.1 server that records what it receives, one JSON line per
/// request: the connection number, the request's index on it, the exact
/// head bytes (hex), the body's length and SHA-256, and any trailer lines.
/// `Expect: 100-continue` gets a 100 first; HEAD gets a head only;
/// `Upgrade: websocket` gets a 101 and CONNECT a 200, after which the
/// server sends `\x82\x05hello` and echoes everything until the client
/// half-closes. Other requests get 200 with a small JSON body.
const RECORDER: &str = r#"
import hashlib, json, socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
lock = threading.Lock()

def emit(record):
    with lock:
        print(json.dumps(record), flush=True)

class Conn:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""
    def fill(self):
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError
        self.buf += data
    def line(self):
        while b"\n" not in self.buf:
            self.fill()
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"
    def take(self, n):
        while n > 0:
            if not self.buf:
                self.fill()
            chunk, self.buf = self.buf[:n], self.buf[n:]
            n -= len(chunk)
            yield chunk

def field(fields, name):
    return ",".join(fields.get(name, [])).lower()

def tunnel(c, sock):
    sock.sendall(b"\x82\x05hello")
    data, c.buf = c.buf, b""
    while True:
        if data:
            sock.sendall(data)
        data = sock.recv(1 << 16)
        if not data:
            break
    sock.shutdown(socket.SHUT_WR)

def serve(sock, conn):
    c = Conn(sock)
    index = 0
    try:
        while True:
            while b"\r\n\r\n" not in c.buf:
                c.fill()
            head, _, c.buf = c.buf.partition(b"\r\n\r\n")
            head += b"\r\n\r\n"
            fields = {}
            for line in head.split(b"\r\n")[1:]:
                name, sep, value = line.partition(b":")
                if sep:
                    fields.setdefault(name.strip().lower().decode("latin-1"), []).append(
                        value.strip().decode("latin-1"))
            method, target = head.split(b" ")[:2]
            body, length, trailers = hashlib.sha256(), 0, b""
            if "100-continue" in field(fields, "expect"):
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if "chunked" in field(fields, "transfer-encoding"):
                while True:
                    size = int(c.line().split(b";")[0].strip(), 16)
                    if size == 0:
                        break
                    for chunk in c.take(size):
                        body.update(chunk)
                        length += len(chunk)
                    c.line()
                while True:
                    line = c.line()
                    if line in (b"\r\n", b"\n"):
                        break
                    trailers += line
            elif method != b"CONNECT":
                for chunk in c.take(int(fields.get("content-length", ["0"])[0])):
                    body.update(chunk)
                    length += len(chunk)
            emit({"conn": conn, "index": index, "head": head.hex(), "body_len": length,
                  "body_sha256": body.hexdigest(), "trailers": trailers.decode("latin-1")})
            index += 1
            if "websocket" in field(fields, "upgrade"):
                sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\n\r\n")
                return tunnel(c, sock)
            if method == b"CONNECT":
                sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                return tunnel(c, sock)
            reply = json.dumps({"target": target.decode("latin-1"), "len": length}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(reply))
            if method != b"HEAD":
                sock.sendall(reply)
    except (EOFError, OSError):
        pass
    finally:
        sock.close()

listener = socket.socket(family)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, port))
listener.listen(1024)
print("READY", flush=True)
conn = 0
while True:
    sock, _ = listener.accept()
    threading.Thread(target=serve, args=(sock, conn), daemon=True).start()
    conn += 1
"#;

/// What the recorder saw of one request.
#[derive(Debug)]
struct Recorded {
    conn: u64,
    index: u64,
    head: Vec<u8>,
    body_len: u64,
    body_sha256: String,
    trailers: String,
}

impl Recorded {
    fn head_text(&self) -> String {
        String::from_utf8_lossy(&self.head).into_owned()
    }

    /// Values of the fields named `name` (any case), in order.
    fn fields(&self, name: &str) -> Vec<String> {
        self.head_text()
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim().to_owned())
            .collect()
    }

    /// The one traceparent, which must be valid.
    fn traceparent(&self) -> TraceParent {
        let values = self.fields("traceparent");
        assert_eq!(values.len(), 1, "one traceparent in {:?}", self.head_text());
        TraceParent::parse(values[0].as_bytes()).expect("a valid traceparent")
    }
}

struct Recorder {
    _child: KillOnDrop,
    lines: mpsc::Receiver<String>,
}

impl Recorder {
    fn next(&self) -> Recorded {
        let line = self.lines.recv_timeout(WAIT).expect("a recorded request");
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        Recorded {
            conn: value["conn"].as_u64().unwrap(),
            index: value["index"].as_u64().unwrap(),
            head: unhex(value["head"].as_str().unwrap()),
            body_len: value["body_len"].as_u64().unwrap(),
            body_sha256: value["body_sha256"].as_str().unwrap().to_owned(),
            trailers: value["trailers"].as_str().unwrap().to_owned(),
        }
    }
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// A blocking client connection with a read buffer, for raw requests.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: &str) -> Client {
        let stream = TcpStream::connect(addr).unwrap_or_else(|err| panic!("{addr}: {err}"));
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0; 16 * 1024];
        let n = self.stream.read(&mut chunk).expect("read");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Exactly `n` bytes.
    fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill() > 0, "closed before {n} bytes");
        }
        self.buf.drain(..n).collect()
    }

    /// One response: its head as text and its Content-Length body.
    fn response(&mut self) -> (String, Vec<u8>) {
        let end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(self.fill() > 0, "closed before a response head");
        };
        let head = String::from_utf8(self.buf.drain(..end).collect()).unwrap();
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let body = if head.starts_with("HTTP/1.1 1") {
            Vec::new()
        } else {
            self.read_exact(length)
        };
        (head, body)
    }

    /// Everything until the peer closes.
    fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill() > 0 {}
        std::mem::take(&mut self.buf)
    }
}

fn curl(lab: &Lab, args: &[&str]) -> Output {
    let output = lab
        .netns
        .command("curl")
        .args(["-sS", "--fail", "--max-time", "120"])
        .args(args)
        .output()
        .expect("curl");
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Accepts one connection, failing the test if none comes in time.
fn accept(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(WAIT)).unwrap();
                stream.set_write_timeout(Some(WAIT)).unwrap();
                return stream;
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection arrived");
                thread::sleep(Duration::from_millis(5));
            }
            Err(err) => panic!("accept: {err}"),
        }
    }
}

/// Echoes one connection's bytes back until the client half-closes, then
/// half-closes too; with `banner`, speaks first.
fn echo_one(listener: &TcpListener, banner: &[u8]) {
    let mut stream = accept(listener);
    stream.write_all(banner).unwrap();
    let mut chunk = [0; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        stream.write_all(&chunk[..n]).unwrap();
    }
    stream.shutdown(Shutdown::Write).unwrap();
}

const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Pseudo-random bytes, reproducible.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn curl_request_arrives_with_a_valid_traceparent() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let recorder = lab.recorder("127.0.0.1", 20080);
    let output = curl(
        &lab,
        &[
            "-H",
            "X-Test:  kept  as is",
            "http://127.0.0.1:20080/hello?x=1",
        ],
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("/hello?x=1"));
    let seen = recorder.next();
    let traceparent = seen.traceparent();
    assert_eq!(traceparent.flags, 0x03, "a new sampled, random trace");
    let head = seen.head_text();
    assert!(head.starts_with("GET /hello?x=1 HTTP/1.1\r\nHost: 127.0.0.1:20080\r\n"));
    assert!(head.contains("\r\nX-Test:  kept  as is\r\n"), "{head}");
    assert!(
        head.ends_with(&format!("\r\ntraceparent: {traceparent}\r\n\r\n")),
        "inserted last: {head}"
    );
    let counters = lab.counters();
    assert_eq!(counters.connections_http, 1);
    assert_eq!(counters.requests_injected, 1);
    assert_eq!(counters.errors, 0, "{counters}");
}

#[test]
fn valid_traceparent_passes_byte_for_byte() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let recorder = lab.recorder("127.0.0.1", 20080);
    let head = format!(
        "GET /kept HTTP/1.1\r\nHost: x\r\nTraceParent:  {VALID} \r\ntracestate: a=1,b=2\r\n\r\n"
    );
    lab.run(|| {
        let mut client = Client::connect("127.0.0.1:20080");
        client.send(head.as_bytes());
        let (status, _) = client.response();
        assert!(status.starts_with("HTTP/1.1 200"));
    });
    assert_eq!(recorder.next().head, head.as_bytes());
    assert_eq!(lab.counters().requests_unchanged, 1);
    assert_eq!(lab.counters().requests_injected, 0);
}

#[test]
fn other_header_bytes_arrive_identical() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let recorder = lab.recorder("127.0.0.1", 20080);
    // Odd case and spacing, repeats, obs-text, an obs-fold line, an
    // invalid traceparent and tracestates to be dropped.
    let sent = "POST  /odd  HTTP/1.1\r\nhOST: x\r\nX-Spaces:   a  b \t\r\ntraceparent: 00-bad\r\n\
                X-Fold: one\r\n two\r\nTraceState: a=1\r\nX-Rep: 1\r\nx-rep: 2\r\n\
                X-Latin: caf\u{e9}\r\nContent-Length: 3\r\ntracestate: b=2\r\n\r\nabc";
    lab.run(|| {
        let mut client = Client::connect("127.0.0.1:20080");
        client.send(sent.as_bytes());
        let (status, body) = client.response();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(String::from_utf8(body).unwrap().contains("\"len\": 3"));
    });
    let seen = recorder.next();
    let traceparent = seen.traceparent();
    let expected = format!(
        "POST  /odd  HTTP/1.1\r\nhOST: x\r\nX-Spaces:   a  b \t\r\n\
         X-Fold: one\r\n two\r\nX-Rep: 1\r\nx-rep: 2\r\n\
         X-Latin: caf\u{e9}\r\nContent-Length: 3\r\ntraceparent: {traceparent}\r\n\r\n"
    );
    assert_eq!(seen.head, expected.as_bytes());
    assert_eq!(seen.body_len, 3);
}

#[test]
fn keep_alive_connection_carries_20_requests() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let recorder = lab.recorder("127.0.0.1", 20080);
    lab.run(|| {
        let mut client = Client::connect("127.0.0.1:20080");
        for i in 0..20 {
            let body = format!("body {i}");
            client.send(
                format!(
                    "POST /r{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            let (status, reply) = client.response();
            assert!(status.starts_with("HTTP/1.1 200"), "{status}");
            assert!(
                String::from_utf8(reply)
                    .unwrap()
                    .contains(&format!("/r{i}\""))
            );
        }
    });
    let mut traces = std::collections::HashSet::new();
    for i in 0..20 {
        let seen = recorder.next();
        assert_eq!((seen.conn, seen.index), (0, i), "one connection, in order");
        assert!(seen.head_text().starts_with(&format!("POST /r{i} ")));
        assert!(traces.insert(seen.traceparent().trace_id));
    }
    let counters = lab.counters();
    assert_eq!(counters.connections_http, 1);
    assert_eq!(counters.requests_injected, 20);
}

#[test]
fn three_pipelined_requests_in_one_write() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let recorder = lab.recorder("127.0.0.1", 20080);
    lab.run(|| {
        let mut client = Client::connect("127.0.0.1:20080");
        client.send(
            format!(
                "GET /p1 HTTP/1.1\r\nHost: x\r\n\r\n\
                 POST /p2 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nGET \
                 GET /p3 HTTP/1.1\r\nHost: x\r\ntraceparent: {VALID}\r\n\r\n"
            )
            .as_bytes(),
        );
        for path in ["/p1", "/p2", "/p3"] {
            let (_, body) = client.response();
            assert!(String::from_utf8(body).unwrap().contains(path));
        }
    });
    let (p1, p2, p3) = (recorder.next(), recorder.next(), recorder.next());
    assert!(p1.head_text().starts_with("GET /p1 "));
    p1.traceparent();
    assert!(p2.head_text().starts_with("POST /p2 "));
    p2.traceparent();
    assert_eq!(p2.body_len, 4);
    assert_eq!(
        p3.head,
        format!("GET /p3 HTTP/1.1\r\nHost: x\r\ntraceparent: {VALID}\r\n\r\n").as_bytes()
    );
    let counters = lab.counters();
    assert_eq!(
        (counters.requests_injected, counters.requests_unchanged),
        (2, 1)
    );
}

#[test]
fn chunked_upload_with_trailers() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let recorder = lab.recorder("127.0.0.1", 20080);
    // A chunk that looks like a request head must stay body.
    let inner = b"GET /not-a-request HTTP/1.1\r\n\r\n";
    lab.run(|| {
        let mut client = Client::connect("127.0.0.1:20080");
        client.send(
            b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe",
        );
        thread::sleep(Duration::from_millis(50));
        client.send(format!("llo\r\n{:x};ext=1\r\n", inner.len()).as_bytes());
        client.send(inner);
        client.send(b"\r\n0\r\nX-Checksum: abc\r\nX-More: 1\r\n\r\n");
        let (status, body) = client.response();
        assert!(status.starts_with("HTTP/1.1 200"));
        assert!(String::from_utf8(body).unwrap().contains("/chunked"));
        client.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n");
        client.response();
    });
    let upload = recorder.next();
    upload.traceparent();
    assert_eq!(upload.body_len, 5 + inner.len() as u64);
    assert_eq!(upload.trailers, "X-Checksum: abc\r\nX-More: 1\r\n");
    let after = recorder.next();
    assert!(after.head_text().starts_with("GET /after "));
    after.traceparent();
    assert_eq!(lab.counters().requests_injected, 2);
}

#[test]
fn expect_100_continue_upload() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let recorder = lab.recorder("127.0.0.1", 20080);
    let data = noise(2 * 1024 * 1024, 100);
    let path = std::env::temp_dir().join(format!("proxy-100-{}.bin", std::process::id()));
    std::fs::write(&path, &data).unwrap();
    let started = Instant::now();
    // curl waits up to 30 s for the 100 before sending the body anyway:
    // finishing well before that shows the 100 came through the proxy.
    let output = curl(
        &lab,
        &[
            "-H",
            "Expect: 100-continue",
            "--expect100-timeout",
            "30",
            "--data-binary",
            &format!("@{}", path.display()),
            "http://127.0.0.1:20080/continue",
        ],
    );
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(&path);
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains(&format!("\"len\": {}", data.len())));
    let seen = recorder.next();
    seen.traceparent();
    assert_eq!(seen.fields("expect"), ["100-continue"]);
    assert_eq!(seen.body_len, data.len() as u64);
    let sha = sha256_of(&lab, &data);
    assert_eq!(seen.body_sha256, sha);
}

/// SHA-256 of `data` in hex, by python (no hashing crate in this build).
fn sha256_of(lab: &Lab, data: &[u8]) -> String {
    let mut child = lab
        .netns
        .command("python3")
        .args([
            "-c",
            "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = thread::spawn(move || stdin.write_all(&data));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn websocket_upgrade_then_binary_frames_both_ways() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let recorder = lab.recorder("127.0.0.1", 20080);
    lab.run(|| {
        let mut client = Client::connect("127.0.0.1:20080");
        // A HEAD first: its response announces a body it does not have,
        // which the proxy must not wait for before seeing the 101.
        client.send(b"HEAD /first HTTP/1.1\r\nHost: x\r\n\r\n");
        let end = loop {
            if let Some(at) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(client.fill() > 0);
        };
        client.buf.drain(..end);
        client.send(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        );
        let (status, _) = client.response();
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        assert_eq!(client.read_exact(7), b"\x82\x05hello");
        // Frames, including one whose payload reads like a request head:
        // after the switch nothing is parsed or injected.
        let mut frames = Vec::new();
        for i in 0..50u8 {
            let payload = noise(100 + usize::from(i), u64::from(i));
            frames.push(0x82);
            frames.push(payload.len() as u8);
            frames.extend_from_slice(&payload);
        }
        frames.extend_from_slice(b"\x82\x20GET / HTTP/1.1\r\nHost: y\r\n\r\n\0\0\0\0\0");
        client.send(&frames);
        assert_eq!(client.read_exact(frames.len()), frames);
        client.stream.shutdown(Shutdown::Write).unwrap();
        assert!(
            client.read_to_end().is_empty(),
            "the server half-closes too"
        );
    });
    let head = recorder.next();
    assert!(head.head_text().starts_with("HEAD /first "));
    let upgrade = recorder.next();
    upgrade.traceparent();
    assert_eq!(upgrade.fields("upgrade"), ["websocket"]);
    let counters = lab.counters();
    assert_eq!(counters.requests_injected, 2);
    assert_eq!((counters.fallbacks, counters.errors), (0, 0), "{counters}");
}

#[test]
fn connect_tunnel_is_not_interpreted() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let recorder = lab.recorder("127.0.0.1", 20080);
    lab.run(|| {
        let mut client = Client::connect("127.0.0.1:20080");
        client.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
        let (status, _) = client.response();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert_eq!(client.read_exact(7), b"\x82\x05hello");
        let inner = b"GET /inside HTTP/1.1\r\nHost: x\r\n\r\n";
        client.send(inner);
        assert_eq!(client.read_exact(inner.len()), inner);
    });
    recorder.next().traceparent();
    assert_eq!(lab.counters().requests_injected, 1);
}

#[test]
fn binary_echo_is_opaque_and_half_closes() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let data = noise(1024 * 1024, 7);
    lab.run(|| {
        let listener = TcpListener::bind("127.0.0.1:20100").unwrap();
        thread::scope(|scope| {
            scope.spawn(|| echo_one(&listener, b""));
            let mut client = Client::connect("127.0.0.1:20100");
            let mut expected = vec![0u8];
            client.send(&[0]);
            // Writing and reading at once: the echo must not deadlock on
            // full buffers.
            let mut writer = client.stream.try_clone().unwrap();
            let sent = data.clone();
            let writing = scope.spawn(move || {
                writer.write_all(&sent).unwrap();
                writer.shutdown(Shutdown::Write).unwrap();
            });
            expected.extend_from_slice(&data);
            assert_eq!(client.read_to_end(), expected);
            writing.join().unwrap();
        });
    });
    let counters = lab.counters();
    assert_eq!(
        (counters.connections_opaque, counters.connections_http),
        (1, 0)
    );
    assert_eq!(counters.errors, 0);
}

#[test]
fn tls_client_hello_is_opaque() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    // A ClientHello record header and start, then bytes that would be a
    // request head if the connection were parsed.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xf4, 0x01, 0x00, 0x00, 0xf0, 0x03, 0x03,
    ];
    hello.extend(noise(32, 3));
    hello.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    lab.run(|| {
        let listener = TcpListener::bind("127.0.0.1:20443").unwrap();
        thread::scope(|scope| {
            scope.spawn(|| echo_one(&listener, b""));
            let mut client = Client::connect("127.0.0.1:20443");
            client.send(&hello);
            client.stream.shutdown(Shutdown::Write).unwrap();
            assert_eq!(client.read_to_end(), hello);
        });
    });
    assert_eq!(lab.counters().connections_opaque, 1);
    assert_eq!(lab.counters().requests_injected, 0);
}

#[test]
fn server_first_protocol_is_opaque() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    lab.run(|| {
        let listener = TcpListener::bind("127.0.0.1:20025").unwrap();
        thread::scope(|scope| {
            scope.spawn(|| echo_one(&listener, b"220 ready\r\n"));
            let mut client = Client::connect("127.0.0.1:20025");
            // The client waits for the banner before saying anything.
            assert_eq!(client.read_exact(11), b"220 ready\r\n");
            let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
            client.send(request);
            assert_eq!(client.read_exact(request.len()), request);
            client.stream.shutdown(Shutdown::Write).unwrap();
            assert!(client.read_to_end().is_empty());
        });
    });
    let counters = lab.counters();
    assert_eq!(counters.connections_opaque, 1);
    assert_eq!(counters.requests_injected, 0);
}

#[test]
fn silent_client_becomes_opaque_after_the_detect_timeout() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    lab.run(|| {
        let listener = TcpListener::bind("127.0.0.1:20026").unwrap();
        thread::scope(|scope| {
            scope.spawn(|| echo_one(&listener, b""));
            let mut client = Client::connect("127.0.0.1:20026");
            // Longer than the 300 ms detect timeout: then an HTTP request
            // passes without injection.
            thread::sleep(Duration::from_millis(800));
            let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
            client.send(request);
            client.stream.shutdown(Shutdown::Write).unwrap();
            assert_eq!(client.read_to_end(), request);
        });
    });
    assert_eq!(lab.counters().connections_opaque, 1);
}

#[test]
fn http_upload_of_200_mb_arrives_intact() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let recorder = lab.recorder("127.0.0.1", 20080);
    let path = std::env::temp_dir().join(format!("proxy-200mb-{}.bin", std::process::id()));
    let data = noise(200 * 1024 * 1024, 200);
    std::fs::write(&path, &data).unwrap();
    let expected = sha256_of(&lab, &data);
    drop(data);
    let started = Instant::now();
    let output = curl(
        &lab,
        &[
            "-H",
            "Expect:",
            "-T",
            &path.display().to_string(),
            "http://127.0.0.1:20080/upload",
        ],
    );
    let _ = std::fs::remove_file(&path);
    let elapsed = started.elapsed();
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"len\": 209715200"));
    let seen = recorder.next();
    seen.traceparent();
    assert_eq!(seen.body_len, 200 * 1024 * 1024);
    assert_eq!(seen.body_sha256, expected);
    assert!(elapsed < Duration::from_secs(90), "took {elapsed:?}");
}

/// Python sink: hashes everything received until the client half-closes,
/// then sends the hex SHA-256 back and closes.
const HASHING_SINK: &str = r#"
import hashlib, socket
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 20200))
listener.listen(1)
print("READY", flush=True)
sock, _ = listener.accept()
digest = hashlib.sha256()
while True:
    data = sock.recv(1 << 16)
    if not data:
        break
    digest.update(data)
sock.sendall(digest.hexdigest().encode())
sock.close()
"#;

/// Python client: sends 200 MB of random bytes (starting with a 0 byte, so
/// never HTTP), half-closes, and prints its own SHA-256 and the server's.
const HASHING_SOURCE: &str = r#"
import hashlib, os, socket
sock = socket.create_connection(("127.0.0.1", 20200), timeout=60)
digest = hashlib.sha256()
block = b"\0" + os.urandom((1 << 20) - 1)
for i in range(200):
    block = bytes([i]) + block[1:]
    digest.update(block)
    sock.sendall(block)
sock.shutdown(socket.SHUT_WR)
reply = b""
while True:
    data = sock.recv(1 << 16)
    if not data:
        break
    reply += data
print(digest.hexdigest(), reply.decode())
"#;

#[test]
fn opaque_stream_of_200_mb_arrives_intact() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let mut sink = KillOnDrop(
        lab.netns
            .command("python3")
            .args(["-c", HASHING_SINK])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let sink_lines = lines(sink.0.stdout.take().unwrap());
    assert_eq!(sink_lines.recv_timeout(WAIT).unwrap(), "READY");
    let started = Instant::now();
    let source = KillOnDrop(
        lab.netns
            .command("timeout")
            .args(["120", "python3", "-c", HASHING_SOURCE])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let output = {
        let mut source = source;
        let mut out = String::new();
        source
            .0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(source.0.wait().unwrap().success());
        out
    };
    let elapsed = started.elapsed();
    let (sent, received) = output.trim().split_once(' ').expect("two digests");
    assert_eq!(sent.len(), 64);
    assert_eq!(sent, received);
    assert!(elapsed < Duration::from_secs(90), "took {elapsed:?}");
    let counters = lab.counters();
    assert_eq!((counters.connections_opaque, counters.errors), (1, 0));
}

#[test]
fn thousand_concurrent_connections_complete() {
    if !privileged() {
        return;
    }
    const CONNECTIONS: usize = 1000;
    let lab = Lab::start();
    let failures = lab.run(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:20300")
                .await
                .unwrap();
            // The server answers nobody until every request has arrived,
            // so all connections are open through the proxy at once.
            let arrived = Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
            let server = tokio::spawn(async move {
                let mut handlers = Vec::new();
                for _ in 0..CONNECTIONS {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    let arrived = Arc::clone(&arrived);
                    handlers.push(tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut chunk = [0; 1024];
                        while !head.ends_with(b"\r\n\r\n") {
                            let n = stream.read(&mut chunk).await.unwrap();
                            assert!(n > 0);
                            head.extend_from_slice(&chunk[..n]);
                        }
                        arrived.wait().await;
                        let text = String::from_utf8(head).unwrap();
                        let traceparent = text
                            .lines()
                            .find_map(|l| l.strip_prefix("traceparent: "))
                            .unwrap_or("none")
                            .to_owned();
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{traceparent}",
                            traceparent.len()
                        );
                        stream.write_all(reply.as_bytes()).await.unwrap();
                    }));
                }
                for handler in handlers {
                    handler.await.unwrap();
                }
            });
            let mut clients = Vec::new();
            for i in 0..CONNECTIONS {
                clients.push(tokio::spawn(async move {
                    let mut stream = tokio::net::TcpStream::connect("127.0.0.1:20300").await?;
                    stream
                        .write_all(format!("GET /c{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                        .await?;
                    let mut reply = Vec::new();
                    stream.read_to_end(&mut reply).await?;
                    let reply = String::from_utf8_lossy(&reply).into_owned();
                    let traceparent = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
                    if TraceParent::parse(traceparent.as_bytes()).is_err() {
                        return Err(std::io::Error::other(format!("no traceparent: {reply}")));
                    }
                    Ok::<_, std::io::Error>(())
                }));
            }
            let all = async {
                let mut failures = Vec::new();
                for client in clients {
                    match client.await {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => failures.push(err.to_string()),
                        Err(err) => failures.push(err.to_string()),
                    }
                }
                server.await.unwrap();
                failures
            };
            tokio::time::timeout(Duration::from_secs(90), all)
                .await
                .expect("1000 connections finish in time")
        })
    });
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let counters = lab.counters();
    assert_eq!(counters.connections_http, CONNECTIONS as u64);
    assert_eq!(counters.requests_injected, CONNECTIONS as u64);
    assert_eq!(counters.errors, 0, "{counters}");
}

#[test]
fn ipv6_requests_get_a_traceparent() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    let recorder = lab.recorder("::1", 20080);
    lab.run(|| {
        let mut client = Client::connect("[::1]:20080");
        client.send(b"GET /six HTTP/1.1\r\nHost: x\r\n\r\n");
        let (status, _) = client.response();
        assert!(status.starts_with("HTTP/1.1 200"));
    });
    recorder.next().traceparent();
    assert_eq!(lab.counters().requests_injected, 1);
}

#[test]
fn connection_that_was_not_redirected_is_closed() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    lab.run(|| {
        let mut client = Client::connect(&format!("127.0.0.1:{PROXY_PORT}"));
        let _ = client.stream.write_all(b"GET / HTTP/1.1\r\n\r\n");
        let mut byte = [0; 1];
        match client.stream.read(&mut byte) {
            Ok(0) => {}
            Err(err) if err.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("expected the proxy to close, got {other:?}"),
        }
    });
    let counters = lab.counters();
    assert_eq!(counters.connections_refused, 1);
    assert_eq!(counters.connections_http + counters.connections_opaque, 0);
}

#[test]
fn unreachable_destination_resets_the_client() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    lab.run(|| {
        // Nothing listens on 20999: the proxy's connect is refused, and
        // the client sees a reset instead of a connection that works.
        let mut client = Client::connect("127.0.0.1:20999");
        let mut byte = [0; 1];
        let result = client.stream.read(&mut byte);
        assert!(
            matches!(&result, Err(err) if err.kind() == ErrorKind::ConnectionReset),
            "{result:?}"
        );
    });
    assert_eq!(lab.counters().errors, 1);
}

#[test]
fn client_reset_reaches_the_server() {
    if !privileged() {
        return;
    }
    let lab = Lab::start();
    lab.run(|| {
        let listener = TcpListener::bind("127.0.0.1:20101").unwrap();
        let client = Client::connect("127.0.0.1:20101");
        let mut server = accept(&listener);
        let mut stream = client.stream;
        stream.write_all(b"\0binary").unwrap();
        let mut got = [0; 7];
        server.read_exact(&mut got).unwrap();
        // Linger 0: the close sends RST.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a linger struct of the right size.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        drop(stream);
        let mut byte = [0; 1];
        let result = server.read(&mut byte);
        assert!(
            matches!(&result, Err(err) if err.kind() == ErrorKind::ConnectionReset),
            "the server sees a reset, not a clean close: {result:?}"
        );
    });
}

#[test]
fn idle_connection_is_reset_on_both_sides() {
    if !privileged() {
        return;
    }
    let lab = Lab::with(ProxySettings {
        idle_timeout: Duration::from_secs(1),
        ..test_settings()
    });
    lab.run(|| {
        let listener = TcpListener::bind("127.0.0.1:20102").unwrap();
        let mut client = Client::connect("127.0.0.1:20102");
        let mut server = accept(&listener);
        client.send(b"\0hello");
        let mut got = [0; 6];
        server.read_exact(&mut got).unwrap();
        let started = Instant::now();
        let mut byte = [0; 1];
        let at_client = client.stream.read(&mut byte);
        let at_server = server.read(&mut byte);
        assert!(
            matches!(&at_client, Err(err) if err.kind() == ErrorKind::ConnectionReset),
            "{at_client:?}"
        );
        assert!(
            matches!(&at_server, Err(err) if err.kind() == ErrorKind::ConnectionReset),
            "{at_server:?}"
        );
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    });
    assert_eq!(lab.counters().errors, 1);
}

#[test]
fn original_destination_is_reported_to_the_context_source() {
    if !privileged() {
        return;
    }
    // The context source sees where the client was going and which request
    // of the connection this is; exercised through a source of its own.
    use agent::proxy::{ProxiedRequest, TraceContextSource};
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recording(Mutex<Vec<(SocketAddr, u64, String, String)>>);

    impl TraceContextSource for Recording {
        fn context_for<'a>(
            &'a self,
            request: &'a ProxiedRequest,
        ) -> Pin<Box<dyn Future<Output = TraceParent> + Send + 'a>> {
            self.0.lock().unwrap().push((
                request.original_destination,
                request.index,
                request.method.clone(),
                request.target.clone(),
            ));
            Box::pin(async { TraceParent::parse(VALID.as_bytes()).unwrap() })
        }
    }

    let netns = Netns::new();
    let recording = Arc::new(Recording::default());
    let source: Arc<dyn TraceContextSource> = recording.clone();
    thread::scope(|scope| {
        scope
            .spawn(|| {
                netns.enter();
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let proxy = Proxy::bind(test_settings()).unwrap();
                    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
                    let client = tokio::task::spawn_blocking(move || {
                        let listener = TcpListener::bind("127.0.0.1:20103").unwrap();
                        let mut client = Client::connect("127.0.0.1:20103");
                        client.send(b"GET /a HTTP/1.1\r\n\r\nPUT /b?c HTTP/1.1\r\n\r\n");
                        let mut server = accept(&listener);
                        let mut received = Vec::new();
                        let mut chunk = [0; 1024];
                        while received.windows(4).filter(|w| w == b"\r\n\r\n").count() < 2 {
                            let n = server.read(&mut chunk).unwrap();
                            assert!(n > 0);
                            received.extend_from_slice(&chunk[..n]);
                        }
                        let _ = done_tx.send(());
                        String::from_utf8(received).unwrap()
                    });
                    let stats = proxy
                        .run(source, async {
                            let _ = done_rx.await;
                        })
                        .await
                        .unwrap();
                    let received = client.await.unwrap();
                    assert_eq!(
                        received,
                        format!(
                            "GET /a HTTP/1.1\r\ntraceparent: {VALID}\r\n\r\n\
                             PUT /b?c HTTP/1.1\r\ntraceparent: {VALID}\r\n\r\n"
                        )
                    );
                    assert_eq!(stats.snapshot().requests_injected, 2);
                });
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    });
    let destination: SocketAddr = "127.0.0.1:20103".parse().unwrap();
    assert_eq!(
        *recording.0.lock().unwrap(),
        [
            (destination, 0, "GET".to_owned(), "/a".to_owned()),
            (destination, 1, "PUT".to_owned(), "/b?c".to_owned()),
        ]
    );
}
