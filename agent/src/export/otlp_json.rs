//! OTLP/JSON: one `ExportTraceServiceRequest` per line, as the OpenTelemetry
//! Collector's file exporter writes and its `otlpjsonfile` receiver reads.
//!
//! The file output writes each line straight from the span model
//! ([`write_json_line`]), leaving default values out as the Collector does.
//! Its reference is the official path (`export/reference.rs`): our spans
//! become the SDK's `SpanData`, and `opentelemetry_proto::transform` builds
//! the request from them, as `opentelemetry-otlp` does; that crate's
//! `with-serde` mapping writes it. That mapping is the OTLP/JSON one: field
//! names in lowerCamelCase, trace and span ids as lower-case hex (not the
//! base64 of the generic protobuf JSON mapping), 64-bit integers as decimal
//! strings, enums as integers; it writes every field, defaults included
//! (`"traceState":""`, `"droppedAttributesCount":0`, ...), which the
//! protobuf JSON mapping allows. A test holds the direct writer to the same
//! message. The official path is not the file output's because it
//! allocates at every step and writes every default: several times the CPU
//! per span, and more bytes (docs/benchmarks.md, "OTLP/JSON: the direct
//! writer against the official conversion").

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use opentelemetry_proto::tonic::trace::v1::{span, status};

use super::otlp_proto::proto_flags;
use super::{ExportError, SCOPE_NAME, SCOPE_VERSION, SERVICE_NAME, group_by_resource};
use crate::span::{Attribute, AttributeValue, Span, SpanKind, SpanStatus, encode_hex};

/// Appends the OTLP/JSON line of `spans` (no newline) to `out`: the message
/// the official conversion builds (`export/reference.rs`), written directly, with its default values left
/// out (an unset status among them). One difference: a tracestate is
/// written as the span holds it, where the SDK drops one its own parser
/// rejects (the correlator has already checked it against W3C's rules).
pub fn write_json_line(spans: &[Span], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"resourceSpans\":[");
    for (g, group) in group_by_resource(spans).iter().enumerate() {
        if g > 0 {
            out.push(b',');
        }
        let resource = &spans[group[0]].resource;
        out.extend_from_slice(b"{\"resource\":{\"attributes\":[{\"key\":");
        write_str(out, SERVICE_NAME);
        out.extend_from_slice(b",\"value\":{\"stringValue\":");
        write_str(out, &resource.service_name);
        out.extend_from_slice(b"}}");
        for attribute in resource.attributes.iter().filter(|a| a.key != SERVICE_NAME) {
            out.push(b',');
            write_attribute(out, attribute);
        }
        out.extend_from_slice(b"]},\"scopeSpans\":[{\"scope\":{\"name\":");
        write_str(out, SCOPE_NAME);
        out.extend_from_slice(b",\"version\":");
        write_str(out, SCOPE_VERSION);
        out.extend_from_slice(b"},\"spans\":[");
        for (i, &index) in group.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_span(out, &spans[index]);
        }
        out.extend_from_slice(b"]}]}");
    }
    out.extend_from_slice(b"]}");
}

/// One span, its default members left out as the Collector does.
fn write_span(out: &mut Vec<u8>, span: &Span) {
    out.extend_from_slice(b"{\"traceId\":");
    write_hex(out, &span.trace_id.0);
    out.extend_from_slice(b",\"spanId\":");
    write_hex(out, &span.span_id.0);
    if !span.trace_state.is_empty() {
        out.extend_from_slice(b",\"traceState\":");
        write_str(out, &span.trace_state);
    }
    if let Some(parent) = span.parent_span_id {
        out.extend_from_slice(b",\"parentSpanId\":");
        write_hex(out, &parent.0);
    }
    // Never 0: the "has is-remote" bit is always set.
    out.extend_from_slice(b",\"flags\":");
    write_int(out, i64::from(proto_flags(span)));
    if !span.name.is_empty() {
        out.extend_from_slice(b",\"name\":");
        write_str(out, &span.name);
    }
    let kind = match span.kind {
        SpanKind::Server => span::SpanKind::Server,
        SpanKind::Client => span::SpanKind::Client,
    } as i32;
    out.extend_from_slice(b",\"kind\":");
    write_int(out, i64::from(kind));
    // 64-bit integers are strings, so even 0 is not a default ("0").
    out.extend_from_slice(b",\"startTimeUnixNano\":");
    write_u64_string(out, span.start_unix_nano);
    out.extend_from_slice(b",\"endTimeUnixNano\":");
    write_u64_string(out, span.end_unix_nano);
    if !span.attributes.is_empty() {
        out.extend_from_slice(b",\"attributes\":[");
        for (i, attribute) in span.attributes.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_attribute(out, attribute);
        }
        out.push(b']');
    }
    if let SpanStatus::Error(message) = &span.status {
        out.extend_from_slice(b",\"status\":{");
        if !message.is_empty() {
            out.extend_from_slice(b"\"message\":");
            write_str(out, message);
            out.push(b',');
        }
        let _ = write!(out, "\"code\":{}", status::StatusCode::Error as i32);
        out.push(b'}');
    }
    out.push(b'}');
}

