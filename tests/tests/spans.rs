//! Privileged: spans made from real traffic — trace context, pairing, HTTP
//! framing cases, counts under load, sampling.
//!
//! Each test feeds the capture events of its own port(s) to a correlate
//! stage of its own (see `tests::spans_of`), so tests with different
//! sampling share one capture.

use std::time::Duration;

use agent::capture::CaptureEvent;
use agent::span::{Span, SpanKind, SpanStatus};
use tests::{
    ChildGuard, ScratchDir, capture, curl, fixtures, free_port, in_vm, privileged, spans_of,
    start_nginx, start_python, wait_listening,
};

const WAIT: Duration = Duration::from_secs(30);

fn recording_server(dir: &ScratchDir, port: u16) -> ChildGuard {
    let out = dir.path().to_str().unwrap().to_string();
    let server = start_python(
        dir,
        "recording_server.py",
        fixtures::RECORDING_SERVER,
        &[&port.to_string(), &out, "127.0.0.1"],
    );
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap());
    server
}

fn of_kind(spans: &[Span], kind: SpanKind) -> Vec<&Span> {
    spans.iter().filter(|s| s.kind == kind).collect()
}

/// Waits until the events of `port` make `count` spans of `kind` (at 100 %).
fn wait_spans(port: u16, kind: SpanKind, count: usize) -> (Vec<CaptureEvent<'static>>, Vec<Span>) {
    let events = capture().wait_for_port(port, WAIT, |e| {
        of_kind(&spans_of(e, 100.0), kind).len() >= count
    });
    let spans = spans_of(&events, 100.0);
    (events, spans)
}

fn attr(span: &Span, key: &str) -> String {
    span.attribute(key)
        .unwrap_or_else(|| panic!("span {} has no {key}", span.name))
}

const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

#[test]
fn inbound_traceparent_is_continued_and_the_client_span_id_is_the_wire_parent_id() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("tp");
    let port = free_port();
    let _server = recording_server(&dir, port);
    let (curl_pid, _) = curl(&[
        "-H",
        &format!("traceparent: {PARENT}"),
        "-H",
        "tracestate: vendor=1",
        &format!("http://127.0.0.1:{port}/tp"),
    ]);
    let (_, spans) = wait_spans(port, SpanKind::Server, 1);
    let server = of_kind(&spans, SpanKind::Server)[0];
    assert_eq!(server.trace_id.to_hex(), "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(server.parent_span_id.unwrap().to_hex(), "b7ad6b7169203331");
    assert_eq!(server.trace_state, "vendor=1");
    let (_, spans) = wait_spans(port, SpanKind::Client, 1);
    let client = of_kind(&spans, SpanKind::Client)[0];
    assert_eq!(
        client
            .resource
            .attributes
            .iter()
            .find(|a| a.key == "process.pid")
            .map(|a| format!("{:?}", a.value)),
        Some(format!("Int({curl_pid})"))
    );
    assert_eq!(
        client.span_id.to_hex(),
        "b7ad6b7169203331",
        "the downstream server's parent is this span"
    );
    assert_eq!(client.trace_id, server.trace_id);
}

#[test]
fn invalid_inbound_traceparent_restarts_the_trace() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("badtp");
    let port = free_port();
    let _server = recording_server(&dir, port);
    let invalid = PARENT.to_uppercase(); // upper-case hex is invalid
    curl(&[
        "-H",
        &format!("traceparent: {invalid}"),
        "-H",
        "tracestate: vendor=1",
        &format!("http://127.0.0.1:{port}/bad"),
    ]);
    let (_, spans) = wait_spans(port, SpanKind::Server, 1);
    let server = of_kind(&spans, SpanKind::Server)[0];
    assert_ne!(server.trace_id.to_hex(), "0af7651916cd43dd8448eb211c80319c");
    assert_ne!(
        server.parent_span_id.map(|p| p.to_hex()).as_deref(),
        Some("b7ad6b7169203331")
    );
    assert_eq!(
        server.trace_state, "",
        "tracestate is dropped with an invalid traceparent"
    );
}

