//! Kubernetes names on spans, without a cluster: a local HTTP server speaks
//! the API server's list and watch protocol for pods (a `PodList`, then a
//! chunked stream of watch events) with real-shaped objects, and honours
//! the field selector as the real one does. The watcher is the agent's own
//! (kube-rs); the end-to-end test runs `agent run` against it with a
//! server process placed in a cgroup named the way the kubelet names a
//! pod's container.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use agent::kubernetes::{self, PodDirectory, WatchTarget};
use serde_json::{Value, json};

mod common;

use common::*;

const DEPLOYMENT_POD: &str = include_str!("fixtures/kubernetes/pod-deployment.json");
const STATEFULSET_POD: &str = include_str!("fixtures/kubernetes/pod-statefulset.json");

/// The deployment pod's uid and its `app` container's id (fixture).
const POD_UID: &str = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9";
const APP_CONTAINER: &str = "4c8e1f2a9b3d5e7f60718293a4b5c6d7e8f90123456789abcdef0123456789ab";
const STATEFULSET_UID: &str = "7c6b5a49-3827-4165-a4b3-c2d1e0f9a8b7";

fn fixture(json: &str) -> Value {
    serde_json::from_str(json).unwrap()
}

/// A pod of another node (must never reach the agent of node-1).
fn other_nodes_pod() -> Value {
    let mut pod = fixture(STATEFULSET_POD);
    pod["metadata"]["uid"] = json!("99999999-8888-4777-8666-555555555555");
    pod["metadata"]["name"] = json!("ledger-db-1");
    pod["spec"]["nodeName"] = json!("node-2");
    pod
}

/// A DaemonSet's pod that appears on node-1 after the list.
fn daemonset_pod() -> Value {
    let mut pod = fixture(STATEFULSET_POD);
    pod["metadata"]["uid"] = json!("12345678-9abc-4def-8123-456789abcdef");
    pod["metadata"]["name"] = json!("log-agent-x7z2p");
    pod["metadata"]["ownerReferences"][0]["kind"] = json!("DaemonSet");
    pod["metadata"]["ownerReferences"][0]["name"] = json!("log-agent");
    pod
}

/// The API server's pods endpoint: lists honour `fieldSelector` (only
/// `spec.nodeName=`), watches stream what the test sends.
struct FakeApiServer {
    port: u16,
    /// Request lines received, in order.
    requests: Arc<Mutex<Vec<String>>>,
    /// Watch events (`ADDED`, `MODIFIED`, `DELETED` with the object) for
    /// the open watch.
    events: mpsc::Sender<Value>,
}

impl FakeApiServer {
    fn start(pods: Vec<Value>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (events, received) = mpsc::channel::<Value>();
        let received = Arc::new(Mutex::new(received));
        let pods = Arc::new(pods);
        let seen = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (pods, seen, received) =
                    (Arc::clone(&pods), Arc::clone(&seen), Arc::clone(&received));
                std::thread::spawn(move || serve(stream, &pods, &seen, &received));
            }
        });
        Self {
            port,
            requests,
            events,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn send(&self, kind: &str, object: Value) {
        self.events
            .send(json!({ "type": kind, "object": object }))
            .unwrap();
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Serves one connection (HTTP/1.1, kept alive between requests).
fn serve(
    stream: TcpStream,
    pods: &[Value],
    seen: &Mutex<Vec<String>>,
    events: &Mutex<mpsc::Receiver<Value>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // The head's other lines (requests have no body here).
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
        }
        let target = request_line.split(' ').nth(1).unwrap_or("").to_string();
        seen.lock().unwrap().push(target.clone());
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let param = |name: &str| {
            query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == name).then(|| percent_decode(v))
            })
        };
        if path != "/api/v1/pods" {
            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
            let _ = write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            continue;
        }
        let node = param("fieldSelector")
            .and_then(|s| s.strip_prefix("spec.nodeName=").map(str::to_string));
        if param("watch").as_deref() == Some("true") {
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            );
            let _ = out.flush();
            // One chunk per event, until the test ends (the watch's
            // timeoutSeconds is longer than any test).
            loop {
                let event = events
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_millis(200));
                let line = match event {
                    Ok(event) => {
                        let on_node = event["object"]["spec"]["nodeName"].as_str();
                        if node.is_some() && on_node != node.as_deref() {
                            continue;
                        }
                        format!("{event}\n")
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                };
                if write!(out, "{:x}\r\n{line}\r\n", line.len()).is_err() || out.flush().is_err() {
                    return;
                }
            }
        }
        let items: Vec<&Value> = pods
            .iter()
            .filter(|p| node.is_none() || p["spec"]["nodeName"].as_str() == node.as_deref())
            .collect();
        let body = json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": { "resourceVersion": "1000" },
            "items": items,
        })
        .to_string();
        let _ = write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = out.flush();
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `what` every 50 ms for at most `timeout`.
fn eventually(timeout: Duration, mut what: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if what() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    what()
}

