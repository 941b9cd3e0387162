//! Span export end to end, without root: spans go through a `SpanSink` to a
//! real OTLP receiver (gRPC and HTTP/protobuf on 127.0.0.1) or to an
//! OTLP/JSON file, and come out with every field intact.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use agent::export::{ExportSettings, ExporterConfig, OtlpProtocol, OtlpSettings, SpanSink};
use agent::span::{
    Attribute, AttributeValue, Resource, Span, SpanId, SpanKind, SpanStatus, TraceId,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;
use tests::otlp_receiver::{OtlpReceiver, Transport};
use tests::{ScratchDir, free_port};

/// Upper bound of every wait in this file.
const WAIT: Duration = Duration::from_secs(30);

const TRACE: TraceId = TraceId([
    0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36,
]);
const T0: u64 = 1_750_000_000_123_456_789;

fn frontend() -> Arc<Resource> {
    Arc::new(Resource {
        service_name: "frontend".into(),
        attributes: vec![
            Attribute::int("process.pid", 100),
            Attribute::string("process.executable.name", "nginx"),
            Attribute::string("host.name", "node-1"),
        ],
    })
}

fn users() -> Arc<Resource> {
    Arc::new(Resource {
        service_name: "users".into(),
        attributes: vec![
            Attribute::int("process.pid", 200),
            Attribute::string("process.command_line", "python3 app.py --port 8000"),
        ],
    })
}

/// Four spans of one trace across two processes: a server span with a
/// remote parent and a tracestate, a client span under it, a failing server
/// span in the other process, and an unsampled root there.
fn sample_spans() -> Vec<Span> {
    let frontend = frontend();
    let users = users();
    vec![
        Span {
            trace_id: TRACE,
            span_id: SpanId([0x10, 1, 2, 3, 4, 5, 6, 7]),
            parent_span_id: Some(SpanId([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])),
            trace_state: "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".into(),
            flags: 0x03,
            name: "GET /cart".into(),
            kind: SpanKind::Server,
            start_unix_nano: T0,
            end_unix_nano: T0 + 12_000_000,
            attributes: vec![
                Attribute::string("http.request.method", "GET"),
                Attribute::string("url.path", "/cart"),
                Attribute::int("http.response.status_code", 200),
                Attribute::int("server.port", 8080),
            ],
            status: SpanStatus::Unset,
            resource: frontend.clone(),
        },
        Span {
            trace_id: TRACE,
            span_id: SpanId([0x20, 1, 2, 3, 4, 5, 6, 7]),
            parent_span_id: Some(SpanId([0x10, 1, 2, 3, 4, 5, 6, 7])),
            trace_state: String::new(),
            flags: 0x01,
            name: "GET".into(),
            kind: SpanKind::Client,
            start_unix_nano: T0 + 1_000_000,
            end_unix_nano: T0 + 9_000_000,
            attributes: vec![
                Attribute::string("http.request.method", "GET"),
                Attribute::string("server.address", "users"),
                Attribute::int("http.response.status_code", 500),
            ],
            status: SpanStatus::Error("HTTP 500".into()),
            resource: frontend,
        },
        Span {
            trace_id: TRACE,
            span_id: SpanId([0x30, 1, 2, 3, 4, 5, 6, 7]),
            parent_span_id: Some(SpanId([0x20, 1, 2, 3, 4, 5, 6, 7])),
            trace_state: String::new(),
            flags: 0x01,
            name: "GET /users/{id}".into(),
            kind: SpanKind::Server,
            start_unix_nano: T0 + 2_000_000,
            end_unix_nano: T0 + 8_000_000,
            attributes: vec![Attribute::int("http.response.status_code", 500)],
            status: SpanStatus::Error("HTTP 500: database unavailable".into()),
            resource: users.clone(),
        },
        Span {
            trace_id: TraceId([0x77; 16]),
            span_id: SpanId([0x40; 8]),
            parent_span_id: None,
            trace_state: String::new(),
            flags: 0x00,
            name: "GET /health".into(),
            kind: SpanKind::Server,
            start_unix_nano: T0,
            end_unix_nano: T0 + 1,
            attributes: vec![],
            status: SpanStatus::Unset,
            resource: users,
        },
    ]
}

/// Short delays so tests run fast; one batch unless told otherwise.
fn settings() -> ExportSettings {
    ExportSettings {
        max_batch_delay: Duration::from_secs(10),
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        shutdown_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

fn otlp(protocol: OtlpProtocol, endpoint: String) -> ExporterConfig {
    ExporterConfig::Otlp(OtlpSettings {
        endpoint: Some(endpoint),
        protocol: Some(protocol),
        headers: vec![("x-test-token".into(), "t0ken".into())],
        timeout: Some(Duration::from_secs(5)),
    })
}

/// An attribute value in comparable form.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Val {
    Str(String),
    Int(i64),
    Other(String),
}

fn proto_attributes(attributes: &[KeyValue]) -> BTreeSet<(String, Val)> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => Val::Str(s.clone()),
                Some(any_value::Value::IntValue(i)) => Val::Int(*i),
                other => Val::Other(format!("{other:?}")),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn our_attributes(attributes: &[Attribute]) -> BTreeSet<(String, Val)> {
    attributes
        .iter()
        .map(|a| {
            let value = match &a.value {
                AttributeValue::String(s) => Val::Str(s.to_string()),
                AttributeValue::Int(i) => Val::Int(*i),
            };
            (a.key.to_string(), value)
        })
        .collect()
}

/// Asserts that a received span says everything `expected` says.
fn assert_span(
    resource: Option<&ProtoResource>,
    scope: Option<&InstrumentationScope>,
    got: &ProtoSpan,
    expected: &Span,
) {
    let what = &expected.name;
    assert_eq!(
        got.trace_id,
        expected.trace_id.0.to_vec(),
        "{what}: trace id"
    );
    assert_eq!(got.span_id, expected.span_id.0.to_vec(), "{what}: span id");
    let parent = expected
        .parent_span_id
        .map_or_else(Vec::new, |p| p.0.to_vec());
    assert_eq!(got.parent_span_id, parent, "{what}: parent span id");
    assert_eq!(got.trace_state, expected.trace_state, "{what}: tracestate");
    // W3C flags in the low byte; OTLP's "is the parent remote" bits above.
    let remote = expected.kind == SpanKind::Server && expected.parent_span_id.is_some();
    let flags = u32::from(expected.flags) | 0x100 | if remote { 0x200 } else { 0 };
    assert_eq!(got.flags, flags, "{what}: flags");
    assert_eq!(got.name, expected.name);
    let kind = match expected.kind {
        SpanKind::Server => 2,
        SpanKind::Client => 3,
    };
    assert_eq!(got.kind, kind, "{what}: kind");
    assert_eq!(
        got.start_time_unix_nano, expected.start_unix_nano,
        "{what}: start"
    );
    assert_eq!(
        got.end_time_unix_nano, expected.end_unix_nano,
        "{what}: end"
    );
    assert_eq!(
        proto_attributes(&got.attributes),
        our_attributes(&expected.attributes),
        "{what}: attributes"
    );
    let status = got.status.clone().unwrap_or_default();
    match &expected.status {
        SpanStatus::Unset => {
            assert_eq!(
                (status.code, status.message.as_str()),
                (0, ""),
                "{what}: status"
            )
        }
        SpanStatus::Error(message) => {
            assert_eq!(
                (status.code, &status.message),
                (2, message),
                "{what}: status"
            )
        }
    }
    let mut resource_attributes = our_attributes(&expected.resource.attributes);
    resource_attributes.insert((
        "service.name".into(),
        Val::Str(expected.resource.service_name.clone()),
    ));
    let got_resource = resource
        .map(|r| proto_attributes(&r.attributes))
        .unwrap_or_default();
    assert_eq!(got_resource, resource_attributes, "{what}: resource");
    assert_eq!(
        scope.map(|s| s.name.as_str()),
        Some("transparent-tracing-agent"),
        "{what}: scope"
    );
}

/// `(resource, scope, span)` of every span in a request.
fn spans_of(
    request: &ExportTraceServiceRequest,
) -> Vec<(
    Option<&ProtoResource>,
    Option<&InstrumentationScope>,
    &ProtoSpan,
)> {
    let mut spans = Vec::new();
    for resource_spans in &request.resource_spans {
        for scope_spans in &resource_spans.scope_spans {
            for span in &scope_spans.spans {
                spans.push((
                    resource_spans.resource.as_ref(),
                    scope_spans.scope.as_ref(),
                    span,
                ));
            }
        }
    }
    spans
}

/// Asserts that `got` holds exactly the `expected` spans, matched by id.
fn assert_all_spans(
    got: &[(
        Option<&ProtoResource>,
        Option<&InstrumentationScope>,
        &ProtoSpan,
    )],
    expected: &[Span],
) {
    assert_eq!(got.len(), expected.len(), "span count");
    for want in expected {
        let (resource, scope, span) = got
            .iter()
            .find(|(_, _, s)| s.span_id == want.span_id.0)
            .unwrap_or_else(|| panic!("span {:?} ({}) missing", want.span_id, want.name));
        assert_span(*resource, *scope, span, want);
    }
}

/// The service names of a request's `ResourceSpans`, in order.
fn services(request: &ExportTraceServiceRequest) -> Vec<String> {
    request
        .resource_spans
        .iter()
        .map(|rs| {
            let attributes = rs
                .resource
                .as_ref()
                .map(|r| r.attributes.as_slice())
                .unwrap_or(&[]);
            proto_attributes(attributes)
                .into_iter()
                .find_map(|(k, v)| match (k.as_str(), v) {
                    ("service.name", Val::Str(s)) => Some(s),
                    _ => None,
                })
                .unwrap_or_default()
        })
        .collect()
}

async fn export_over(protocol: OtlpProtocol) {
    let receiver = OtlpReceiver::start().unwrap();
    let endpoint = match protocol {
        OtlpProtocol::Grpc => receiver.grpc_endpoint(),
        OtlpProtocol::HttpProtobuf => receiver.http_endpoint(),
    };
    let sink = SpanSink::start(otlp(protocol, endpoint), settings()).unwrap();
    let spans = sample_spans();
    for span in &spans {
        assert!(sink.try_send(span.clone()));
    }
    // Shutdown flushes the one batch (its 10 s delay has not passed).
    let counts = sink.shutdown().await;
    assert_eq!(counts.exported, 4, "{counts:?}");
    assert_eq!(counts.export_errors, 0, "{counts:?}");

    let received = receiver.wait_for_spans_async(spans.len(), WAIT).await;
    let transport = match protocol {
        OtlpProtocol::Grpc => Transport::Grpc,
        OtlpProtocol::HttpProtobuf => Transport::Http,
    };
    assert!(received.iter().all(|s| s.transport == transport));
    let requests = receiver.requests();
    let got: Vec<_> = requests.iter().flat_map(|r| spans_of(&r.request)).collect();
    assert_all_spans(&got, &spans);

    // One batch, two processes: one request holding one ResourceSpans per
    // resource, each with only its own spans.
    assert_eq!(requests.len(), 1, "one request for the batch");
    let request = &requests[0];
    assert_eq!(services(&request.request), ["frontend", "users"]);
    for resource_spans in &request.request.resource_spans {
        let one = ExportTraceServiceRequest {
            resource_spans: vec![resource_spans.clone()],
        };
        let service = services(&one)[0].clone();
        let names: BTreeSet<String> = spans
            .iter()
            .filter(|s| s.resource.service_name == service)
            .map(|s| s.name.to_string())
            .collect();
        let got: BTreeSet<String> = spans_of(&one)
            .iter()
            .map(|(_, _, s)| s.name.clone())
            .collect();
        assert_eq!(got, names, "spans under {service}");
    }
    assert_eq!(
        request.header("x-test-token"),
        Some("t0ken"),
        "configured header"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_keeps_every_field() {
    export_over(OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_keeps_every_field() {
    export_over(OtlpProtocol::HttpProtobuf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_file_lines_decode_into_the_same_spans() {
    let dir = ScratchDir::new("export-json");
    let path = dir.path().join("spans.jsonl");
    let sink = SpanSink::start(ExporterConfig::File(path.clone()), settings()).unwrap();
    let spans = sample_spans();
    for span in &spans {
        sink.send(span.clone()).await;
    }
    let counts = sink.shutdown().await;
    assert_eq!(counts.exported, 4, "{counts:?}");

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one batch, one line: {text}");
    // OTLP/JSON, not the generic protobuf JSON mapping: hex ids, 64-bit
    // integers as strings, enums as numbers.
    let line = lines[0];
    assert!(
        line.contains(r#""traceId":"4bf92f3577b34da6a3ce929d0e0e4736""#),
        "{line}"
    );
    assert!(
        line.contains(r#""parentSpanId":"00f067aa0ba902b7""#),
        "{line}"
    );
    assert!(
        line.contains(&format!(r#""startTimeUnixNano":"{T0}""#)),
        "{line}"
    );
    assert!(line.contains(r#""intValue":"8080""#), "{line}");
    assert!(line.contains(r#""kind":2"#), "{line}");

    let request: ExportTraceServiceRequest = serde_json::from_str(line).unwrap();
    // One line, one batch: both resources side by side in one request.
    assert_eq!(services(&request), ["frontend", "users"]);
    assert_all_spans(&spans_of(&request), &spans);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_file_appends_a_line_per_batch() {
    let dir = ScratchDir::new("export-json-batches");
    let path = dir.path().join("spans.jsonl");
    let settings = ExportSettings {
        max_batch_size: 3,
        ..settings()
    };
    let sink = SpanSink::start(ExporterConfig::File(path.clone()), settings).unwrap();
    let spans = sample_spans();
    for span in &spans {
        sink.send(span.clone()).await;
    }
    sink.shutdown().await;
    let text = std::fs::read_to_string(&path).unwrap();
    let requests: Vec<ExportTraceServiceRequest> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(requests.len(), 2, "{text}");
    let got: Vec<_> = requests.iter().flat_map(spans_of).collect();
    assert_all_spans(&got, &spans);
}

/// OTLP requests carry several batches: each batch is encoded when it is
/// full, and the request goes once `max_request_spans` are staged (what is
/// left goes at shutdown), with each batch's spans grouped by resource.
async fn batches_share_a_request(protocol: OtlpProtocol) {
    let receiver = OtlpReceiver::start().unwrap();
    let endpoint = match protocol {
        OtlpProtocol::Grpc => receiver.grpc_endpoint(),
        OtlpProtocol::HttpProtobuf => receiver.http_endpoint(),
    };
    let settings = ExportSettings {
        max_batch_size: 2,
        max_request_spans: 4,
        ..settings()
    };
    let sink = SpanSink::start(otlp(protocol, endpoint), settings).unwrap();
    // Each batch of two holds both processes.
    let spans = sample_spans();
    for i in [0, 2, 1, 3, 0, 1] {
        sink.send(spans[i].clone()).await;
    }
    // The first four make a request without waiting for the delay (10 s).
    let received = receiver.wait_for_spans_async(4, WAIT).await;
    assert_eq!(received.len(), 4);
    assert_eq!(receiver.requests().len(), 1);
    let counts = sink.shutdown().await;
    assert_eq!(counts.exported, 6, "{counts:?}");
    let requests = receiver.requests();
    let per_request: Vec<usize> = requests
        .iter()
        .map(|r| spans_of(&r.request).len())
        .collect();
    assert_eq!(per_request, [4, 2]);
    // Two batches in the first request, a ResourceSpans per process in
    // each.
    let first = &requests[0].request;
    assert_eq!(services(first), ["frontend", "users", "frontend", "users"]);
    assert_all_spans(&spans_of(first), &spans);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requests_carry_several_batches() {
    batches_share_a_request(OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_carry_several_batches() {
    batches_share_a_request(OtlpProtocol::HttpProtobuf).await;
}

/// Starts the receiver only after the exporter failed against the closed
/// port; the queued spans must arrive once it is up.
async fn retry_until_the_receiver_is_up(protocol: OtlpProtocol) {
    let port = free_port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let settings = ExportSettings {
        max_batch_delay: Duration::from_millis(20),
        max_attempts: 1000,
        ..settings()
    };
    let sink = SpanSink::start(otlp(protocol, format!("http://{addr}")), settings).unwrap();
    let spans = sample_spans();
    for span in &spans {
        assert!(sink.try_send(span.clone()));
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while sink.counts().export_errors < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed attempt: {:?}",
            sink.counts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sink.counts().exported, 0);

    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let receiver = match protocol {
        OtlpProtocol::Grpc => OtlpReceiver::start_at(addr, any),
        OtlpProtocol::HttpProtobuf => OtlpReceiver::start_at(any, addr),
    }
    .unwrap();
    let received = receiver.wait_for_spans_async(spans.len(), WAIT).await;
    assert_eq!(received.len(), spans.len());
    let counts = sink.shutdown().await;
    assert_eq!(counts.exported, 4, "{counts:?}");
    assert_eq!(counts.dropped_after_retries, 0, "{counts:?}");
    assert!(counts.export_errors >= 2, "{counts:?}");
    let requests = receiver.requests();
    let got: Vec<_> = requests.iter().flat_map(|r| spans_of(&r.request)).collect();
    assert_all_spans(&got, &spans);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_retries_until_the_receiver_is_up() {
    retry_until_the_receiver_is_up(OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_export_retries_until_the_receiver_is_up() {
    retry_until_the_receiver_is_up(OtlpProtocol::HttpProtobuf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_dropped_and_counted_after_its_last_attempt() {
    // The batch goes as soon as it is full: exactly one batch of four.
    let settings = ExportSettings {
        max_batch_size: 4,
        max_request_spans: 4,
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        ..settings()
    };
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let sink = SpanSink::start(otlp(OtlpProtocol::HttpProtobuf, endpoint), settings).unwrap();
    for span in sample_spans() {
        assert!(sink.try_send(span));
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while sink.counts().dropped_after_retries < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            sink.counts()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let counts = sink.shutdown().await;
    assert_eq!(counts.exported, 0, "{counts:?}");
    assert_eq!(counts.dropped_after_retries, 4, "{counts:?}");
    assert_eq!(counts.export_errors, 3, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_and_counts() {
    // One span per batch and a long backoff: after its first failed
    // attempt the task sits in backoff and the queue fills.
    let settings = ExportSettings {
        queue_capacity: 4,
        max_batch_size: 1,
        max_request_spans: 1,
        initial_backoff: Duration::from_secs(60),
        max_backoff: Duration::from_secs(60),
        shutdown_timeout: Duration::from_millis(500),
        ..settings()
    };
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let sink = SpanSink::start(otlp(OtlpProtocol::Grpc, endpoint), settings).unwrap();
    let template = sample_spans().remove(0);
    let total = 50u64;
    let mut refused = 0u64;
    for i in 0..total {
        let mut span = template.clone();
        span.span_id = SpanId((i + 1).to_be_bytes());
        if !sink.try_send(span) {
            refused += 1;
        }
    }
    // 4 queued plus at most 1 taken by the task.
    assert!(refused >= total - 5, "refused {refused} of {total}");
    assert_eq!(sink.counts().dropped_queue_full, refused);

    let counts = sink.shutdown().await;
    assert_eq!(counts.dropped_queue_full, refused, "{counts:?}");
    assert_eq!(counts.exported, 0, "{counts:?}");
    // Everything accepted but not delivered is accounted for at shutdown.
    assert_eq!(
        counts.dropped_queue_full + counts.dropped_after_retries,
        total,
        "{counts:?}"
    );
}

/// Marks the child process of [`environment_configures_the_exporter`].
const CHILD_MARKER: &str = "EXPORT_TEST_ENV_CHILD";

/// Child half of [`environment_configures_the_exporter`]: exports with no
/// endpoint or protocol given, so only the environment can say where to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by environment_configures_the_exporter in a child process"]
async fn environment_child() {
    if std::env::var_os(CHILD_MARKER).is_none() {
        return;
    }
    let config = ExporterConfig::Otlp(OtlpSettings {
        headers: vec![("x-test-token".into(), "t0ken".into())],
        ..Default::default()
    });
    let sink = SpanSink::start(config, settings()).unwrap();
    for span in sample_spans() {
        sink.send(span).await;
    }
    let counts = sink.shutdown().await;
    assert_eq!(counts.exported, 4, "{counts:?}");
}

/// `OTEL_EXPORTER_OTLP_*` apply to what is not set explicitly, and an
/// explicit header wins over one of the same name from the environment.
/// The variables are set on a child process (this test binary again), as
/// changing this process's environment would race with the other tests.
#[test]
fn environment_configures_the_exporter() {
    let receiver = OtlpReceiver::start().unwrap();
    let cases = [
        ("grpc", receiver.grpc_endpoint(), Transport::Grpc),
        ("http/protobuf", receiver.http_endpoint(), Transport::Http),
    ];
    for (round, (protocol, endpoint, transport)) in cases.into_iter().enumerate() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "environment_child", "--ignored", "--quiet"])
            .env(CHILD_MARKER, "1")
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env(
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-test-token=from-env,x-env-only=yes%20indeed",
            )
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                panic!("{protocol}: child still running after {WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = child.wait_with_output().unwrap();
        assert!(
            status.success(),
            "{protocol}: child failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let received = receiver.wait_for_spans(4 * (round + 1), WAIT);
        assert_eq!(received.len(), 4 * (round + 1), "{protocol}");
        for request in receiver
            .requests()
            .iter()
            .filter(|r| r.transport == transport)
        {
            let tokens: Vec<&str> = request
                .headers
                .iter()
                .filter(|(name, _)| name == "x-test-token")
                .map(|(_, value)| value.as_str())
                .collect();
            assert_eq!(tokens, ["t0ken"], "{protocol}: explicit header wins");
            assert_eq!(
                request.header("x-env-only"),
                Some("yes indeed"),
                "{protocol}"
            );
        }
    }
}
