//! The configuration's unit tests: parsing, errors and their keys, the
//! flags, the documentation, and the settings handed to the stages.

use std::path::{Path, PathBuf};

use clap::Parser;

use super::error::allowed_values;
use super::*;
use crate::export::{ExporterConfig as Output, OtlpProtocol};
use crate::proxy::ProxyMode;
use crate::proxy::rules::RedirectRules;
use crate::sampling::Sampler;

/// Every key a file can hold, so the docs test below can check none is
/// left undocumented.
const ALL_KEYS: &[&str] = &[
    "tracing.random_sampling",
    "tracing.parent_based",
    "tracing.exporter.endpoint",
    "tracing.exporter.protocol",
    "tracing.exporter.headers",
    "tracing.exporter.timeout_ms",
    "tracing.file",
    "tracing.terminal",
    "capture.max_message_bytes",
    "capture.ring_buffer_bytes",
    "http.request_headers",
    "http.response_headers",
    "http.redact_query_parameters",
    "http.route_heuristic",
    "processes.include",
    "processes.exclude",
    "processes.command_line",
    "proxy.enabled",
    "proxy.listen_port",
    "proxy.mode",
    "proxy.ports",
    "proxy.pod_interfaces",
    "proxy.include_cidrs",
    "proxy.exclude_cidrs",
    "proxy.exclude_ports",
    "proxy.workers",
    "metrics.enabled",
    "metrics.address",
    "kubernetes.enabled",
    "kubernetes.node_name",
    "kubernetes.api_server",
];

const FULL_EXAMPLE: &str = r#"
# Every key, none at its default.
tracing:
  random_sampling: 12.5
  parent_based: false
  exporter:
    endpoint: https://collector.example:4318
    protocol: http/protobuf
    headers: { X-API-Key: abc, tenant: "7" }
    timeout_ms: 2500
  file: /var/log/agent/spans.jsonl
  terminal: true
capture:
  max_message_bytes: 4096
  ring_buffer_bytes: 1048576
http:
  request_headers: [X-Request-ID, user-agent]
  response_headers: [content-type]
  redact_query_parameters: [token, Session]
  route_heuristic: false
processes:
  include: [nginx, python3]
  exclude: [sshd]
  command_line: true
proxy:
  enabled: true
  listen_port: 15006
  mode: host
  ports: [8000]
  pod_interfaces: ["cali+", eth0]
  include_cidrs: [10.0.0.0/8, "fd00::/8"]
  exclude_cidrs: [10.96.0.1]
  exclude_ports: [22]
  workers: 3
metrics:
  enabled: false
  address: 0.0.0.0:9471
kubernetes:
  enabled: true
  node_name: node-7
  api_server: http://127.0.0.1:8001
"#;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    overrides: ConfigOverrides,
}

fn err(yaml: &str) -> ConfigError {
    match Config::from_yaml(yaml) {
        Ok(c) => panic!("expected an error for {yaml:?}, got {c:?}"),
        Err(e) => e,
    }
}

/// A file in the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("agent-config-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write temp file");
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn overrides(args: &[&str]) -> ConfigOverrides {
    let argv = std::iter::once("agent").chain(args.iter().copied());
    Cli::try_parse_from(argv).expect("flags parse").overrides
}

#[test]
fn defaults() {
    let c = Config::default();
    assert_eq!(c.tracing.random_sampling, 100.0);
    assert!(c.tracing.parent_based);
    assert_eq!(c.tracing.exporter, None);
    assert_eq!(c.tracing.file, None);
    assert_eq!(c.tracing.terminal, TerminalMode::Auto);
    assert!(c.terminal_enabled());
    assert_eq!(c.capture.max_message_bytes, 16384);
    assert_eq!(c.capture.ring_buffer_bytes, 8388608);
    assert!(c.http.request_headers.is_empty());
    assert!(c.http.response_headers.is_empty());
    assert_eq!(
        c.http.redact_query_parameters,
        [
            "token",
            "access_token",
            "password",
            "secret",
            "api_key",
            "key",
            "sig",
            "signature",
            "auth"
        ]
    );
    assert!(c.http.route_heuristic);
    assert_eq!(c.processes, ProcessFilterConfig::default());
    assert!(!c.processes.command_line);
    let p = &c.proxy;
    assert!(!p.enabled);
    assert_eq!(p.listen_port, 15001);
    assert_eq!(p.mode, ProxyMode::Node);
    assert_eq!(p.ports, [80, 8080]);
    assert_eq!(p.pod_interfaces, ["veth+"]);
    assert!(p.include_cidrs.is_empty() && p.exclude_cidrs.is_empty() && p.exclude_ports.is_empty());
    c.validate().expect("defaults are valid");
}

