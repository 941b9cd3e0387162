//! The agent's OCI image (`cargo xtask image`) run the way the DaemonSet
//! runs it: privileged, in the host's pid and network namespaces, with the
//! tracefs, BTF and bpffs mounts of deploy/base. The agent inside traces a
//! request between two processes of the host and exports it to this test's
//! OTLP receiver, answers its health probes, and stops on SIGTERM.
//!
//! With only the capabilities of deploy/capabilities, the same, and the
//! proxy inside injects trace context and removes its rules at SIGTERM.
//!
//! Host only (xtask's HOST_ONLY_TESTS): podman and the image are not in the
//! VM guests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tests::netns::Netns;
use tests::otlp_receiver::OtlpReceiver;
use tests::{free_port, privileged, wait_listening};

/// The image `cargo xtask image` builds (xtask/src/image.rs, `reference`).
const IMAGE: &str = concat!("localhost/tracing-agent:", env!("CARGO_PKG_VERSION"));

/// podman's options on this machine kind (xtask/src/image.rs,
/// `PODMAN_OPTIONS`, which builds the image with the same).
const PODMAN_OPTIONS: &[&str] = &[
    "--storage-driver=vfs",
    "--runtime=runc",
    "--cgroup-manager=cgroupfs",
    "--events-backend=file",
];

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(PODMAN_OPTIONS)
        .args(args)
        .output()
        .expect("podman (installed by cargo xtask setup)")
}

/// Removes the container however the test ends.
struct Container(String);

impl Container {
    /// What the agent in the container printed, for failure messages.
    fn logs(&self) -> String {
        let out = podman(&["logs", &self.0]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "2", &self.0]);
    }
}

