//! Privileged: the proxy in node mode on a node-like topology (pods in
//! network namespaces joined by veth pairs, the agent in the root
//! namespace), together with the probes: the server receives a valid
//! injected `traceparent`, the other header bytes are unchanged, and the
//! agent reports exactly one CLIENT span per proxied request, whose span-id
//! is the injected parent-id, with the server's SERVER span as its child.

use std::sync::Arc;
use std::time::Duration;

use agent::correlate::{Correlator, ProcessFilter, ProcessTable, ProxyContexts, SpanSettings};
use agent::span::SpanKind;
use agent::tracecontext::TraceParent;
use tests::netns::{Topology, start_node_proxy};
use tests::{ScratchDir, capture, find, fixtures, free_port, privileged};

/// Not the default 15001, so this test cannot meet another proxy.
const LISTEN_PORT: u16 = 15_101;

#[test]
fn proxied_request_carries_the_client_span_as_injected_parent() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("proxy-spans");
    let port = free_port();
    let topology = Topology::new(&["pod-a", "pod-b"]).expect("building the pod topology");
    let (pod_a, pod_b) = (
        topology.pod("pod-a").unwrap(),
        topology.pod("pod-b").unwrap(),
    );
    let server_addr = pod_b.addr(port);
    let script = dir.write("recording_server.py", fixtures::RECORDING_SERVER.as_bytes());
    let out = dir.path().to_str().unwrap().to_string();
    let _server = pod_b
        .spawn(
            "/usr/bin/python3",
            &[script.to_str().unwrap(), &port.to_string(), &out, "0.0.0.0"],
        )
        .expect("python3 in pod-b");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pod_a
        .exec("/usr/bin/python3")
        .args(["-c", &connect_probe(server_addr)])
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the server in pod-b never listened"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let contexts = Arc::new(ProxyContexts::new());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let proxy = start_node_proxy(&runtime, LISTEN_PORT, vec![port], contexts.clone());

    let curl = pod_a
        .exec("curl")
        .args([
            "-s",
            "-S",
            "--max-time",
            "20",
            "-H",
            "X-Keep: Exactly  As Sent",
        ])
        .arg(format!("http://{server_addr}/through-proxy"))
        .output()
        .unwrap();
    assert!(
        curl.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    assert_eq!(curl.stdout, b"you asked for /through-proxy\n");
    let stats = runtime.block_on(proxy.stop()).expect("rules removed");
    assert_eq!(stats.requests_injected, 1, "{stats:?}");

    // What the server received: curl's request plus one traceparent line.
    let received = std::fs::read(wait_for_file(&dir, "in-", Duration::from_secs(10))).unwrap();
    let text = String::from_utf8_lossy(&received).into_owned();
    let line_start = text
        .find("traceparent: ")
        .expect("the server received a traceparent");
    let line_end = line_start + text[line_start..].find("\r\n").unwrap() + 2;
    let injected =
        TraceParent::parse(&text.as_bytes()[line_start + "traceparent: ".len()..line_end - 2])
            .expect("the injected traceparent is valid");
    let without_injected = [&received[..line_start], &received[line_end..]].concat();

    // The agent saw curl's original request (before injection).
    let events = capture().wait_for_port(port, Duration::from_secs(20), |e| {
        tests::messages(e)
            .iter()
            .any(|m| m.bytes.starts_with(b"GET /through-proxy"))
            && tests::messages(e)
                .iter()
                .filter(|m| m.bytes.starts_with(b"HTTP/1.1 200"))
                .count()
                >= 2
    });
    let curl_request = tests::messages(&events)
        .into_iter()
        .find(|m| {
            m.bytes.starts_with(b"GET /through-proxy") && find(&m.bytes, b"traceparent").is_none()
        })
        .expect("curl's original request was captured")
        .bytes
        .clone();
    assert_eq!(
        String::from_utf8_lossy(&without_injected),
        String::from_utf8_lossy(&curl_request),
        "every other header byte arrives exactly as curl sent it"
    );

    let processes = ProcessTable::new("/proc", ProcessFilter::default());
    let sampler = agent::sampling::Sampler::new(100.0, true).unwrap();
    let mut correlator = Correlator::new(sampler, SpanSettings::default(), processes);
    correlator.share_with_proxy(contexts, agent::proxy::RedirectScope::of_ports(vec![port]));
    let mut spans = Vec::new();
    for event in &events {
        correlator.handle(event, &mut spans);
    }
    correlator.finish(&mut spans);
    let clients: Vec<_> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client)
        .collect();
    let servers: Vec<_> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server)
        .collect();
    assert_eq!(
        clients.len(),
        1,
        "exactly one CLIENT span per proxied request: {clients:#?}"
    );
    assert_eq!(servers.len(), 1);
    assert_eq!(clients[0].trace_id, injected.trace_id);
    assert_eq!(
        clients[0].span_id, injected.parent_id,
        "the CLIENT span is the injected parent"
    );
    assert_eq!(servers[0].trace_id, injected.trace_id);
    assert_eq!(
        servers[0].parent_span_id,
        Some(injected.parent_id),
        "the SERVER span is its child"
    );
}

/// A Python one-liner that exits 0 once `addr` accepts a connection.
fn connect_probe(addr: std::net::SocketAddr) -> String {
    format!(
        "import socket; socket.create_connection(('{}', {}), timeout=1).close()",
        addr.ip(),
        addr.port()
    )
}

/// The first non-empty file in `dir` whose name starts with `prefix`.
fn wait_for_file(dir: &ScratchDir, prefix: &str, timeout: Duration) -> std::path::PathBuf {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let found = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .find(|e| {
                e.file_name().to_string_lossy().starts_with(prefix)
                    && e.metadata().map(|m| m.len() > 0).unwrap_or(false)
            });
        if let Some(entry) = found {
            return entry.path();
        }
        if std::time::Instant::now() >= deadline {
            return dir.path().join("missing");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
