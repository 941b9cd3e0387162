//! Message heads: what the proxy reads from them and the one change it makes
//! to a request head. Pure functions on bytes, no I/O, so every case can be
//! tested on literal heads.
//!
//! httparse finds where a head ends and checks the start line. The field
//! lines are then walked here, because the rewrite must keep every byte the
//! client sent (case, spacing, obs-fold continuation lines) and must agree
//! exactly with what it decided from: a field that httparse would have
//! skipped as invalid cannot be left for the server to interpret differently.
//! A request head whose field lines are not strictly valid is therefore not
//! rewritten at all; the connection is forwarded unchanged from there on.

use std::mem::MaybeUninit;
use std::ops::Range;

use crate::http::framing::{self, FramingFields, Mode};
use crate::http::is_tchar;
use crate::tracecontext::{PropagatedContext, TRACEPARENT_LEN, TraceParent};

// Framing is decided by the tracer's module, in its strict mode (see
// `crate::http::framing`); the proxy's API names its types.
pub use crate::http::framing::MethodKind as AnsweredMethod;
pub use crate::http::framing::{BodyFraming, ResponseKind};

/// Header slots tried on the stack; a head with more falls back to the heap.
/// They are left uninitialized for httparse to fill: zeroing 128 slots for
/// every head cost more than parsing a small one.
const STACK_HEADERS: usize = 128;

/// `n` header slots on the heap, for the rare head with more than
/// [`STACK_HEADERS`] fields.
fn uninit_headers<'b>(n: usize) -> Vec<MaybeUninit<httparse::Header<'b>>> {
    std::iter::repeat_with(MaybeUninit::uninit)
        .take(n)
        .collect()
}

/// What a request's traceparent fields say, by the rules of
/// [`crate::tracecontext::extract`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceparentField {
    /// Exactly one, valid: the request continues a trace and passes unchanged.
    Valid,
    /// No traceparent field.
    Missing,
    /// One field that does not parse (or is folded over several lines).
    Invalid,
    /// Two or more fields: which the client meant is unknowable.
    Multiple,
}

impl TraceparentField {
    /// Whether the proxy must insert a traceparent of its own.
    pub fn needs_injection(self) -> bool {
        self != TraceparentField::Valid
    }
}

/// What parsing the bytes at the start of a buffer gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadParse<T> {
    /// A complete head.
    Complete(T),
    /// Valid so far; more bytes are needed.
    Partial,
    /// Not a head the proxy can interpret.
    Invalid,
}

/// What the proxy reads from a request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHeadInfo {
    /// Length of the head in bytes, blank line included.
    pub len: usize,
    /// Where the method lies in the head.
    pub method: Range<usize>,
    /// Where the request target lies in the head.
    pub target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// How the request body is delimited.
    pub framing: BodyFraming,
    /// Whether the request carries a traceparent the proxy must keep.
    pub traceparent: TraceparentField,
    /// The traceparent, when [`TraceparentField::Valid`].
    pub received_traceparent: Option<TraceParent>,
    /// `CONNECT`: a 2xx answer turns the connection into a tunnel.
    pub connect: bool,
    /// An `Upgrade` field: a 101 answer switches the connection to
    /// another protocol.
    pub upgrade: bool,
    /// Where the blank line that ends the head lies.
    pub blank_line: Range<usize>,
    /// Whether any `traceparent` or `tracestate` field is present, which an
    /// injection drops (see [`write_injected_head`]).
    pub has_trace_fields: bool,
}

impl RequestHeadInfo {
    /// The method, given the head it was parsed from.
    pub fn method<'h>(&self, head: &'h [u8]) -> &'h str {
        ascii(head, &self.method)
    }

    /// The request target, given the head it was parsed from.
    pub fn target<'h>(&self, head: &'h [u8]) -> &'h str {
        ascii(head, &self.target)
    }

    /// Whether the response decides if the connection stays HTTP.
    pub fn may_switch_protocols(&self) -> bool {
        self.connect || self.upgrade
    }
}

fn ascii<'h>(head: &'h [u8], range: &Range<usize>) -> &'h str {
    head.get(range.clone())
        .and_then(|bytes| std::str::from_utf8(bytes).ok())
        .unwrap_or_default()
}

/// Parses the request head at the start of `buf`.
pub fn parse_request_head(buf: &[u8]) -> HeadParse<RequestHeadInfo> {
    let mut headers = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    match parse_request_line(buf, &mut headers) {
        Err(httparse::Error::TooManyHeaders) => {
            // Rare: a field line takes at least 3 bytes ("a:\n"), which
            // bounds how many slots can be needed.
            let mut headers = uninit_headers(buf.len() / 3 + 1);
            finish_request_head(buf, parse_request_line(buf, &mut headers))
        }
        other => finish_request_head(buf, other),
    }
}

