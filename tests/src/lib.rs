//! Harness for the privileged integration tests: one capture shared by all
//! tests of a test binary, real servers and clients started as child
//! processes, and helpers to pick one connection's events out of everything
//! the node does.
//!
//! The test process is the agent here (the capture excludes its own pid), so
//! every server and client a test drives is a separate process.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use agent::capture::{Capture, CaptureEvent, Connection, Direction, Message, ProbeSettings};

pub use agent::capture;

pub mod acceptance;
pub mod agent_process;
pub mod cgroup;
pub mod chains;
pub mod links;
pub mod live;
pub mod netns;
pub mod otlp_receiver;

/// Fixture scripts, embedded so the test binaries carry them into the VM.
pub mod fixtures {
    /// A raw HTTP/1.1 server that records the exact bytes it receives and sends.
    pub const RECORDING_SERVER: &str = include_str!("../fixtures/recording_server.py");
    /// A binary (non-HTTP) echo server and client.
    pub const BINARY_ECHO: &str = include_str!("../fixtures/binary_echo.py");
    /// A client that keeps one connection open across a signal.
    pub const SLOW_CLIENT: &str = include_str!("../fixtures/slow_client.py");
    /// A client that sends three requests in one write.
    pub const PIPELINING_CLIENT: &str = include_str!("../fixtures/pipelining_client.py");
    /// An HTTP/1.1 server that prints each request's exact head (and its
    /// body's length and SHA-256) as a JSON line; it also tunnels after
    /// CONNECT and WebSocket upgrades.
    pub const REQUEST_RECORDER: &str = include_str!("../fixtures/request_recorder.py");
    /// A bulk non-HTTP stream whose sink and source both hash what they move.
    pub const HASHING_STREAM: &str = include_str!("../fixtures/hashing_stream.py");
    /// The backend and the python frontends (thread per request, asyncio)
    /// of the parent-link tests.
    pub const LINK_SERVICE_PY: &str = include_str!("../fixtures/link_service.py");
    /// The Node.js frontend of the parent-link tests.
    pub const LINK_SERVICE_JS: &str = include_str!("../fixtures/link_service.js");
    /// The Go net/http frontend of the parent-link tests (built by the test).
    pub const LINK_SERVICE_GO: &str = include_str!("../fixtures/link_service.go");
    /// FastAPI on uvicorn (plain asyncio loop or uvloop; `async def` or
    /// `def` endpoint) as a frontend of the parent-link tests.
    pub const ASGI_SERVICE_PY: &str = include_str!("../fixtures/asgi_service.py");
    /// aiohttp as a frontend of the parent-link tests.
    pub const AIOHTTP_SERVICE_PY: &str = include_str!("../fixtures/aiohttp_service.py");
}

/// Whether privileged tests can run here. Outside CI a non-root run skips
/// with a message; under `CI=true` it is a failure, so CI can never pass
/// with the privileged tests silently skipped.
pub fn privileged() -> bool {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("privileged test cannot run: not root, and CI=true forbids skipping");
    }
    eprintln!("SKIPPED: privileged test needs root");
    false
}

/// Events seen so far by the shared capture, with a condition variable to
/// wait for more.
struct EventLog {
    events: Mutex<KeptEvents>,
}

/// The events kept, and how many older ones were dropped to keep them
/// bounded (so that positions in the whole stream stay meaningful).
#[derive(Default)]
struct KeptEvents {
    events: Vec<CaptureEvent<'static>>,
    dropped: usize,
}

/// Ports the tests of this binary use (see [`free_port`]): the shared
/// capture keeps only their events, so a busy machine or a load test
/// cannot crowd them out.
static WATCHED_PORTS: Mutex<Vec<u16>> = Mutex::new(Vec::new());

fn watched(event: &CaptureEvent) -> bool {
    // Python context records name no connection; they come only from the
    // Python processes on this machine that moved HTTP, and
    // `wait_for_ports` keeps those of the processes it returns.
    let Some(c) = event.connection() else {
        return true;
    };
    let ports = WATCHED_PORTS.lock().unwrap();
    ports.contains(&c.local.port()) || ports.contains(&c.remote.port())
}