#[test]
fn http_framing_cases_each_produce_one_span_per_request_with_its_status() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("framing");
    let port = free_port();
    let _server = recording_server(&dir, port);
    let base = format!("http://127.0.0.1:{port}");
    // keep-alive: three requests on one connection
    curl(&[
        &format!("{base}/ka/1"),
        &format!("{base}/ka/2"),
        &format!("{base}/ka/3"),
    ]);
    curl(&[&format!("{base}/chunked")]);
    curl(&[&format!("{base}/204")]);
    curl(&["-I", &format!("{base}/head")]);
    curl(&[&format!("{base}/status/503")]);
    let big = format!("X-Big: {}", "b".repeat(12 * 1024));
    curl(&["-H", &big, &format!("{base}/bighead")]);
    let upload = dir.write("upload.bin", &vec![b'u'; 200_000]);
    curl(&[
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("{base}/upload"),
    ]);
    let pipelined = start_python(
        &dir,
        "pipelining_client.py",
        fixtures::PIPELINING_CLIENT,
        &[&port.to_string()],
    );
    let statuses = pipelined.wait_stdout(WAIT);
    assert_eq!(statuses.lines().count(), 3, "{statuses}");

    let expected = [
        ("GET", "/ka/1", "200"),
        ("GET", "/ka/2", "200"),
        ("GET", "/ka/3", "200"),
        ("GET", "/chunked", "200"),
        ("GET", "/204", "204"),
        ("HEAD", "/head", "200"),
        ("GET", "/status/503", "503"),
        ("GET", "/bighead", "200"),
        ("POST", "/upload", "200"),
        ("GET", "/pipe/1", "200"),
        ("GET", "/pipe/2", "200"),
        ("GET", "/pipe/3", "200"),
    ];
    let (_, spans) = wait_spans(port, SpanKind::Server, expected.len());
    for kind in [SpanKind::Server, SpanKind::Client] {
        let mut got: Vec<(String, String, String)> = of_kind(&spans, kind)
            .iter()
            .map(|s| {
                (
                    attr(s, "http.request.method"),
                    attr(s, "url.path"),
                    attr(s, "http.response.status_code"),
                )
            })
            .collect();
        got.sort();
        let mut want: Vec<(String, String, String)> = expected
            .iter()
            .map(|(m, p, c)| (m.to_string(), p.to_string(), c.to_string()))
            .collect();
        want.sort();
        assert_eq!(got, want, "{kind:?} spans: exactly one per request");
    }
    let server_503 = of_kind(&spans, SpanKind::Server)
        .into_iter()
        .find(|s| attr(s, "url.path") == "/status/503")
        .unwrap();
    assert_eq!(server_503.status, SpanStatus::Error("HTTP 503".into()));
    // Every server span is the child of the client span of the same request.
    for server in of_kind(&spans, SpanKind::Server) {
        let parent = spans
            .iter()
            .find(|c| Some(c.span_id) == server.parent_span_id)
            .expect("the client span is the parent");
        assert_eq!(parent.kind, SpanKind::Client);
        assert_eq!(attr(parent, "url.path"), attr(server, "url.path"));
        assert!(
            parent.start_unix_nano <= server.start_unix_nano
                && server.end_unix_nano <= parent.end_unix_nano
        );
    }
}