/// The request line and head length, as httparse sees them.
struct RequestLine {
    len: usize,
    method: Range<usize>,
    target: Range<usize>,
    minor_version: u8,
}

fn parse_request_line<'b>(
    buf: &'b [u8],
    headers: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<RequestLine>, httparse::Error> {
    let mut request = httparse::Request::new(&mut []);
    // Invalid field lines are not skipped in the end: the walk below
    // rejects them. Ignoring them here only lets obs-fold lines through to
    // that walk, which accepts them where RFC 9112 allows them.
    let status = httparse::ParserConfig::default()
        .allow_multiple_spaces_in_request_line_delimiters(true)
        .ignore_invalid_headers_in_requests(true)
        .parse_request_with_uninit_headers(&mut request, buf, headers)?;
    let httparse::Status::Complete(len) = status else {
        return Ok(None);
    };
    let (Some(method), Some(target), Some(minor_version)) =
        (request.method, request.path, request.version)
    else {
        return Err(httparse::Error::Token);
    };
    Ok(Some(RequestLine {
        len,
        method: offset_of(buf, method.as_bytes()),
        target: offset_of(buf, target.as_bytes()),
        minor_version,
    }))
}

/// Where `part`, a sub-slice of `buf`, lies in it.
fn offset_of(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(buf.as_ptr() as usize);
    start..start + part.len()
}

fn finish_request_head(
    buf: &[u8],
    line: Result<Option<RequestLine>, httparse::Error>,
) -> HeadParse<RequestHeadInfo> {
    let line = match line {
        Ok(Some(line)) => line,
        Ok(None) => return HeadParse::Partial,
        Err(_) => return HeadParse::Invalid,
    };
    let Some(head) = buf.get(..line.len) else {
        return HeadParse::Invalid;
    };
    let mut fields = FieldSummary::default();
    let layout = match walk_fields(head, |field| fields.add(head, field)) {
        Ok(layout) if layout.end == head.len() => layout,
        _ => return HeadParse::Invalid,
    };
    let method = AnsweredMethod::of(head.get(line.method.clone()).unwrap_or_default());
    let framing = fields
        .framing
        .request(Mode::Strict, line.minor_version, method);
    HeadParse::Complete(RequestHeadInfo {
        len: line.len,
        method: line.method,
        target: line.target,
        minor_version: line.minor_version,
        framing,
        traceparent: fields.traceparent(),
        received_traceparent: match fields.traceparent() {
            TraceparentField::Valid => fields.traceparent_value,
            _ => None,
        },
        connect: method == AnsweredMethod::Connect,
        upgrade: fields.upgrade,
        blank_line: layout.blank_line,
        has_trace_fields: fields.traceparents > 0 || fields.tracestates > 0,
    })
}

/// What the walk over a request's fields collects.
#[derive(Default)]
struct FieldSummary {
    traceparents: usize,
    tracestates: usize,
    traceparent_valid: bool,
    traceparent_value: Option<TraceParent>,
    /// Content-Length and Transfer-Encoding, folded ones included.
    framing: FramingFields,
    upgrade: bool,
}

impl FieldSummary {
    fn add(&mut self, head: &[u8], field: &Field) {
        let name = field.name(head);
        if self.framing.add(name, field.value(head), field.folded) {
            return;
        }
        if name.eq_ignore_ascii_case(b"traceparent") {
            self.traceparents += 1;
            // A folded value is not something the specification's parsers
            // accept; it is replaced like any invalid one.
            self.traceparent_value = (!field.folded)
                .then(|| TraceParent::parse(field.value(head)).ok())
                .flatten();
            self.traceparent_valid = self.traceparent_value.is_some();
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.upgrade = true;
        } else if name.eq_ignore_ascii_case(b"tracestate") {
            self.tracestates += 1;
        }
    }

    fn traceparent(&self) -> TraceparentField {
        match (self.traceparents, self.traceparent_valid) {
            (0, _) => TraceparentField::Missing,
            (1, true) => TraceparentField::Valid,
            (1, false) => TraceparentField::Invalid,
            _ => TraceparentField::Multiple,
        }
    }
}

/// One field of a head: its first line and any obs-fold continuation lines.
struct Field {
    /// The name, as sent.
    name: Range<usize>,
    /// The value on the first line, without surrounding whitespace.
    value: Range<usize>,
    /// All of the field's lines, line endings included.
    lines: Range<usize>,
    /// Whether continuation lines follow the first.
    folded: bool,
}

impl Field {
    fn name<'h>(&self, head: &'h [u8]) -> &'h [u8] {
        head.get(self.name.clone()).unwrap_or_default()
    }

    fn value<'h>(&self, head: &'h [u8]) -> &'h [u8] {
        head.get(self.value.clone()).unwrap_or_default()
    }
}

