//! The proxy's request head rewrite (`proxy::head::rewrite_request_head`),
//! with the oracle that rules out request smuggling. Two oracles that do
//! not use the parser under test:
//! - bytes: the rewritten head is exactly the original with its
//!   `traceparent` and `tracestate` lines (and their continuation lines)
//!   taken out and the two decided lines put before the blank line, ended
//!   as the client ends it;
//! - httparse, strict about fields (as a server would read them): where it
//!   reads the original head, it ends where the agent says, and it reads
//!   the rewritten one as the same method, target and version, every field
//!   but the trace fields byte for byte and in order, and the trace fields
//!   exactly as decided, last.
//!
//! And the agent's own reading of both heads: the same request line and
//! the same body framing. A head left unchanged carried one valid
//! traceparent (checked by the W3C grammar, written out here); a head
//! refused (`NotRewritable`, which the proxy forwards unchanged) is one
//! the agent's parser refuses and httparse does not read either.
#![no_main]

use agent::proxy::head::{
    HeadParse, RewriteOutcome, TraceparentField, parse_request_head, rewrite_request_head,
};
use agent::span::{SpanId, TraceId};
use agent::tracecontext::{PropagatedContext, TraceParent};
use libfuzzer_sys::fuzz_target;

/// What the rewrite injects, as text: `00-<trace id>-<span id>-<flags>`, a
/// new trace's flags being sampled (01) and random trace id (02, W3C
/// Trace Context level 2).
const TRACEPARENT: &[u8] = b"00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-7c7c7c7c7c7c7c7c-03";
const TRACESTATE: &[u8] = b"agent=1,other=x";

fn is_trace_field(line: &[u8]) -> bool {
    let name = line.split(|&b| b == b':').next().unwrap_or_default();
    name.eq_ignore_ascii_case(b"traceparent") || name.eq_ignore_ascii_case(b"tracestate")
}

/// The head the rewrite must produce from `head` (complete), from its bytes
/// alone: lines are split at LF; the start line (after any empty lines)
/// and every field line but the trace fields' are kept as they are, a
/// line starting with a space or tab going with the field before it.
fn expected_rewrite(head: &[u8]) -> Vec<u8> {
    let lines: Vec<&[u8]> = head.split_inclusive(|&b| b == b'\n').collect();
    let (blank, lines) = lines.split_last().expect("a head has a blank line");
    let start_line = lines
        .iter()
        .position(|l| *l != b"\r\n" && *l != b"\n")
        .expect("a head has a start line");
    let mut out = Vec::new();
    let mut dropping = false;
    for (i, line) in lines.iter().enumerate() {
        if i > start_line {
            if !matches!(line.first(), Some(b' ' | b'\t')) {
                dropping = is_trace_field(line);
            }
            if dropping {
                continue;
            }
        }
        out.extend_from_slice(line);
    }
    for (name, value) in [
        (&b"traceparent"[..], TRACEPARENT),
        (b"tracestate", TRACESTATE),
    ] {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(blank);
    }
    out.extend_from_slice(blank);
    out
}

/// A head as httparse reads it, fields strictly (no obs-fold, no invalid
/// line skipped), the request line as leniently as the proxy takes it
/// (several spaces between its parts).
#[derive(Debug, PartialEq, Eq)]
struct Strict {
    len: usize,
    method: String,
    path: String,
    version: u8,
    fields: Vec<(String, Vec<u8>)>,
}

/// None: incomplete; Err: not a head httparse reads.
fn strict(buf: &[u8]) -> Result<Option<Strict>, httparse::Error> {
    // A field line takes at least 3 bytes ("a:" and LF).
    let mut headers = vec![httparse::EMPTY_HEADER; buf.len() / 3 + 1];
    let mut request = httparse::Request::new(&mut headers);
    let status = httparse::ParserConfig::default()
        .allow_multiple_spaces_in_request_line_delimiters(true)
        .parse_request(&mut request, buf)?;
    let httparse::Status::Complete(len) = status else {
        return Ok(None);
    };
    Ok(Some(Strict {
        len,
        method: request.method.unwrap_or_default().to_string(),
        path: request.path.unwrap_or_default().to_string(),
        version: request.version.unwrap_or(9),
        fields: request
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect(),
    }))
}

/// A traceparent value a W3C Trace Context parser accepts (level 1,
/// section 3.2), optional whitespace around it.
fn valid_traceparent(value: &[u8]) -> bool {
    let value = value.trim_ascii();
    let hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |b: &[u8]| b.iter().any(|&c| c != b'0');
    value.len() >= 55
        && hex(&value[0..2])
        && &value[0..2] != b"ff"
        && (value.len() == 55 || (&value[0..2] != b"00" && value[55] == b'-'))
        && value[2] == b'-'
        && hex(&value[3..35])
        && nonzero(&value[3..35])
        && value[35] == b'-'
        && hex(&value[36..52])
        && nonzero(&value[36..52])
        && value[52] == b'-'
        && hex(&value[53..55])
}

