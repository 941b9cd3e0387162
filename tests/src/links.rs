//! Parent links measured against a known true tree: curl calls a frontend
//! with a unique `rid` per request, the frontend calls a backend with the
//! same `rid`, so every span knows which request it belongs to. The
//! frontend's CLIENT span is right when its parent is the frontend's SERVER
//! span of the same `rid`, wrong when it is any other span, and has no
//! parent when the agent was not sure.

use std::time::Duration;

use agent::span::{Span, SpanKind};

use crate::{ChildGuard, ScratchDir, capture, fixtures, free_port, spans_of, start_python};

const WAIT: Duration = Duration::from_secs(60);

/// Right, missing and wrong parents of the frontend's outbound calls.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LinkCounts {
    /// The parent is the frontend's SERVER span of the same request.
    pub right: usize,
    /// No parent (the agent was not sure).
    pub no_parent: usize,
    /// Any other parent.
    pub wrong: usize,
}

/// The `rid` query parameter of a span's request (the test's request id).
pub fn rid(span: &Span) -> Option<String> {
    span.attribute("url.query")?
        .split('&')
        .find_map(|p| p.strip_prefix("rid=").map(str::to_string))
}

/// The `process.pid` of a span's resource.
pub fn pid(span: &Span) -> Option<i64> {
    span.resource
        .attributes
        .iter()
        .find(|a| a.key == "process.pid")
        .and_then(|a| match a.value {
            agent::span::AttributeValue::Int(pid) => Some(pid),
            _ => None,
        })
}

/// Runs `requests` calls at `concurrency` through `frontend` (already
/// started on `front_port`, calling the backend on `back_port`), and scores
/// the links. Also checks the links that are exact by construction: the
/// frontend's SERVER span is the child of curl's CLIENT span, the backend's
/// SERVER span the child of the frontend's CLIENT span (both ends on this
/// node), and every trace is complete.
pub fn measure(
    case: &str,
    frontend: &ChildGuard,
    front_port: u16,
    back_port: u16,
    requests: usize,
    concurrency: usize,
) -> LinkCounts {
    let front_pid = frontend.pid() as i64;
    call_in_parallel(
        std::process::Command::new("curl"),
        &format!("127.0.0.1:{front_port}"),
        case,
        requests,
        concurrency,
    );

    // Every span of this round: the four of each request (curl's call,
    // the frontend's SERVER and CLIENT spans, the backend's SERVER span).
    let prefix = format!("{case}-");
    let events = capture().wait_for_ports(&[front_port, back_port], WAIT, |events| {
        spans_of(events, 100.0)
            .iter()
            .filter(|s| rid(s).is_some_and(|r| r.starts_with(&prefix)))
            .count()
            >= 4 * requests
    });
    let spans = spans_of(&events, 100.0);
    let find = |kind: SpanKind, front: bool, rid_value: &str| -> Vec<&Span> {
        spans
            .iter()
            .filter(|s| {
                s.kind == kind
                    && (pid(s) == Some(front_pid)) == front
                    && rid(s).as_deref() == Some(rid_value)
            })
            .collect()
    };
    let by_id = |id| spans.iter().find(|s| s.span_id == id);
    let mut counts = LinkCounts::default();
    let mut decisions = std::collections::BTreeMap::<String, usize>::new();
    for n in 1..=requests {
        let n = format!("{case}-{n}");
        let [front_server] = find(SpanKind::Server, true, &n)[..] else {
            panic!("{case}: rid {n}: not exactly one frontend SERVER span");
        };
        let [front_client] = find(SpanKind::Client, true, &n)[..] else {
            panic!("{case}: rid {n}: not exactly one frontend CLIENT span");
        };
        let [back_server] = find(SpanKind::Server, false, &n)[..] else {
            panic!("{case}: rid {n}: not exactly one backend SERVER span");
        };
        let [curl_client] = find(SpanKind::Client, false, &n)[..] else {
            panic!("{case}: rid {n}: not exactly one curl CLIENT span");
        };
        assert_eq!(
            front_server.parent_span_id,
            Some(curl_client.span_id),
            "{case}: rid {n}: the frontend's SERVER span is curl's call's child"
        );
        assert_eq!(
            back_server.parent_span_id,
            Some(front_client.span_id),
            "{case}: rid {n}: the backend's SERVER span is the frontend's call's child"
        );
        *decisions
            .entry(
                front_client
                    .attribute(agent::correlate::PARENT_DECISION_ATTRIBUTE)
                    .unwrap_or_default(),
            )
            .or_default() += 1;
        match front_client.parent_span_id {
            None => counts.no_parent += 1,
            Some(parent) if parent == front_server.span_id => {
                assert_eq!(front_client.trace_id, front_server.trace_id);
                counts.right += 1
            }
            Some(parent) => {
                let other = by_id(parent).map(|s| (s.kind, rid(s)));
                eprintln!("{case}: rid {n}: WRONG parent {other:?}");
                counts.wrong += 1
            }
        }
    }
    // One line per case, for the table in the notes.
    println!(
        "links {case}: {requests} calls at concurrency {concurrency}: right {} / no parent {} / wrong {} ; decisions {decisions:?}",
        counts.right, counts.no_parent, counts.wrong
    );
    counts
}

