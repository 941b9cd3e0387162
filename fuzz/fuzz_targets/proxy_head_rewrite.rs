//! The proxy's request head rewrite (`proxy::head::rewrite_request_head`),
//! with the oracle that rules out request smuggling: a rewritten head
//! parses as the same request line, with the same body framing, every
//! field but `traceparent` and `tracestate` byte for byte and in order,
//! and exactly the trace fields decided; a head left unchanged carried one
//! valid traceparent.
#![no_main]

use agent::proxy::head::{
    HeadParse, RewriteOutcome, TraceparentField, parse_request_head, rewrite_request_head,
};
use agent::span::{SpanId, TraceId};
use agent::tracecontext::{PropagatedContext, TraceParent};
use libfuzzer_sys::fuzz_target;

/// The head's fields other than the trace fields, raw: each its line and
/// the continuation lines (obs-fold, starting with a space or tab) that
/// belong to it.
fn other_fields(head: &[u8]) -> Vec<Vec<&[u8]>> {
    let mut fields: Vec<Vec<&[u8]>> = Vec::new();
    for line in head.split(|&b| b == b'\n').skip(1) {
        match (line.first(), fields.last_mut()) {
            (Some(b' ' | b'\t'), Some(field)) => field.push(line),
            _ => fields.push(vec![line]),
        }
    }
    fields.retain(|field| {
        let name = field[0].split(|&b| b == b':').next().unwrap_or_default();
        !name.eq_ignore_ascii_case(b"traceparent") && !name.eq_ignore_ascii_case(b"tracestate")
    });
    fields
}

fuzz_target!(|data: &[u8]| {
    let inject = PropagatedContext {
        traceparent: TraceParent::root(TraceId([0x4b; 16]), SpanId([0x7c; 8]), true),
        tracestate: "agent=1,other=x".to_string(),
    };
    let original = match parse_request_head(data) {
        HeadParse::Complete(info) => Some(info),
        _ => None,
    };
    match rewrite_request_head(data, &inject) {
        RewriteOutcome::Unchanged { head_len } => {
            let info = original.expect("an unchanged head parsed");
            assert_eq!(head_len, info.len);
            assert_eq!(info.traceparent, TraceparentField::Valid);
        }
        RewriteOutcome::Injected { head, head_len } => {
            let before = original.expect("an injected head parsed");
            assert_eq!(head_len, before.len);
            assert!(before.traceparent.needs_injection());
            let HeadParse::Complete(after) = parse_request_head(&head) else {
                panic!(
                    "the rewritten head does not parse: {:?}",
                    String::from_utf8_lossy(&head)
                );
            };
            assert_eq!(after.len, head.len(), "the head is all there is");
            let old = &data[..head_len];
            assert_eq!(before.method(old), after.method(&head));
            assert_eq!(before.target(old), after.target(&head));
            assert_eq!(before.minor_version, after.minor_version);
            assert_eq!(before.framing, after.framing, "the same body framing");
            assert_eq!(before.connect, after.connect);
            assert_eq!(before.upgrade, after.upgrade);
            assert_eq!(after.traceparent, TraceparentField::Valid);
            assert_eq!(after.received_traceparent, Some(inject.traceparent));
            assert_eq!(
                other_fields(old),
                other_fields(&head),
                "every other field unchanged"
            );
        }
        RewriteOutcome::Incomplete => {
            assert!(matches!(parse_request_head(data), HeadParse::Partial));
        }
        RewriteOutcome::NotRewritable => {}
    }
});
