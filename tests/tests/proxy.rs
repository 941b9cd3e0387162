//! Privileged: the transparent proxy on real sockets, with the agent's own
//! REDIRECT rules, driven by real clients (curl, raw sockets, python) and
//! servers (a python server that reports the exact head bytes it receives,
//! raw sockets).
//!
//! Each case runs in node mode, and some in host mode as well (the test
//! names end in `::node` and `::host`):
//! - node mode: a [`Topology`] with pods `pod-a` (the client) and `pod-b`
//!   (the server), each joined to the root namespace by a veth pair like
//!   pods on a node; the proxy runs in the root namespace (in this process)
//!   with its node-mode PREROUTING rules, restricted to pod-a's veth and
//!   this test's server port, so a parallel test's traffic is never caught;
//! - host mode: one fresh namespace holding the proxy, its host-mode OUTPUT
//!   rules, the client and the server, which talk over its loopback.
//!
//! Every test has its own namespaces, server port, proxy port and chain
//! prefix, so tests run in parallel; guards remove the rules and the
//! namespaces however a test ends. The VMs do not run these (the proxy's
//! own logic; `proxy_rules`, `proxy_spans` and `fail_open` check what the
//! kernel does for it under each kernel).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use agent::config::ProxyConfig;
use agent::proxy::rules::RedirectRules;
use agent::proxy::{
    ProxyCounters, ProxyMode, ProxySettings, ProxyStats, RunningProxy, StandaloneContexts,
    TraceContextSource,
};
use agent::tracecontext::TraceParent;
use tests::chains::{remove_stale_chains, unique_chain_prefix};
use tests::netns::{Netns, Topology, run_in};
use tests::{ChildGuard, ScratchDir, fixtures, free_port, run_curl};

/// Longest any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(30);

/// Tag of this binary's chain prefixes (see `tests::chains`).
const CHAIN_TAG: &str = "P";

/// A traceparent the proxy must leave alone.
const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Where the proxy intercepts connections (`proxy.mode`), and so where a
/// test puts its client and server.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Client in pod-a, server in pod-b, proxy and rules in the root
    /// namespace.
    Node,
    /// Proxy, rules, client and server in one namespace, on loopback.
    Host,
}

/// The namespaces a lab made; removed when dropped.
enum Places {
    /// pod-a (client) and pod-b (server).
    Node(Topology),
    /// The one namespace of host mode.
    Host(Netns),
}

/// A proxy serving one test, with its rules installed, and the namespaces
/// its traffic runs in. Dropping it stops the proxy, which removes the
/// rules, then removes the namespaces.
struct Lab {
    /// The redirected destination port: servers listen on it.
    port: u16,
    /// The port the proxy listens on.
    listen_port: u16,
    stats: Arc<ProxyStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The proxy's thread; its result says whether the rules came off.
    proxy: Option<thread::JoinHandle<Result<(), String>>>,
    // Last: the namespaces go once the proxy and its rules are gone.
    places: Places,
}

/// Settings of most tests: a long idle timeout (nothing here idles that
/// long by design) and a short shutdown grace, so that a lab stops quickly.
fn test_settings() -> ProxySettings {
    ProxySettings {
        idle_timeout: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(1),
        ..ProxySettings::default()
    }
}

impl Lab {
    /// A lab in `mode` with [`test_settings`] and new random contexts.
    fn start(mode: Mode) -> Lab {
        Lab::with(mode, test_settings(), Arc::new(StandaloneContexts::new()))
    }