/// Events kept at most; the oldest half goes when full (a busy node must
/// not make a test binary grow without bound).
const MAX_KEPT_EVENTS: usize = 200_000;

/// The capture shared by every test in this binary. Started on first use,
/// on its own thread and runtime, and kept until the process exits.
pub struct SharedCapture {
    log: Arc<EventLog>,
    capture: Arc<Capture>,
}

static SHARED: OnceLock<SharedCapture> = OnceLock::new();

/// Starts (once) and returns the shared capture.
pub fn capture() -> &'static SharedCapture {
    SHARED.get_or_init(|| {
        // The agent's log (the Python watcher's, the probes'), with RUST_LOG.
        let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off"))
            .is_test(true)
            .try_init();
        let log = Arc::new(EventLog {
            events: Mutex::new(KeptEvents::default()),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_log = log.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let (capture, mut reader) = match Capture::start(ProbeSettings::default()) {
                    Ok(started) => started,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return;
                    }
                };
                let capture = Arc::new(capture);
                let _ = ready_tx.send(Ok(capture.clone()));
                let mut batch = Vec::new();
                // Filtered before taking the log's lock: `watched` takes
                // the ports' lock, never while the log's is held.
                while reader
                    .read(|event| {
                        if watched(&event) {
                            batch.push(event.into_owned());
                        }
                    })
                    .await
                    .is_ok()
                {
                    let mut kept = thread_log.events.lock().unwrap();
                    for event in batch.drain(..) {
                        if kept.events.len() >= MAX_KEPT_EVENTS {
                            kept.events.drain(..MAX_KEPT_EVENTS / 2);
                            kept.dropped += MAX_KEPT_EVENTS / 2;
                        }
                        kept.events.push(event);
                    }
                }
                drop(capture);
            });
        });
        match ready_rx.recv() {
            Ok(Ok(capture)) => SharedCapture { log, capture },
            Ok(Err(e)) => panic!("the capture did not start: {e}"),
            Err(_) => panic!("the capture thread died while starting"),
        }
    })
}

impl SharedCapture {
    /// Waits (at most `timeout`) until the capture reads the contexts of
    /// Python process `pid`; how long that took, or None.
    pub fn wait_python_watched(&self, pid: u32, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        loop {
            if self.capture.is_python_watched(pid) {
                return Some(start.elapsed());
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The capture's counters (kernel and user space), by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.capture.counters().unwrap_or_default()
    }

    /// Client requests to `ports` wake the capture's reader at once, as
    /// `agent run` sets for its proxy's ports (the proxy waits for them).
    pub fn wake_on_requests_to(&self, ports: &[u16]) {
        self.capture
            .wake_on_requests_to(ports)
            .expect("setting the capture's wake-up ports");
    }

    /// The events kept from position `from` of the whole stream on (all
    /// of them, not only those of some ports), and the position after the
    /// last: for a consumer that follows the capture as it goes (see
    /// [`live`]). Events dropped to keep the log bounded are skipped.
    pub fn events_since(&self, from: usize) -> (Vec<CaptureEvent<'static>>, usize) {
        let kept = self.log.events.lock().unwrap();
        let start = from.saturating_sub(kept.dropped).min(kept.events.len());
        (
            kept.events[start..].to_vec(),
            kept.dropped + kept.events.len(),
        )
    }

    /// Waits until `done` holds for the events touching `port` (as local or
    /// remote port), or the timeout passes. Returns those events either way.
    pub fn wait_for_port(
        &self,
        port: u16,
        timeout: Duration,
        done: impl Fn(&[CaptureEvent]) -> bool,
    ) -> Vec<CaptureEvent<'static>> {
        self.wait_for_ports(&[port], timeout, done)
    }

    /// [`Self::wait_for_port`] for the events touching any of `ports`, in
    /// capture order (a service's inbound and outbound connections).
    pub fn wait_for_ports(
        &self,
        ports: &[u16],
        timeout: Duration,
        done: impl Fn(&[CaptureEvent]) -> bool,
    ) -> Vec<CaptureEvent<'static>> {
        let deadline = Instant::now() + timeout;
        loop {
            let matching: Vec<CaptureEvent<'static>> = {
                let kept = self.log.events.lock().unwrap();
                let events = &kept.events;
                let touches = |e: &CaptureEvent| {
                    e.connection()
                        .is_some_and(|c| ports.iter().any(|&p| touches_port(c, p)))
                };
                // The Python context records of the processes whose
                // connections match, in their place among the others.
                let pids: std::collections::HashSet<u32> = events
                    .iter()
                    .filter(|e| touches(e))
                    .map(|e| e.pid())
                    .collect();
                events
                    .iter()
                    .filter(|e| touches(e) || (e.connection().is_none() && pids.contains(&e.pid())))
                    .cloned()
                    .collect()
            };
            let now = Instant::now();
            if done(&matching) || now >= deadline {
                return matching;
            }
            // Checking can be costly (tests correlate all the events): at
            // most every 50 ms, not on every event.
            std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
        }
    }

    /// The events touching `port` once no new one has arrived for `quiet`
    /// (at most `timeout` in all): for asserting that something did *not*
    /// happen, or that nothing more came.
    pub fn settle_port(
        &self,
        port: u16,
        quiet: Duration,
        timeout: Duration,
    ) -> Vec<CaptureEvent<'static>> {
        let deadline = Instant::now() + timeout;
        let mut last = usize::MAX;
        loop {
            let now = self.wait_for_port(port, Duration::ZERO, |_| true);
            if now.len() == last || Instant::now() >= deadline {
                return now;
            }
            last = now.len();
            std::thread::sleep(quiet);
        }
    }
}

