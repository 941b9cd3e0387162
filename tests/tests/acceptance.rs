//! Privileged: the product's promise on a node-like topology. A client pod
//! calls a frontend pod, which calls nginx in a third pod (`proxy_pass`,
//! forwarding the request's headers as they are), which calls a python
//! backend in a fourth; none has tracing code. The agent's correlation runs
//! live with its proxy in node mode for nginx's and the backend's ports, as
//! `agent run` does. Each request has a unique id, so the true tree is
//! known, and every hop must be right for the right reason:
//!
//! - curl's CLIENT -> the frontend's SERVER: both ends on the node
//!   (`local-peer`);
//! - the frontend's SERVER -> its CLIENT: the signal exact for the
//!   frontend's runtime (`thread`, `python-context`), or no parent; never
//!   another request's;
//! - the frontend's CLIENT -> nginx's SERVER: the traceparent the proxy
//!   injected (`wire`);
//! - nginx's SERVER -> its CLIENT: nginx forwards the traceparent it got
//!   (`forwarded`);
//! - nginx's CLIENT -> the backend's SERVER: the traceparent the proxy
//!   rewrote for the forward (`wire`).

use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agent::config::{ProxyConfig, ProxyMode};
use agent::correlate::PARENT_DECISION_ATTRIBUTE;
use agent::proxy::rules::RedirectRules;
use agent::proxy::{ProxySettings, RunningProxy};
use agent::span::{Span, SpanKind};
use tests::links::{LinkCounts, call_in_parallel, event_loop_rounds, pid, rid};
use tests::live::LiveCorrelation;
use tests::netns::{Pod, Topology, pod_interface_wildcard};
use tests::{ChildGuard, ScratchDir, capture, fixtures, free_port, in_vm, privileged};

/// One proxy at a time in this binary (its chains have fixed names).
static PROXY: Mutex<()> = Mutex::new(());
const WAIT: Duration = Duration::from_secs(60);

/// What a frontend pod runs: the program and its arguments before
/// `PORT BACKEND`.
struct Frontend {
    name: &'static str,
    program: &'static str,
    script: (&'static str, &'static str),
    args: &'static [&'static str],
}

const THREADS: Frontend = Frontend {
    name: "python-threads",
    program: "/usr/bin/python3",
    script: ("link_service.py", fixtures::LINK_SERVICE_PY),
    args: &["threads"],
};
const UVICORN: Frontend = Frontend {
    name: "uvicorn-asyncio",
    program: "/opt/agent-tests/venv/bin/python",
    script: ("asgi_service.py", fixtures::ASGI_SERVICE_PY),
    args: &["asyncio", "async"],
};
const AIOHTTP: Frontend = Frontend {
    name: "aiohttp",
    program: "/opt/agent-tests/venv/bin/python",
    script: ("aiohttp_service.py", fixtures::AIOHTTP_SERVICE_PY),
    args: &[],
};

/// The outcome of a round: the frontend hop's score, and the requests whose
/// other hops were not all right.
struct Round {
    frontend_hop: LinkCounts,
    /// How the frontend's calls got their parent (or why none), by count.
    decisions: std::collections::BTreeMap<String, usize>,
    broken_chains: Vec<String>,
}