fuzz_target!(|data: &[u8]| {
    let inject = PropagatedContext {
        traceparent: TraceParent::root(TraceId([0x4b; 16]), SpanId([0x7c; 8]), true),
        tracestate: String::from_utf8(TRACESTATE.to_vec()).unwrap(),
    };
    let original = match parse_request_head(data) {
        HeadParse::Complete(info) => Some(info),
        _ => None,
    };
    let strict_original = strict(data);
    match rewrite_request_head(data, &inject) {
        RewriteOutcome::Unchanged { head_len } => {
            let info = original.expect("an unchanged head parsed");
            assert_eq!(head_len, info.len);
            assert_eq!(info.traceparent, TraceparentField::Valid);
            // Independently: one traceparent line, not folded, valid.
            let head = &data[..head_len];
            let lines: Vec<&[u8]> = head.split(|&b| b == b'\n').collect();
            let traceparents: Vec<usize> = (1..lines.len())
                .filter(|&i| {
                    let name = lines[i].split(|&b| b == b':').next().unwrap_or_default();
                    name.eq_ignore_ascii_case(b"traceparent")
                })
                .collect();
            let [i] = traceparents[..] else {
                panic!("{} traceparent lines", traceparents.len());
            };
            assert!(
                !matches!(lines.get(i + 1).and_then(|l| l.first()), Some(b' ' | b'\t')),
                "a folded traceparent passed"
            );
            let line = lines[i].strip_suffix(b"\r").unwrap_or(lines[i]);
            let value = &line[line.iter().position(|&b| b == b':').unwrap() + 1..];
            assert!(
                valid_traceparent(value),
                "an invalid traceparent passed: {:?}",
                String::from_utf8_lossy(value)
            );
            if let Ok(Some(s)) = strict_original {
                assert_eq!(s.len, head_len, "httparse ends the head elsewhere");
            }
        }
        RewriteOutcome::Injected { head, head_len } => {
            let before = original.expect("an injected head parsed");
            assert_eq!(head_len, before.len);
            assert!(before.traceparent.needs_injection());
            let old = &data[..head_len];
            assert_eq!(
                head,
                expected_rewrite(old),
                "from {:?}",
                String::from_utf8_lossy(old)
            );
            let HeadParse::Complete(after) = parse_request_head(&head) else {
                panic!(
                    "the rewritten head does not parse: {:?}",
                    String::from_utf8_lossy(&head)
                );
            };
            assert_eq!(after.len, head.len(), "the head is all there is");
            assert_eq!(before.method(old), after.method(&head));
            assert_eq!(before.target(old), after.target(&head));
            assert_eq!(before.minor_version, after.minor_version);
            assert_eq!(before.framing, after.framing, "the same body framing");
            assert_eq!(before.connect, after.connect);
            assert_eq!(before.upgrade, after.upgrade);
            assert_eq!(after.traceparent, TraceparentField::Valid);
            assert_eq!(after.received_traceparent, Some(inject.traceparent));
            // As a server's parser reads them.
            if let Ok(Some(s_before)) = strict_original {
                assert_eq!(s_before.len, head_len, "httparse ends the head elsewhere");
                let Ok(Some(s_after)) = strict(&head) else {
                    panic!(
                        "httparse reads the original but not the rewrite: {:?}",
                        String::from_utf8_lossy(&head)
                    );
                };
                assert_eq!(s_after.len, head.len());
                assert_eq!(
                    (&s_before.method, &s_before.path, s_before.version),
                    (&s_after.method, &s_after.path, s_after.version)
                );
                let others = |s: &Strict| -> Vec<(String, Vec<u8>)> {
                    s.fields
                        .iter()
                        .filter(|(name, _)| !is_trace_field(name.as_bytes()))
                        .cloned()
                        .collect()
                };
                assert_eq!(others(&s_before), others(&s_after), "the other fields");
                let n = s_after.fields.len();
                assert!(n >= 2);
                assert_eq!(
                    s_after.fields[n - 2..],
                    [
                        ("traceparent".to_string(), TRACEPARENT.to_vec()),
                        ("tracestate".to_string(), TRACESTATE.to_vec()),
                    ],
                    "the trace fields, last and exactly as decided"
                );
                assert_eq!(others(&s_after).len(), n - 2, "no other trace field");
            }
        }
        RewriteOutcome::Incomplete => {
            assert!(matches!(parse_request_head(data), HeadParse::Partial));
            assert!(
                !matches!(strict_original, Ok(Some(_))),
                "httparse reads a complete head"
            );
        }
        RewriteOutcome::NotRewritable => {
            // Forwarded unchanged by the proxy, which goes opaque: only for
            // bytes its parser refuses, and never for a head a server's
            // strict parser reads.
            assert!(matches!(parse_request_head(data), HeadParse::Invalid));
            assert!(
                !matches!(strict_original, Ok(Some(_))),
                "a head httparse reads was not rewritten: {:?}",
                String::from_utf8_lossy(data)
            );
        }
    }
});