    /// Builds the namespaces, then starts the proxy with `settings` (its
    /// listen addresses replaced by a free port) and its own rules for
    /// `mode`, injecting contexts from `contexts`.
    fn with(mode: Mode, settings: ProxySettings, contexts: Arc<dyn TraceContextSource>) -> Lab {
        let port = free_port();
        let listen_port = free_port();
        let places = match mode {
            Mode::Node => {
                Places::Node(Topology::new(&["pod-a", "pod-b"]).expect("building the pods"))
            }
            Mode::Host => Places::Host(Netns::new("proxy-host").expect("creating the namespace")),
        };
        let config = ProxyConfig {
            enabled: true,
            listen_port,
            mode: match mode {
                Mode::Node => ProxyMode::Node,
                Mode::Host => ProxyMode::Host,
            },
            ports: vec![port],
            // Only this lab's client pod: a parallel test's pods are not
            // redirected to this proxy.
            pod_interfaces: match &places {
                Places::Node(topology) => vec![pod(topology, "pod-a").veth.clone()],
                Places::Host(_) => Vec::new(),
            },
            ..ProxyConfig::default()
        };
        let rules = RedirectRules {
            chain_prefix: unique_chain_prefix(CHAIN_TAG),
            ..config.redirect_rules()
        };
        let settings = ProxySettings {
            listen: config.proxy_settings().listen,
            ..settings
        };
        // The rules code runs iptables in the namespace of the thread that
        // calls it: in host mode the proxy's runtime (and so every thread
        // it starts) lives in the lab's namespace.
        let namespace = match &places {
            Places::Node(_) => {
                static STALE: Once = Once::new();
                STALE.call_once(|| remove_stale_chains(CHAIN_TAG));
                None
            }
            Places::Host(netns) => Some(netns.name().to_owned()),
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let proxy = thread::spawn(move || {
            let serve = move || serve_proxy(settings, rules, contexts, ready_tx, stop_rx);
            match namespace {
                Some(name) => run_in(&name, serve).map_err(|e| format!("entering {name}: {e}"))?,
                None => serve(),
            }
        });
        let started = ready_rx.recv_timeout(WAIT);
        let mut lab = Lab {
            port,
            listen_port,
            stats: Arc::new(ProxyStats::default()),
            stop: Some(stop_tx),
            proxy: Some(proxy),
            places,
        };
        match started {
            Ok(Ok(stats)) => lab.stats = stats,
            Ok(Err(e)) => panic!("the proxy did not start: {e}"),
            Err(_) => {
                let proxy = lab.proxy.take().unwrap();
                drop(lab.stop.take());
                match proxy.join() {
                    Err(panic) => std::panic::resume_unwind(panic),
                    Ok(result) => panic!("the proxy did not start in time: {result:?}"),
                }
            }
        }
        lab
    }

    /// The namespace the client runs in.
    fn client_ns(&self) -> &Netns {
        match &self.places {
            Places::Node(topology) => pod(topology, "pod-a").namespace(),
            Places::Host(netns) => netns,
        }
    }

    /// The namespace the server runs in.
    fn server_ns(&self) -> &Netns {
        match &self.places {
            Places::Node(topology) => pod(topology, "pod-b").namespace(),
            Places::Host(netns) => netns,
        }
    }

    /// The server's IPv4 address: pod-b's, or loopback in host mode.
    fn server_ip(&self) -> IpAddr {
        match &self.places {
            Places::Node(topology) => pod(topology, "pod-b").ipv4.into(),
            Places::Host(_) => Ipv4Addr::LOCALHOST.into(),
        }
    }

    /// The server's IPv6 address. Both the host and the VM kernels have
    /// IPv6, so its absence fails the test rather than skipping it.
    fn server_ip_v6(&self) -> IpAddr {
        match &self.places {
            Places::Node(topology) => pod(topology, "pod-b")
                .ipv6
                .expect("pod-b has an IPv6 address (the kernel has IPv6)")
                .into(),
            Places::Host(_) => Ipv6Addr::LOCALHOST.into(),
        }
    }

    /// Where clients connect: the server on the redirected port.
    fn target(&self) -> SocketAddr {
        SocketAddr::new(self.server_ip(), self.port)
    }

    /// The proxy's own address as the client reaches it without a
    /// redirect: pod-a's gateway (the root end of its veth), or loopback.
    fn proxy_addr(&self) -> SocketAddr {
        let ip: IpAddr = match &self.places {
            Places::Node(topology) => pod(topology, "pod-a").gateway_v4.into(),
            Places::Host(_) => Ipv4Addr::LOCALHOST.into(),
        };
        SocketAddr::new(ip, self.listen_port)
    }

    /// The proxy's counters now.
    fn counters(&self) -> ProxyCounters {
        self.stats.snapshot()
    }

    /// Runs `f` on a thread in the client's namespace (sockets it opens
    /// stay there when handed back).
    fn on_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.client_ns()
            .run(f)
            .expect("entering the client namespace")
    }

    /// Runs `f` on a thread in the server's namespace.
    fn on_server<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.server_ns()
            .run(f)
            .expect("entering the server namespace")
    }

    /// A listener on the server side at [`Lab::target`].
    fn listen(&self) -> TcpListener {
        let addr = self.target();
        self.on_server(|| TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")))
    }

    /// A client connection to [`Lab::target`], from the client side.
    fn connect(&self) -> Client {
        self.connect_to(self.target())
    }

    /// A client connection to `addr`, from the client side.
    fn connect_to(&self, addr: SocketAddr) -> Client {
        self.on_client(|| Client::connect(addr))
    }

    /// curl run on the client side with `--fail` and `args`; its stdout.
    fn curl(&self, args: &[&str]) -> Vec<u8> {
        let mut all = vec!["--fail"];
        all.extend_from_slice(args);
        run_curl(
            self.client_ns().exec("curl"),
            Duration::from_secs(120),
            &all,
        )
        .1
    }

    /// Starts the request recorder on the server side at `ip`, on the
    /// redirected port, and waits until it listens.
    fn recorder_at(&self, ip: IpAddr) -> Recorder {
        let mut child = self
            .server_ns()
            .spawn(
                "/usr/bin/python3",
                &[
                    "-c",
                    fixtures::REQUEST_RECORDER,
                    &ip.to_string(),
                    &self.port.to_string(),
                ],
            )
            .expect("python3");
        let lines = child.stdout_lines();
        let ready = lines.recv_timeout(WAIT).expect("the recorder starts");
        assert_eq!(ready, "READY");
        Recorder {
            _child: child,
            lines,
        }
    }

    /// The request recorder at [`Lab::target`].
    fn recorder(&self) -> Recorder {
        self.recorder_at(self.server_ip())
    }
}