/// Starts `program script args` in `pod`, listening on all its addresses,
/// once it says READY.
fn start_in(
    pod: &Pod,
    dir: &ScratchDir,
    program: &str,
    script: (&str, &str),
    args: &[String],
) -> ChildGuard {
    let path = dir.write(script.0, script.1.as_bytes());
    let mut child = ChildGuard(
        pod.exec(program)
            .env("LINK_BIND", "0.0.0.0")
            .arg(path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the service starts (cargo xtask setup)"),
    );
    assert_eq!(child.read_line(), "READY", "{} in {}", script.0, pod.name);
    child
}

/// Runs the topology with `frontend` for each (requests, concurrency) of
/// `rounds`, after a first round of 20 at 1 (a Python frontend's first
/// requests come before the agent reads its interpreter).
fn run_topology(frontend: &Frontend, rounds: &[(usize, usize)]) -> Vec<(String, Round)> {
    let _one_proxy = PROXY.lock().unwrap_or_else(|e| e.into_inner());
    capture();
    let dir = ScratchDir::new("acceptance");
    let topology =
        Topology::new(&["client", "front", "nginx", "back"]).expect("building the pod topology");
    let pod = |name| topology.pod(name).unwrap();
    let (front_port, nginx_port, back_port) = (free_port(), free_port(), free_port());

    let backend = start_in(
        pod("back"),
        &dir,
        "/usr/bin/python3",
        ("link_service.py", fixtures::LINK_SERVICE_PY),
        &["backend".into(), back_port.to_string()],
    );
    let root = dir.path().display();
    let conf = dir.write(
        "nginx.conf",
        format!(
            "daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;\n\
             fastcgi_temp_path {root}/fastcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;\n\
             server {{ listen {nginx_port}; location / {{ proxy_pass http://{}; }} }} }}\n",
            pod("back").addr(back_port)
        )
        .as_bytes(),
    );
    let _nginx = pod("nginx")
        .spawn(
            "nginx",
            &[
                "-c",
                conf.to_str().unwrap(),
                "-p",
                dir.path().to_str().unwrap(),
            ],
        )
        .expect("nginx is installed (cargo xtask setup)");
    let front = start_in(
        pod("front"),
        &dir,
        frontend.program,
        frontend.script,
        &frontend
            .args
            .iter()
            .map(|a| a.to_string())
            .chain([
                front_port.to_string(),
                pod("nginx").addr(nginx_port).to_string(),
            ])
            .collect::<Vec<_>>(),
    );

    let live = LiveCorrelation::start(vec![nginx_port, back_port]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A proxy port of its own per run. Pods reuse addresses from run to run
    // (as Kubernetes reuses pod IPs), and the conntrack entries of the last
    // run's connections (kept 120 s after they close) would then make NAT
    // remap some clients' source ports, which the proxy's agreement with
    // the probes does not survive (see docs/proxy.md, known gaps).
    let listen_port = free_port();
    let config = ProxyConfig {
        enabled: true,
        listen_port,
        mode: ProxyMode::Node,
        ports: vec![nginx_port, back_port],
        pod_interfaces: vec![pod_interface_wildcard()],
        ..ProxyConfig::default()
    };
    let settings = ProxySettings {
        listen: config.proxy_settings().listen,
        ..ProxySettings::default()
    };
    let proxy = runtime
        .block_on(RunningProxy::start(
            settings,
            Some(RedirectRules::from(&config)),
            live.contexts(),
        ))
        .expect("the proxy starts with its rules");

    let mut results = Vec::new();
    let front_url = pod("front").addr(front_port);
    for (round, &(requests, concurrency)) in [(20, 1)].iter().chain(rounds).enumerate() {
        let case = if round == 0 {
            format!("{}-first", frontend.name)
        } else {
            format!("{}-c{concurrency}", frontend.name)
        };
        call_in_parallel(
            pod("client").exec("curl"),
            &front_url.to_string(),
            &case,
            requests,
            concurrency,
        );
        let prefix = format!("{case}-");
        let deadline = Instant::now() + WAIT;
        let spans = loop {
            let spans = live.spans();
            let done = spans
                .iter()
                .filter(|s| rid(s).is_some_and(|r| r.starts_with(&prefix)))
                .count()
                >= 6 * requests;
            if done || Instant::now() > deadline {
                break spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        tests::assert_span_ids_unique(&spans);
        let round = score(
            &case,
            &spans,
            requests,
            front.pid() as i64,
            backend.pid() as i64,
        );
        println!(
            "acceptance {case}: {requests} calls at concurrency {concurrency}: frontend hop right {} / no parent {} / wrong {}; other hops broken in {}; decisions {:?}",
            round.frontend_hop.right,
            round.frontend_hop.no_parent,
            round.frontend_hop.wrong,
            round.broken_chains.len(),
            round.decisions
        );
        results.push((case, round));
    }
    let stats = runtime
        .block_on(proxy.stop())
        .expect("rules removed")
        .snapshot();
    println!(
        "acceptance {}: proxy {stats}; agreement {:?}",
        frontend.name,
        live.contexts().counters()
    );
    results
}

/// Scores each request's chain of six spans (see the module documentation).
fn score(case: &str, spans: &[Span], requests: usize, front: i64, back: i64) -> Round {
    let mut round = Round {
        frontend_hop: LinkCounts::default(),
        decisions: Default::default(),
        broken_chains: Vec::new(),
    };
    let decision = |s: &Span| s.attribute(PARENT_DECISION_ATTRIBUTE).unwrap_or_default();
    for n in 1..=requests {
        let id = format!("{case}-{n}");
        let mine: Vec<&Span> = spans
            .iter()
            .filter(|s| rid(s).as_deref() == Some(&id))
            .collect();
        let one = |what: &str, f: &dyn Fn(&Span) -> bool| -> Option<&Span> {
            let found: Vec<&&Span> = mine.iter().filter(|s| f(s)).collect();
            match found[..] {
                [span] => Some(*span),
                _ => {
                    round_note(&id, what, found.len());
                    None
                }
            }
        };
        let is = |s: &Span, kind: SpanKind, p: i64| s.kind == kind && pid(s) == Some(p);
        let curl = one("curl's CLIENT", &|s| {
            s.kind == SpanKind::Client && pid(s) != Some(front) && decision(s) != "forwarded"
        });
        let front_server = one("the frontend's SERVER", &|s| is(s, SpanKind::Server, front));
        let front_client = one("the frontend's CLIENT", &|s| is(s, SpanKind::Client, front));
        let nginx_server = one("nginx's SERVER", &|s| {
            s.kind == SpanKind::Server && pid(s) != Some(front) && pid(s) != Some(back)
        });
        let nginx_client = one("nginx's CLIENT", &|s| {
            s.kind == SpanKind::Client && decision(s) == "forwarded"
        });
        let back_server = one("the backend's SERVER", &|s| is(s, SpanKind::Server, back));
        let (
            Some(curl),
            Some(front_server),
            Some(front_client),
            Some(nginx_server),
            Some(nginx_client),
            Some(back_server),
        ) = (
            curl,
            front_server,
            front_client,
            nginx_server,
            nginx_client,
            back_server,
        )
        else {
            round
                .broken_chains
                .push(format!("{id}: spans missing: {mine:#?}"));
            continue;
        };
        *round.decisions.entry(decision(front_client)).or_default() += 1;
        match front_client.parent_span_id {
            None => round.frontend_hop.no_parent += 1,
            Some(parent) if parent == front_server.span_id => round.frontend_hop.right += 1,
            Some(_) => {
                eprintln!("{id}: WRONG parent of the frontend's call: {front_client:#?}");
                round.frontend_hop.wrong += 1
            }
        }
        let hops = [
            (
                "curl -> frontend",
                front_server.parent_span_id == Some(curl.span_id),
            ),
            (
                "frontend -> nginx",
                nginx_server.parent_span_id == Some(front_client.span_id),
            ),
            (
                "nginx forwards",
                nginx_client.parent_span_id == Some(nginx_server.span_id),
            ),
            (
                "nginx -> backend",
                back_server.parent_span_id == Some(nginx_client.span_id),
            ),
        ];
        for (hop, right) in hops {
            if !right {
                let summary: Vec<String> = mine
                    .iter()
                    .map(|s| {
                        format!(
                            "{:?} pid {:?} id {} parent {:?} {}",
                            s.kind,
                            pid(s),
                            s.span_id.to_hex(),
                            s.parent_span_id.map(|p| p.to_hex()),
                            decision(s)
                        )
                    })
                    .collect();
                round
                    .broken_chains
                    .push(format!("{id}: {hop}: {summary:#?}"));
            }
        }
    }
    round
}

fn round_note(id: &str, what: &str, found: usize) {
    eprintln!("{id}: {found} spans for {what}, not one");
}

/// Fails on any wrong link; on any broken hop other than the frontend's;
/// and, after the first round, on fewer than `least_right_percent` of the
/// frontend's calls right.
fn assert_rounds(results: &[(String, Round)], least_right_percent: usize) {
    let mut failures = Vec::new();
    for (index, (case, round)) in results.iter().enumerate() {
        let counts = &round.frontend_hop;
        let total = counts.right + counts.no_parent + counts.wrong;
        if counts.wrong != 0 {
            failures.push(format!("{case}: wrong parents: {counts:?}"));
        }
        if index > 0 && counts.right * 100 < total * least_right_percent {
            failures.push(format!(
                "{case}: too few right: {counts:?}, decisions {:?}",
                round.decisions
            ));
        }
        for broken in round.broken_chains.iter().take(3) {
            failures.push(format!("{case}: {broken}"));
        }
        if round.broken_chains.len() > 3 {
            failures.push(format!(
                "{case}: {} broken chains in all",
                round.broken_chains.len()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The share of an event-loop frontend's calls that must be right after the
/// first round, in percent; what this topology must show is that none is
/// wrong (its share is reported; `links.rs` asserts 95 % without the
/// proxy). A call whose context the proxy had to decide, its 10 ms wait for
/// the probes run out, has no parent: here the probes' view reaches the
/// proxy through the test's shared capture, slower than in `agent run`, and
/// on a loaded host a few percent of calls get none (seen: 390 of 400
/// right). In the VMs (about 20 times slower) many more do (6.1: 26 of 40
/// right): there only "never wrong, some right" is asserted.
fn event_loop_least_right() -> usize {
    if in_vm() { 1 } else { 80 }
}

#[test]
fn thread_per_request_frontend_every_trace_whole_and_every_link_right() {
    if !privileged() {
        return;
    }
    let rounds: &[(usize, usize)] = if in_vm() { &[(100, 16)] } else { &[(1000, 16)] };
    let results = run_topology(&THREADS, rounds);
    // In the slow VMs the proxy may have to decide before the probes (its
    // wait is 10 ms): such a call has no parent, never a wrong one.
    assert_rounds(&results, if in_vm() { 95 } else { 100 });
}

#[test]
fn uvicorn_frontend_never_a_wrong_parent() {
    if !privileged() {
        return;
    }
    let results = run_topology(&UVICORN, event_loop_rounds());
    assert_rounds(&results, event_loop_least_right());
}

#[test]
fn aiohttp_frontend_never_a_wrong_parent() {
    if !privileged() {
        return;
    }
    let results = run_topology(&AIOHTTP, event_loop_rounds());
    assert_rounds(&results, event_loop_least_right());
}
