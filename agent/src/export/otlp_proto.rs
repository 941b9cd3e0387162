//! OTLP protobuf, encoded straight from the span model: the bytes of an
//! `ExportTraceServiceRequest` (opentelemetry-proto's
//! `collector/trace/v1`), which the OTLP/gRPC and HTTP/protobuf transports
//! ([`super::otlp`]) send as they are.
//!
//! The message is the one the official path builds (the SDK's `SpanData`
//! converted by `opentelemetry_proto::transform`, as `opentelemetry-otlp`
//! does; see `export/reference.rs`): one `ResourceSpans` per resource
//! group, its `Resource` holding `service.name` and the resource's other
//! attributes, one `ScopeSpans` of scope `transparent-tracing-agent` and
//! the agent's version, and per span its ids, tracestate, parent, flags
//! (the W3C flags and the is-remote bits), name, kind, times, attributes and
//! status. Fields holding their default value are left out, as protobuf
//! does; one of them is a status of all defaults, which the official
//! conversion sends as an empty message for an unset status (an absent one
//! reads the same). As in the OTLP/JSON writer, a tracestate is written as
//! the span holds it, where the SDK drops one its own parser rejects (the
//! correlator has already checked it against W3C's rules). A test decodes
//! the bytes with the official prost types and compares the message with
//! the official conversion's.
//!
//! Nested messages are length-delimited, and the length comes first: each
//! request is encoded in two passes over the spans, the first computing
//! every span's length (kept in a scratch vector reused from request to
//! request, so encoding allocates nothing per span), the second writing.

use bytes::{BufMut, BytesMut};
use opentelemetry_proto::tonic::trace::v1::{SpanFlags, span, status};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use super::otlp::parent_is_remote;
use super::{SCOPE_NAME, SCOPE_VERSION, SERVICE_NAME, group_by_resource};
use crate::span::{Attribute, AttributeValue, Resource, Span, SpanKind, SpanStatus};

/// Field numbers of the messages written (opentelemetry-proto 1.x).
mod field {
    /// `ExportTraceServiceRequest.resource_spans`.
    pub const REQUEST_RESOURCE_SPANS: u32 = 1;
    /// `ResourceSpans.resource`.
    pub const RESOURCE_SPANS_RESOURCE: u32 = 1;
    /// `ResourceSpans.scope_spans`.
    pub const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
    /// `Resource.attributes`.
    pub const RESOURCE_ATTRIBUTES: u32 = 1;
    /// `ScopeSpans.scope`.
    pub const SCOPE_SPANS_SCOPE: u32 = 1;
    /// `ScopeSpans.spans`.
    pub const SCOPE_SPANS_SPANS: u32 = 2;
    /// `InstrumentationScope.name`.
    pub const SCOPE_NAME: u32 = 1;
    /// `InstrumentationScope.version`.
    pub const SCOPE_VERSION: u32 = 2;
    /// `KeyValue.key`.
    pub const KEY: u32 = 1;
    /// `KeyValue.value`.
    pub const VALUE: u32 = 2;
    /// `AnyValue.string_value`.
    pub const STRING_VALUE: u32 = 1;
    /// `AnyValue.int_value`.
    pub const INT_VALUE: u32 = 3;
    /// `Span.trace_id`.
    pub const TRACE_ID: u32 = 1;
    /// `Span.span_id`.
    pub const SPAN_ID: u32 = 2;
    /// `Span.trace_state`.
    pub const TRACE_STATE: u32 = 3;
    /// `Span.parent_span_id`.
    pub const PARENT_SPAN_ID: u32 = 4;
    /// `Span.name`.
    pub const NAME: u32 = 5;
    /// `Span.kind`.
    pub const KIND: u32 = 6;
    /// `Span.start_time_unix_nano`.
    pub const START_TIME: u32 = 7;
    /// `Span.end_time_unix_nano`.
    pub const END_TIME: u32 = 8;
    /// `Span.attributes`.
    pub const ATTRIBUTES: u32 = 9;
    /// `Span.status`.
    pub const STATUS: u32 = 15;
    /// `Span.flags`.
    pub const FLAGS: u32 = 16;
    /// `Status.message`.
    pub const STATUS_MESSAGE: u32 = 2;
    /// `Status.code`.
    pub const STATUS_CODE: u32 = 3;
}