impl Lab {
    /// Stops the proxy (its rules removed, its connections drained) and
    /// returns its final counters: nothing the proxy still does can change
    /// them after that.
    fn finish(mut self) -> ProxyCounters {
        self.stop_proxy();
        self.counters()
    }

    /// Stops the proxy, if it still runs, and waits for its thread; fails
    /// the test if the rules could not be removed (unless it fails anyway).
    fn stop_proxy(&mut self) {
        drop(self.stop.take());
        let Some(proxy) = self.proxy.take() else {
            return;
        };
        // Bounded by the shutdown grace plus the rules' removal.
        let outcome = match proxy.join() {
            Ok(result) => result,
            Err(_) => Err("the proxy thread panicked".to_owned()),
        };
        if let Err(e) = outcome {
            if thread::panicking() {
                eprintln!("stopping the proxy: {e}");
            } else {
                panic!("stopping the proxy: {e}");
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_proxy();
    }
}

/// The pod of `topology` called `name`.
fn pod<'a>(topology: &'a Topology, name: &str) -> &'a tests::netns::Pod {
    topology.pod(name).expect("the lab's pods")
}

/// The proxy's thread: starts it with its rules, reports its counters on
/// `ready` (or why it did not start), serves until `stop` fires or is
/// dropped, then removes the rules and drains the proxy.
fn serve_proxy(
    settings: ProxySettings,
    rules: RedirectRules,
    contexts: Arc<dyn TraceContextSource>,
    ready: mpsc::Sender<Result<Arc<ProxyStats>, String>>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async {
        let proxy = match RunningProxy::start(settings, Some(rules), contexts).await {
            Ok(proxy) => proxy,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return Ok(());
            }
        };
        let _ = ready.send(Ok(proxy.stats()));
        let _ = stop.await;
        proxy
            .stop()
            .await
            .map(drop)
            .map_err(|e| format!("removing the rules: {e}"))
    })
}

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

/// The running request recorder (`tests/fixtures/request_recorder.py`).
struct Recorder {
    _child: ChildGuard,
    lines: mpsc::Receiver<String>,
}

impl Recorder {
    /// The next request it saw, waiting at most [`WAIT`].
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
    fn connect(addr: SocketAddr) -> Client {
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
        let n = read_some(&mut self.stream, &mut chunk).expect("read");
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

/// One `read`, repeated when a signal interrupts it.
///
/// The sockets here have read timeouts, and a blocking socket read with a
/// timeout is never restarted after a signal (signal(7)). Signals do come:
/// while a thread spawns a process, glibc's posix_spawn blocks every signal
/// in it, so the SIGCHLD of a child that exits meanwhile is queued instead
/// of dropped, and it interrupts whichever thread takes it, say one of
/// another test's reads. That is the harness, not the proxy, so it is
/// retried; std's `read_exact` and `write_all` do the same.
fn read_some(stream: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            result => return result,
        }
    }
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
        let n = read_some(&mut stream, &mut chunk).unwrap();
        if n == 0 {
            break;
        }
        stream.write_all(&chunk[..n]).unwrap();
    }
    stream.shutdown(Shutdown::Write).unwrap();
}

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