#[test]
fn empty_file_is_default() {
    for text in [
        "",
        "\n  \n",
        "# only a comment\n",
        "---\n",
        "~\n",
        "tracing:\ncapture:\n",
    ] {
        assert_eq!(Config::from_yaml(text), Ok(Config::default()), "{text:?}");
    }
    let file = TempFile::new("empty.yaml", "");
    assert_eq!(Config::load(&file.0), Ok(Config::default()));
}

#[test]
fn full_example_parses() {
    let c = Config::from_yaml(FULL_EXAMPLE).expect("full example is valid");
    let t = &c.tracing;
    assert_eq!(t.random_sampling, 12.5);
    assert!(!t.parent_based);
    let e = t.exporter.as_ref().expect("exporter");
    assert_eq!(
        e.endpoint.as_deref(),
        Some("https://collector.example:4318")
    );
    assert_eq!(e.protocol, Some(OtlpProtocol::HttpProtobuf));
    assert_eq!(e.headers.get("x-api-key").map(String::as_str), Some("abc"));
    assert_eq!(e.headers.get("tenant").map(String::as_str), Some("7"));
    assert_eq!(e.timeout_ms, Some(2500));
    assert_eq!(
        t.file.as_deref(),
        Some(Path::new("/var/log/agent/spans.jsonl"))
    );
    assert_eq!(t.terminal, TerminalMode::On);
    assert_eq!(
        c.capture,
        CaptureConfig {
            max_message_bytes: 4096,
            ring_buffer_bytes: 1 << 20
        }
    );
    assert_eq!(c.http.request_headers, ["x-request-id", "user-agent"]);
    assert_eq!(c.http.response_headers, ["content-type"]);
    assert_eq!(c.http.redact_query_parameters, ["token", "session"]);
    assert!(!c.http.route_heuristic);
    assert_eq!(c.processes.include, ["nginx", "python3"]);
    assert_eq!(c.processes.exclude, ["sshd"]);
    assert!(c.processes.command_line);
    let p = &c.proxy;
    assert!(p.enabled);
    assert_eq!((p.listen_port, p.mode), (15006, ProxyMode::Host));
    assert_eq!(p.ports, [8000]);
    assert_eq!(p.pod_interfaces, ["cali+", "eth0"]);
    assert_eq!(
        p.include_cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.0.0.0/8", "fd00::/8"]
    );
    assert_eq!(p.exclude_cidrs[0].to_string(), "10.96.0.1/32");
    assert_eq!(p.exclude_ports, [22]);
    assert_eq!((p.workers, p.proxy_settings().workers), (3, 3));
    assert!(c.terminal_enabled());
    assert_eq!(
        c.kubernetes.kubernetes_settings(),
        crate::kubernetes::KubernetesSettings {
            enabled: crate::kubernetes::Enablement::On,
            node_name: Some("node-7".into()),
            api_server: Some("http://127.0.0.1:8001".into()),
        }
    );
    assert!(!c.metrics.enabled);
    assert_eq!(c.metrics.address, "0.0.0.0:9471");
    assert_eq!(c.metrics.metrics_settings().address, None);
}

/// The configuration the DaemonSet mounts (deploy/base/configmap.yaml)
/// is one this agent accepts.
#[test]
fn the_deployed_configuration_is_valid() {
    let map: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(include_str!("../../../deploy/base/configmap.yaml")).unwrap();
    let text = map["data"]["agent.yaml"].as_str().expect("data.agent.yaml");
    let c = Config::from_yaml(text).unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.processes.command_line, "command lines stay on the node");
    assert!(!c.terminal_enabled());
}