/// A string attribute of a span's resource.
fn resource_string(span: &tests::otlp_receiver::ReceivedSpan, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let attributes = &span.resource.as_ref()?.attributes;
    let kv = attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// The status of GET `path` on loopback `port`, if it answers.
fn status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

#[test]
fn the_image_traces_host_processes_and_exports_over_otlp() {
    if !privileged() {
        return;
    }
    traces_in_the_image("privileged", &["--privileged"]);
}

/// The capabilities deploy/capabilities adds back, read from it (one
/// source of truth for the overlay and this test).
fn overlay_capabilities() -> Vec<String> {
    let overlay = include_str!("../../deploy/capabilities/kustomization.yaml");
    let after_add = overlay
        .split_once("add:")
        .expect("the overlay adds capabilities")
        .1;
    after_add
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .map_while(|l| l.strip_prefix("- "))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_image_runs_with_only_the_capabilities_of_the_overlay() {
    if !privileged() {
        return;
    }
    let security = overlay_security();
    let security: Vec<&str> = security.iter().map(String::as_str).collect();
    traces_in_the_image("capabilities", &security);
}

/// `podman <run>` (a detached `run` of container `name`), which must
/// start; the container is removed however the test ends.
fn start_container(run: &[&str], name: String) -> Container {
    let started = podman(run);
    let container = Container(name);
    assert!(
        started.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    container
}

/// Whether the image is built; outside CI a missing one skips the test.
fn image_present() -> bool {
    if podman(&["image", "exists", IMAGE]).status.success() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{IMAGE} is missing: `cargo xtask test` builds it (stage image) before the host tests"
    );
    eprintln!("SKIPPED: {IMAGE} is missing; build it with `cargo xtask image`");
    false
}

/// The podman options the capability overlay stands for.
fn overlay_security() -> Vec<String> {
    let capabilities = overlay_capabilities();
    assert!(
        capabilities.contains(&"BPF".to_string()),
        "{capabilities:?}"
    );
    vec![
        "--cap-drop=all".to_string(),
        format!("--cap-add={}", capabilities.join(",")),
        "--security-opt=seccomp=unconfined".to_string(),
    ]
}

/// One request to `port` on the namespace's loopback: `traced` when it came
/// through the proxy, `direct` when not (see `serve_traced_or_direct`).
fn traced_or_direct(netns: &Netns, port: u16) -> String {
    netns
        .run(|| {
            let mut stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream
                .write_all(b"GET /image-proxy HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok::<_, std::io::Error>(answer.rsplit("\r\n\r\n").next().unwrap_or("").to_string())
        })
        .unwrap()
        .unwrap_or_else(|e| format!("failed: {e}"))
}

/// The proxy's nat rules in `netns` (lines naming its listen port or guard).
fn proxy_rules(netns: &Netns, listen_port: u16) -> Vec<String> {
    let out = netns
        .exec("iptables-save")
        .args(["-t", "nat"])
        .output()
        .expect("iptables-save");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("--to-ports {listen_port}")))
        .map(str::to_string)
        .collect()
}

/// The proxy in the image, with only the overlay's capabilities, in a
/// network namespace of the test's own (host mode: its rules in that
/// namespace's OUTPUT chain): requests to the proxied port gain a
/// traceparent, and SIGTERM removes the rules.
#[test]
fn the_images_proxy_injects_and_cleans_up_with_only_the_overlays_capabilities() {
    if !privileged() || !image_present() {
        return;
    }
    let netns = Netns::new("image-proxy").expect("a network namespace");
    let port = free_port();
    let listener = netns
        .run(|| std::net::TcpListener::bind(("127.0.0.1", port)))
        .unwrap()
        .expect("the server's port");
    tests::serve_traced_or_direct(listener);
    assert_eq!(traced_or_direct(&netns, port), "direct", "before the agent");

    let listen_port = free_port();
    let metrics_port = free_port();
    let config = std::env::temp_dir().join(format!("image-proxy-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "proxy:\n  enabled: true\n  mode: host\n  listen_port: {listen_port}\n  ports: [{port}]\n\
             metrics:\n  address: 127.0.0.1:{metrics_port}\n"
        ),
    )
    .unwrap();
    let name = format!("agent-image-proxy-{}", std::process::id());
    let network = format!("--network=ns:/run/netns/{}", netns.name());
    let mount = format!(
        "--volume={}:/etc/tracing-agent/agent.yaml:ro",
        config.display()
    );
    let security = overlay_security();
    let mut run = vec!["run", "--detach", "--name", &name];
    run.extend(security.iter().map(String::as_str));
    run.extend_from_slice(&[
        "--pid=host",
        &network,
        "--ulimit=nofile=1024:1024",
        "--ulimit=nproc=1024:1024",
        "--volume=/sys/kernel/tracing:/sys/kernel/tracing",
        "--volume=/sys/kernel/btf:/sys/kernel/btf:ro",
        "--volume=/sys/fs/bpf:/sys/fs/bpf",
        &mount,
        IMAGE,
        "run",
        "--no-terminal",
        "--config",
        "/etc/tracing-agent/agent.yaml",
    ]);
    let container = start_container(&run, name.clone());
    let _ = std::fs::remove_file(&config);
    let logs = || container.logs();
    let deadline = Instant::now() + Duration::from_secs(60);
    while netns.run(|| status(metrics_port, "/readyz")).unwrap() != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the agent in the image never got ready:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let rules = proxy_rules(&netns, listen_port);
    assert!(
        rules.iter().any(|r| r.contains("-m bpf --object-pinned")),
        "guarded REDIRECT rules in the namespace: {rules:#?}\n{}",
        logs()
    );
    assert_eq!(
        traced_or_direct(&netns, port),
        "traced",
        "through the proxy:\n{}",
        logs()
    );

    let stopped = podman(&["stop", "--time", "20", &container.0]);
    assert!(stopped.status.success());
    let inspect = podman(&["inspect", "--format", "{{.State.ExitCode}}", &container.0]);
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        "0",
        "exit code after SIGTERM:\n{}",
        logs()
    );
    assert_eq!(
        proxy_rules(&netns, listen_port),
        Vec::<String>::new(),
        "SIGTERM removes the rules:\n{}",
        logs()
    );
    assert_eq!(traced_or_direct(&netns, port), "direct", "after the agent");
}

