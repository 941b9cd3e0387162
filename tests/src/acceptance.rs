//! The acceptance topology: the product's promise on a node-like topology. A client pod
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

use crate::links::{LinkCounts, call_in_parallel, pid, rid};
use crate::live::LiveCorrelation;
use crate::netns::{Pod, Topology, start_node_proxy};
use crate::{ChildGuard, ScratchDir, capture, fixtures, free_port, in_vm};
use agent::correlate::PARENT_DECISION_ATTRIBUTE;
use agent::span::{Span, SpanKind};

/// One proxy at a time in this binary (its chains have fixed names).
static PROXY: Mutex<()> = Mutex::new(());
const WAIT: Duration = Duration::from_secs(60);

/// What a frontend pod runs.
pub struct Frontend {
    /// The frontend's name in the rounds' names and the output.
    pub name: &'static str,
    /// Writes what the frontend needs into the scratch directory (a script,
    /// a binary) and returns its command line before `PORT BACKEND`.
    pub command: fn(&ScratchDir) -> Vec<String>,
    /// A Python interpreter: the rounds after the first wait until the
    /// agent reads its contexts (the first round shows what comes before).
    pub python: bool,
}

/// Python's ThreadingHTTPServer: a thread per request.
pub const THREADS: Frontend = Frontend {
    name: "python-threads",
    command: |dir| {
        let script = dir.write("link_service.py", fixtures::LINK_SERVICE_PY.as_bytes());
        strings(&["/usr/bin/python3", path(&script), "threads"])
    },
    python: true,
};
/// FastAPI on uvicorn's plain asyncio loop, `async def` endpoint.
pub const UVICORN: Frontend = Frontend {
    name: "uvicorn-asyncio",
    command: |dir| {
        let script = dir.write("asgi_service.py", fixtures::ASGI_SERVICE_PY.as_bytes());
        strings(&[crate::TEST_VENV_PYTHON, path(&script), "asyncio", "async"])
    },
    python: true,
};
/// aiohttp's server and client.
pub const AIOHTTP: Frontend = Frontend {
    name: "aiohttp",
    command: |dir| {
        let script = dir.write(
            "aiohttp_service.py",
            fixtures::AIOHTTP_SERVICE_PY.as_bytes(),
        );
        strings(&[crate::TEST_VENV_PYTHON, path(&script)])
    },
    python: true,
};
/// Go's net/http server and client (goroutines on an M:N scheduler).
pub const GO: Frontend = Frontend {
    name: "go-net-http",
    command: |dir| vec![path(&crate::links::build_go_link_service(dir)).to_string()],
    python: false,
};
/// Node.js's http server and client (an event loop).
pub const NODE: Frontend = Frontend {
    name: "node-http",
    command: |dir| {
        let script = dir.write("link_service.js", fixtures::LINK_SERVICE_JS.as_bytes());
        strings(&["/usr/bin/node", path(&script)])
    },
    python: false,
};

fn strings(all: &[&str]) -> Vec<String> {
    all.iter().map(|s| s.to_string()).collect()
}

fn path(path: &std::path::Path) -> &str {
    path.to_str().expect("scratch paths are UTF-8")
}

/// The outcome of a round: the frontend hop's score, and the requests whose
/// other hops were not all right.
pub struct Round {
    /// Right / no parent / wrong of the frontend's calls.
    pub frontend_hop: LinkCounts,
    /// How the frontend's calls got their parent (or why none), by count.
    pub decisions: std::collections::BTreeMap<String, usize>,
    /// The requests whose other hops were not all right.
    pub broken_chains: Vec<String>,
}

/// Starts `command` in `pod`, listening on all its addresses, once it says
/// READY.
fn start_in(pod: &Pod, command: &[String]) -> ChildGuard {
    let mut child = ChildGuard(
        pod.exec(&command[0])
            .env("LINK_BIND", "0.0.0.0")
            .args(&command[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the service starts (cargo xtask setup)"),
    );
    assert_eq!(child.read_line(), "READY", "{command:?} in {}", pod.name);
    child
}

/// Runs the topology with `frontend` for each (requests, concurrency) of
/// `rounds`, after a first round of 20 at 1 (a Python frontend's first
/// requests come before the agent reads its interpreter).
pub fn run_topology(frontend: &Frontend, rounds: &[(usize, usize)]) -> Vec<(String, Round)> {
    let _one_proxy = PROXY.lock().unwrap_or_else(|e| e.into_inner());
    capture();
    let dir = ScratchDir::new("acceptance");
    let topology =
        Topology::new(&["client", "front", "nginx", "back"]).expect("building the pod topology");
    let pod = |name| topology.pod(name).unwrap();
    let (front_port, nginx_port, back_port) = (free_port(), free_port(), free_port());

    let backend_script = dir.write("link_service.py", fixtures::LINK_SERVICE_PY.as_bytes());
    let backend = start_in(
        pod("back"),
        &strings(&[
            "/usr/bin/python3",
            path(&backend_script),
            "backend",
            &back_port.to_string(),
        ]),
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
    let mut front_command = (frontend.command)(&dir);
    front_command.extend([
        front_port.to_string(),
        pod("nginx").addr(nginx_port).to_string(),
    ]);
    let front = start_in(pod("front"), &front_command);

    let live = LiveCorrelation::start(vec![nginx_port, back_port]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A proxy port of its own per run, so that runs never share conntrack
    // entries (pods reuse addresses from run to run; a remapped source port
    // is handled, see proxy::conntrack, but need not be provoked here).
    let listen_port = free_port();
    let proxy = start_node_proxy(
        &runtime,
        listen_port,
        vec![nginx_port, back_port],
        live.contexts(),
    );

    let mut results = Vec::new();
    let front_url = pod("front").addr(front_port);
    for (round, &(requests, concurrency)) in [(20, 1)].iter().chain(rounds).enumerate() {
        let case = if round == 0 {
            format!("{}-first", frontend.name)
        } else {
            format!("{}-c{concurrency}", frontend.name)
        };
        if round == 1 && frontend.python {
            let waited = capture().wait_python_watched(front.pid(), WAIT);
            println!(
                "acceptance {}: the agent read the interpreter {waited:?} after the first round",
                frontend.name
            );
            assert!(
                waited.is_some(),
                "{}: the interpreter is never read",
                frontend.name
            );
        }
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
        crate::assert_span_ids_unique(&spans);
        let round = score(
            &case,
            &spans,
            requests,
            front.pid() as i64,
            backend.pid() as i64,
        );
        // For a round short of right links: whether the kernel failed to
        // read contexts, and whether the frontend was still watched.
        let python: Vec<_> = capture()
            .counters()
            .into_iter()
            .filter(|(name, _)| name.starts_with("python"))
            .collect();
        println!(
            "acceptance {case}: capture {python:?}, frontend watched: {}",
            capture()
                .wait_python_watched(front.pid(), Duration::ZERO)
                .is_some()
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
    let stats = runtime.block_on(proxy.stop()).expect("rules removed");
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
pub fn assert_rounds(results: &[(String, Round)], least_right_percent: usize) {
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
pub fn event_loop_least_right() -> usize {
    if in_vm() { 1 } else { 80 }
}
