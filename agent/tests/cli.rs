//! The `agent` binary as a user runs it.

use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::*;

#[test]
fn run_prints_the_trace_of_a_curl_and_stops_cleanly_on_sigterm() {
    if !privileged() {
        return;
    }
    let _agent = one_agent_at_a_time();
    let port = free_port();
    let _server = start_http_server(port);

    let mut agent = KillOnDrop(
        Command::new(AGENT)
            .args(["run"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = lines(agent.0.stdout.take().unwrap());
    let err = lines(agent.0.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_line(&err, deadline, |l| l.contains("tracing HTTP"))
        .expect("the agent reports it is tracing");

    let status = Command::new("curl")
        .args(["-s", "-o", "/dev/null"])
        .arg(format!("http://127.0.0.1:{port}/cli-view"))
        .status()
        .unwrap();
    assert!(status.success());
    // The default view: one block per trace, curl's CLIENT span with the
    // server's SERVER span under it (both ends are on this machine).
    let deadline = Instant::now() + Duration::from_secs(15);
    let header = wait_line(&out, deadline, |l| {
        l.starts_with("trace ") && l.contains("2 spans")
    })
    .expect("a trace block is printed");
    let client =
        wait_line(&out, deadline, |l| l.contains("curl: GET /cli-view")).expect("curl's span");
    let server_line =
        wait_line(&out, deadline, |l| l.contains(": GET /cli-view")).expect("the server's span");
    assert!(
        client.starts_with("  curl:"),
        "the client span is the root: {client}"
    );
    assert!(
        server_line.starts_with("    python"),
        "the server span is its child: {server_line}"
    );
    assert!(header.len() > 40, "{header}");

    // SAFETY: signal to our own child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let counters = wait_line(&err, deadline, |l| l.contains("counters"))
        .expect("counters are printed at exit");
    assert!(
        counters.contains("agent_capture_dropped_total{reason=\"ringbuf_full\"}=0")
            && counters.contains("agent_spans_total=2 "),
        "{counters}"
    );
    let status = loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "clean exit after SIGTERM: {status}");
}

#[test]
fn run_without_root_is_a_clear_error_not_a_panic() {
    if !privileged() {
        return;
    }
    // Drop to nobody for this one process.
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            AGENT,
            "run",
        ])
        .output()
        .expect("setpriv (util-linux) is installed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("must run as root"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn out_of_range_option_names_the_limit() {
    let output = Command::new(AGENT)
        .args(["run", "--max-message-bytes", "99999"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--max-message-bytes") && stderr.contains("between 1 and 16384"),
        "{stderr}"
    );
}

/// `iptables-save -t nat` lines of the proxy's own chains and jumps.
fn proxy_rules_in_nat() -> Vec<String> {
    let out = Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()
        .expect("iptables-save");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("TTA_"))
        .map(str::to_string)
        .collect()
}

fn start_proxy(config: &std::path::Path) -> KillOnDrop {
    let mut proxy = KillOnDrop(
        Command::new(AGENT)
            .args(["proxy", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let err = lines(proxy.0.stderr.take().unwrap());
    wait_line(&err, Instant::now() + Duration::from_secs(20), |l| {
        l.contains("proxy on port")
    })
    .expect("the proxy reports it is listening");
    proxy
}

#[test]
fn proxy_rules_exist_while_running_go_on_sigterm_and_survive_kill_9_once() {
    if !privileged() {
        return;
    }
    let _agent = one_agent_at_a_time();
    // Host mode for one unused port: nothing else on the machine is redirected.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("agent-cli-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "proxy:\n  enabled: true\n  mode: host\n  listen_port: {listen}\n  ports: [{port}]\n"
        ),
    )
    .unwrap();
    assert!(
        proxy_rules_in_nat().is_empty(),
        "no proxy rules before: {:?}",
        proxy_rules_in_nat()
    );

    let proxy = start_proxy(&config);
    let running = proxy_rules_in_nat();
    assert!(
        running
            .iter()
            .any(|l| l.contains(&format!("--dports {port}")) && l.contains("REDIRECT")),
        "{running:?}"
    );
    assert_eq!(
        running
            .iter()
            .filter(|l| l.starts_with("-A OUTPUT"))
            .count(),
        1,
        "one jump: {running:?}"
    );
    // SIGTERM: the rules go with the proxy.
    // SAFETY: signal to our own child.
    unsafe { libc::kill(proxy.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut proxy = proxy;
    while proxy.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the proxy did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        proxy_rules_in_nat().is_empty(),
        "rules left after SIGTERM: {:?}",
        proxy_rules_in_nat()
    );

    // kill -9 leaves the rules, but their lease runs out: within a second
    // new connections to the port reach it directly (tests/tests/fail_open.rs
    // measures the window); a restart installs exactly one copy.
    let server = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let proxy = start_proxy(&config);
    let first = proxy_rules_in_nat();
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (_upstream, peer) = server.accept().unwrap();
    assert_ne!(peer, client.local_addr().unwrap(), "through the proxy");
    // SAFETY: signal to our own child.
    unsafe { libc::kill(proxy.0.id() as i32, libc::SIGKILL) };
    drop(proxy);
    std::thread::sleep(Duration::from_secs(1));
    let client = TcpStream::connect(("127.0.0.1", port))
        .expect("a second after the kill, the port is reached, not refused");
    let (_direct, peer) = server.accept().unwrap();
    assert_eq!(peer, client.local_addr().unwrap(), "directly");
    assert_eq!(
        proxy_rules_in_nat(),
        first,
        "SIGKILL leaves the rules in place"
    );
    let mut proxy = start_proxy(&config);
    assert_eq!(
        proxy_rules_in_nat(),
        first,
        "after a restart: the same rules, one copy"
    );
    // SAFETY: signal to our own child.
    unsafe { libc::kill(proxy.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the proxy did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(proxy_rules_in_nat().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A thread-per-request frontend that calls `BACKEND` for every request
/// (`GET /call?rid=N` -> `GET /back?rid=N`), and a backend that prints the
/// `tracestate` and `traceparent` each call brought
/// (`rid=N|<tracestate>|<traceparent>`, `NONE` for a missing field).
const TRACESTATE_SERVICES: &str = r#"
import http.client, http.server, sys
mode, port = sys.argv[1], int(sys.argv[2])
backend = int(sys.argv[3]) if len(sys.argv) > 3 else 0
class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def do_GET(self):
        query = self.path.split("?", 1)[1]
        if mode == "frontend":
            conn = http.client.HTTPConnection("127.0.0.1", backend, timeout=10)
            conn.request("GET", "/back?" + query)
            conn.getresponse().read()
            conn.close()
        else:
            states = self.headers.get_all("tracestate") or ["NONE"]
            parent = self.headers.get("traceparent", "NONE")
            print(query, ",".join(states), parent, sep="|", flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("READY", flush=True)
server.serve_forever()
"#;

/// Starts [`TRACESTATE_SERVICES`] (written into `dir`) with `args`, once it
/// is listening; returns it and its output lines.
fn start_service(dir: &std::path::Path, args: &[String]) -> (KillOnDrop, mpsc::Receiver<String>) {
    std::fs::create_dir_all(dir).unwrap();
    let script = dir.join("services.py");
    std::fs::write(&script, TRACESTATE_SERVICES).unwrap();
    let mut child = KillOnDrop(
        Command::new("/usr/bin/python3")
            .arg(&script)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = lines(child.0.stdout.take().unwrap());
    wait_line(&out, Instant::now() + Duration::from_secs(20), |l| {
        l == "READY"
    })
    .expect("a service starts");
    (child, out)
}

/// `agent run` with its proxy in host mode for `port`, spans to
/// `spans_file` (OTLP/JSON), once it traces.
fn start_agent_with_proxy(
    dir: &std::path::Path,
    port: u16,
    spans_file: &std::path::Path,
) -> KillOnDrop {
    let config = dir.join("agent.yaml");
    let listen = free_port();
    std::fs::write(
        &config,
        format!(
            "proxy:\n  enabled: true\n  mode: host\n  listen_port: {listen}\n  ports: [{port}]\n"
        ),
    )
    .unwrap();
    let mut agent = KillOnDrop(
        Command::new(AGENT)
            .args(["run", "--no-terminal", "--config"])
            .arg(&config)
            .arg("--output-file")
            .arg(spans_file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let err = lines(agent.0.stderr.take().unwrap());
    wait_line(&err, Instant::now() + Duration::from_secs(30), |l| {
        l.contains("tracing HTTP")
    })
    .expect("the agent starts with its proxy");
    agent
}

/// Every span of an OTLP/JSON lines file, as JSON.
fn exported_spans(file: &std::path::Path) -> Vec<serde_json::Value> {
    let mut spans = Vec::new();
    for line in std::fs::read_to_string(file).unwrap().lines() {
        let request: serde_json::Value = serde_json::from_str(line).unwrap();
        for resource in request["resourceSpans"].as_array().unwrap() {
            for scope in resource["scopeSpans"].as_array().unwrap() {
                spans.extend(scope["spans"].as_array().unwrap().iter().cloned());
            }
        }
    }
    spans
}

/// A string attribute of an exported span ("" when absent).
fn string_attribute(span: &serde_json::Value, key: &str) -> String {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .and_then(|a| a["value"]["stringValue"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The W3C tracestate rules (../shared/notes/design.md), each through the
/// running agent: an inbound request with `traceparent` and `tracestate`
/// reaches an uninstrumented thread-per-request frontend, whose call to the
/// backend goes through the proxy (host mode). The backend must receive
/// the tracestate the rules give, and the frontend's CLIENT span record it.
#[test]
fn run_with_proxy_hands_the_inbound_tracestate_on_by_the_w3c_rules() {
    if !privileged() {
        return;
    }
    let _agent = one_agent_at_a_time();
    let dir = std::env::temp_dir().join(format!("agent-cli-tracestate-{}", std::process::id()));
    let (back_port, front_port) = (free_port(), free_port());
    let (_backend, received) = start_service(&dir, &["backend".into(), back_port.to_string()]);
    let (_frontend, _) = start_service(
        &dir,
        &[
            "frontend".into(),
            front_port.to_string(),
            back_port.to_string(),
        ],
    );
    let spans_file = dir.join("spans.json");
    let mut agent = start_agent_with_proxy(&dir, back_port, &spans_file);

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let members = |n: usize, len: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("k{i:02}={}", "v".repeat(len - 4)))
            .collect()
    };
    let long = format!("long={}", "y".repeat(200));
    let four_of_103 = members(4, 103).join(",");
    // (case, traceparent, tracestate fields, what the backend must get)
    let cases: Vec<(&str, &str, Vec<String>, String)> = vec![
        (
            "one",
            PARENT,
            vec!["congo=t61rcWkgMzE".into()],
            "congo=t61rcWkgMzE".into(),
        ),
        (
            "fields-joined-in-order",
            PARENT,
            vec!["a=1,b=2".into(), "c=3".into()],
            "a=1,b=2,c=3".into(),
        ),
        (
            "empty-members-and-spaces",
            PARENT,
            vec!["a=1, ,b=2 ,".into()],
            "a=1,b=2".into(),
        ),
        (
            "multi-tenant-key",
            PARENT,
            vec!["t1@vendor=x,0z=y".into()],
            "t1@vendor=x,0z=y".into(),
        ),
        (
            "32-members",
            PARENT,
            vec![members(32, 6).join(",")],
            members(32, 6).join(","),
        ),
        (
            "33-members",
            PARENT,
            vec![members(33, 6).join(",")],
            "NONE".into(),
        ),
        ("invalid-key", PARENT, vec!["A=1,b=2".into()], "NONE".into()),
        (
            "invalid-value",
            PARENT,
            vec!["a=x=y,b=2".into()],
            "NONE".into(),
        ),
        (
            "value-ending-in-space",
            PARENT,
            vec!["a=x\u{20}\u{20}y\u{20},b=2".into()],
            "a=x  y,b=2".into(),
        ),
        (
            "cut-long-members-first",
            PARENT,
            vec![format!(
                "{},{long},{}",
                members(2, 103).join(","),
                members(4, 103)[2..].join(",")
            )],
            four_of_103.clone(),
        ),
        (
            "cut-from-the-right",
            PARENT,
            vec![members(6, 103).join(",")],
            four_of_103,
        ),
        ("no-traceparent", "", vec!["a=1".into()], "NONE".into()),
        (
            "invalid-traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            vec!["a=1".into()],
            "NONE".into(),
        ),
    ];
    let mut got = Vec::new();
    for (case, traceparent, fields, _) in &cases {
        let mut curl = Command::new("curl");
        curl.args(["-s", "-S", "--fail", "--max-time", "20", "-o", "/dev/null"]);
        if !traceparent.is_empty() {
            curl.args(["-H", &format!("traceparent: {traceparent}")]);
        }
        for field in fields {
            curl.args(["-H", &format!("tracestate: {field}")]);
        }
        let status = curl
            .arg(format!("http://127.0.0.1:{front_port}/call?rid={case}"))
            .status()
            .expect("curl is installed (cargo xtask setup)");
        assert!(status.success(), "{case}: the call succeeds");
        let line = wait_line(&received, Instant::now() + Duration::from_secs(10), |l| {
            l.starts_with(&format!("rid={case}|"))
        })
        .unwrap_or_else(|| panic!("{case}: the backend got no call"));
        got.push(line.split('|').nth(1).unwrap_or_default().to_string());
    }
    // SAFETY: signal to our own child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    assert!(agent.0.wait().unwrap().success());

    // The frontend's CLIENT spans (kind 3), by the rid in their query.
    let mut recorded = std::collections::HashMap::new();
    for span in exported_spans(&spans_file) {
        if span["kind"] == 3 && span["name"].as_str().unwrap().contains("/back") {
            let state = span["traceState"].as_str().unwrap_or_default();
            recorded.insert(string_attribute(&span, "url.query"), state.to_string());
        }
    }
    let mut failures = Vec::new();
    for ((case, _, _, expected), got) in cases.iter().zip(&got) {
        if got != expected {
            failures.push(format!("{case}: the backend got {got:?}, not {expected:?}"));
        }
        let span_state = recorded.get(&format!("rid={case}"));
        let expected_span = if expected == "NONE" { "" } else { expected };
        if span_state.map(String::as_str) != Some(expected_span) {
            failures.push(format!(
                "{case}: the CLIENT span records {span_state:?}, not {expected_span:?}"
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// nginx forwarding the `traceparent` it receives unchanged to a backend
/// whose port the proxy redirects: the proxy writes nginx's own CLIENT span
/// as the parent, so the backend's SERVER span is that span's child, and
/// no span takes an id another has.
#[test]
fn run_with_proxy_reparents_a_traceparent_a_gateway_forwards() {
    if !privileged() {
        return;
    }
    let _agent = one_agent_at_a_time();
    let dir = std::env::temp_dir().join(format!("agent-cli-forward-{}", std::process::id()));
    let (back_port, front_port) = (free_port(), free_port());
    let (_backend, received) = start_service(&dir, &["backend".into(), back_port.to_string()]);
    let root = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;\n\
             fastcgi_temp_path {root}/fastcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;\n\
             server {{ listen 127.0.0.1:{front_port}; location / {{ proxy_pass http://127.0.0.1:{back_port}; }} }} }}\n"
        ),
    )
    .unwrap();
    let _nginx = StopNginx(KillOnDrop(
        Command::new("nginx")
            .args(["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap()])
            .spawn()
            .expect("nginx is installed (cargo xtask setup)"),
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", front_port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let spans_file = dir.join("spans.json");
    let mut agent = start_agent_with_proxy(&dir, back_port, &spans_file);

    // A parent-id of its own per request, as a real caller sends.
    let sent = |n: usize| format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-01", 0xa000 + n);
    let mut backend_parents = Vec::new();
    for n in 0..5 {
        let status = Command::new("curl")
            .args(["-s", "-S", "--fail", "--max-time", "20", "-o", "/dev/null"])
            .args(["-H", &format!("traceparent: {}", sent(n))])
            .arg(format!("http://127.0.0.1:{front_port}/back?rid=fwd{n}"))
            .status()
            .expect("curl is installed (cargo xtask setup)");
        assert!(status.success());
        let line = wait_line(&received, Instant::now() + Duration::from_secs(10), |l| {
            l.starts_with(&format!("rid=fwd{n}|"))
        })
        .expect("the backend got the call");
        backend_parents.push(line.split('|').nth(2).unwrap_or_default().to_string());
    }
    // SAFETY: signal to our own child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    assert!(agent.0.wait().unwrap().success());

    let spans = exported_spans(&spans_file);
    let mut ids = std::collections::HashSet::new();
    for span in &spans {
        assert!(
            ids.insert(span["spanId"].as_str().unwrap().to_string()),
            "two spans share an id: {spans:#?}"
        );
    }
    for (n, backend_parent) in backend_parents.iter().enumerate() {
        let query = format!("rid=fwd{n}");
        let of_request: Vec<&serde_json::Value> = spans
            .iter()
            .filter(|s| string_attribute(s, "url.query") == query)
            .collect();
        let forwarder = of_request
            .iter()
            .find(|s| string_attribute(s, "trace.parent.decision") == "forwarded")
            .unwrap_or_else(|| panic!("{query}: no forwarding CLIENT span: {of_request:#?}"));
        let forwarder_id = forwarder["spanId"].as_str().unwrap();
        assert_eq!(
            backend_parent,
            &format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{forwarder_id}-01"),
            "{query}: the backend's parent is nginx's CLIENT span"
        );
        assert!(
            of_request
                .iter()
                .any(|s| s["kind"] == 2 && s["parentSpanId"] == forwarder["spanId"]),
            "{query}: the backend's SERVER span is its child: {of_request:#?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// nginx's master, stopped with SIGTERM (which stops its workers too; a
/// SIGKILL would leave them running).
struct StopNginx(KillOnDrop);

impl Drop for StopNginx {
    fn drop(&mut self) {
        // SAFETY: signal to our own child.
        unsafe { libc::kill(self.0.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