/// A buffer the encoder writes into and can size up front.
pub trait Buffer: BufMut {
    /// Makes room for `additional` more bytes.
    fn reserve_bytes(&mut self, additional: usize);
}

impl Buffer for Vec<u8> {
    fn reserve_bytes(&mut self, additional: usize) {
        self.reserve(additional);
    }
}

impl Buffer for BytesMut {
    fn reserve_bytes(&mut self, additional: usize) {
        self.reserve(additional);
    }
}

/// Encodes `ExportTraceServiceRequest`s; holds the scratch of the length
/// pass, so one encoder reused from request to request allocates nothing
/// once it has seen its largest request.
#[derive(Debug, Default)]
pub struct ProtoEncoder {
    /// The encoded length of each span of the request, in writing order.
    span_lens: Vec<usize>,
    /// Per resource group: the `Resource` and `ScopeSpans` lengths.
    group_lens: Vec<(usize, usize)>,
}

impl ProtoEncoder {
    /// A new encoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends to `out` the request holding `spans` grouped by resource
    /// ([`group_by_resource`]): one `ResourceSpans` per group.
    pub fn encode(&mut self, spans: &[Span], out: &mut impl Buffer) {
        self.encode_groups(spans, &group_by_resource(spans), out);
    }

    /// Appends to `out` the request holding one `ResourceSpans` per group of
    /// `groups` (indices into `spans` of spans sharing one resource, as
    /// [`group_by_resource`] makes them). Returns the bytes appended.
    pub fn encode_groups(
        &mut self,
        spans: &[Span],
        groups: &[Vec<usize>],
        out: &mut impl Buffer,
    ) -> usize {
        self.span_lens.clear();
        self.group_lens.clear();
        let scope = delimited_len(field::SCOPE_SPANS_SCOPE, scope_len());
        let mut total = 0;
        for group in groups {
            let Some(&first) = group.first() else {
                continue;
            };
            let resource = resource_len(&spans[first].resource);
            let mut scope_spans = scope;
            for &i in group {
                let len = span_len(&spans[i]);
                self.span_lens.push(len);
                scope_spans += delimited_len(field::SCOPE_SPANS_SPANS, len);
            }
            self.group_lens.push((resource, scope_spans));
            total += delimited_len(
                field::REQUEST_RESOURCE_SPANS,
                resource_spans_len(resource, scope_spans),
            );
        }
        out.reserve_bytes(total);
        let mut lens = self.span_lens.iter();
        let non_empty = groups.iter().filter(|g| !g.is_empty());
        for (group, &(resource, scope_spans)) in non_empty.zip(&self.group_lens) {
            write_header(
                out,
                field::REQUEST_RESOURCE_SPANS,
                resource_spans_len(resource, scope_spans),
            );
            write_header(out, field::RESOURCE_SPANS_RESOURCE, resource);
            write_resource(out, &spans[group[0]].resource);
            write_header(out, field::RESOURCE_SPANS_SCOPE_SPANS, scope_spans);
            write_header(out, field::SCOPE_SPANS_SCOPE, scope_len());
            write_str(out, field::SCOPE_NAME, SCOPE_NAME);
            write_str(out, field::SCOPE_VERSION, SCOPE_VERSION);
            for (&i, &len) in group.iter().zip(&mut lens) {
                write_header(out, field::SCOPE_SPANS_SPANS, len);
                write_span(out, &spans[i]);
            }
        }
        total
    }
}

/// `ResourceSpans`: its resource and its one `ScopeSpans`.
fn resource_spans_len(resource: usize, scope_spans: usize) -> usize {
    delimited_len(field::RESOURCE_SPANS_RESOURCE, resource)
        + delimited_len(field::RESOURCE_SPANS_SCOPE_SPANS, scope_spans)
}

/// Length of a length-delimited field whose content is `len` bytes.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// Length of a string field, nothing when empty (the default).
fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        delimited_len(tag, s.len())
    }
}