fn touches_port(c: &Connection, port: u16) -> bool {
    c.local.port() == port || c.remote.port() == port
}

/// The data messages among `events`, in capture order.
pub fn messages<'a>(events: &'a [CaptureEvent<'a>]) -> Vec<&'a Message<'a>> {
    events
        .iter()
        .filter_map(|e| match e {
            CaptureEvent::Data(m) => Some(m),
            _ => None,
        })
        .collect()
}

/// Checks that the messages a process moved in one direction are exactly
/// `expected`: their lengths add up to it, and each message's copied bytes
/// (a prefix when the kernel truncated it) match `expected` at that offset.
/// Returns a description of the first difference.
pub fn stream_mismatch(
    events: &[CaptureEvent],
    pid: u32,
    direction: Direction,
    expected: &[u8],
) -> Option<String> {
    let mut offset = 0usize;
    for m in messages(events)
        .into_iter()
        .filter(|m| m.connection.pid == pid && m.direction == direction)
    {
        let end = offset + m.bytes.len();
        match expected.get(offset..end) {
            Some(want) if want == &m.bytes[..] => {}
            Some(want) => {
                let at = want
                    .iter()
                    .zip(m.bytes.iter())
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Some(format!(
                    "pid {pid} {direction:?}: message at stream offset {offset} differs at byte {at}: {:?} vs expected {:?}",
                    preview(&m.bytes[at..]),
                    preview(&want[at..])
                ));
            }
            None => {
                return Some(format!(
                    "pid {pid} {direction:?}: {} bytes captured past the {} expected",
                    end - expected.len().min(end),
                    expected.len()
                ));
            }
        }
        offset += m.len as usize;
    }
    (offset != expected.len()).then(|| {
        format!(
            "pid {pid} {direction:?}: {offset} bytes moved, {} expected",
            expected.len()
        )
    })
}

/// The first bytes of `b`, readable.
pub fn preview(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned()
}

/// The concatenated bytes a process with `pid` moved in `direction`.
pub fn bytes_of(events: &[CaptureEvent], pid: u32, direction: Direction) -> Vec<u8> {
    messages(events)
        .into_iter()
        .filter(|m| m.connection.pid == pid && m.direction == direction)
        .flat_map(|m| m.bytes.iter().copied())
        .collect()
}

