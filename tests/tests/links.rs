//! Privileged: how outbound calls find their parent, measured against a
//! known true tree (see `tests::links`). The rule under test: never a wrong
//! parent. Thread-per-request servers get every link right from the thread
//! signal; Python event loops from the interpreter's contexts (the first
//! requests of a process, before the agent reads it, get no parent).

use std::time::Duration;

use agent::correlate::PARENT_DECISION_ATTRIBUTE;
use agent::span::{Span, SpanKind};
use tests::links::{event_loop_rounds, measure, pid, python_services, rid, venv_services};
use tests::{ChildGuard, ScratchDir, capture, in_vm, privileged};

/// How long spans may take to arrive.
const WAIT: Duration = Duration::from_secs(30);

/// A thread-per-request frontend: every link right, every trace whole.
#[test]
fn thread_per_request_frontend_links_every_call_right() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("links-threads");
    let (_backend, back_port, frontend, front_port) = python_services(&dir, "threads");
    let (requests, concurrency) = if in_vm() { (100, 8) } else { (1000, 16) };
    let counts = measure(
        "python-threads",
        &frontend,
        front_port,
        back_port,
        requests,
        concurrency,
    );
    // Never wrong. A call made before curl's side of the same request was
    // seen (the server's trace may still change) gets no parent
    // (`none-trace-pending`): rare on the host, more frequent in the slow
    // VMs. Every other link is right.
    assert_eq!(counts.wrong, 0, "{counts:?}");
    // The VMs' share is not measured yet: there only "never wrong" and
    // "some right" are asserted.
    let least_right = if in_vm() { 1 } else { requests * 95 / 100 };
    assert!(counts.right >= least_right, "right: {counts:?}");
}