/// A `KeyValue`: `key` and `value` are written whole, defaults included.
fn write_attribute(out: &mut Vec<u8>, attribute: &Attribute) {
    out.extend_from_slice(b"{\"key\":");
    write_str(out, &attribute.key);
    match &attribute.value {
        AttributeValue::String(s) => {
            out.extend_from_slice(b",\"value\":{\"stringValue\":");
            write_str(out, s);
            out.extend_from_slice(b"}}");
        }
        // 64-bit integers are decimal strings in OTLP/JSON.
        AttributeValue::Int(i) => {
            out.extend_from_slice(b",\"value\":{\"intValue\":\"");
            write_int(out, *i);
            out.extend_from_slice(b"\"}}");
        }
    }
}

/// A JSON string, escaped as serde_json escapes it.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // Nearly every string (keys, paths, addresses) needs no escaping: copy
    // it whole; serde_json escapes the rest.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// A decimal integer, without `core::fmt`'s machinery.
fn write_int(out: &mut Vec<u8>, value: i64) {
    if value < 0 {
        out.push(b'-');
    }
    write_digits(out, value.unsigned_abs());
}

/// A 64-bit unsigned integer as OTLP/JSON writes it: a decimal string.
fn write_u64_string(out: &mut Vec<u8>, value: u64) {
    out.push(b'"');
    write_digits(out, value);
    out.push(b'"');
}

fn write_digits(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Ids as lower-case hex in quotes (OTLP/JSON, not base64).
fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    let start = out.len();
    out.resize(start + 2 * bytes.len(), 0);
    encode_hex(bytes, &mut out[start..]);
    out.push(b'"');
}

/// Appends OTLP/JSON lines to a file.
#[derive(Debug)]
pub struct JsonFileExporter {
    path: PathBuf,
    file: BufWriter<File>,
    /// The line being written, its capacity kept from batch to batch.
    line: Vec<u8>,
}