/// Where the parts of a head lie.
struct Layout {
    /// The blank line that ends the head.
    blank_line: Range<usize>,
    /// End of the head.
    end: usize,
}

/// Head bytes malformed in a way the proxy will not rewrite.
struct Malformed;

/// Where the field lines of `head` begin: after any empty lines, which may
/// precede a start line (RFC 9112 section 2.2), and the start line.
fn start_line_end(head: &[u8]) -> Result<usize, Malformed> {
    let mut pos = 0;
    while let Some(rest) = head.get(pos..) {
        if rest.starts_with(b"\r\n") {
            pos += 2;
        } else if rest.starts_with(b"\n") {
            pos += 1;
        } else {
            break;
        }
    }
    next_line(head, pos).map(|(_, next)| next).ok_or(Malformed)
}

/// Walks the field lines of `head` (a complete head), calling `visit` for
/// each field in order. Checks the field grammar strictly: a name that is a
/// token directly followed by `:`, values of visible characters, spaces and
/// tabs, continuation lines only after a field.
fn walk_fields(head: &[u8], mut visit: impl FnMut(&Field)) -> Result<Layout, Malformed> {
    let mut pos = start_line_end(head)?;
    let mut pending: Option<Field> = None;
    loop {
        let (content, next) = next_line(head, pos).ok_or(Malformed)?;
        let line = head.get(content.clone()).ok_or(Malformed)?;
        match line.first() {
            None => {
                if let Some(field) = pending.take() {
                    visit(&field);
                }
                return Ok(Layout {
                    blank_line: pos..next,
                    end: next,
                });
            }
            Some(b' ' | b'\t') => {
                let field = pending.as_mut().ok_or(Malformed)?;
                if !line.iter().all(|&b| is_value_byte(b)) {
                    return Err(Malformed);
                }
                field.lines.end = next;
                field.folded = true;
            }
            Some(_) => {
                if let Some(field) = pending.take() {
                    visit(&field);
                }
                let colon = line.iter().position(|&b| b == b':').ok_or(Malformed)?;
                let (name, value) = (&line[..colon], &line[colon + 1..]);
                if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
                    return Err(Malformed);
                }
                if !value.iter().all(|&b| is_value_byte(b)) {
                    return Err(Malformed);
                }
                let value_start = content.start + colon + 1;
                let leading = value
                    .iter()
                    .take_while(|&&b| b == b' ' || b == b'\t')
                    .count();
                let trailing = value[leading..]
                    .iter()
                    .rev()
                    .take_while(|&&b| b == b' ' || b == b'\t')
                    .count();
                pending = Some(Field {
                    name: content.start..content.start + colon,
                    value: value_start + leading..content.end - trailing,
                    lines: pos..next,
                    folded: false,
                });
            }
        }
        pos = next;
    }
}

/// The line starting at `pos`: its content (without CR LF or LF) and where
/// the next line starts. None when no LF follows.
fn next_line(head: &[u8], pos: usize) -> Option<(Range<usize>, usize)> {
    let rest = head.get(pos..)?;
    let lf = rest.iter().position(|&b| b == b'\n')?;
    let content_len = if lf > 0 && rest[lf - 1] == b'\r' {
        lf - 1
    } else {
        lf
    };
    Some((pos..pos + content_len, pos + lf + 1))
}

/// A byte a field value may hold: visible ASCII, obs-text, space, tab.
fn is_value_byte(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff)
}

/// Writes `head` (a complete request head) to `out` with exactly one
/// `traceparent` field of `context`'s value added just before the blank
/// line, followed by a `tracestate` field when `context` continues one;
/// every other `traceparent` and `tracestate` field left out (a tracestate
/// only means something alongside the traceparent it came with), and all
/// other bytes as they were. Appends to `out`, so a reused buffer makes
/// this allocation-free. False, with `out` unchanged, when the head is
/// malformed (see [`parse_request_head`], which rejects such heads).
pub fn write_injected_head(head: &[u8], context: &PropagatedContext, out: &mut Vec<u8>) -> bool {
    let Ok(fields_start) = start_line_end(head) else {
        return false;
    };
    let mark = out.len();
    out.reserve(head.len() + added_len(context));
    out.extend_from_slice(&head[..fields_start]);
    let walked = walk_fields(head, |field| {
        let name = field.name(head);
        let drop =
            name.eq_ignore_ascii_case(b"traceparent") || name.eq_ignore_ascii_case(b"tracestate");
        if !drop {
            out.extend_from_slice(head.get(field.lines.clone()).unwrap_or_default());
        }
    });
    let layout = match walked {
        // Bytes past the blank line would be lost if not refused here.
        Ok(layout) if layout.end == head.len() => layout,
        _ => {
            out.truncate(mark);
            return false;
        }
    };
    // The added line ends the way the client ends its lines.
    let line_end = head.get(layout.blank_line.clone()).unwrap_or(b"\r\n");
    push_context_lines(context, line_end, out);
    out.extend_from_slice(line_end);
    true
}

