//! The agent's `/metrics`, `/healthz` and `/readyz` as their users read
//! them: the running agent, `promtool check metrics`, and a real Prometheus
//! server scraping it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::*;

/// GET `path` from `port` on loopback: (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let status = answer.split(' ').nth(1)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Polls `what` every 100 ms until it gives Some, for at most `timeout`.
fn wait_for<T>(timeout: Duration, mut what: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = what() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of a sample line `name value` (labels included in `name`).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The first value of an instant query on the Prometheus at `port`.
fn query(port: u16, promql: &str) -> Option<f64> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = get(port, &format!("/api/v1/query?query={encoded}"))?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// `agent run` writing spans to /dev/null and serving its metrics on
/// loopback `port`; its stderr lines.
fn start_agent_serving_metrics(port: u16) -> (KillOnDrop, std::sync::mpsc::Receiver<String>) {
    start_agent([
        "--output-file=/dev/null".to_string(),
        format!("--metrics-address=127.0.0.1:{port}"),
    ])
}

/// Runs promtool, Prometheus' own linter, on `text`: exit 0 means no
/// error and no lint.
fn promtool_check(text: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian prometheus, installed by cargo xtask setup)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// Every family the agent can serve, each stage's readings with every
/// label set (the capture's for every kernel and user counter, each
/// output kind's, the proxy's and the Kubernetes watcher's, which a run
/// of the agent here does not all show), passes promtool.
#[test]
fn every_metric_family_passes_promtool() {
    use agent::correlate::{AgreementCounters, CorrelateCounters};
    use agent::export::ExportCounts;
    use agent::metrics::Health;
    use agent::proxy::stats::ProxyCounters;

    let mut readings: Vec<_> = agent_common::counter::NAMES
        .into_iter()
        .chain(agent::capture::USER_COUNTER_NAMES)
        .map(|name| agent::capture::counter_reading(name, 1))
        .collect();
    readings.extend(CorrelateCounters::default().readings());
    for output in ["otlp", "file", "terminal"] {
        readings.extend(ExportCounts::default().readings(output));
    }
    readings.extend(AgreementCounters::default().readings());
    readings.extend(ProxyCounters::default().readings());
    readings.extend(agent::kubernetes::PodDirectory::default().readings());
    let health = std::sync::Arc::new(Health::default());
    health.publish(readings);
    let text = health.encode();
    for family in [
        "agent_capture_dropped_total{reason=\"ringbuf_full\"}",
        "agent_spans_total",
        "agent_export_spans_total{output=\"terminal\",result=\"exported\"}",
        "agent_proxy_contexts_total{outcome=\"waited\"}",
        "agent_proxy_requests_total{context=\"injected\"}",
        "agent_proxy_connections_bypassed_total",
        "agent_kubernetes_pods",
    ] {
        assert!(sample(&text, family).is_some(), "{family} in\n{text}");
    }
    promtool_check(&text);
}

#[test]
fn prometheus_scrapes_the_agents_counters_and_the_probes_answer() {
    if !privileged() {
        return;
    }
    let _agent = one_agent_at_a_time();
    let server_port = free_port();
    let _server = start_http_server(server_port);

    let metrics_port = free_port();
    let (_agent_process, err) = start_agent_serving_metrics(metrics_port);
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_line(&err, deadline, |l| l.contains("tracing HTTP")).expect("the agent starts");

    // Health: live at once, ready once the probes are attached.
    assert_eq!(get(metrics_port, "/healthz").map(|(s, _)| s), Some(200));
    wait_for(Duration::from_secs(10), || {
        (get(metrics_port, "/readyz")?.0 == 200).then_some(())
    })
    .expect("/readyz answers 200 once the agent runs");

    // One traced exchange: curl's CLIENT span and the server's SERVER span.
    let status = Command::new("curl")
        .args(["-s", "-o", "/dev/null"])
        .arg(format!("http://127.0.0.1:{server_port}/metrics-test"))
        .status()
        .unwrap();
    assert!(status.success());
    let text = wait_for(Duration::from_secs(10), || {
        let (_, text) = get(metrics_port, "/metrics")?;
        (sample(&text, "agent_spans_total")? >= 2.0).then_some(text)
    })
    .expect("/metrics counts the two spans within 10 s");
    assert_eq!(
        sample(
            &text,
            "agent_capture_dropped_total{reason=\"ringbuf_full\"}"
        ),
        Some(0.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "agent_export_spans_total{output=\"file\",result=\"exported\"}"
        )
        .is_some(),
        "{text}"
    );

    promtool_check(&text);

    // A real Prometheus server scrapes the agent every second.
    let dir = std::env::temp_dir().join(format!("agent-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: agent\n    static_configs:\n      \
             - targets: ['127.0.0.1:{metrics_port}']\n"
        ),
    )
    .unwrap();
    let prometheus_port = free_port();
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian prometheus, installed by cargo xtask setup)"),
    );
    let up = wait_for(Duration::from_secs(60), || {
        query(prometheus_port, "up{job=\"agent\"}").filter(|v| *v == 1.0)
    });
    assert_eq!(up, Some(1.0), "Prometheus scraped the agent");
    let spans = wait_for(Duration::from_secs(30), || {
        query(prometheus_port, "agent_spans_total").filter(|v| *v >= 2.0)
    });
    assert!(spans.is_some(), "Prometheus stored agent_spans_total >= 2");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_taken_metrics_port_is_reported_and_the_agent_runs_on() {
    if !privileged() {
        return;
    }
    let _agent = one_agent_at_a_time();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (mut agent, err) = start_agent_serving_metrics(port);
    let deadline = Instant::now() + Duration::from_secs(30);
    let warning = wait_line(&err, deadline, |l| l.contains("cannot serve /metrics"))
        .expect("the taken port is reported");
    assert!(warning.contains(&port.to_string()), "{warning}");
    wait_line(&err, deadline, |l| l.contains("tracing HTTP")).expect("and the agent runs on");
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent is still running"
    );
}