/// Makes `requests` calls `GET /call?rid=<case>-N` to `authority` with
/// `curl` (a command that runs curl, possibly in a namespace), at most
/// `concurrency` at once, and fails unless every call succeeds.
pub fn call_in_parallel(
    mut curl: std::process::Command,
    authority: &str,
    case: &str,
    requests: usize,
    concurrency: usize,
) {
    let status = curl
        .args([
            "--parallel",
            "--parallel-max",
            &concurrency.to_string(),
            "--no-progress-meter",
            "--fail",
            "--max-time",
            "60",
            "--output",
            "/dev/null",
            &format!("http://{authority}/call?rid={case}-[1-{requests}]"),
        ])
        .status()
        .expect("curl is installed (cargo xtask setup)");
    assert!(status.success(), "{case}: every call succeeds");
}

/// The backend of the link tests (answers every request), on a free port.
fn start_backend(dir: &ScratchDir) -> (ChildGuard, u16) {
    let port = free_port();
    let mut backend = start_python(
        dir,
        "link_service.py",
        fixtures::LINK_SERVICE_PY,
        &["backend", &port.to_string()],
    );
    assert_eq!(backend.read_line(), "READY");
    (backend, port)
}

/// The rounds (requests, concurrency) of the event-loop frontends: 8 and
/// 32 concurrent callers (fewer requests in the VMs).
pub fn event_loop_rounds() -> &'static [(usize, usize)] {
    if crate::in_vm() {
        &[(40, 8)]
    } else {
        &[(200, 8), (400, 32)]
    }
}

/// The backend, and a frontend of `mode` calling it.
pub fn python_services(dir: &ScratchDir, mode: &str) -> (ChildGuard, u16, ChildGuard, u16) {
    services_under(dir, std::path::Path::new("/usr/bin/python3"), mode)
}

/// The backend, and a frontend of `mode` under `python` calling it.
pub fn services_under(
    dir: &ScratchDir,
    python: &std::path::Path,
    mode: &str,
) -> (ChildGuard, u16, ChildGuard, u16) {
    let (backend, back_port) = start_backend(dir);
    let front_port = free_port();
    let script = dir.write("link_service.py", fixtures::LINK_SERVICE_PY.as_bytes());
    let mut frontend = ChildGuard(
        std::process::Command::new(python)
            .arg(script)
            .args([mode, &front_port.to_string(), &back_port.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the interpreter is installed"),
    );
    assert_eq!(frontend.read_line(), "READY");
    (backend, back_port, frontend, front_port)
}

/// The backend, and a frontend from the tests' venv (`script` with `args`
/// before the two ports) calling it.
pub fn venv_services(
    dir: &ScratchDir,
    script_name: &str,
    script: &str,
    args: &[&str],
) -> (ChildGuard, u16, ChildGuard, u16) {
    let (backend, back_port) = start_backend(dir);
    let front_port = free_port();
    let ports = [front_port.to_string(), back_port.to_string()];
    let all: Vec<&str> = args
        .iter()
        .copied()
        .chain(ports.iter().map(String::as_str))
        .collect();
    let mut frontend = crate::start_venv_python(dir, script_name, script, &all);
    assert_eq!(frontend.read_line(), "READY");
    (backend, back_port, frontend, front_port)
}

/// Measures `frontend` at each (requests, concurrency) of `rounds`, for a
/// runtime whose calls must never get a parent from the thread signal:
/// fails on any wrong parent and on any parent at all.
pub fn assert_never_linked_by_thread(
    runtime: &str,
    frontend: &ChildGuard,
    front_port: u16,
    back_port: u16,
    rounds: &[(usize, usize)],
) {
    for &(requests, concurrency) in rounds {
        let counts = measure(
            &format!("{runtime}-c{concurrency}"),
            frontend,
            front_port,
            back_port,
            requests,
            concurrency,
        );
        assert_eq!(counts.wrong, 0, "{runtime}: {counts:?}");
        assert_eq!(counts.no_parent, requests, "{runtime}: {counts:?}");
    }
}

/// Builds the Go frontend (`link_service.go`) into `dir` with the system's
/// Go (installed by `cargo xtask setup`) and returns the binary's path.
pub fn build_go_link_service(dir: &ScratchDir) -> std::path::PathBuf {
    let source = dir.write("link_service.go", fixtures::LINK_SERVICE_GO.as_bytes());
    let binary = dir.path().join("link_service");
    let built = std::process::Command::new("/usr/bin/go")
        .arg("build")
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        // Offline and outside any module: the standard library only.
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOCACHE", dir.path().join("go-cache"))
        .status()
        .expect("go is installed (cargo xtask setup)");
    assert!(built.success(), "go build failed");
    binary
}