/// SHA-256 of `data` in hex, by python (no hashing crate in this build).
fn sha256_of(data: &[u8]) -> String {
    let mut child = Command::new("/usr/bin/python3")
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

/// Size of each bulk transfer.
fn bulk_bytes() -> usize {
    200 << 20
}

/// Declares the tests: for each case, a module of that name with one
/// `#[test]` per listed mode (`node`, `host`) that runs the case in that
/// mode as root.
macro_rules! cases {
    ($($case:ident: $($mode:ident),+;)+) => {$(
        mod $case {
            $(
                #[test]
                fn $mode() {
                    if tests::privileged() {
                        super::$case(cases!(@mode $mode));
                    }
                }
            )+
        }
    )+};
    (@mode node) => { super::Mode::Node };
    (@mode host) => { super::Mode::Host };
}

cases! {
    curl_request_arrives_with_a_valid_traceparent: node, host;
    valid_traceparent_passes_byte_for_byte: node, host;
    other_header_bytes_arrive_identical: node, host;
    keep_alive_connection_carries_20_requests: node, host;
    three_pipelined_requests_in_one_write: node;
    chunked_upload_with_trailers: node;
    expect_100_continue_upload: node;
    websocket_upgrade_then_binary_frames_both_ways: node;
    connect_tunnel_is_not_interpreted: node;
    binary_echo_is_opaque_and_half_closes: node, host;
    tls_client_hello_is_opaque: node;
    server_first_protocol_is_opaque: node;
    client_silent_at_first_still_gets_a_traceparent: node, host;
    unfinished_request_line_is_relayed_after_the_detect_timeout: node;
    http_upload_of_200_mb_arrives_intact: node;
    opaque_stream_of_200_mb_arrives_intact: node;
    thousand_concurrent_connections_complete: node;
    ipv6_requests_get_a_traceparent: node;
    connection_that_was_not_redirected_is_closed: node;
    unreachable_destination_resets_the_client: node;
    client_reset_reaches_the_server: node;
    server_reset_after_an_http_request_reaches_the_client: node, host;
    server_that_never_answers_is_reset_at_the_idle_timeout: node;
    idle_connection_is_reset_on_both_sides: node;
    connection_open_at_shutdown_is_reset_after_the_grace: node;
    original_destination_is_reported_to_the_context_source: node;
}

fn curl_request_arrives_with_a_valid_traceparent(mode: Mode) {
    let lab = Lab::start(mode);
    let recorder = lab.recorder();
    let target = lab.target();
    let output = lab.curl(&[
        "-H",
        "X-Test:  kept  as is",
        &format!("http://{target}/hello?x=1"),
    ]);
    assert!(String::from_utf8_lossy(&output).contains("/hello?x=1"));
    let seen = recorder.next();
    let traceparent = seen.traceparent();
    assert_eq!(traceparent.flags, 0x03, "a new sampled, random trace");
    let head = seen.head_text();
    assert!(
        head.starts_with(&format!("GET /hello?x=1 HTTP/1.1\r\nHost: {target}\r\n")),
        "{head}"
    );
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

fn valid_traceparent_passes_byte_for_byte(mode: Mode) {
    let lab = Lab::start(mode);
    let recorder = lab.recorder();
    let head = format!(
        "GET /kept HTTP/1.1\r\nHost: x\r\nTraceParent:  {VALID} \r\ntracestate: a=1,b=2\r\n\r\n"
    );
    let mut client = lab.connect();
    client.send(head.as_bytes());
    let (status, _) = client.response();
    assert!(status.starts_with("HTTP/1.1 200"));
    assert_eq!(recorder.next().head, head.as_bytes());
    assert_eq!(lab.counters().requests_unchanged, 1);
    assert_eq!(lab.counters().requests_injected, 0);
}

fn other_header_bytes_arrive_identical(mode: Mode) {
    let lab = Lab::start(mode);
    let recorder = lab.recorder();
    // Odd case and spacing, repeats, obs-text, an obs-fold line, an
    // invalid traceparent and tracestates to be dropped.
    let sent = "POST  /odd  HTTP/1.1\r\nhOST: x\r\nX-Spaces:   a  b \t\r\ntraceparent: 00-bad\r\n\
                X-Fold: one\r\n two\r\nTraceState: a=1\r\nX-Rep: 1\r\nx-rep: 2\r\n\
                X-Latin: caf\u{e9}\r\nContent-Length: 3\r\ntracestate: b=2\r\n\r\nabc";
    let mut client = lab.connect();
    client.send(sent.as_bytes());
    let (status, body) = client.response();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(String::from_utf8(body).unwrap().contains("\"len\": 3"));
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

fn keep_alive_connection_carries_20_requests(mode: Mode) {
    let lab = Lab::start(mode);
    let recorder = lab.recorder();
    let mut client = lab.connect();
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

fn three_pipelined_requests_in_one_write(mode: Mode) {
    let lab = Lab::start(mode);
    let recorder = lab.recorder();
    let mut client = lab.connect();
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

fn chunked_upload_with_trailers(mode: Mode) {
    let lab = Lab::start(mode);
    let recorder = lab.recorder();
    // A chunk that looks like a request head must stay body.
    let inner = b"GET /not-a-request HTTP/1.1\r\n\r\n";
    let mut client = lab.connect();
    client.send(b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe");
    thread::sleep(Duration::from_millis(50));
    client.send(format!("llo\r\n{:x};ext=1\r\n", inner.len()).as_bytes());
    client.send(inner);
    client.send(b"\r\n0\r\nX-Checksum: abc\r\nX-More: 1\r\n\r\n");
    let (status, body) = client.response();
    assert!(status.starts_with("HTTP/1.1 200"));
    assert!(String::from_utf8(body).unwrap().contains("/chunked"));
    client.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n");
    client.response();
    let upload = recorder.next();
    upload.traceparent();
    assert_eq!(upload.body_len, 5 + inner.len() as u64);
    assert_eq!(upload.trailers, "X-Checksum: abc\r\nX-More: 1\r\n");
    let after = recorder.next();
    assert!(after.head_text().starts_with("GET /after "));
    after.traceparent();
    assert_eq!(lab.counters().requests_injected, 2);
}

fn expect_100_continue_upload(mode: Mode) {
    let lab = Lab::start(mode);
    let recorder = lab.recorder();
    let data = noise(2 * 1024 * 1024, 100);
    let dir = ScratchDir::new("proxy-100");
    let path = dir.write("body.bin", &data);
    let started = Instant::now();
    // curl waits up to 30 s for the 100 before sending the body anyway:
    // finishing well before that shows the 100 came through the proxy.
    let output = lab.curl(&[
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "30",
        "--data-binary",
        &format!("@{}", path.display()),
        &format!("http://{}/continue", lab.target()),
    ]);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(String::from_utf8_lossy(&output).contains(&format!("\"len\": {}", data.len())));
    let seen = recorder.next();
    seen.traceparent();
    assert_eq!(seen.fields("expect"), ["100-continue"]);
    assert_eq!(seen.body_len, data.len() as u64);
    assert_eq!(seen.body_sha256, sha256_of(&data));
}

fn websocket_upgrade_then_binary_frames_both_ways(mode: Mode) {
    let lab = Lab::start(mode);
    let recorder = lab.recorder();
    let mut client = lab.connect();
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
    let head = recorder.next();
    assert!(head.head_text().starts_with("HEAD /first "));
    let upgrade = recorder.next();
    upgrade.traceparent();
    assert_eq!(upgrade.fields("upgrade"), ["websocket"]);
    let counters = lab.counters();
    assert_eq!(counters.requests_injected, 2);
    assert_eq!((counters.fallbacks, counters.errors), (0, 0), "{counters}");
}

fn connect_tunnel_is_not_interpreted(mode: Mode) {
    let lab = Lab::start(mode);
    let recorder = lab.recorder();
    let mut client = lab.connect();
    client.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
    let (status, _) = client.response();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(client.read_exact(7), b"\x82\x05hello");
    let inner = b"GET /inside HTTP/1.1\r\nHost: x\r\n\r\n";
    client.send(inner);
    assert_eq!(client.read_exact(inner.len()), inner);
    recorder.next().traceparent();
    assert_eq!(lab.counters().requests_injected, 1);
}

fn binary_echo_is_opaque_and_half_closes(mode: Mode) {
    let lab = Lab::start(mode);
    let data = noise(1024 * 1024, 7);
    let listener = lab.listen();
    thread::scope(|scope| {
        scope.spawn(|| echo_one(&listener, b""));
        let mut client = lab.connect();
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
    let counters = lab.counters();
    assert_eq!(
        (counters.connections_opaque, counters.connections_http),
        (1, 0)
    );
    assert_eq!(counters.errors, 0);
}

fn tls_client_hello_is_opaque(mode: Mode) {
    let lab = Lab::start(mode);
    // A ClientHello record header and start, then bytes that would be a
    // request head if the connection were parsed.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xf4, 0x01, 0x00, 0x00, 0xf0, 0x03, 0x03,
    ];
    hello.extend(noise(32, 3));
    hello.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let listener = lab.listen();
    thread::scope(|scope| {
        scope.spawn(|| echo_one(&listener, b""));
        let mut client = lab.connect();
        client.send(&hello);
        client.stream.shutdown(Shutdown::Write).unwrap();
        assert_eq!(client.read_to_end(), hello);
    });
    assert_eq!(lab.counters().connections_opaque, 1);
    assert_eq!(lab.counters().requests_injected, 0);
}

fn server_first_protocol_is_opaque(mode: Mode) {
    let lab = Lab::start(mode);
    let listener = lab.listen();
    thread::scope(|scope| {
        scope.spawn(|| echo_one(&listener, b"220 ready\r\n"));
        let mut client = lab.connect();
        // The client waits for the banner before saying anything.
        assert_eq!(client.read_exact(11), b"220 ready\r\n");
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        client.send(request);
        assert_eq!(client.read_exact(request.len()), request);
        client.stream.shutdown(Shutdown::Write).unwrap();
        assert!(client.read_to_end().is_empty());
    });
    let counters = lab.counters();
    assert_eq!(counters.connections_opaque, 1);
    assert_eq!(counters.requests_injected, 0);
}

fn client_silent_at_first_still_gets_a_traceparent(mode: Mode) {
    let lab = Lab::start(mode);
    let recorder = lab.recorder();
    let mut client = lab.connect();
    // Longer than the 300 ms detect timeout, as a pooled connection opened
    // ahead of use: while nobody has said anything the proxy waits, so the
    // first request is still recognised and injected.
    thread::sleep(Duration::from_millis(800));
    client.send(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _) = client.response();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    recorder.next().traceparent();
    let counters = lab.counters();
    assert_eq!(counters.connections_http, 1, "{counters}");
    assert_eq!(counters.requests_injected, 1, "{counters}");
}

fn unfinished_request_line_is_relayed_after_the_detect_timeout(mode: Mode) {
    let lab = Lab::start(mode);
    let listener = lab.listen();
    thread::scope(|scope| {
        scope.spawn(|| echo_one(&listener, b""));
        let mut client = lab.connect();
        // Looks like the start of a request line and then waits for the
        // server, as a client-first text protocol might: after the detect
        // timeout it is forwarded unchanged, and the answer comes back.
        let started = Instant::now();
        client.send(b"HELLO there");
        assert_eq!(client.read_exact(11), b"HELLO there");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        client.stream.shutdown(Shutdown::Write).unwrap();
        assert!(client.read_to_end().is_empty());
    });
    assert_eq!(lab.counters().connections_opaque, 1);
}

/// An HTTP upload of [`bulk_bytes`] (200 MiB on the host).
fn http_upload_of_200_mb_arrives_intact(mode: Mode) {
    let lab = Lab::start(mode);
    let recorder = lab.recorder();
    let dir = ScratchDir::new("proxy-bulk");
    let size = bulk_bytes();
    let data = noise(size, 200);
    let path = dir.write("upload.bin", &data);
    let expected = sha256_of(&data);
    drop(data);
    let started = Instant::now();
    let output = lab.curl(&[
        "-H",
        "Expect:",
        "-T",
        &path.display().to_string(),
        &format!("http://{}/upload", lab.target()),
    ]);
    let elapsed = started.elapsed();
    assert!(String::from_utf8_lossy(&output).contains(&format!("\"len\": {size}")));
    let seen = recorder.next();
    seen.traceparent();
    assert_eq!(seen.body_len, size as u64);
    assert_eq!(seen.body_sha256, expected);
    assert!(elapsed < Duration::from_secs(90), "took {elapsed:?}");
}

/// An opaque stream of [`bulk_bytes`] (200 MiB on the host), hashed at
/// both ends.
fn opaque_stream_of_200_mb_arrives_intact(mode: Mode) {
    let lab = Lab::start(mode);
    let (ip, port) = (lab.server_ip().to_string(), lab.port.to_string());
    let mut sink = lab
        .server_ns()
        .spawn(
            "/usr/bin/python3",
            &["-c", fixtures::HASHING_STREAM, "sink", &ip, &port],
        )
        .expect("python3");
    let sink_lines = sink.stdout_lines();
    assert_eq!(sink_lines.recv_timeout(WAIT).unwrap(), "READY");
    let megabytes = (bulk_bytes() >> 20).to_string();
    let started = Instant::now();
    // `timeout` bounds the source even if the proxy stalls the stream.
    let mut source = lab
        .client_ns()
        .spawn(
            "timeout",
            &[
                "120",
                "/usr/bin/python3",
                "-c",
                fixtures::HASHING_STREAM,
                "source",
                &ip,
                &port,
                &megabytes,
            ],
        )
        .expect("timeout and python3");
    let mut output = String::new();
    source
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    assert!(source.0.wait().unwrap().success());
    let elapsed = started.elapsed();
    let (sent, received) = output.trim().split_once(' ').expect("two digests");
    assert_eq!(sent.len(), 64);
    assert_eq!(sent, received);
    assert!(elapsed < Duration::from_secs(90), "took {elapsed:?}");
    let counters = lab.counters();
    assert_eq!((counters.connections_opaque, counters.errors), (1, 0));
}

/// Raises this process's open-file limit to at least `needed` (root may
/// raise the hard limit too): a login shell often starts with 1024.
fn raise_open_file_limit(needed: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    if limit.rlim_cur >= needed {
        return;
    }
    limit.rlim_cur = needed;
    limit.rlim_max = limit.rlim_max.max(needed);
    // SAFETY: a valid rlimit.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(
        rc,
        0,
        "raising RLIMIT_NOFILE to {needed}: {}",
        std::io::Error::last_os_error()
    );
}

fn thousand_concurrent_connections_complete(mode: Mode) {
    const CONNECTIONS: usize = 1000;
    // Each connection is four sockets in this process: the client's, the
    // proxy's two and the server's.
    raise_open_file_limit(4 * CONNECTIONS as u64 + 1024);
    let lab = Lab::with(mode, test_settings(), Arc::new(StandaloneContexts::new()));
    let target = lab.target();
    // Bound by tokio on the server side so the backlog holds every
    // connection at once (std's would be 128); handed back as a std socket
    // for the client side's runtime to serve.
    let listener = lab.on_server(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime
            .block_on(tokio::net::TcpListener::bind(target))
            .unwrap()
            .into_std()
            .unwrap()
    });
    // How far the connections got, for the message if they do not finish
    // in time: one failure anywhere keeps the server's barrier (below)
    // closed, so the others wait for it.
    let accepted = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let stats = Arc::clone(&lab.stats);
    let failures = lab.on_client(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            // The server answers nobody until every request has arrived,
            // so all connections are open through the proxy at once.
            let arrived = Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
            let (server_accepted, server_heads) = (Arc::clone(&accepted), Arc::clone(&heads));
            let server = tokio::spawn(async move {
                let mut handlers = Vec::new();
                for _ in 0..CONNECTIONS {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    server_accepted.fetch_add(1, Ordering::Relaxed);
                    let arrived = Arc::clone(&arrived);
                    let heads = Arc::clone(&server_heads);
                    handlers.push(tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut chunk = [0; 1024];
                        while !head.ends_with(b"\r\n\r\n") {
                            let n = stream.read(&mut chunk).await.unwrap();
                            assert!(n > 0);
                            head.extend_from_slice(&chunk[..n]);
                        }
                        heads.fetch_add(1, Ordering::Relaxed);
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
                let failed = Arc::clone(&failed);
                clients.push(tokio::spawn(async move {
                    let result = async {
                        let mut stream = tokio::net::TcpStream::connect(target).await?;
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
                    }
                    .await;
                    if let Err(err) = result {
                        failed.lock().unwrap().push(format!("connection {i}: {err}"));
                    }
                }));
            }
            let all = async {
                for client in clients {
                    if let Err(err) = client.await {
                        failed.lock().unwrap().push(err.to_string());
                    }
                }
                server.await.unwrap();
            };
            if tokio::time::timeout(Duration::from_secs(90), all).await.is_err() {
                let failed = failed.lock().unwrap();
                panic!(
                    "{CONNECTIONS} connections did not finish in time: the server accepted {} \
                     and read {} heads; {} clients failed: {:?}; proxy: {}",
                    accepted.load(Ordering::Relaxed),
                    heads.load(Ordering::Relaxed),
                    failed.len(),
                    &failed[..failed.len().min(5)],
                    stats.snapshot()
                );
            }
            std::mem::take(&mut *failed.lock().unwrap())
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

fn ipv6_requests_get_a_traceparent(mode: Mode) {
    let lab = Lab::start(mode);
    let ip = lab.server_ip_v6();
    let recorder = lab.recorder_at(ip);
    let mut client = lab.connect_to(SocketAddr::new(ip, lab.port));
    client.send(b"GET /six HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _) = client.response();
    assert!(status.starts_with("HTTP/1.1 200"));
    recorder.next().traceparent();
    assert_eq!(lab.counters().requests_injected, 1);
}

fn connection_that_was_not_redirected_is_closed(mode: Mode) {
    let lab = Lab::start(mode);
    let mut client = lab.connect_to(lab.proxy_addr());
    let _ = client.stream.write_all(b"GET / HTTP/1.1\r\n\r\n");
    let mut byte = [0; 1];
    match read_some(&mut client.stream, &mut byte) {
        Ok(0) => {}
        Err(err) if err.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the proxy to close, got {other:?}"),
    }
    let counters = lab.counters();
    assert_eq!(counters.connections_refused, 1);
    assert_eq!(counters.connections_http + counters.connections_opaque, 0);
}

fn unreachable_destination_resets_the_client(mode: Mode) {
    let lab = Lab::start(mode);
    // Nothing listens on the server port: the proxy's connect is refused,
    // and the client sees a reset instead of a connection that works.
    let mut client = lab.connect();
    let mut byte = [0; 1];
    let result = read_some(&mut client.stream, &mut byte);
    assert!(
        matches!(&result, Err(err) if err.kind() == ErrorKind::ConnectionReset),
        "{result:?}"
    );
    assert_eq!(lab.counters().errors, 1);
}

fn client_reset_reaches_the_server(mode: Mode) {
    let lab = Lab::start(mode);
    let listener = lab.listen();
    let client = lab.connect();
    let mut server = accept(&listener);
    let mut stream = client.stream;
    stream.write_all(b"\0binary").unwrap();
    let mut got = [0; 7];
    server.read_exact(&mut got).unwrap();
    reset(stream);
    let mut byte = [0; 1];
    let result = read_some(&mut server, &mut byte);
    assert!(
        matches!(&result, Err(err) if err.kind() == ErrorKind::ConnectionReset),
        "the server sees a reset, not a clean close: {result:?}"
    );
}

/// A lab whose proxy resets connections idle for a second.
fn lab_with_idle_timeout_of_a_second(mode: Mode) -> Lab {
    Lab::with(
        mode,
        ProxySettings {
            idle_timeout: Duration::from_secs(1),
            ..test_settings()
        },
        Arc::new(StandaloneContexts::new()),
    )
}

/// Closes `stream` with a reset (linger 0) instead of a FIN.
fn reset(stream: TcpStream) {
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
}

/// A server that reads an HTTP request and resets the connection instead
/// of answering: the client sees a reset, as it would without the proxy
/// (not a clean close, nor a 5xx the proxy made up).
fn server_reset_after_an_http_request_reaches_the_client(mode: Mode) {
    let lab = Lab::start(mode);
    let listener = lab.listen();
    let mut client = lab.connect();
    client.send(b"GET /reset HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut server = accept(&listener);
    let mut head = Vec::new();
    let mut chunk = [0; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = read_some(&mut server, &mut chunk).expect("the request reaches the server");
        assert!(n > 0, "the request reaches the server");
        head.extend_from_slice(&chunk[..n]);
    }
    assert!(
        String::from_utf8_lossy(&head).contains("traceparent: "),
        "through the proxy"
    );
    reset(server);
    assert_reset(&mut client.stream, "client");
    assert_eq!(lab.counters().errors, 1, "the reset is counted");
}

/// A server that takes an HTTP request and never answers: the client
/// waits, as it would without the proxy, until the proxy's idle timeout
/// resets both sides (a dead downstream does not hold proxy connections
/// forever).
fn server_that_never_answers_is_reset_at_the_idle_timeout(mode: Mode) {
    let lab = lab_with_idle_timeout_of_a_second(mode);
    let listener = lab.listen();
    let mut client = lab.connect();
    client.send(b"GET /silent HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut server = accept(&listener);
    let mut chunk = [0; 1024];
    assert!(read_some(&mut server, &mut chunk).expect("the request") > 0);
    let started = Instant::now();
    assert_reset(&mut client.stream, "client");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "reset at the idle timeout, not before: {waited:?}"
    );
    assert_reset(&mut server, "server");
    assert_eq!(lab.counters().errors, 1);
}

/// A connection through the proxy that has carried a few opaque bytes and
/// is left open: the client end and the server end.
fn open_opaque_connection(lab: &Lab) -> (Client, TcpStream) {
    let listener = lab.listen();
    let mut client = lab.connect();
    let mut server = accept(&listener);
    client.send(b"\0hello");
    let mut got = [0; 6];
    server.read_exact(&mut got).unwrap();
    (client, server)
}

/// Fails unless the next read from `stream` reports a reset.
fn assert_reset(stream: &mut impl Read, side: &str) {
    let mut byte = [0; 1];
    let result = read_some(stream, &mut byte);
    assert!(
        matches!(&result, Err(err) if err.kind() == ErrorKind::ConnectionReset),
        "the {side} sees a reset, not a clean close: {result:?}"
    );
}

fn idle_connection_is_reset_on_both_sides(mode: Mode) {
    let lab = lab_with_idle_timeout_of_a_second(mode);
    let (mut client, mut server) = open_opaque_connection(&lab);
    let started = Instant::now();
    assert_reset(&mut client.stream, "client");
    assert_reset(&mut server, "server");
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(lab.counters().errors, 1);
}

fn connection_open_at_shutdown_is_reset_after_the_grace(mode: Mode) {
    let mut lab = Lab::start(mode);
    let (mut client, mut server) = open_opaque_connection(&lab);
    let started = Instant::now();
    lab.stop_proxy();
    let waited = started.elapsed();
    // Run alone, this lab's rules are the root namespace's only nat rules:
    // when the stop deleted them before the drain, the proxy's reset left
    // with its own address and never reached the client.
    assert_reset(&mut client.stream, "client");
    assert_reset(&mut server, "server");
    let grace = test_settings().shutdown_grace;
    assert!(
        waited >= grace,
        "open connections get the grace: {waited:?}"
    );
    assert!(waited < grace + Duration::from_secs(4), "{waited:?}");
    assert_eq!(lab.counters().errors, 1);
}

fn original_destination_is_reported_to_the_context_source(mode: Mode) {
    // The context source sees where the client was going and which request
    // of the connection this is; exercised through a source of its own.
    use agent::proxy::ProxiedRequest;
    use std::future::Future;
    use std::pin::Pin;

    #[derive(Default)]
    struct Recording(Mutex<Vec<(SocketAddr, u64, String, String)>>);

    impl TraceContextSource for Recording {
        fn context_for<'a>(
            &'a self,
            request: &'a ProxiedRequest,
        ) -> Pin<Box<dyn Future<Output = agent::tracecontext::PropagatedContext> + Send + 'a>>
        {
            self.0.lock().unwrap().push((
                request.original_destination,
                request.index,
                request.method.clone(),
                request.target.clone(),
            ));
            Box::pin(async {
                agent::tracecontext::PropagatedContext::without_state(
                    TraceParent::parse(VALID.as_bytes()).unwrap(),
                )
            })
        }
    }

    let recording = Arc::new(Recording::default());
    let lab = Lab::with(mode, test_settings(), recording.clone());
    let listener = lab.listen();
    let mut client = lab.connect();
    client.send(b"GET /a HTTP/1.1\r\n\r\nPUT /b?c HTTP/1.1\r\n\r\n");
    let mut server = accept(&listener);
    let mut received = Vec::new();
    let mut chunk = [0; 1024];
    while received.windows(4).filter(|w| w == b"\r\n\r\n").count() < 2 {
        let n = read_some(&mut server, &mut chunk).unwrap();
        assert!(n > 0);
        received.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(
        String::from_utf8(received).unwrap(),
        format!(
            "GET /a HTTP/1.1\r\ntraceparent: {VALID}\r\n\r\n\
             PUT /b?c HTTP/1.1\r\ntraceparent: {VALID}\r\n\r\n"
        )
    );
    let destination = lab.target();
    // Counted after the write upstream, which the server may see first.
    drop((client, server));
    assert_eq!(lab.finish().requests_injected, 2);
    assert_eq!(
        *recording.0.lock().unwrap(),
        [
            (destination, 0, "GET".to_owned(), "/a".to_owned()),
            (destination, 1, "PUT".to_owned(), "/b?c".to_owned()),
        ]
    );
}