#[test]
fn the_watcher_lists_this_nodes_pods_then_follows_their_changes() {
    let api = FakeApiServer::start(vec![
        fixture(DEPLOYMENT_POD),
        fixture(STATEFULSET_POD),
        other_nodes_pod(),
    ]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let directory = Arc::new(PodDirectory::default());
    let target = WatchTarget {
        node_name: "node-1".into(),
        api_server: Some(api.url()),
    };
    let client = {
        let _entered = runtime.enter();
        kubernetes::client(&target).expect("a client for a plain-HTTP API server")
    };
    runtime.spawn(kubernetes::watch(
        client,
        target.node_name.clone(),
        directory.clone(),
    ));

    assert!(
        eventually(Duration::from_secs(10), || directory.len() == 2),
        "the two pods of node-1 listed; requests: {:?}",
        api.requests()
    );
    let pod = directory.get(POD_UID).expect("the deployment's pod");
    assert_eq!(pod.name, "checkout-7d9c6b5f4-x2k8q");
    assert_eq!(pod.container_name(Some(APP_CONTAINER)), Some("app"));
    assert!(directory.get(STATEFULSET_UID).is_some());

    // Changes arrive by the watch, not by listing again.
    api.send("ADDED", daemonset_pod());
    api.send("ADDED", other_nodes_pod());
    api.send("DELETED", fixture(STATEFULSET_POD));
    assert!(
        eventually(Duration::from_secs(10), || {
            directory.get(STATEFULSET_UID).is_none()
        }),
        "the deletion arrives; requests: {:?}",
        api.requests()
    );
    let daemonset = directory
        .get("12345678-9abc-4def-8123-456789abcdef")
        .expect("the new pod");
    assert_eq!(daemonset.owners[0].name, "log-agent");
    assert_eq!(directory.len(), 2, "never another node's pod");

    let requests = api.requests();
    assert!(
        requests.iter().all(|r| {
            r.starts_with("/api/v1/pods?") && r.contains("fieldSelector=spec.nodeName%3Dnode-1")
        }),
        "every request asks for this node's pods only: {requests:?}"
    );
    let watches = requests.iter().filter(|r| r.contains("watch=true")).count();
    assert_eq!(
        (requests.len() - watches, watches),
        (1, 1),
        "one list, then one watch: {requests:?}"
    );
    assert!(
        requests[1].contains("resourceVersion=1000"),
        "the watch starts where the list ended: {requests:?}"
    );
    let readings: Vec<String> = directory.readings().iter().map(|r| r.to_string()).collect();
    assert!(
        readings.contains(&"agent_kubernetes_pods=2".to_string()),
        "{readings:?}"
    );
    runtime.shutdown_background();
}

#[test]
fn an_unreachable_api_server_is_counted_and_retried_not_fatal() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // A closed port, over TLS: the rustls client is built (its crypto
    // provider chosen) and its failure is an error, not a panic.
    let closed = free_port();
    let target = WatchTarget {
        node_name: "node-1".into(),
        api_server: Some(format!("https://127.0.0.1:{closed}")),
    };
    let directory = Arc::new(PodDirectory::default());
    let client = {
        let _entered = runtime.enter();
        kubernetes::client(&target).expect("a TLS client")
    };
    let watch = runtime.spawn(kubernetes::watch(
        client,
        "node-1".into(),
        directory.clone(),
    ));
    let errors = || {
        directory
            .readings()
            .iter()
            .find(|r| r.family == "agent_kubernetes_watch_errors")
            .map(|r| r.to_string())
            .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(10), || errors()
            != "agent_kubernetes_watch_errors_total=0"),
        "the failed list is counted: {}",
        errors()
    );
    assert!(!watch.is_finished(), "the watcher keeps retrying");
    assert!(directory.is_empty());
    runtime.shutdown_background();
}

