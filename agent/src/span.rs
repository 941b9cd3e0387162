//! The span model every later stage shares: what `correlate` produces and
//! `export` consumes. Plain data, no OpenTelemetry SDK types, so stages stay
//! testable on their own.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

mod text;

pub use text::{Text, TextBuilder};

/// A W3C / OpenTelemetry trace id: 16 bytes, never all zero when valid.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TraceId(pub [u8; 16]);

/// A W3C / OpenTelemetry span id (the traceparent's parent-id): 8 bytes,
/// never all zero when valid.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// Whether the id is not all zero.
    pub fn is_valid(&self) -> bool {
        self.0 != [0; 16]
    }

    /// Lower-case hex, 32 characters.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl SpanId {
    /// Whether the id is not all zero.
    pub fn is_valid(&self) -> bool {
        self.0 != [0; 8]
    }

    /// Lower-case hex, 16 characters.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0; bytes.len() * 2];
    encode_hex(bytes, &mut out);
    out.into_iter().map(char::from).collect()
}

/// Writes `bytes` as lower-case hex, two digits each, into `out` (twice
/// their length): the one encoder of ids, for the traceparent field, the
/// OTLP/JSON ids and the terminal alike.
pub(crate) fn encode_hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (byte, pair) in bytes.iter().zip(out.as_chunks_mut::<2>().0) {
        *pair = [
            DIGITS[usize::from(byte >> 4)],
            DIGITS[usize::from(byte & 0x0f)],
        ];
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// W3C trace-flags bits.
pub mod flags {
    /// The caller may have recorded the trace.
    pub const SAMPLED: u8 = 0x01;
    /// The trace-id's right-most 7 bytes are random (Trace Context level 2).
    pub const RANDOM: u8 = 0x02;
}

/// OpenTelemetry span kind, as far as HTTP traffic needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// The process received the request.
    Server,
    /// The process sent the request.
    Client,
}

/// OpenTelemetry span status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpanStatus {
    /// Not an error (HTTP leaves success unset).
    Unset,
    /// An error, with a short description.
    Error(String),
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum AttributeValue {
    /// A string; static (a known method, `http`) or short ones without an
    /// allocation ([`Text`]).
    String(Text),
    /// An integer.
    Int(i64),
}

/// A key/value attribute. Keys are OpenTelemetry semantic-convention names.
#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    /// e.g. `http.request.method`. Borrowed when static (nearly always), so
    /// building a span does not allocate its keys.
    pub key: Cow<'static, str>,
    /// The value.
    pub value: AttributeValue,
}

impl Attribute {
    /// A string attribute.
    pub fn string(key: impl Into<Cow<'static, str>>, value: impl Into<Text>) -> Self {
        Self {
            key: key.into(),
            value: AttributeValue::String(value.into()),
        }
    }

    /// An integer attribute.
    pub fn int(key: impl Into<Cow<'static, str>>, value: i64) -> Self {
        Self {
            key: key.into(),
            value: AttributeValue::Int(value),
        }
    }
}

/// The process a span was observed in (OpenTelemetry resource).
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    /// `service.name`: OTEL_SERVICE_NAME of the process, else its executable name.
    pub service_name: String,
    /// The other resource attributes: `process.pid`, `process.executable.name`,
    /// `process.command_line`, `host.name`.
    pub attributes: Vec<Attribute>,
}

/// One finished span.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    /// Trace it belongs to.
    pub trace_id: TraceId,
    /// Its own id.
    pub span_id: SpanId,
    /// Its parent, if any.
    pub parent_span_id: Option<SpanId>,
    /// W3C tracestate to propagate, already validated (empty: none).
    pub trace_state: String,
    /// W3C trace-flags of the span's context.
    pub flags: u8,
    /// `GET` or `GET /users/{id}`.
    pub name: Text,
    /// Server or client.
    pub kind: SpanKind,
    /// Start, Unix epoch nanoseconds.
    pub start_unix_nano: u64,
    /// End, Unix epoch nanoseconds.
    pub end_unix_nano: u64,
    /// Span attributes.
    pub attributes: Vec<Attribute>,
    /// Status.
    pub status: SpanStatus,
    /// The process it was observed in, shared by its spans.
    pub resource: Arc<Resource>,
}

impl Span {
    /// Whether the sampled flag is set.
    pub fn is_sampled(&self) -> bool {
        self.flags & flags::SAMPLED != 0
    }

    /// The value of a string or integer attribute, as text.
    pub fn attribute(&self, key: &str) -> Option<String> {
        self.attributes
            .iter()
            .find(|a| a.key == key)
            .map(|a| match &a.value {
                AttributeValue::String(s) => s.to_string(),
                AttributeValue::Int(i) => i.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_as_lower_case_hex() {
        let t = TraceId([0xab; 16]);
        assert_eq!(t.to_hex(), "ab".repeat(16));
        assert_eq!(
            format!("{:?}", SpanId([0, 1, 2, 3, 4, 5, 6, 0xff])),
            "00010203040506ff"
        );
        assert!(!TraceId::default().is_valid() && !SpanId::default().is_valid());
    }
}