/// Runs the image with `security` (podman options) as the DaemonSet runs
/// it, and checks that it traces, exports, answers its probes and stops.
fn traces_in_the_image(label: &str, security: &[&str]) {
    if !image_present() {
        return;
    }
    let receiver = OtlpReceiver::start().unwrap();
    let server_port = free_port();
    let mut server = tests::ChildGuard(
        Command::new("/usr/bin/python3")
            .args(["-m", "http.server", &server_port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(format!("127.0.0.1:{server_port}").parse().unwrap());

    let metrics_port = free_port();
    let name = format!("agent-image-test-{label}-{}", std::process::id());
    let metrics_address = format!("--metrics-address=127.0.0.1:{metrics_port}");
    let endpoint = format!("--exporter-endpoint={}", receiver.grpc_endpoint());
    let mut run = vec!["run", "--detach", "--name", &name];
    run.extend_from_slice(security);
    run.extend_from_slice(&[
        "--pid=host",
        "--network=host",
        "--ulimit=nofile=1024:1024",
        "--ulimit=nproc=1024:1024",
        "--volume=/sys/kernel/tracing:/sys/kernel/tracing",
        "--volume=/sys/kernel/btf:/sys/kernel/btf:ro",
        "--volume=/sys/fs/bpf:/sys/fs/bpf",
        IMAGE,
        "run",
        "--no-terminal",
        &endpoint,
        &metrics_address,
    ]);
    let container = start_container(&run, name.clone());
    let logs = || container.logs();

    // Ready once its probes are attached, as the kubelet would see it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(metrics_port, "/readyz") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the agent in the image never got ready:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status(metrics_port, "/healthz"), Some(200));

    // The client runs in a container of its own (the host's file system
    // under an overlay, `--rootfs /:O`), so its CLIENT span must carry that
    // container's id, read from its cgroup; the server runs on the host.
    let cid_file = std::env::temp_dir().join(format!("{}-curl.cid", container.0));
    let _ = std::fs::remove_file(&cid_file);
    let url = format!("http://127.0.0.1:{server_port}/from-the-image-{label}");
    let cid_option = format!("--cidfile={}", cid_file.display());
    let curl = podman(&[
        "run",
        "--rm",
        &cid_option,
        "--network=host",
        "--ulimit=nofile=1024:1024",
        "--ulimit=nproc=1024:1024",
        "--rootfs",
        "/:O",
        "/usr/bin/curl",
        "--silent",
        "--show-error",
        "--output",
        "/dev/null",
        &url,
    ]);
    assert!(
        curl.status.success(),
        "curl in a container: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let curl_container = std::fs::read_to_string(&cid_file).unwrap();
    let _ = std::fs::remove_file(&cid_file);
    // The agent traces the whole machine (another test's traffic too):
    // wait for this request's two spans.
    let name = format!("GET /from-the-image-{label}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let ours = loop {
        let ours: Vec<_> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.span.name == name)
            .collect();
        if ours.len() >= 2 || Instant::now() >= deadline {
            break ours;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ours.len(), 2, "a CLIENT and a SERVER span:\n{}", logs());
    let server_span = ours
        .iter()
        .find(|s| s.span.kind == 2)
        .expect("the server's SERVER span");
    let client_span = ours
        .iter()
        .find(|s| s.span.kind == 3)
        .expect("curl's CLIENT span");
    assert_eq!(server_span.span.trace_id, client_span.span.trace_id);
    assert_eq!(server_span.span.parent_span_id, client_span.span.span_id);
    assert_eq!(client_span.service_name(), Some("curl"));
    assert_eq!(
        resource_string(client_span, "container.id").as_deref(),
        Some(curl_container.trim()),
        "the CLIENT span names curl's container"
    );
    assert_eq!(
        resource_string(server_span, "container.id"),
        None,
        "the server runs on the host"
    );

    // SIGTERM, as the kubelet stops a pod: the agent exits on its own.
    let stopped = podman(&["stop", "--time", "20", &container.0]);
    assert!(stopped.status.success());
    let inspect = podman(&["inspect", "--format", "{{.State.ExitCode}}", &container.0]);
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        "0",
        "exit code after SIGTERM:\n{}",
        logs()
    );
    let _ = server.0.kill();
}