/// [`write_injected_head`] for a head that [`parse_request_head`] read as
/// `info`. When there is no trace field to drop, which is nearly always,
/// the line is spliced in before the blank line without walking the fields
/// a second time: the parse already checked them.
pub fn write_injected(
    head: &[u8],
    info: &RequestHeadInfo,
    context: &PropagatedContext,
    out: &mut Vec<u8>,
) -> bool {
    let fields_end = info.blank_line.start;
    let line_end = match head.get(info.blank_line.clone()) {
        Some(line_end) if !info.has_trace_fields && info.len == head.len() => line_end,
        _ => return write_injected_head(head, context, out),
    };
    out.reserve(head.len() + added_len(context));
    out.extend_from_slice(&head[..fields_end]);
    push_context_lines(context, line_end, out);
    out.extend_from_slice(line_end);
    true
}

/// Bytes the added lines take at most.
fn added_len(context: &PropagatedContext) -> usize {
    b"traceparent: \r\n".len()
        + TRACEPARENT_LEN
        + b"tracestate: \r\n".len()
        + context.tracestate.len()
}

/// Appends `traceparent: <value>` and, when there is one, `tracestate:
/// <value>`, each ended by `line_end`. A tracestate that is not a valid
/// field value (it always is, coming from a parsed one) is left out rather
/// than let it break the head.
fn push_context_lines(context: &PropagatedContext, line_end: &[u8], out: &mut Vec<u8>) {
    let mut value = [0; TRACEPARENT_LEN];
    context.traceparent.write_header_value(&mut value);
    out.extend_from_slice(b"traceparent: ");
    out.extend_from_slice(&value);
    out.extend_from_slice(line_end);
    let state = context.tracestate.as_bytes();
    if !state.is_empty() && state.iter().all(|&b| is_value_byte(b) && b != b'\t') {
        out.extend_from_slice(b"tracestate: ");
        out.extend_from_slice(state);
        out.extend_from_slice(line_end);
    }
}

/// What [`rewrite_request_head`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RewriteOutcome {
    /// The head carries one valid traceparent and passes byte for byte.
    Unchanged {
        /// Length of the head.
        head_len: usize,
    },
    /// The head to send in place of the first `head_len` bytes.
    Injected {
        /// The rewritten head.
        head: Vec<u8>,
        /// Length of the original head.
        head_len: usize,
    },
    /// The bytes begin a request head that is not complete yet.
    Incomplete,
    /// Not an HTTP/1.x request head the proxy interprets; it forwards such
    /// bytes unchanged.
    NotRewritable,
}

/// The pure form of what the proxy does to one request head: the head at
/// the start of `bytes` either passes unchanged (valid traceparent) or gets
/// `inject` (see [`write_injected_head`]). Bytes after the head are not
/// looked at.
pub fn rewrite_request_head(bytes: &[u8], inject: &PropagatedContext) -> RewriteOutcome {
    let info = match parse_request_head(bytes) {
        HeadParse::Complete(info) => info,
        HeadParse::Partial => return RewriteOutcome::Incomplete,
        HeadParse::Invalid => return RewriteOutcome::NotRewritable,
    };
    let head_len = info.len;
    if !info.traceparent.needs_injection() {
        return RewriteOutcome::Unchanged { head_len };
    }
    let mut head = Vec::new();
    if !write_injected(&bytes[..head_len], &info, inject, &mut head) {
        return RewriteOutcome::NotRewritable;
    }
    RewriteOutcome::Injected { head, head_len }
}

/// What the proxy reads from a response head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeadInfo {
    /// Length of the head in bytes, blank line included.
    pub len: usize,
    /// Status code.
    pub status: u16,
    /// What the response means for the connection.
    pub kind: ResponseKind,
}

/// Parses the response head at the start of `buf`, answering a request
/// made with `method`. Lenient where servers are sloppy: responses are
/// only observed, never changed.
pub fn parse_response_head(buf: &[u8], method: AnsweredMethod) -> HeadParse<ResponseHeadInfo> {
    let mut headers = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    match parse_response_with(buf, method, &mut headers) {
        Err(httparse::Error::TooManyHeaders) => {
            let mut headers = uninit_headers(buf.len() / 3 + 1);
            finish_response(parse_response_with(buf, method, &mut headers))
        }
        other => finish_response(other),
    }
}

