//! The kernel record decoder: any bytes give an event or an error, never a
//! panic (the ring buffer's records come from kernel code, but a decoder
//! bug must not take the agent down).
#![no_main]

use agent::capture::event::decode_record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A message's bytes are the record's own: in bounds, or an error.
    if let Ok(agent::capture::CaptureEvent::Data(m)) = decode_record(data) {
        assert!(m.bytes.len() <= data.len());
    }
});