/// A cgroup named as the kubelet's cgroupfs driver names a container's
/// (`/kubepods/besteffort/pod<uid>/<container id>`), in the memory
/// hierarchy (v1 on the host; the unified one where that is all there is).
struct PodCgroup {
    /// The container's directory; its parents are removed with it.
    dirs: Vec<PathBuf>,
}

impl PodCgroup {
    fn new(pod_uid: &str, container_id: &str) -> Self {
        let root = if Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists() {
            Path::new("/sys/fs/cgroup/memory")
        } else {
            Path::new("/sys/fs/cgroup")
        };
        let mut dirs = Vec::new();
        let mut path = root.to_path_buf();
        for part in [
            "kubepods".to_string(),
            "besteffort".to_string(),
            format!("pod{pod_uid}"),
            container_id.to_string(),
        ] {
            path.push(part);
            if !path.exists() {
                std::fs::create_dir(&path).unwrap();
                dirs.push(path.clone());
            }
        }
        // A failed run's leftover is taken over (and removed this time).
        if dirs.last() != Some(&path) {
            dirs.push(path);
        }
        Self { dirs }
    }

    fn add(&self, pid: u32) {
        let dir = self.dirs.last().expect("a container cgroup of its own");
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            // Empty once the processes are gone (a moment after they are reaped).
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn spans_of_a_pods_process_carry_its_kubernetes_names() {
    if !privileged() {
        return;
    }
    let _agent = one_agent_at_a_time();
    let api = FakeApiServer::start(vec![fixture(DEPLOYMENT_POD), fixture(STATEFULSET_POD)]);
    let config = std::env::temp_dir().join(format!("agent-k8s-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "kubernetes:\n  enabled: true\n  node_name: node-1\n  api_server: {}\n",
            api.url()
        ),
    )
    .unwrap();
    let spans_file = std::env::temp_dir().join(format!("agent-k8s-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&spans_file);

    // The "pod": a server in the container's cgroup, before the agent
    // starts (the agent reads a process once). The cgroup first, so that
    // it is removed after the server is gone, even on a failure.
    let cgroup = PodCgroup::new(POD_UID, APP_CONTAINER);
    let port = free_port();
    let server = start_http_server(port);
    cgroup.add(server.0.id());

    let (agent, err) = start_agent([
        "--config".as_ref(),
        config.as_os_str(),
        "--output-file".as_ref(),
        spans_file.as_os_str(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_line(&err, deadline, |l| {
        l.contains("naming the pods of node node-1")
    })
    .expect("the agent watches node-1's pods");
    wait_line(&err, deadline, |l| l.contains("tracing HTTP")).expect("the agent starts");
    assert!(
        eventually(Duration::from_secs(10), || api.requests().len() >= 2),
        "the agent lists and watches: {:?}",
        api.requests()
    );

    let status = Command::new("curl")
        .args(["-s", "-o", "/dev/null"])
        .arg(format!("http://127.0.0.1:{port}/k8s-names"))
        .status()
        .unwrap();
    assert!(status.success());

    let mut server_resource = None;
    eventually(Duration::from_secs(10), || {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&spans_file) {
            let _ = f.read_to_string(&mut text);
        }
        server_resource = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .flat_map(|batch| {
                batch["resourceSpans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .find(|rs| {
                rs["scopeSpans"][0]["spans"]
                    .as_array()
                    .is_some_and(|spans| spans.iter().any(|s| s["kind"] == json!(2)))
            })
            .map(|rs| rs["resource"].clone());
        server_resource.is_some()
    });
    drop(agent);
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&spans_file);
    let resource = server_resource.expect("the SERVER span was written");
    let attributes: Vec<(String, String)> = resource["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["key"].as_str().unwrap().to_string(),
                a["value"]["stringValue"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    let get = |key: &str| {
        attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("service.name"), Some("checkout"), "{attributes:?}");
    assert_eq!(get("k8s.pod.name"), Some("checkout-7d9c6b5f4-x2k8q"));
    assert_eq!(get("k8s.namespace.name"), Some("shop"));
    assert_eq!(get("k8s.node.name"), Some("node-1"));
    assert_eq!(get("k8s.container.name"), Some("app"));
    assert_eq!(get("k8s.deployment.name"), Some("checkout"));
    assert_eq!(get("k8s.pod.uid"), Some(POD_UID));
    assert_eq!(get("container.id"), Some(APP_CONTAINER));
    drop(server);
    drop(cgroup);
}