impl JsonFileExporter {
    /// Opens (creating if needed) `path` for appending.
    pub fn open(path: &Path) -> Result<Self, ExportError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| ExportError::Config(format!("cannot open {}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: BufWriter::new(file),
            line: Vec::new(),
        })
    }

    /// Writes `spans` as one line and flushes it, so a reader (or a crash)
    /// sees whole lines only. On success `spans` is emptied.
    pub fn export(&mut self, spans: &mut Vec<Span>) -> Result<(), ExportError> {
        if spans.is_empty() {
            return Ok(());
        }
        self.line.clear();
        write_json_line(spans, &mut self.line);
        self.line.push(b'\n');
        self.file
            .write_all(&self.line)
            .and_then(|()| self.file.flush())
            .map_err(|e| ExportError::Export(format!("writing {}: {e}", self.path.display())))?;
        spans.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    use super::*;
    use crate::export::reference::{export_request, normalized};
    use crate::span::{Resource, SpanId, Text, TraceId};

    /// The request as one line of OTLP/JSON, defaults included.
    fn json_line(request: &ExportTraceServiceRequest) -> String {
        serde_json::to_string(request).unwrap()
    }

    /// The message a line holds, read with the `with-serde` mapping.
    fn read_line(line: &[u8]) -> ExportTraceServiceRequest {
        serde_json::from_slice(line).unwrap()
    }

    fn sample(resource: &Arc<Resource>, id: u8, status: SpanStatus) -> Span {
        Span {
            trace_id: TraceId([
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36,
            ]),
            span_id: SpanId([0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7 + id]),
            parent_span_id: (id == 0).then_some(SpanId([0xab; 8])),
            trace_state: if id == 0 {
                "vendor=x".into()
            } else {
                String::new()
            },
            flags: 1,
            name: "GET /users/{id}".into(),
            kind: if id == 0 {
                SpanKind::Server
            } else {
                SpanKind::Client
            },
            start_unix_nano: 1_544_712_660_000_000_000,
            end_unix_nano: 1_544_712_661_000_000_000,
            attributes: vec![
                Attribute::string("http.request.method", "GET"),
                Attribute::int("http.response.status_code", 0),
            ],
            status,
            resource: resource.clone(),
        }
    }

    /// A SERVER span with an error and its CLIENT child, of one resource.
    fn two_spans() -> Vec<Span> {
        let resource = Arc::new(Resource {
            service_name: "users".into(),
            attributes: vec![Attribute::int("process.pid", 4242)],
        });
        vec![
            sample(&resource, 0, SpanStatus::Error("HTTP 500".into())),
            sample(&resource, 1, SpanStatus::Unset),
        ]
    }

    #[test]
    fn lines_use_the_otlp_json_mapping() {
        let spans = two_spans();
        let mut line = Vec::new();
        write_json_line(&spans, &mut line);
        let version = SCOPE_VERSION;
        let expected = format!(
            concat!(
                r#"{{"resourceSpans":[{{"resource":{{"attributes":["#,
                r#"{{"key":"service.name","value":{{"stringValue":"users"}}}},"#,
                r#"{{"key":"process.pid","value":{{"intValue":"4242"}}}}]}},"#,
                r#""scopeSpans":[{{"scope":{{"name":"transparent-tracing-agent","version":"{version}"}},"#,
                r#""spans":["#,
                r#"{{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"00f067aa0ba902b7","#,
                r#""traceState":"vendor=x","parentSpanId":"abababababababab","flags":769,"#,
                r#""name":"GET /users/{{id}}","kind":2,"#,
                r#""startTimeUnixNano":"1544712660000000000","endTimeUnixNano":"1544712661000000000","#,
                r#""attributes":[{{"key":"http.request.method","value":{{"stringValue":"GET"}}}},"#,
                r#"{{"key":"http.response.status_code","value":{{"intValue":"0"}}}}],"#,
                r#""status":{{"message":"HTTP 500","code":2}}}},"#,
                r#"{{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"00f067aa0ba902b8","#,
                r#""flags":257,"name":"GET /users/{{id}}","kind":3,"#,
                r#""startTimeUnixNano":"1544712660000000000","endTimeUnixNano":"1544712661000000000","#,
                r#""attributes":[{{"key":"http.request.method","value":{{"stringValue":"GET"}}}},"#,
                r#"{{"key":"http.response.status_code","value":{{"intValue":"0"}}}}]}}"#,
                r#"]}}]}}]}}"#
            ),
            version = version
        );
        assert_eq!(String::from_utf8(line.clone()).unwrap(), expected);
        // And it reads back into the official request.
        assert_eq!(
            normalized(read_line(&line)),
            normalized(export_request(&spans))
        );
    }

    /// The official request, written with every default, is OTLP/JSON: hex
    /// ids, lowerCamelCase names, 64-bit integers as strings; and it reads
    /// back into the same message.
    #[test]
    fn the_official_line_is_otlp_json() {
        let spans = two_spans();
        let request = export_request(&spans);
        let line = json_line(&request);
        for part in [
            r#""traceId":"4bf92f3577b34da6a3ce929d0e0e4736""#,
            r#""spanId":"00f067aa0ba902b7""#,
            r#""parentSpanId":"abababababababab""#,
            r#""parentSpanId":"""#,
            r#""startTimeUnixNano":"1544712660000000000""#,
            r#""intValue":"4242""#,
            r#""droppedAttributesCount":0"#,
            r#""traceState":"""#,
            r#""status":{"message":"","code":0}"#,
            r#""scopeSpans":[{"scope":{"name":"transparent-tracing-agent""#,
        ] {
            assert!(line.contains(part), "{part} not in {line}");
        }
        assert_eq!(read_line(line.as_bytes()), request);
    }

    /// The direct writer writes the official request's message, over
    /// resources, empty and escaped strings, both statuses and both kinds.
    #[test]
    fn the_direct_writer_writes_the_official_message() {
        let users = Arc::new(Resource {
            service_name: "users \"eu\"\n".into(),
            attributes: vec![
                Attribute::int("process.pid", -7),
                Attribute::int("min", i64::MIN),
                Attribute::int("zero", 0),
                Attribute::string("empty", ""),
                Attribute::string("escapes", "tab\t back\\slash \u{1} \u{7f}"),
                Attribute::string(SERVICE_NAME, "shadowed"),
            ],
        });
        let bare = Arc::new(Resource {
            service_name: String::new(),
            attributes: vec![],
        });
        let mut spans = vec![
            sample(&users, 0, SpanStatus::Error("HTTP 500 \u{e9}".into())),
            sample(&bare, 1, SpanStatus::Unset),
            sample(&users, 2, SpanStatus::Error(String::new())),
        ];
        spans[1].attributes.clear();
        spans[1].name = Text::default();
        spans[2].start_unix_nano = 0;
        spans[2].end_unix_nano = u64::MAX;
        let mut written = Vec::new();
        write_json_line(&spans, &mut written);
        let expected = normalized(export_request(&spans));
        assert_eq!(normalized(read_line(&written)), expected);
        // Every span is there, in its resource's order.
        assert_eq!(expected.resource_spans.len(), 2);
        assert_eq!(expected.resource_spans[0].scope_spans[0].spans.len(), 2);
    }

    #[test]
    fn the_file_gets_one_line_per_batch() {
        let dir = std::env::temp_dir().join(format!("otlp-json-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("spans.jsonl");
        let _ = std::fs::remove_file(&path);
        let resource = Arc::new(Resource {
            service_name: "s".into(),
            attributes: vec![],
        });
        let mut exporter = JsonFileExporter::open(&path).unwrap();
        let mut batch = vec![sample(&resource, 1, SpanStatus::Unset)];
        exporter.export(&mut batch).unwrap();
        assert!(batch.is_empty());
        let mut batch = vec![sample(&resource, 2, SpanStatus::Unset)];
        exporter.export(&mut batch).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.ends_with('\n'));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(JsonFileExporter::open(Path::new("/nonexistent-dir/x.jsonl")).is_err());
    }
}