fn scope_len() -> usize {
    str_len(field::SCOPE_NAME, SCOPE_NAME) + str_len(field::SCOPE_VERSION, SCOPE_VERSION)
}

/// The resource's attributes: `service.name` first, then the others but a
/// `service.name` among them (the field wins).
fn resource_attributes(resource: &Resource) -> impl Iterator<Item = &Attribute> {
    resource.attributes.iter().filter(|a| a.key != SERVICE_NAME)
}

fn resource_len(resource: &Resource) -> usize {
    let service = key_value_len(SERVICE_NAME, any_string_len(&resource.service_name));
    delimited_len(field::RESOURCE_ATTRIBUTES, service)
        + resource_attributes(resource)
            .map(|a| delimited_len(field::RESOURCE_ATTRIBUTES, attribute_len(a)))
            .sum::<usize>()
}

/// `AnyValue` with a string: a oneof member, written even when empty.
fn any_string_len(s: &str) -> usize {
    delimited_len(field::STRING_VALUE, s.len())
}

fn any_len(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::String(s) => any_string_len(s),
        AttributeValue::Int(i) => key_len(field::INT_VALUE) + encoded_len_varint(*i as u64),
    }
}

/// `KeyValue` of `key` and an `AnyValue` of `value_len` bytes (always
/// present: the SDK never leaves it out).
fn key_value_len(key: &str, value_len: usize) -> usize {
    str_len(field::KEY, key) + delimited_len(field::VALUE, value_len)
}

fn attribute_len(attribute: &Attribute) -> usize {
    key_value_len(&attribute.key, any_len(&attribute.value))
}

/// The parent's id, unless none or all zero (the SDK's invalid id, which
/// it leaves out too).
fn parent_id(span: &Span) -> Option<&[u8; 8]> {
    span.parent_span_id
        .as_ref()
        .filter(|p| p.is_valid())
        .map(|p| &p.0)
}

fn kind(span: &Span) -> i32 {
    match span.kind {
        SpanKind::Server => span::SpanKind::Server as i32,
        SpanKind::Client => span::SpanKind::Client as i32,
    }
}

/// The span's OTLP flags: the W3C flags and the is-remote bits.
pub(super) fn proto_flags(span: &Span) -> u32 {
    let mut flags = u32::from(span.flags) | SpanFlags::ContextHasIsRemoteMask as u32;
    if parent_is_remote(span) {
        flags |= SpanFlags::ContextIsRemoteMask as u32;
    }
    flags
}

const STATUS_ERROR: i32 = status::StatusCode::Error as i32;

fn status_len(message: &str) -> usize {
    str_len(field::STATUS_MESSAGE, message)
        + key_len(field::STATUS_CODE)
        + encoded_len_varint(STATUS_ERROR as u64)
}

fn fixed64_len(tag: u32, value: u64) -> usize {
    if value == 0 { 0 } else { key_len(tag) + 8 }
}

fn span_len(span: &Span) -> usize {
    let mut len = delimited_len(field::TRACE_ID, 16)
        + delimited_len(field::SPAN_ID, 8)
        + str_len(field::TRACE_STATE, &span.trace_state)
        + str_len(field::NAME, &span.name)
        + key_len(field::KIND)
        + encoded_len_varint(kind(span) as u64)
        + fixed64_len(field::START_TIME, span.start_unix_nano)
        + fixed64_len(field::END_TIME, span.end_unix_nano)
        + span
            .attributes
            .iter()
            .map(|a| delimited_len(field::ATTRIBUTES, attribute_len(a)))
            .sum::<usize>();
    if parent_id(span).is_some() {
        len += delimited_len(field::PARENT_SPAN_ID, 8);
    }
    if let SpanStatus::Error(message) = &span.status {
        len += delimited_len(field::STATUS, status_len(message));
    }
    if proto_flags(span) != 0 {
        len += key_len(field::FLAGS) + 4;
    }
    len
}

/// The key and length of a length-delimited field.
fn write_header(out: &mut impl BufMut, tag: u32, len: usize) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}

