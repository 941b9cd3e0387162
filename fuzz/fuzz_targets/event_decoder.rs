//! The kernel record decoder: any bytes give an event or an error, never a
//! panic (the ring buffer's records come from kernel code, but a decoder
//! bug must not take the agent down).
#![no_main]

use agent::capture::event::RecordDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = RecordDecoder::new();
    let _ = decoder.decode(data);
    // A second record through the same buffer.
    let _ = decoder.decode(data);
});