#[test]
fn kubernetes_defaults_to_auto_and_a_bad_api_server_is_named() {
    let c = Config::from_yaml("").unwrap();
    assert_eq!(
        c.kubernetes.kubernetes_settings(),
        crate::kubernetes::KubernetesSettings::default()
    );
    let e = err("kubernetes:\n  api_server: 127.0.0.1:8001\n");
    assert_eq!(e.key(), "kubernetes.api_server");
    let e = err("kubernetes:\n  enabled: sometimes\n");
    assert!(e.to_string().contains("auto, true or false"), "{e}");
}

#[test]
fn metrics_default_on_localhost_and_a_bad_address_is_named() {
    let c = Config::default();
    assert_eq!(
        c.metrics.metrics_settings().address,
        Some(crate::metrics::DEFAULT_ADDRESS)
    );
    let e = err("metrics:\n  address: localhost:9470\n");
    assert_eq!(e.key(), "metrics.address");
    assert!(e.reason().contains("IP:PORT"), "{e}");
    let cli = Cli::parse_from(["x", "--metrics-address", "10.1.2.3:9100"]);
    let c = cli.overrides.load().unwrap();
    assert_eq!(
        c.metrics.metrics_settings().address,
        Some("10.1.2.3:9100".parse().unwrap())
    );
    let cli = Cli::parse_from(["x", "--metrics-address", "nope"]);
    let e = cli.overrides.load().unwrap_err();
    assert!(e.to_string().contains("--metrics-address"), "{e}");
}

#[test]
fn brief_example_parses() {
    // The sample from the design discussion, verbatim apart from `file`.
    let yaml = "tracing:\n  random_sampling: 100\n  parent_based: true\n  exporter:\n    \
                    endpoint: http://127.0.0.1:4317\n    protocol: grpc\n    headers: { x-api-key: abc }\n    \
                    timeout_ms: 10000\n  terminal: auto\n";
    let c = Config::from_yaml(yaml).expect("valid");
    assert_eq!(
        c.tracing.exporter.as_ref().and_then(|e| e.protocol),
        Some(OtlpProtocol::Grpc)
    );
    assert!(
        !c.terminal_enabled(),
        "auto is off once an exporter is configured"
    );
}

#[test]
fn unknown_keys_are_named_with_their_path() {
    let e = err("trcing:\n  random_sampling: 5\n");
    assert_eq!(e.kind(), ConfigErrorKind::UnknownKey);
    assert_eq!(e.key(), "trcing");
    assert!(e.to_string().contains("unknown key trcing"), "{e}");
    assert!(
        e.to_string().contains("tracing"),
        "lists the known keys: {e}"
    );

    let e = err("tracing:\n  exporter:\n    endpont: http://x:4317\n");
    assert_eq!(e.kind(), ConfigErrorKind::UnknownKey);
    assert_eq!(e.key(), "tracing.exporter.endpont");
    let text = e.to_string();
    assert!(
        text.contains("unknown key tracing.exporter.endpont"),
        "{text}"
    );
    assert!(text.contains("endpoint"), "{text}");
    assert!(text.starts_with("line 3 column 5: "), "{text}");

    let e = err("capture:\n  max_message_byte: 10\n");
    assert_eq!(e.key(), "capture.max_message_byte");
    let e = err("proxy:\n  mode: node\n  port: [1]\n");
    assert_eq!(e.key(), "proxy.port");
}

#[test]
fn duplicate_keys_are_errors() {
    let e = err("capture:\n  max_message_bytes: 10\n  max_message_bytes: 20\n");
    assert_eq!(e.key(), "capture.max_message_bytes");
    assert_eq!(
        e.to_string(),
        "line 2 column 3: capture.max_message_bytes: given more than once"
    );
    let e = err("tracing:\n  exporter:\n    headers: {a: x, a: y}\n");
    assert_eq!(e.key(), "tracing.exporter.headers.a");
    let e = err("proxy: {}\nproxy: {}\n");
    assert_eq!(e.key(), "proxy");
}

