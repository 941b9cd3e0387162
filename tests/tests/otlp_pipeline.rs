//! Privileged: spans of real captured traffic reach a real OTLP receiver
//! (built on the official protobuf definitions) over gRPC and over HTTP, and
//! the OTLP/JSON file decodes with the same definitions.

use std::time::Duration;

use agent::export::{ExportSettings, ExporterConfig, OtlpProtocol, OtlpSettings, SpanSinks};
use agent::span::SpanKind;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind as ProtoKind;
use tests::otlp_receiver::{OtlpReceiver, Transport};
use tests::{
    ScratchDir, capture, curl, fixtures, free_port, privileged, spans_of, start_python,
    wait_listening,
};

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()
}

fn string(v: Option<&Value>) -> Option<&str> {
    match v {
        Some(Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v {
        Some(Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

#[test]
fn captured_spans_reach_an_otlp_receiver_over_grpc_and_http_and_the_json_file() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("otlp");
    let port = free_port();
    let out = dir.path().to_str().unwrap().to_string();
    let server = start_python(
        &dir,
        "recording_server.py",
        fixtures::RECORDING_SERVER,
        &[&port.to_string(), &out, "127.0.0.1"],
    );
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap());
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    curl(&[
        "-A",
        "agent-test/1.0",
        "-H",
        &format!("traceparent: {parent}"),
        &format!("http://127.0.0.1:{port}/orders/7?x=1"),
    ]);

    let events = capture().wait_for_port(port, Duration::from_secs(30), |e| {
        spans_of(e, 100.0).len() >= 2
    });
    let spans = spans_of(&events, 100.0);
    assert_eq!(
        spans.len(),
        2,
        "one CLIENT (curl) and one SERVER (python) span"
    );
    let server_span = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server)
        .unwrap()
        .clone();

    let receiver = OtlpReceiver::start().unwrap();
    let json = dir.path().join("spans.jsonl");
    let outputs = vec![
        ExporterConfig::Otlp(OtlpSettings {
            endpoint: Some(receiver.grpc_endpoint()),
            protocol: Some(OtlpProtocol::Grpc),
            headers: Vec::new(),
            timeout: None,
        }),
        ExporterConfig::Otlp(OtlpSettings {
            endpoint: Some(receiver.http_endpoint()),
            protocol: Some(OtlpProtocol::HttpProtobuf),
            headers: Vec::new(),
            timeout: None,
        }),
        ExporterConfig::File(json.clone()),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let sinks = SpanSinks::start(outputs, &ExportSettings::default()).unwrap();
        for span in spans.clone() {
            sinks.send(span).await;
        }
        sinks.shutdown().await;
    });

    let received = receiver.wait_for_spans(4, Duration::from_secs(30));
    assert_eq!(received.len(), 4, "two spans over each transport");
    for transport in [Transport::Grpc, Transport::Http] {
        let server = received
            .iter()
            .find(|r| r.transport == transport && r.span.kind == ProtoKind::Server as i32)
            .unwrap_or_else(|| panic!("a SERVER span over {transport:?}"));
        let s = &server.span;
        assert_eq!(s.trace_id, hex("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(s.parent_span_id, hex("00f067aa0ba902b7"));
        assert_eq!(s.span_id, server_span.span_id.0.to_vec());
        assert_eq!(s.name, "GET /orders/{id}");
        assert_eq!(
            string(attribute(&s.attributes, "http.request.method")),
            Some("GET")
        );
        assert_eq!(
            string(attribute(&s.attributes, "url.path")),
            Some("/orders/7")
        );
        assert_eq!(string(attribute(&s.attributes, "url.query")), Some("x=1"));
        assert_eq!(
            int(attribute(&s.attributes, "http.response.status_code")),
            Some(200)
        );
        assert_eq!(
            int(attribute(&s.attributes, "server.port")),
            Some(port as i64)
        );
        assert_eq!(
            string(attribute(&s.attributes, "client.address")),
            Some("127.0.0.1")
        );
        assert_eq!(
            string(attribute(&s.attributes, "network.peer.address")),
            Some("127.0.0.1")
        );
        assert_eq!(
            string(attribute(&s.attributes, "network.protocol.version")),
            Some("1.1")
        );
        assert_eq!(
            string(attribute(&s.attributes, "user_agent.original")),
            Some("agent-test/1.0")
        );
        assert!(s.end_time_unix_nano > s.start_time_unix_nano);
        let resource = server.resource.as_ref().unwrap();
        assert!(
            server
                .service_name()
                .is_some_and(|n| n.starts_with("python")),
            "{:?}",
            server.service_name()
        );
        assert_eq!(
            int(attribute(&resource.attributes, "process.pid")),
            Some(server_pid(&server_span))
        );
        let client = received
            .iter()
            .find(|r| r.transport == transport && r.span.kind == ProtoKind::Client as i32)
            .unwrap();
        assert_eq!(
            client.span.span_id,
            hex("00f067aa0ba902b7"),
            "the CLIENT span is the wire parent"
        );
    }

    let text = std::fs::read_to_string(&json).unwrap();
    let decoded: Vec<ExportTraceServiceRequest> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let file_spans: Vec<_> = decoded
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .collect();
    assert_eq!(file_spans.len(), 2);
    let file_server = file_spans
        .iter()
        .find(|s| s.kind == ProtoKind::Server as i32)
        .unwrap();
    assert_eq!(
        file_server.trace_id,
        hex("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(
        file_server
            .attributes
            .iter()
            .find(|kv| kv.key == "url.path")
            .and_then(|kv| kv.value.clone()),
        Some(AnyValue {
            value: Some(Value::StringValue("/orders/7".into()))
        })
    );
    drop(server);
}

fn server_pid(span: &agent::span::Span) -> i64 {
    match span
        .resource
        .attributes
        .iter()
        .find(|a| a.key == "process.pid")
        .map(|a| &a.value)
    {
        Some(agent::span::AttributeValue::Int(pid)) => *pid,
        _ => panic!("no process.pid"),
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