/// A stdlib asyncio frontend (`asyncio.start_server`, a task per
/// connection): its thread never gives a parent, its contexts do.
#[test]
fn asyncio_streams_frontend_links_calls_through_python_contexts() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("links-asyncio");
    let (_backend, back_port, frontend, front_port) = python_services(&dir, "asyncio");
    let failures = measure_rounds(
        "python-asyncio-streams",
        &frontend,
        front_port,
        back_port,
        event_loop_rounds(),
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The stdlib asyncio frontend under each interpreter built from upstream
/// sources that the agent has a layout for (3.11 to 3.13), and those it
/// has none for (3.8 to 3.10: never a parent, never a wrong one). Ignored:
/// the interpreters are the image's pyenv builds, which `cargo xtask setup`
/// does not install; run by hand with
/// `cargo test -p tests --test links -- --ignored pyenv --nocapture`.
#[test]
#[ignore = "needs the image's pyenv interpreters, not installed by setup"]
fn asyncio_streams_frontend_on_pyenv_interpreters() {
    assert!(privileged(), "run as root");
    capture();
    let root = std::path::Path::new("/root/.pyenv/versions");
    let mut versions: Vec<_> = std::fs::read_dir(root)
        .expect("pyenv's interpreters")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|v| {
            v.starts_with("3.")
                && v.split('.')
                    .nth(1)
                    .is_some_and(|m| m.parse::<u32>().is_ok_and(|m| m >= 8))
        })
        .collect();
    versions.sort();
    let mut failures = Vec::new();
    for version in versions {
        let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
        let dir = ScratchDir::new("links-pyenv");
        let (_backend, back_port, frontend, front_port) =
            tests::links::services_under(&dir, &root.join(&version).join("bin/python3"), "asyncio");
        let name = format!("pyenv-{version}-asyncio-streams");
        if minor >= 11 {
            failures.extend(measure_rounds(
                &name,
                &frontend,
                front_port,
                back_port,
                &[(200, 8)],
            ));
        } else {
            let counts = measure(
                &format!("{name}-c8"),
                &frontend,
                front_port,
                back_port,
                200,
                8,
            );
            if counts.wrong != 0 || counts.right != 0 {
                failures.push(format!("{name}: {counts:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Measures a frontend from the tests' venv (see [`measure_rounds`]).
fn measure_python_frontend(
    name: &str,
    script_name: &str,
    script: &str,
    args: &[&str],
    rounds: &[(usize, usize)],
) -> Vec<String> {
    let dir = ScratchDir::new("links-venv");
    let (_backend, back_port, frontend, front_port) =
        venv_services(&dir, script_name, script, args);
    measure_rounds(name, &frontend, front_port, back_port, rounds)
}

/// Measures a Python event-loop frontend: a first round right after it
/// starts (its first requests come before the agent reads its interpreter,
/// and get no parent), then `rounds`, each with at least 95 % right; never
/// a wrong parent. Returns the failures.
fn measure_rounds(
    name: &str,
    frontend: &ChildGuard,
    front_port: u16,
    back_port: u16,
    rounds: &[(usize, usize)],
) -> Vec<String> {
    let mut failures = Vec::new();
    let first = measure(
        &format!("{name}-first"),
        frontend,
        front_port,
        back_port,
        20,
        1,
    );
    if first.wrong != 0 {
        failures.push(format!("{name}-first: {first:?}"));
    }
    for &(requests, concurrency) in rounds {
        let case = format!("{name}-c{concurrency}");
        let counts = measure(
            &case,
            frontend,
            front_port,
            back_port,
            requests,
            concurrency,
        );
        if counts.wrong != 0 || counts.right < requests * 95 / 100 {
            failures.push(format!("{case}: {counts:?}"));
        }
    }
    failures
}

/// FastAPI on uvicorn, with each event loop and each kind of endpoint:
/// calls get their parent from the interpreter's contexts (the task serving
/// the request), never a wrong one.
#[test]
fn asgi_frontends_link_calls_through_python_contexts() {
    if !privileged() {
        return;
    }
    capture();
    let mut failures = Vec::new();
    for (event_loop, endpoint) in [
        ("asyncio", "async"),
        ("asyncio", "sync"),
        ("uvloop", "async"),
        ("uvloop", "sync"),
    ] {
        failures.extend(measure_python_frontend(
            &format!("uvicorn-{event_loop}-{endpoint}"),
            "asgi_service.py",
            tests::fixtures::ASGI_SERVICE_PY,
            &[event_loop, endpoint],
            event_loop_rounds(),
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// aiohttp: a task per connection creates a task per request.
#[test]
fn aiohttp_frontend_links_calls_through_python_contexts() {
    if !privileged() {
        return;
    }
    capture();
    let failures = measure_python_frontend(
        "aiohttp",
        "aiohttp_service.py",
        tests::fixtures::AIOHTTP_SERVICE_PY,
        &[],
        event_loop_rounds(),
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// nginx forwarding the `traceparent` it receives as it is (`proxy_pass`
/// forwards request headers unchanged), from curl to a python backend: its
/// CLIENT span gets an id of its own as the child of its SERVER span, the
/// backend's SERVER span is the child of nginx's CLIENT span, and no two
/// spans share an id.
#[test]
fn a_forwarding_nginx_gets_spans_of_its_own_and_the_backend_is_its_child() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("links-forward");
    let (_backend, back_port, _python_front, _) = python_services(&dir, "threads");
    let (static_port, front_port) = (tests::free_port(), tests::free_port());
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    let _nginx = tests::start_nginx(
        &dir,
        static_port,
        1,
        &format!(
            "server {{ listen 127.0.0.1:{front_port}; \
             location / {{ proxy_pass http://127.0.0.1:{back_port}; }} }}"
        ),
    );
    tests::wait_listening(format!("127.0.0.1:{front_port}").parse().unwrap());
    let requests = if in_vm() { 10 } else { 40 };
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_of = |n: usize| format!("{:016x}", 0x1000_0000_0000_0000u64 + n as u64);
    for n in 1..=requests {
        tests::curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-H",
            &format!("traceparent: 00-{trace}-{}-01", parent_of(n)),
            &format!("http://127.0.0.1:{front_port}/back?rid=fwd-{n}"),
        ]);
    }
    let events = capture().wait_for_ports(&[front_port, back_port], WAIT, |events| {
        let spans = tests::spans_of(events, 100.0);
        spans
            .iter()
            .filter(|s| rid(s).is_some_and(|r| r.starts_with("fwd-")))
            .count()
            >= 4 * requests
    });
    let spans = tests::spans_of(&events, 100.0);
    let by_id = |id| spans.iter().find(|s| s.span_id == id);
    let mut failures = Vec::new();
    for n in 1..=requests {
        let of_request: Vec<&Span> = spans
            .iter()
            .filter(|s| rid(s).as_deref() == Some(&format!("fwd-{n}")))
            .collect();
        let decision = |s: &Span| s.attribute(PARENT_DECISION_ATTRIBUTE).unwrap_or_default();
        let find = |kind: SpanKind, decision_is: &str| {
            of_request
                .iter()
                .copied()
                .find(|s| s.kind == kind && decision(s) == decision_is)
        };
        let (Some(curl), Some(nginx_client)) = (
            find(SpanKind::Client, "wire"),
            find(SpanKind::Client, "forwarded"),
        ) else {
            failures.push(format!("fwd-{n}: {of_request:#?}"));
            continue;
        };
        let nginx_server = nginx_client.parent_span_id.and_then(by_id);
        let backend_server = of_request
            .iter()
            .find(|s| s.kind == SpanKind::Server && pid(s) != nginx_server.and_then(pid));
        let received = agent::span::SpanId((0x1000_0000_0000_0000u64 + n as u64).to_be_bytes());
        let ok = curl.span_id == received
            && nginx_client.span_id != received
            && nginx_server
                .is_some_and(|s| s.kind == SpanKind::Server && s.parent_span_id == Some(received))
            && backend_server.is_some_and(|s| s.parent_span_id == Some(nginx_client.span_id));
        if !ok {
            failures.push(format!("fwd-{n}: {of_request:#?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