#[test]
fn sampling_out_of_range() {
    for (value, shown) in [
        ("150", "150"),
        ("-1", "-1"),
        (".nan", "NaN"),
        ("100.5", "100.5"),
        (".inf", "inf"),
    ] {
        let e = err(&format!("tracing:\n  random_sampling: {value}\n"));
        assert_eq!(e.kind(), ConfigErrorKind::InvalidValue);
        assert_eq!(
            e.to_string(),
            format!("tracing.random_sampling: must be between 0 and 100, got {shown}")
        );
    }
    for ok in ["0", "100", "0.5", "33.3"] {
        Config::from_yaml(&format!("tracing:\n  random_sampling: {ok}\n")).expect(ok);
    }
}

#[test]
fn type_errors_name_key_and_allowed_values() {
    let e = err("tracing:\n  random_sampling: lots\n");
    assert_eq!(e.key(), "tracing.random_sampling");
    assert_eq!(
        e.to_string(),
        "line 2 column 20: tracing.random_sampling: expected a number between 0 and 100, got string \"lots\""
    );
    let e = err("capture:\n  max_message_bytes: -5\n");
    assert!(
        e.to_string().ends_with(
            "capture.max_message_bytes: expected an integer between 1 and 16384, got integer -5"
        ),
        "{e}"
    );
    let e = err("capture:\n  ring_buffer_bytes: 1.5\n");
    assert!(
        e.to_string().contains("a power of two of at least 4096"),
        "{e}"
    );
    let e = err("proxy:\n  ports: [80, http]\n");
    assert_eq!(e.key(), "proxy.ports[1]");
    assert!(
        e.to_string()
            .contains("expected a port number between 1 and 65535"),
        "{e}"
    );
    let e = err("proxy:\n  listen_port: 70000\n");
    assert!(
        e.to_string().contains(
            "proxy.listen_port: expected a port number between 1 and 65535, got integer 70000"
        ),
        "{e}"
    );
    let e = err("tracing: [1, 2]\n");
    assert_eq!(
        e.to_string(),
        "line 1 column 10: tracing: expected a mapping of keys, got a list"
    );
    let e = err("[1, 2]\n");
    assert!(
        e.to_string().contains("must be a mapping of sections"),
        "{e}"
    );
    let e = err("tracing:\n  terminal: sometimes\n");
    assert!(
        e.to_string()
            .contains("tracing.terminal: expected auto, true or false, got string \"sometimes\""),
        "{e}"
    );
    let e = err("proxy:\n  mode: cluster\n");
    assert!(
        e.to_string()
            .contains("proxy.mode: expected node or host, got cluster"),
        "{e}"
    );
}

#[test]
fn bad_protocol() {
    let e = err("tracing:\n  exporter:\n    protocol: http/json\n");
    assert_eq!(e.key(), "tracing.exporter.protocol");
    assert!(
        e.to_string()
            .contains("tracing.exporter.protocol: expected grpc or http/protobuf, got http/json"),
        "{e}"
    );
}

#[test]
fn forbidden_headers() {
    for name in [
        "authorization",
        "Cookie",
        "SET-COOKIE",
        "proxy-authorization",
    ] {
        for section in ["request_headers", "response_headers"] {
            let e = err(&format!("http:\n  {section}: [x-request-id, {name}]\n"));
            assert_eq!(e.key(), format!("http.{section}"));
            let text = e.to_string();
            assert!(text.contains(&name.to_ascii_lowercase()), "{text}");
            assert!(text.contains("never leave the agent"), "{text}");
        }
    }
    let e = err("http:\n  request_headers: [\"x request\"]\n");
    assert!(e.to_string().contains("not a valid header name"), "{e}");
}

#[test]
fn header_names_are_lower_cased_and_deduplicated() {
    let c =
        Config::from_yaml("http:\n  request_headers: [X-Request-Id, x-request-id, Traceparent]\n")
            .unwrap();
    assert_eq!(c.http.request_headers, ["x-request-id", "traceparent"]);
}