/// Total bytes (copied or not) a process with `pid` moved in `direction`.
pub fn moved_len(events: &[CaptureEvent], pid: u32, direction: Direction) -> u64 {
    messages(events)
        .into_iter()
        .filter(|m| m.connection.pid == pid && m.direction == direction)
        .map(|m| m.len as u64)
        .sum()
}

/// The spans the agent's correlate stage makes of `events`, sampling at
/// `percentage` (parent-based), with resources from this machine's /proc.
pub fn spans_of(events: &[CaptureEvent], percentage: f64) -> Vec<agent::span::Span> {
    use agent::correlate::{Correlator, ProcessFilter, ProcessTable, SpanSettings};
    let sampler = agent::sampling::Sampler::new(percentage, true).unwrap();
    let mut correlator = Correlator::new(
        sampler,
        SpanSettings::default(),
        ProcessTable::new("/proc", ProcessFilter::default()),
    );
    let mut spans = Vec::new();
    for event in events {
        correlator.handle(event, &mut spans);
    }
    correlator.finish(&mut spans);
    assert_span_ids_unique(&spans);
    spans
}

/// No two spans share an id, except spans that both took theirs from a
/// `traceparent` the application sent (decision `wire`; a test may send the
/// same one twice). Every trace the tests build goes through this.
pub fn assert_span_ids_unique(spans: &[agent::span::Span]) {
    use agent::correlate::PARENT_DECISION_ATTRIBUTE;
    let mut seen: std::collections::HashMap<agent::span::SpanId, &agent::span::Span> =
        std::collections::HashMap::new();
    for span in spans {
        if let Some(other) = seen.insert(span.span_id, span) {
            let from_wire = |s: &agent::span::Span| {
                s.attribute(PARENT_DECISION_ATTRIBUTE).as_deref() == Some("wire")
            };
            assert!(
                from_wire(span) && from_wire(other),
                "two spans share the id {:?}: {other:#?} and {span:#?}",
                span.span_id
            );
        }
    }
}

/// Whether the tests run inside the qemu VMs, where emulation is slow and
/// load tests use fewer requests.
pub fn in_vm() -> bool {
    std::env::var_os("AGENT_IN_VM").is_some()
}

/// Answers every request with `traced` or `direct`, by whether its head
/// carried a traceparent (did it come through the proxy?); a thread per
/// connection (some stay idle), until the process ends.
pub fn serve_traced_or_direct(listener: TcpListener) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || answer_traced_or_direct(stream));
        }
    });
}

fn answer_traced_or_direct(mut stream: TcpStream) {
    use std::io::{Read, Write};
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let traced = String::from_utf8_lossy(&head)
        .to_ascii_lowercase()
        .contains("\r\ntraceparent:");
    let body = if traced { "traced" } else { "direct" };
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A free TCP port on loopback (the listener is closed again at once),
/// watched by the shared capture from now on.
pub fn free_port() -> u16 {
    let mut watched = WATCHED_PORTS.lock().unwrap();
    // The kernel may hand the port just released out again: never give one
    // twice, since tests take several in a row.
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !watched.contains(&port) {
            watched.push(port);
            return port;
        }
    }
}