fn write_bytes(out: &mut impl BufMut, tag: u32, bytes: &[u8]) {
    write_header(out, tag, bytes.len());
    out.put_slice(bytes);
}

/// A string field, left out when empty.
fn write_str(out: &mut impl BufMut, tag: u32, s: &str) {
    if !s.is_empty() {
        write_bytes(out, tag, s.as_bytes());
    }
}

fn write_varint(out: &mut impl BufMut, tag: u32, value: u64) {
    encode_key(tag, WireType::Varint, out);
    encode_varint(value, out);
}

fn write_fixed64(out: &mut impl BufMut, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::SixtyFourBit, out);
        out.put_u64_le(value);
    }
}

fn write_key_value(out: &mut impl BufMut, tag: u32, key: &str, value: &AttributeValue) {
    write_header(out, tag, key_value_len(key, any_len(value)));
    write_str(out, field::KEY, key);
    write_header(out, field::VALUE, any_len(value));
    match value {
        AttributeValue::String(s) => write_bytes(out, field::STRING_VALUE, s.as_bytes()),
        AttributeValue::Int(i) => write_varint(out, field::INT_VALUE, *i as u64),
    }
}

fn write_resource(out: &mut impl BufMut, resource: &Resource) {
    // `service.name` as a borrowed string value, without building one.
    let service = &resource.service_name;
    write_header(
        out,
        field::RESOURCE_ATTRIBUTES,
        key_value_len(SERVICE_NAME, any_string_len(service)),
    );
    write_str(out, field::KEY, SERVICE_NAME);
    write_header(out, field::VALUE, any_string_len(service));
    write_bytes(out, field::STRING_VALUE, service.as_bytes());
    for attribute in resource_attributes(resource) {
        write_key_value(
            out,
            field::RESOURCE_ATTRIBUTES,
            &attribute.key,
            &attribute.value,
        );
    }
}