fn finish_response(
    result: Result<Option<ResponseHeadInfo>, httparse::Error>,
) -> HeadParse<ResponseHeadInfo> {
    match result {
        Ok(Some(info)) => HeadParse::Complete(info),
        Ok(None) => HeadParse::Partial,
        Err(_) => HeadParse::Invalid,
    }
}

fn parse_response_with<'b>(
    buf: &'b [u8],
    method: AnsweredMethod,
    headers: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<ResponseHeadInfo>, httparse::Error> {
    let mut response = httparse::Response::new(&mut []);
    let status = httparse::ParserConfig::default()
        .allow_multiple_spaces_in_response_status_delimiters(true)
        .allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .ignore_invalid_headers_in_responses(true)
        .parse_response_with_uninit_headers(&mut response, buf, headers)?;
    let httparse::Status::Complete(len) = status else {
        return Ok(None);
    };
    let Some(status) = response.code else {
        return Err(httparse::Error::Status);
    };
    // Strict, though responses are only observed: a last Transfer-Encoding
    // line that does not itself end in `chunked` is not followed (the relay
    // goes opaque at the body), the rest is RFC 9112's recipient reading.
    let fields = response.headers.iter().map(|h| (h.name, h.value));
    let kind = framing::response(Mode::Strict, status, method, fields);
    Ok(Some(ResponseHeadInfo { len, status, kind }))
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;
    use crate::tracecontext::{SpanId, TraceId, extract};

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn inject() -> PropagatedContext {
        PropagatedContext::without_state(TraceParent {
            trace_id: TraceId([0xab; 16]),
            parent_id: SpanId([0xcd; 8]),
            flags: 0x03,
        })
    }

    fn injected_line() -> String {
        format!(
            "traceparent: {}\r\n",
            inject().traceparent.to_header_value()
        )
    }

    #[test]
    fn a_continued_tracestate_follows_the_injected_traceparent() {
        let context = PropagatedContext {
            tracestate: "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".into(),
            ..inject()
        };
        // The application's own tracestate (without a traceparent it means
        // nothing) is replaced, on the fast path and the walking one.
        for head in [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\ntracestate: stale=1\r\n\r\n",
        ] {
            let RewriteOutcome::Injected { head, .. } =
                rewrite_request_head(head.as_bytes(), &context)
            else {
                panic!("not injected");
            };
            assert_eq!(
                String::from_utf8(head).unwrap(),
                format!(
                    "GET / HTTP/1.1\r\nHost: a\r\n{}tracestate: congo=t61rcWkgMzE,rojo=00f067aa0ba902b7\r\n\r\n",
                    injected_line()
                )
            );
        }
        // A value that could break the head is never written.
        let broken = PropagatedContext {
            tracestate: "a=1\r\nx-injected: 1".into(),
            ..inject()
        };
        let RewriteOutcome::Injected { head, .. } =
            rewrite_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", &broken)
        else {
            panic!("not injected");
        };
        assert_eq!(
            String::from_utf8(head).unwrap(),
            format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", injected_line())
        );
    }

    fn rewrite(head: &str) -> RewriteOutcome {
        rewrite_request_head(head.as_bytes(), &inject())
    }

    fn injected(head: &str) -> String {
        match rewrite(head) {
            RewriteOutcome::Injected {
                head: out,
                head_len,
            } => {
                assert_eq!(head_len, head.len());
                String::from_utf8(out).unwrap()
            }
            other => panic!("{head:?} gave {other:?}"),
        }
    }

    fn info(head: &str) -> RequestHeadInfo {
        match parse_request_head(head.as_bytes()) {
            HeadParse::Complete(info) => info,
            other => panic!("{head:?} gave {other:?}"),
        }
    }

    #[test]
    fn traceparent_goes_just_before_the_blank_line() {
        let head = "GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            injected(head),
            format!(
                "GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n{}\r\n",
                injected_line()
            )
        );
        // A head without any field.
        assert_eq!(
            injected("GET / HTTP/1.0\r\n\r\n"),
            format!("GET / HTTP/1.0\r\n{}\r\n", injected_line())
        );
    }

    #[test]
    fn every_other_byte_is_kept() {
        // Odd case, no space and many spaces after colons, trailing
        // whitespace, repeats, obs-fold, obs-text, empty values.
        let head = "POST  /x  HTTP/1.1\r\nhOsT:example.com\r\nX-A:   spaced   \t\r\n\
                    X-Folded: first\r\n \t second\r\n\tthird\r\nX-A: again\r\n\
                    X-Empty:\r\nX-Bin: \u{e9}t\u{e9}\r\nContent-Length: 0\r\n\r\n";
        let out = injected(head);
        let blank = head.len() - 2;
        assert_eq!(out, format!("{}{}\r\n", &head[..blank], injected_line()));
    }

    #[test]
    fn lf_only_heads_get_an_lf_line() {
        let out = injected("GET / HTTP/1.1\nHost: a\n\n");
        assert_eq!(
            out,
            format!(
                "GET / HTTP/1.1\nHost: a\ntraceparent: {}\n\n",
                inject().traceparent.to_header_value()
            )
        );
    }

    #[test]
    fn leading_empty_lines_are_kept() {
        let head = "\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(
            injected(head),
            format!(
                "\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
                injected_line()
            )
        );
    }

    #[test]
    fn valid_traceparent_passes_unchanged() {
        for head in [
            format!("GET / HTTP/1.1\r\ntraceparent: {VALID}\r\n\r\n"),
            format!("GET / HTTP/1.1\r\nTraceParent:{VALID}\r\ntracestate: a=1\r\n\r\n"),
            format!("GET / HTTP/1.1\r\nTRACEPARENT: \t{VALID} \t\r\nTraceState: junk junk\r\n\r\n"),
            format!("GET / HTTP/1.1\ntraceparent: {VALID}\n\n"),
            // A higher version with more fields is valid too.
            format!(
                "GET / HTTP/1.1\r\ntraceparent: cc-{}-extra\r\n\r\n",
                &VALID[3..]
            ),
        ] {
            assert_eq!(
                rewrite(&head),
                RewriteOutcome::Unchanged {
                    head_len: head.len()
                },
                "{head:?}"
            );
        }
    }

    #[test]
    fn invalid_traceparent_is_replaced() {
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "",
            "garbage",
        ] {
            let head = format!("GET / HTTP/1.1\r\nHost: a\r\ntraceparent: {bad}\r\nX: y\r\n\r\n");
            assert_eq!(
                injected(&head),
                format!(
                    "GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n{}\r\n",
                    injected_line()
                ),
                "{bad:?}"
            );
            assert_eq!(info(&head).traceparent, TraceparentField::Invalid);
        }
    }

    #[test]
    fn tracestate_goes_without_a_valid_traceparent() {
        let head = "GET / HTTP/1.1\r\ntracestate: a=1\r\nHost: a\r\nTraceState: b=2\r\n\
                    TRACESTATE: c=3\r\n   ,d=4\r\n\r\n";
        assert_eq!(
            injected(head),
            format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", injected_line())
        );
        assert_eq!(info(head).traceparent, TraceparentField::Missing);
        let invalid = format!("GET / HTTP/1.1\r\ntracestate: a=1\r\ntraceparent: x{VALID}\r\n\r\n");
        assert_eq!(
            injected(&invalid),
            format!("GET / HTTP/1.1\r\n{}\r\n", injected_line())
        );
    }

    #[test]
    fn two_traceparents_become_one() {
        let head = format!(
            "GET / HTTP/1.1\r\ntraceparent: {VALID}\r\nHost: a\r\nTraceparent: {VALID}\r\n\r\n"
        );
        assert_eq!(info(&head).traceparent, TraceparentField::Multiple);
        let out = injected(&head);
        assert_eq!(
            out,
            format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", injected_line())
        );
        assert_eq!(out.matches("traceparent").count(), 1);
    }

    #[test]
    fn folded_traceparent_is_replaced_whole() {
        let head = format!("GET / HTTP/1.1\r\ntraceparent:\r\n {VALID}\r\nHost: a\r\n\r\n");
        assert_eq!(info(&head).traceparent, TraceparentField::Invalid);
        assert_eq!(
            injected(&head),
            format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", injected_line())
        );
    }

    #[test]
    fn only_exact_field_names_count() {
        let head = format!(
            "GET / HTTP/1.1\r\nX-traceparent: {VALID}\r\ntraceparents: {VALID}\r\n\
             tracestate-x: 1\r\n\r\n"
        );
        let out = injected(&head);
        assert_eq!(
            out,
            format!("{}{}\r\n", &head[..head.len() - 2], injected_line())
        );
    }

    #[test]
    fn malformed_field_lines_are_not_rewritten() {
        for head in [
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET / HTTP/1.1\r\n Host: a\r\n\r\n",
            "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
            "GET / HTTP/1.1\r\nX\x7f: a\r\n\r\n",
            "GET / HTTP/1.1\r\n: a\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "\x16\x03\x01\x00\x05hello",
            "GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
        ] {
            assert_eq!(rewrite(head), RewriteOutcome::NotRewritable, "{head:?}");
        }
    }

    #[test]
    fn partial_heads_need_more() {
        let head = "GET /x HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n";
        for end in 0..head.len() {
            assert_eq!(
                rewrite(&head[..end]),
                RewriteOutcome::Incomplete,
                "{:?}",
                &head[..end]
            );
        }
    }

    #[test]
    fn bytes_after_the_head_are_not_part_of_it() {
        let bytes = "POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
        let head_len = bytes.find("hello").unwrap();
        let RewriteOutcome::Injected { head, head_len: n } = rewrite(bytes) else {
            panic!()
        };
        assert_eq!(n, head_len);
        assert!(head.ends_with(b"\r\n\r\n"));
        assert!(!String::from_utf8(head).unwrap().contains("hello"));
    }

    #[test]
    fn method_target_and_version_are_read() {
        let head = "OPTIONS  *  HTTP/1.0\r\nHost: a\r\n\r\n";
        let info = info(head);
        assert_eq!(info.method(head.as_bytes()), "OPTIONS");
        assert_eq!(info.target(head.as_bytes()), "*");
        assert_eq!(info.minor_version, 0);
        assert!(!info.may_switch_protocols());
    }

    #[test]
    fn request_framing_follows_rfc_9112() {
        let framing = |fields: &str| info(&format!("POST / HTTP/1.1\r\n{fields}\r\n")).framing;
        assert_eq!(framing(""), BodyFraming::None);
        assert_eq!(framing("Content-Length: 0\r\n"), BodyFraming::None);
        assert_eq!(framing("content-length:  12 \r\n"), BodyFraming::Length(12));
        assert_eq!(
            framing("Content-Length: 5, 5\r\nContent-Length: 5\r\n"),
            BodyFraming::Length(5)
        );
        assert_eq!(
            framing("Content-Length: 5\r\nContent-Length: 6\r\n"),
            BodyFraming::Unframeable
        );
        assert_eq!(framing("Content-Length: +5\r\n"), BodyFraming::Unframeable);
        assert_eq!(
            framing("Content-Length: 99999999999999999999999\r\n"),
            BodyFraming::Unframeable
        );
        assert_eq!(
            framing("Transfer-Encoding: gzip, Chunked\r\n"),
            BodyFraming::Chunked
        );
        assert_eq!(
            framing("Transfer-Encoding: chunked, gzip\r\n"),
            BodyFraming::Unframeable
        );
        assert_eq!(
            framing("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"),
            BodyFraming::Unframeable
        );
        assert_eq!(
            framing("Transfer-Encoding:\r\n chunked\r\n"),
            BodyFraming::Unframeable
        );
        assert_eq!(
            info("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").framing,
            BodyFraming::Unframeable
        );
    }

    #[test]
    fn connect_and_upgrade_may_switch_protocols() {
        let connect = info("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
        assert!(connect.connect && connect.may_switch_protocols());
        assert_eq!(connect.framing, BodyFraming::None);
        assert_eq!(
            info("CONNECT a:1 HTTP/1.1\r\nContent-Length: 3\r\n\r\n").framing,
            BodyFraming::Unframeable
        );
        let upgrade = info("GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nupgrade: websocket\r\n\r\n");
        assert!(upgrade.upgrade && upgrade.may_switch_protocols());
    }

    #[test]
    fn injection_decision_agrees_with_extract() {
        let mut rng = StdRng::seed_from_u64(0x9e);
        let values = [
            VALID,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "  ",
            "",
        ];
        let names = ["traceparent", "TraceParent", "tracestate", "x-other"];
        for _ in 0..2_000 {
            let fields: Vec<(&str, &str)> = (0..rng.random_range(0..4))
                .map(|_| {
                    (
                        names[rng.random_range(0..names.len())],
                        values[rng.random_range(0..values.len())],
                    )
                })
                .collect();
            let mut head = String::from("GET / HTTP/1.1\r\n");
            for (name, value) in &fields {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let expected = extract(
                fields
                    .iter()
                    .map(|(name, value)| (*name, value.trim().as_bytes())),
            );
            assert_eq!(
                info(&head).traceparent.needs_injection(),
                expected.is_none(),
                "{head:?}"
            );
        }
    }

    #[test]
    fn rewriting_never_panics_and_keeps_what_it_does_not_drop() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let seeds = [
            format!("GET / HTTP/1.1\r\nHost: a\r\ntraceparent: {VALID}\r\ntracestate: a=1\r\n\r\n"),
            "POST /x HTTP/1.1\r\nX-F: a\r\n b\r\nContent-Length: 3\r\n\r\nabc".to_owned(),
            "GET / HTTP/1.1\nTraceState: x\ntraceparent: 00-\n\n".to_owned(),
        ];
        for _ in 0..20_000 {
            let mut bytes = seeds[rng.random_range(0..seeds.len())].as_bytes().to_vec();
            for _ in 0..rng.random_range(0..4) {
                let at = rng.random_range(0..=bytes.len());
                let byte = *[b'\r', b'\n', b' ', b':', b'\t', rng.random()]
                    .get(rng.random_range(0..6))
                    .unwrap();
                match rng.random_range(0..3) {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => {}
                }
            }
            let _ = parse_response_head(&bytes, AnsweredMethod::Other);
            let RewriteOutcome::Injected { head, head_len } =
                rewrite_request_head(&bytes, &inject())
            else {
                continue;
            };
            // The splice gives what the walk over every field gives.
            let mut walked = Vec::new();
            assert!(write_injected_head(
                &bytes[..head_len],
                &inject(),
                &mut walked
            ));
            assert_eq!(head, walked, "{bytes:?}");
            // The output carries exactly the injected context...
            let HeadParse::Complete(again) = parse_request_head(&head) else {
                panic!("rewritten head does not parse: {head:?}");
            };
            assert_eq!(again.traceparent, TraceparentField::Valid);
            assert_eq!(again.len, head.len());
            // ...and, without its added line, is the input without the
            // dropped fields.
            let line_end: &[u8] = if head.ends_with(b"\r\n\r\n") {
                b"\r\n"
            } else {
                b"\n"
            };
            let added = [
                b"traceparent: ".as_slice(),
                inject().traceparent.to_header_value().as_bytes(),
                line_end,
            ]
            .concat();
            let blank = head.len() - line_end.len();
            assert_eq!(&head[blank - added.len()..blank], &added[..]);
            let without: Vec<u8> = [&head[..blank - added.len()], &head[blank..]].concat();
            let mut expected = Vec::new();
            let original = &bytes[..head_len];
            expected.extend_from_slice(&original[..start_line_end(original).ok().unwrap()]);
            walk_fields(original, |field| {
                let name = field.name(original);
                if !name.eq_ignore_ascii_case(b"traceparent")
                    && !name.eq_ignore_ascii_case(b"tracestate")
                {
                    expected.extend_from_slice(&original[field.lines.clone()]);
                }
            })
            .ok()
            .unwrap();
            expected.extend_from_slice(line_end);
            assert_eq!(without, expected);
        }
    }

    #[test]
    fn response_heads_say_what_follows() {
        let kind = |head: &str, method| match parse_response_head(head.as_bytes(), method) {
            HeadParse::Complete(info) => {
                assert_eq!(info.len, head.len());
                info.kind
            }
            other => panic!("{head:?} gave {other:?}"),
        };
        use AnsweredMethod::{Connect, Head, Other};
        use ResponseKind::{Final, Interim, Switch};
        assert_eq!(kind("HTTP/1.1 100 Continue\r\n\r\n", Other), Interim);
        assert_eq!(
            kind("HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n", Other),
            Interim
        );
        assert_eq!(
            kind(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
                Other
            ),
            Switch
        );
        assert_eq!(
            kind("HTTP/1.1 200 Connection established\r\n\r\n", Connect),
            Switch
        );
        assert_eq!(
            kind("HTTP/1.1 407 Auth\r\nContent-Length: 2\r\n\r\n", Connect),
            Final(BodyFraming::Length(2))
        );
        assert_eq!(
            kind("HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n", Head),
            Final(BodyFraming::None)
        );
        assert_eq!(
            kind("HTTP/1.1 204 No Content\r\n\r\n", Other),
            Final(BodyFraming::None)
        );
        assert_eq!(
            kind(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                Other
            ),
            Final(BodyFraming::None)
        );
        assert_eq!(
            kind(
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                Other
            ),
            Final(BodyFraming::Chunked)
        );
        assert_eq!(
            kind("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", Other),
            Final(BodyFraming::UntilClose)
        );
        assert_eq!(
            kind("HTTP/1.0 200 OK\r\n\r\n", Other),
            Final(BodyFraming::UntilClose)
        );
        assert_eq!(
            kind("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", Other),
            Final(BodyFraming::Unframeable)
        );
        assert_eq!(
            parse_response_head(b"HTTP/1.1 200 OK\r\n", Other),
            HeadParse::Partial
        );
        assert_eq!(
            parse_response_head(b"SSH-2.0-OpenSSH\r\n", Other),
            HeadParse::Invalid
        );
    }

    #[test]
    fn heads_with_many_fields_are_parsed() {
        let mut head = String::from("GET / HTTP/1.1\r\n");
        for i in 0..500 {
            head.push_str(&format!("X-{i}: {i}\r\n"));
        }
        head.push_str("\r\n");
        let out = injected(&head);
        assert_eq!(out.len(), head.len() + injected_line().len());
        let response = head.replacen("GET / HTTP/1.1", "HTTP/1.1 204 No", 1);
        assert!(matches!(
            parse_response_head(response.as_bytes(), AnsweredMethod::Other),
            HeadParse::Complete(_)
        ));
    }
}
