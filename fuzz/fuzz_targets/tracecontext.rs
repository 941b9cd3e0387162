//! traceparent and tracestate parsing: never a panic, and what parses
//! formats back to a value that parses to the same thing.
#![no_main]

use agent::tracecontext::{TraceParent, TraceState};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(parent) = TraceParent::parse(data) {
        let text = parent.to_header_value();
        assert_eq!(text.len(), 55, "{text}");
        assert_eq!(TraceParent::parse(text.as_bytes()), Ok(parent));
    }
    // The same bytes as tracestate fields, one per line.
    let fields: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    if let Ok(state) = TraceState::parse_fields(&fields) {
        // The propagated value is the state cut to its limit, and parses
        // back to that.
        let text = state.to_header_value();
        let cut = state.truncated_to(agent::tracecontext::MAX_PROPAGATED_LEN);
        assert_eq!(
            TraceState::parse_fields(&[text.as_bytes()]).as_ref(),
            Ok(&cut)
        );
        assert!(cut.len() <= state.len());
        // Truncation keeps a valid list within the limit.
        let short = state.truncated_to(64);
        assert!(short.to_header_value().len() <= 64);
    }
});
