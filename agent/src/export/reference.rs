//! The official conversion of our spans to OTLP, the reference the agent's
//! own encoders are held to: each span becomes the SDK's `SpanData` and
//! `opentelemetry_proto::transform` builds the request from them, as
//! `opentelemetry-otlp` does. The agent does not send these (its protobuf
//! and OTLP/JSON are written straight from the span model, see
//! `otlp_proto` and `otlp_json`), so the SDK is a dev-dependency: this file
//! is compiled into the unit tests (`export::reference`) and, through a
//! `#[path]` module, into the pipeline benchmark. It names everything
//! through `crate::span` and `crate::export`, which the benchmark's root
//! provides as imports of the agent's modules.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanContext, SpanKind as OtelSpanKind, Status, TraceFlags, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use crate::export::otlp::parent_is_remote;
use crate::export::{SCOPE_NAME, SCOPE_VERSION, SERVICE_NAME, group_by_resource};
use crate::span::{AttributeValue, Resource, Span, SpanKind, SpanStatus};

/// The OTLP request for `spans`, as `opentelemetry-otlp` builds it: one
/// `ResourceSpans` per distinct resource (in order of first appearance),
/// each with one `ScopeSpans` of scope `transparent-tracing-agent`.
pub fn export_request(spans: &[Span]) -> ExportTraceServiceRequest {
    let scope = scope();
    let resource_spans = group_by_resource(spans)
        .into_iter()
        .flat_map(|group| {
            let resource =
                ResourceAttributesWithSchema::from(&sdk_resource(&spans[group[0]].resource));
            let batch = group
                .iter()
                .map(|&i| span_data(&spans[i], &scope))
                .collect();
            group_spans_by_resource_and_scope(batch, &resource)
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

/// The instrumentation scope every exported span carries.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope::builder(SCOPE_NAME)
        .with_version(SCOPE_VERSION)
        .build()
}

/// Our resource as an SDK resource: `service.name` plus its attributes.
pub fn sdk_resource(resource: &Resource) -> opentelemetry_sdk::Resource {
    let attributes = resource
        .attributes
        .iter()
        .filter(|a| a.key != SERVICE_NAME)
        .map(|a| KeyValue::new(a.key.to_string(), value(&a.value)))
        .chain(std::iter::once(KeyValue::new(
            SERVICE_NAME,
            resource.service_name.clone(),
        )));
    opentelemetry_sdk::Resource::builder_empty()
        .with_attributes(attributes)
        .build()
}

fn value(value: &AttributeValue) -> Value {
    match value {
        AttributeValue::String(s) => Value::from(s.to_string()),
        AttributeValue::Int(i) => Value::I64(*i),
    }
}

/// Our span as SDK span data.
pub fn span_data(span: &Span, scope: &InstrumentationScope) -> SpanData {
    let trace_state = if span.trace_state.is_empty() {
        TraceState::default()
    } else {
        // The SDK's own parser decides here, and a value it rejects is
        // dropped rather than the whole span.
        TraceState::from_str(&span.trace_state).unwrap_or_default()
    };
    let span_context = SpanContext::new(
        opentelemetry::TraceId::from_bytes(span.trace_id.0),
        opentelemetry::SpanId::from_bytes(span.span_id.0),
        TraceFlags::new(span.flags),
        false,
        trace_state,
    );
    SpanData {
        span_context,
        parent_span_id: span
            .parent_span_id
            .map_or(opentelemetry::SpanId::INVALID, |p| {
                opentelemetry::SpanId::from_bytes(p.0)
            }),
        parent_span_is_remote: parent_is_remote(span),
        span_kind: match span.kind {
            SpanKind::Server => OtelSpanKind::Server,
            SpanKind::Client => OtelSpanKind::Client,
        },
        name: Cow::Owned(span.name.to_string()),
        start_time: unix_time(span.start_unix_nano),
        end_time: unix_time(span.end_unix_nano),
        attributes: span
            .attributes
            .iter()
            .map(|a| KeyValue::new(a.key.to_string(), value(&a.value)))
            .collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match &span.status {
            SpanStatus::Unset => Status::Unset,
            SpanStatus::Error(message) => Status::error(message.clone()),
        },
        instrumentation_scope: scope.clone(),
    }
}

fn unix_time(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// `request` with what protobuf does not tell apart made equal, for
/// comparing our encoders' requests with the official one's: a status of
/// all defaults is an unset status, as an absent one is; the SDK keeps
/// resource attributes in a hash map, so their order is not the spans'
/// (sorted by key here).
#[allow(
    dead_code,
    reason = "the pipeline benchmark includes this file and compares nothing"
)]
pub fn normalized(mut request: ExportTraceServiceRequest) -> ExportTraceServiceRequest {
    use opentelemetry_proto::tonic::trace::v1::Status as ProtoStatus;
    for resource_spans in &mut request.resource_spans {
        if let Some(resource) = &mut resource_spans.resource {
            resource.attributes.sort_by(|a, b| a.key.cmp(&b.key));
        }
        for scope_spans in &mut resource_spans.scope_spans {
            for span in &mut scope_spans.spans {
                if span.status == Some(ProtoStatus::default()) {
                    span.status = None;
                }
            }
        }
    }
    request
}