/// A child process that is killed when dropped, so a failing test leaves
/// no server behind.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits (at most `timeout`) for the child to exit and returns its stdout.
    pub fn wait_stdout(mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while self.0.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "child {} still running after {timeout:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        if let Some(mut stdout) = self.0.stdout.take() {
            std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
        }
        out
    }

    /// Reads one line of the child's stdout (blocking until it comes).
    pub fn read_line(&mut self) -> String {
        let stdout = self.0.stdout.as_mut().expect("stdout is piped");
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while std::io::Read::read(stdout, &mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        String::from_utf8_lossy(&line).into_owned()
    }

    /// The child's stdout as lines, read on a thread of their own so that a
    /// test can wait for the next one with a deadline (`recv_timeout`).
    pub fn stdout_lines(&mut self) -> std::sync::mpsc::Receiver<String> {
        use std::io::BufRead;
        let stdout = self.0.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Writes one line to the child's stdin.
    pub fn write_line(&mut self, line: &str) {
        let stdin = self.0.stdin.as_mut().expect("stdin is piped");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for ChildGuard {
    /// SIGTERM first, so servers with workers (nginx) take them down too;
    /// SIGKILL after a bounded wait.
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (bounded) until something accepts connections at `addr`. The
/// probe connection comes from the test process, which the capture ignores.
pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens at {addr} after 20 s");
}

/// A fresh scratch directory, removed when dropped.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// Creates `/tmp/agent-test-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("agent-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(contents))
            .unwrap();
        path
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts nginx in `dir`, listening on 127.0.0.1:`port`, serving
/// `dir`/www, logging requests to `dir`/access.log. `http_directives` go
/// into its `http` block. Waits until it accepts connections.
pub fn start_nginx(dir: &ScratchDir, port: u16, workers: u32, http_directives: &str) -> ChildGuard {
    let root = dir.path().display();
    let conf = dir.write(
        "nginx.conf",
        format!(
            "daemon off;\nworker_processes {workers};\npid {root}/nginx.pid;\nerror_log {root}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {root}/access.log;\n  client_body_temp_path {root}/body;\n\
             proxy_temp_path {root}/proxy;\n  fastcgi_temp_path {root}/fastcgi;\n  uwsgi_temp_path {root}/uwsgi;\n\
             scgi_temp_path {root}/scgi;\n  {http_directives}\n\
             server {{ listen 127.0.0.1:{port}; root {root}/www; }}\n}}\n"
        )
        .as_bytes(),
    );
    let nginx = ChildGuard(
        Command::new("nginx")
            .args([
                "-c",
                conf.to_str().unwrap(),
                "-p",
                dir.path().to_str().unwrap(),
            ])
            .spawn()
            .expect("nginx must be installed (cargo xtask setup)"),
    );
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap());
    nginx
}

/// Starts a Python fixture script with arguments.
pub fn start_python(
    dir: &ScratchDir,
    script_name: &str,
    script: &str,
    args: &[&str],
) -> ChildGuard {
    start_script(
        Command::new("/usr/bin/python3"),
        dir.write(script_name, script.as_bytes()),
        args,
    )
}

/// Runs `interpreter script args`, stdin and stdout piped.
fn start_script(mut interpreter: Command, script: PathBuf, args: &[&str]) -> ChildGuard {
    let child = interpreter
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the interpreter is installed (cargo xtask setup)");
    ChildGuard(child)
}

/// The tests' venv's interpreter (FastAPI, uvicorn, uvloop, aiohttp, httpx;
/// made by `cargo xtask setup`, whose `TEST_VENV_PYTHON` this must match).
pub const TEST_VENV_PYTHON: &str = "/opt/agent-tests/venv/bin/python";

/// Starts a Python fixture script under the tests' venv.
pub fn start_venv_python(
    dir: &ScratchDir,
    script_name: &str,
    script: &str,
    args: &[&str],
) -> ChildGuard {
    start_script(
        Command::new(TEST_VENV_PYTHON),
        dir.write(script_name, script.as_bytes()),
        args,
    )
}

/// Runs curl to completion and returns its pid and stdout. Fails the test
/// if curl fails.
pub fn curl(args: &[&str]) -> (u32, Vec<u8>) {
    run_curl(Command::new("curl"), Duration::from_secs(20), args)
}

/// Runs `command` (curl, or a wrapper that runs it, such as
/// [`netns::exec`]`(ns, "curl")`) with `args`, allowing it `max_time`, and
/// returns its pid and stdout. Fails the test if curl fails.
pub fn run_curl(mut command: Command, max_time: Duration, args: &[&str]) -> (u32, Vec<u8>) {
    let child = command
        .args(["--silent", "--show-error", "--max-time"])
        .arg(max_time.as_secs().max(1).to_string())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl must be installed (cargo xtask setup)");
    let pid = child.id();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (pid, output.stdout)
}

/// Index of the first occurrence of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