/// One span's fields, in field-number order (`flags` is number 16).
fn write_span(out: &mut impl BufMut, span: &Span) {
    write_bytes(out, field::TRACE_ID, &span.trace_id.0);
    write_bytes(out, field::SPAN_ID, &span.span_id.0);
    write_str(out, field::TRACE_STATE, &span.trace_state);
    if let Some(parent) = parent_id(span) {
        write_bytes(out, field::PARENT_SPAN_ID, parent);
    }
    write_str(out, field::NAME, &span.name);
    write_varint(out, field::KIND, kind(span) as u64);
    write_fixed64(out, field::START_TIME, span.start_unix_nano);
    write_fixed64(out, field::END_TIME, span.end_unix_nano);
    for attribute in &span.attributes {
        write_key_value(out, field::ATTRIBUTES, &attribute.key, &attribute.value);
    }
    if let SpanStatus::Error(message) = &span.status {
        write_header(out, field::STATUS, status_len(message));
        write_str(out, field::STATUS_MESSAGE, message);
        write_varint(out, field::STATUS_CODE, STATUS_ERROR as u64);
    }
    let flags = proto_flags(span);
    if flags != 0 {
        encode_key(field::FLAGS, WireType::ThirtyTwoBit, out);
        out.put_u32_le(flags);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;

    use super::*;
    use crate::export::reference::{export_request, normalized, scope, sdk_resource, span_data};
    use crate::span::{SpanId, Text, TraceId};

    fn decoded(bytes: &[u8]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest::decode(bytes).unwrap()
    }

    fn span(resource: &Arc<Resource>, id: u8) -> Span {
        Span {
            trace_id: TraceId([
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36,
            ]),
            span_id: SpanId([0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, id]),
            parent_span_id: None,
            trace_state: String::new(),
            flags: 1,
            name: "GET /users/{id}".into(),
            kind: SpanKind::Client,
            start_unix_nano: 1_544_712_660_000_000_000,
            end_unix_nano: 1_544_712_661_000_000_000,
            attributes: vec![
                Attribute::string("http.request.method", "GET"),
                Attribute::int("http.response.status_code", 200),
            ],
            status: SpanStatus::Unset,
            resource: resource.clone(),
        }
    }

    /// Spans over every case the model has: three resources (one of them
    /// equal to another behind a different `Arc`, one with no attributes and
    /// an empty service name, one shadowing `service.name`), remote and
    /// local parents, no parent and an all-zero one, both kinds, both
    /// statuses with and without a message, every attribute value type
    /// with extreme and empty values, empty and unicode strings, zero and
    /// maximal times, every flag value class.
    fn many_spans() -> Vec<Span> {
        let users = Arc::new(Resource {
            service_name: "users \u{1F600} caf\u{e9}".into(),
            attributes: vec![
                Attribute::int("process.pid", -7),
                Attribute::int("min", i64::MIN),
                Attribute::int("max", i64::MAX),
                Attribute::int("zero", 0),
                Attribute::string("empty", ""),
                Attribute::string("", "empty key"),
                Attribute::string("long", "x".repeat(300)),
                Attribute::string(SERVICE_NAME, "shadowed"),
            ],
        });
        let users_again = Arc::new((*users).clone());
        let bare = Arc::new(Resource {
            service_name: String::new(),
            attributes: vec![],
        });
        let mut spans = Vec::new();
        // A SERVER span with a remote parent, a tracestate and an error.
        let mut server = span(&users, 1);
        server.kind = SpanKind::Server;
        server.parent_span_id = Some(SpanId([0xab; 8]));
        server.trace_state = "vendor=x,other=y".into();
        server.flags = 3;
        server.status = SpanStatus::Error("HTTP 500 \u{e9}\u{4e2d}".into());
        spans.push(server);
        // Its CLIENT child: a local parent, no tracestate.
        let mut client = span(&bare, 2);
        client.parent_span_id = Some(SpanId([0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 1]));
        client.attributes.clear();
        client.name = Text::default();
        client.flags = 0;
        spans.push(client);
        // An error without a message, times at the extremes.
        let mut extreme = span(&users_again, 3);
        extreme.status = SpanStatus::Error(String::new());
        extreme.start_unix_nano = 0;
        extreme.end_unix_nano = u64::MAX;
        extreme.flags = 0xff;
        extreme
            .attributes
            .push(Attribute::string("unicode", "\u{10FFFF}\u{0}"));
        spans.push(extreme);
        // A SERVER span without a parent, and one with an all-zero parent.
        let mut root = span(&bare, 4);
        root.kind = SpanKind::Server;
        spans.push(root);
        let mut zero_parent = span(&users, 5);
        zero_parent.kind = SpanKind::Server;
        zero_parent.parent_span_id = Some(SpanId([0; 8]));
        spans.push(zero_parent);
        // Many attributes, so lengths take more than one varint byte.
        let mut wide = span(&users, 6);
        for i in 0..40 {
            wide.attributes
                .push(Attribute::int(format!("attribute.{i}"), i));
        }
        spans.push(wide);
        spans
    }

    #[test]
    fn the_bytes_decode_into_the_official_message() {
        let spans = many_spans();
        let mut bytes = Vec::new();
        let written =
            ProtoEncoder::new().encode_groups(&spans, &group_by_resource(&spans), &mut bytes);
        assert_eq!(written, bytes.len());
        let expected = normalized(export_request(&spans));
        assert_eq!(normalized(decoded(&bytes)), expected);
        // Every span is there, under two resources (equal resources behind
        // different `Arc`s share one).
        assert_eq!(expected.resource_spans.len(), 2);
        let count: usize = expected
            .resource_spans
            .iter()
            .map(|rs| rs.scope_spans[0].spans.len())
            .sum();
        assert_eq!(count, spans.len());
    }

    /// Each span alone, so a difference points at the span that has it.
    #[test]
    fn each_span_alone_is_the_official_message() {
        for span in many_spans() {
            let spans = [span];
            let mut bytes = Vec::new();
            ProtoEncoder::new().encode(&spans, &mut bytes);
            assert_eq!(
                normalized(decoded(&bytes)),
                normalized(export_request(&spans)),
                "{:?}",
                spans[0]
            );
        }
    }

    /// Only defaults differ from the official encoding: a status of all
    /// defaults per unset span, and nothing else.
    #[test]
    fn the_official_encoding_differs_only_by_empty_statuses() {
        let spans = many_spans();
        let mut ours = Vec::new();
        ProtoEncoder::new().encode(&spans, &mut ours);
        let official = export_request(&spans).encode_to_vec();
        let unset = spans
            .iter()
            .filter(|s| s.status == SpanStatus::Unset)
            .count();
        // An empty `status` field: its key (15) and a zero length.
        assert_eq!(official.len(), ours.len() + 2 * unset);
    }

    /// One encoder, reused: the same bytes each time, appended after what
    /// the buffer held, and no allocation of the scratch once it is large
    /// enough.
    #[test]
    fn a_reused_encoder_writes_the_same_bytes() {
        let spans = many_spans();
        let mut encoder = ProtoEncoder::new();
        let mut first = Vec::new();
        encoder.encode(&spans, &mut first);
        let capacity = encoder.span_lens.capacity();
        let mut again = BytesMut::from(&b"prefix"[..]);
        encoder.encode(&spans, &mut again);
        assert_eq!(&again[..6], b"prefix");
        assert_eq!(&again[6..], &first[..]);
        assert_eq!(encoder.span_lens.capacity(), capacity);
        // Groups given one at a time, as the exporter sends them.
        for group in group_by_resource(&spans) {
            let mut one = Vec::new();
            encoder.encode_groups(&spans, std::slice::from_ref(&group), &mut one);
            let request = decoded(&one);
            assert_eq!(request.resource_spans.len(), 1);
            assert_eq!(
                request.resource_spans[0].scope_spans[0].spans.len(),
                group.len()
            );
        }
        // No spans: an empty request.
        let mut empty = Vec::new();
        assert_eq!(encoder.encode_groups(&spans, &[], &mut empty), 0);
        assert!(empty.is_empty());
    }

    /// The reference itself: the SDK span data holds every field.
    #[test]
    fn the_reference_span_data_keeps_every_field() {
        let resource = Arc::new(Resource {
            service_name: "svc".into(),
            attributes: vec![Attribute::int("process.pid", 42)],
        });
        let span = Span {
            trace_id: TraceId([1; 16]),
            span_id: SpanId([2; 8]),
            parent_span_id: Some(SpanId([3; 8])),
            trace_state: "k=v,a=b".into(),
            flags: 3,
            name: "GET /x".into(),
            kind: SpanKind::Server,
            start_unix_nano: 1_700_000_000_123_456_789,
            end_unix_nano: 1_700_000_000_223_456_789,
            attributes: vec![
                Attribute::string("http.request.method", "GET"),
                Attribute::int("http.response.status_code", 500),
            ],
            status: SpanStatus::Error("boom".into()),
            resource,
        };
        let data = span_data(&span, &scope());
        assert_eq!(data.span_context.trace_id().to_bytes(), [1; 16]);
        assert_eq!(data.span_context.span_id().to_bytes(), [2; 8]);
        assert_eq!(data.span_context.trace_flags().to_u8(), 3);
        assert_eq!(data.span_context.trace_state().header(), "k=v,a=b");
        assert_eq!(data.parent_span_id.to_bytes(), [3; 8]);
        assert!(data.parent_span_is_remote);
        assert_eq!(data.span_kind, opentelemetry::trace::SpanKind::Server);
        assert_eq!(
            data.start_time
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos(),
            1_700_000_000_123_456_789
        );
        assert_eq!(data.attributes.len(), 2);
        assert_eq!(data.attributes[1].value, opentelemetry::Value::I64(500));
        assert_eq!(data.status, opentelemetry::trace::Status::error("boom"));
        assert_eq!(data.instrumentation_scope.name(), SCOPE_NAME);

        let sdk = sdk_resource(&span.resource);
        assert_eq!(
            sdk.get(&opentelemetry::Key::from_static_str("service.name")),
            Some(opentelemetry::Value::from("svc"))
        );
        assert_eq!(sdk.len(), 2);
    }
}