#[test]
fn capture_ranges() {
    for (yaml, expected) in [
        (
            "max_message_bytes: 0",
            "capture.max_message_bytes: must be between 1 and 16384, got 0",
        ),
        (
            "max_message_bytes: 99999",
            "capture.max_message_bytes: must be between 1 and 16384, got 99999",
        ),
        (
            "ring_buffer_bytes: 5000",
            "capture.ring_buffer_bytes: must be a power of two of at least 4096, got 5000",
        ),
        (
            "ring_buffer_bytes: 2048",
            "capture.ring_buffer_bytes: must be a power of two of at least 4096, got 2048",
        ),
        (
            "ring_buffer_bytes: 0",
            "capture.ring_buffer_bytes: must be a power of two of at least 4096, got 0",
        ),
    ] {
        assert_eq!(err(&format!("capture:\n  {yaml}\n")).to_string(), expected);
    }
    for ok in [
        "max_message_bytes: 1",
        "max_message_bytes: 16384",
        "ring_buffer_bytes: 4096",
        "ring_buffer_bytes: 2147483648",
    ] {
        Config::from_yaml(&format!("capture:\n  {ok}\n")).expect(ok);
    }
}

#[test]
fn exporter_checks() {
    let e = err("tracing:\n  exporter:\n    endpoint: collector:4317\n");
    assert!(
        e.to_string()
            .starts_with("tracing.exporter.endpoint: must be an http:// or https:// URL"),
        "{e}"
    );
    let e = err("tracing:\n  exporter:\n    endpoint: \"http://\"\n");
    assert!(e.to_string().contains("must name a host"), "{e}");
    let e = err("tracing:\n  exporter:\n    timeout_ms: 0\n");
    assert_eq!(
        e.to_string(),
        "tracing.exporter.timeout_ms: must be between 1 and 600000, got 0"
    );
    let e = err("tracing:\n  exporter:\n    headers: {x-api-key: \"abc\\r\\nx-evil: 1\"}\n");
    assert_eq!(e.key(), "tracing.exporter.headers.x-api-key");
    assert!(
        !e.to_string().contains("abc"),
        "the value is not echoed: {e}"
    );

    // Present but empty enables export with every setting left to the
    // exporter; a null section is the same as an absent one.
    let c = Config::from_yaml("tracing:\n  exporter: {}\n").unwrap();
    assert_eq!(c.tracing.exporter, Some(ExporterConfig::default()));
    let c = Config::from_yaml("tracing:\n  exporter:\n").unwrap();
    assert_eq!(c.tracing.exporter, None);
}

#[test]
fn exporter_debug_hides_header_values() {
    let c = Config::from_yaml("tracing:\n  exporter:\n    headers: {x-api-key: s3cr3t}\n").unwrap();
    let debug = format!("{c:?}");
    assert!(
        debug.contains("x-api-key") && !debug.contains("s3cr3t"),
        "{debug}"
    );
}

#[test]
fn terminal_resolution() {
    let mode = |yaml: &str| Config::from_yaml(yaml).unwrap().terminal_enabled();
    assert!(mode(""));
    assert!(!mode("tracing:\n  file: /tmp/spans.jsonl\n"));
    assert!(!mode(
        "tracing:\n  exporter: {endpoint: \"http://c:4317\"}\n"
    ));
    assert!(mode(
        "tracing:\n  file: /tmp/spans.jsonl\n  terminal: true\n"
    ));
    assert!(!mode("tracing:\n  terminal: false\n"));
    assert!(mode("tracing:\n  terminal: \"auto\"\n"));
}