/// nginx serving a file to curl at 50 transfers in parallel: every request
/// of the access log has exactly one SERVER and one CLIENT span; sampling
/// keeps about its share.
#[test]
fn every_request_under_concurrent_load_has_one_server_and_one_client_span() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("load");
    let port = free_port();
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    dir.write("www/index.html", b"hello\n");
    let _nginx = start_nginx(&dir, port, 2, "keepalive_requests 100000;");
    let requests = if in_vm() { 200 } else { 2000 };
    // One curl process, an exact count of requests (URL globbing), each
    // answered before curl exits, over up to 50 keep-alive connections.
    let load = std::process::Command::new("curl")
        .args([
            "--parallel",
            "--parallel-max",
            "50",
            "--no-progress-meter",
            "--fail",
            "--max-time",
            "20",
            "--output",
            "/dev/null",
            &format!("http://127.0.0.1:{port}/index.html?[1-{requests}]"),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("curl is installed (cargo xtask setup)");
    let load_pid = load.id();
    assert!(load.wait_with_output().unwrap().status.success());
    // nginx writes the access log line after the response; give it a moment.
    let access_log = || {
        std::fs::read_to_string(dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while access_log() < requests && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let logged = access_log();
    assert_eq!(logged, requests, "nginx logged every request");

    let events = capture().wait_for_port(port, WAIT * 2, |e| {
        let spans = spans_of(e, 100.0);
        of_kind(&spans, SpanKind::Server).len() >= logged
            && of_kind(&spans, SpanKind::Client).len() >= logged
    });
    let spans = spans_of(&events, 100.0);
    let servers = of_kind(&spans, SpanKind::Server);
    let clients = of_kind(&spans, SpanKind::Client);
    assert_eq!(servers.len(), logged, "one SERVER span per access-log line");
    assert_eq!(clients.len(), logged, "one CLIENT span per access-log line");
    assert!(
        servers
            .iter()
            .all(|s| attr(s, "http.response.status_code") == "200")
    );
    assert!(
        servers.iter().all(|s| s.resource.service_name == "nginx"),
        "{:?}",
        servers[0].resource
    );
    // (curl has exited by now, so its resource is named after its pid.)
    let pid_of = |s: &Span| {
        s.resource
            .attributes
            .iter()
            .find(|a| a.key == "process.pid")
            .map(|a| a.value.clone())
    };
    assert!(
        clients
            .iter()
            .all(|s| pid_of(s) == Some(agent::span::AttributeValue::Int(load_pid as i64)))
    );

    // Sampling decides per trace from the trace id: the same events give
    // none, about a quarter, or all of the traces.
    let traces = |percentage: f64| of_kind(&spans_of(&events, percentage), SpanKind::Server).len();
    assert_eq!(traces(0.0), 0);
    assert_eq!(traces(100.0), logged);
    let quarter = traces(25.0) as f64 / logged as f64;
    let (low, high) = if in_vm() { (0.12, 0.38) } else { (0.20, 0.30) };
    assert!(
        (low..=high).contains(&quarter),
        "25 % sampling kept {:.1} %",
        quarter * 100.0
    );
}

/// wrk (duration-bound) against `python3 -m http.server`: one SERVER span
/// per line of the server's own request log; one CLIENT span per request wrk
/// sent, of which only those in flight when wrk stopped lack a response.
#[test]
fn wrk_against_python_http_server_has_one_server_span_per_logged_request() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("wrk");
    let port = free_port();
    dir.write("index.html", b"hello\n");
    let log = std::fs::File::create(dir.path().join("requests.log")).unwrap();
    let _server = ChildGuard(
        std::process::Command::new("/usr/bin/python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap());
    let connections = 10;
    let status = std::process::Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            "-d1s",
            &format!("http://127.0.0.1:{port}/index.html"),
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("wrk is installed (cargo xtask setup)");
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(500));
    let logged = std::fs::read_to_string(dir.path().join("requests.log"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"GET /index.html"))
        .count();
    assert!(logged > 0);

    let events = capture().wait_for_port(port, WAIT * 2, |e| {
        of_kind(&spans_of(e, 100.0), SpanKind::Server).len() >= logged
    });
    let spans = spans_of(&events, 100.0);
    assert_eq!(
        of_kind(&spans, SpanKind::Server).len(),
        logged,
        "one SERVER span per logged request"
    );
    let answered = of_kind(&spans, SpanKind::Client)
        .into_iter()
        .filter(|s| s.attribute("http.response.status_code").is_some())
        .count();
    assert!(
        answered <= logged && logged - answered <= connections,
        "{answered} answered CLIENT spans for {logged} logged requests"
    );
}