#[test]
fn process_and_proxy_checks() {
    let e = err("processes:\n  include: [/usr/bin/nginx]\n");
    assert_eq!(e.key(), "processes.include");
    let e = err("proxy:\n  ports: [15001]\n");
    assert!(
        e.to_string()
            .contains("must not contain proxy.listen_port (15001)"),
        "{e}"
    );
    let e = err("proxy:\n  exclude_ports: [0]\n");
    assert_eq!(e.key(), "proxy.exclude_ports");
    let e = err("proxy:\n  workers: 5000\n");
    assert_eq!(e.key(), "proxy.workers");
    assert!(e.to_string().contains("at most 1024"), "{e}");
    let e = err("proxy:\n  workers: -1\n");
    assert_eq!(e.key(), "proxy.workers");
    let e = err("proxy:\n  enabled: true\n  ports: []\n");
    assert_eq!(e.key(), "proxy.ports");
    let e = err("proxy:\n  pod_interfaces: [averyveryverylongname+]\n");
    assert_eq!(e.key(), "proxy.pod_interfaces");
    let e = err("proxy:\n  include_cidrs: [10.0.0.1/8]\n");
    assert_eq!(e.key(), "proxy.include_cidrs[0]");
    assert!(e.to_string().contains("did you mean 10.0.0.0/8?"), "{e}");
    let e = err("proxy:\n  exclude_cidrs: [10.0.0.0/33]\n");
    assert!(e.to_string().contains("between 0 and 32"), "{e}");
    let e = err("proxy:\n  exclude_cidrs: [somewhere]\n");
    assert!(e.to_string().contains("expected a CIDR block"), "{e}");
}

#[test]
fn redirect_rules_follow_the_file() {
    assert_eq!(
        ProxyConfig::default().redirect_rules(),
        RedirectRules::default()
    );
    let config = Config::from_yaml(FULL_EXAMPLE).unwrap();
    let rules = config.proxy.redirect_rules();
    assert_eq!(
        (rules.mode, rules.listen_port, &rules.ports[..]),
        (ProxyMode::Host, 15006, &[8000][..])
    );
    assert_eq!(rules.pod_interfaces, ["cali+", "eth0"]);
    assert_eq!(rules.include_cidrs, config.proxy.include_cidrs);
    assert_eq!(rules.exclude_cidrs, config.proxy.exclude_cidrs);
    assert_eq!(rules.exclude_ports, [22]);
    assert!(rules.validate().is_ok());
}

#[test]
fn syntax_errors() {
    let e = err("tracing: [\n");
    assert_eq!(e.kind(), ConfigErrorKind::Syntax);
    assert!(e.to_string().starts_with("invalid YAML: "), "{e}");
    assert!(e.location().is_some());
}

#[test]
fn missing_file_names_the_path() {
    let path = Path::new("/nonexistent/agent-config-test/agent.yaml");
    let e = Config::load(path).unwrap_err();
    assert_eq!(e.kind(), ConfigErrorKind::Io);
    assert!(
        e.to_string()
            .contains("/nonexistent/agent-config-test/agent.yaml"),
        "{e}"
    );
    let e = overrides(&["--config", "/nonexistent/agent-config-test/agent.yaml"])
        .load()
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("/nonexistent/agent-config-test/agent.yaml"),
        "{e}"
    );
}

#[test]
fn file_errors_name_the_file() {
    let file = TempFile::new("bad.yaml", "capture:\n  ring_buffer_bytes: 5000\n");
    let e = Config::load(&file.0).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: capture.ring_buffer_bytes: must be a power of two of at least 4096, got 5000",
            file.0.display()
        )
    );
    let file = TempFile::new("typo.yaml", "http:\n  route_heuristics: false\n");
    let e = Config::load(&file.0).unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "{}:2:3: unknown key http.route_heuristics",
            file.0.display()
        )),
        "{e}"
    );
}

#[test]
fn overrides_win_over_the_file() {
    let file = TempFile::new("override.yaml", FULL_EXAMPLE);
    let path = file.0.to_str().expect("utf-8 temp path");
    let c = overrides(&[
        "--config",
        path,
        "--random-sampling",
        "1",
        "--exporter-endpoint",
        "http://other:4317",
        "--exporter-protocol",
        "grpc",
        "--output-file",
        "/tmp/other.jsonl",
        "--no-terminal",
        "--max-message-bytes",
        "512",
        "--ring-buffer-bytes",
        "65536",
        "--request-header",
        "X-B3-TraceId,x-correlation-id",
        "--include-process",
        "curl",
        "--exclude-process",
        "a",
        "--exclude-process",
        "b",
    ])
    .load()
    .expect("valid");
    assert_eq!(c.tracing.random_sampling, 1.0);
    let e = c.tracing.exporter.as_ref().expect("exporter");
    assert_eq!(e.endpoint.as_deref(), Some("http://other:4317"));
    assert_eq!(e.protocol, Some(OtlpProtocol::Grpc));
    assert_eq!(
        e.timeout_ms,
        Some(2500),
        "keys without a flag keep the file's value"
    );
    assert_eq!(
        c.tracing.file.as_deref(),
        Some(Path::new("/tmp/other.jsonl"))
    );
    assert_eq!(c.tracing.terminal, TerminalMode::Off);
    assert_eq!(
        c.capture,
        CaptureConfig {
            max_message_bytes: 512,
            ring_buffer_bytes: 65536
        }
    );
    assert_eq!(c.http.request_headers, ["x-b3-traceid", "x-correlation-id"]);
    assert_eq!(c.http.response_headers, ["content-type"]);
    assert_eq!(c.processes.include, ["curl"]);
    assert_eq!(c.processes.exclude, ["a", "b"]);

    // An override can repair a file value; validation runs afterwards.
    let bad = TempFile::new("fixable.yaml", "capture:\n  max_message_bytes: 0\n");
    let bad_path = bad.0.to_str().expect("utf-8 temp path");
    let c = overrides(&["--config", bad_path, "--max-message-bytes", "100"])
        .load()
        .unwrap();
    assert_eq!(c.capture.max_message_bytes, 100);
    let e = overrides(&["--config", bad_path]).load().unwrap_err();
    assert!(e.to_string().starts_with(bad_path), "{e}");
}

#[test]
fn overrides_without_file_and_flag_errors() {
    assert_eq!(overrides(&[]).load(), Ok(Config::default()));
    let c = overrides(&["--exporter-protocol", "http/protobuf"])
        .load()
        .unwrap();
    assert_eq!(
        c.tracing.exporter.and_then(|e| e.protocol),
        Some(OtlpProtocol::HttpProtobuf)
    );
    // The last of --terminal / --no-terminal wins.
    let o = overrides(&["--no-terminal", "--terminal"]);
    assert_eq!(o.load().unwrap().tracing.terminal, TerminalMode::On);

    let e = overrides(&["--random-sampling", "150"]).load().unwrap_err();
    assert_eq!(
        e.to_string(),
        "--random-sampling (tracing.random_sampling): must be between 0 and 100, got 150"
    );
    let e = overrides(&["--max-message-bytes", "0"]).load().unwrap_err();
    assert!(
        e.to_string()
            .starts_with("--max-message-bytes (capture.max_message_bytes)"),
        "{e}"
    );
    let e = overrides(&["--request-header", "Authorization"])
        .load()
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("--request-header (http.request_headers)"),
        "{e}"
    );
    assert!(Cli::try_parse_from(["agent", "--exporter-protocol", "http"]).is_err());
}

#[test]
fn cli_definition_is_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}

#[test]
fn every_key_and_flag_is_documented() {
    let docs = include_str!("../../../docs/configuration.md");
    for key in ALL_KEYS {
        let leaf = key.rsplit('.').next().unwrap_or(key);
        assert!(
            docs.contains(&format!("`{leaf}`")),
            "docs/configuration.md lacks {key}"
        );
        assert!(
            allowed_values(key).is_some(),
            "no allowed-values text for {key}"
        );
    }
    use clap::CommandFactory;
    for arg in Cli::command().get_arguments() {
        if let Some(long) = arg.get_long() {
            assert!(
                docs.contains(&format!("`--{long}")),
                "docs/configuration.md lacks --{long}"
            );
        }
    }
    assert!(docs.contains("`--stats-interval"));
}

#[test]
fn every_documented_key_exists() {
    // Each key set to its default must parse: a key in ALL_KEYS that the
    // structs lack would be reported as unknown.
    for key in ALL_KEYS {
        let (section, rest) = key.split_once('.').unwrap_or((key, ""));
        let yaml = match rest.split_once('.') {
            Some((sub, leaf)) => format!("{section}:\n  {sub}:\n    {leaf}: null\n"),
            None => format!("{section}:\n  {rest}: null\n"),
        };
        match Config::from_yaml(&yaml) {
            Err(e) if e.kind() == ConfigErrorKind::UnknownKey => panic!("{key}: {e}"),
            _ => {}
        }
    }
}

/// The words of type errors and of `--help` state the stages' limits and
/// defaults: they must say what the stages check.
#[test]
fn allowed_values_and_flag_help_state_the_stages_limits() {
    use crate::capture::{MIN_RING_BUFFER_BYTES, ProbeSettings};
    use crate::export::MAX_EXPORT_TIMEOUT_MS;
    use agent_common::MAX_MESSAGE_BYTES;
    use clap::CommandFactory;

    let allowed = |key| allowed_values(key).unwrap_or_default();
    assert!(allowed("capture.max_message_bytes").ends_with(&format!(" 1 and {MAX_MESSAGE_BYTES}")));
    assert!(allowed("capture.ring_buffer_bytes").ends_with(&format!(" {MIN_RING_BUFFER_BYTES}")));
    assert!(
        allowed("tracing.exporter.timeout_ms")
            .ends_with(&format!(" 1 and {MAX_EXPORT_TIMEOUT_MS}"))
    );
    assert!(allowed("tracing.random_sampling").ends_with(" 0 and 100"));
    assert!(Sampler::new(0.0, true).is_ok() && Sampler::new(100.0, true).is_ok());
    assert!(Sampler::new(-0.01, true).is_err() && Sampler::new(100.01, true).is_err());

    let help = |long: &str| {
        Cli::command()
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_help().map(ToString::to_string))
            .unwrap_or_default()
    };
    let probe = ProbeSettings::default();
    assert!(
        help("max-message-bytes").contains(&format!(
            "1 to {MAX_MESSAGE_BYTES} [capture.max_message_bytes; default {}]",
            probe.max_message_bytes
        )),
        "{}",
        help("max-message-bytes")
    );
    assert!(
        help("ring-buffer-bytes").contains(&format!(
            ">= {MIN_RING_BUFFER_BYTES} [capture.ring_buffer_bytes; default {}]",
            probe.ring_buffer_bytes
        )),
        "{}",
        help("ring-buffer-bytes")
    );
    assert!(
        help("random-sampling").contains(&format!(
            "0 to 100 [tracing.random_sampling; default {}]",
            Sampler::default().percentage()
        )),
        "{}",
        help("random-sampling")
    );
}

#[test]
fn terminal_is_the_default_output() {
    assert_eq!(
        Config::default().exporters(|_| None),
        vec![Output::Terminal]
    );
}

#[test]
fn otlp_endpoint_in_the_environment_turns_export_on_and_the_terminal_off() {
    let outputs = Config::default()
        .exporters(|k| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c:4317".into()));
    assert_eq!(outputs.len(), 1);
    assert!(matches!(outputs[0], Output::Otlp(_)));
}

#[test]
fn file_and_exporter_from_the_file_are_both_used() {
    let config = Config::from_yaml(
            "tracing:\n  exporter:\n    endpoint: http://127.0.0.1:4318\n    protocol: http/protobuf\n  file: /tmp/x.jsonl\n  terminal: true\n",
        )
        .unwrap();
    let kinds: Vec<&str> = config
        .exporters(|_| None)
        .iter()
        .map(|o| o.kind())
        .collect();
    assert_eq!(kinds, ["otlp", "file", "terminal"]);
}

#[test]
fn sampler_and_span_settings_follow_the_file() {
    let config = Config::from_yaml(
        "tracing:\n  random_sampling: 25\nhttp:\n  request_headers: [X-Request-Id]\n",
    )
    .unwrap();
    assert_eq!(config.sampler().unwrap().percentage(), 25.0);
    assert_eq!(
        config.span_settings().request_headers,
        vec!["x-request-id".to_string()]
    );
}
