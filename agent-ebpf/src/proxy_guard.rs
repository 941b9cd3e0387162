//! The proxy's lease on its REDIRECT rules: an `iptables -m bpf` match that
//! holds only while the proxy keeps renewing it.
//!
//! Every REDIRECT rule of the proxy carries this match (`-m bpf
//! --object-pinned`). The proxy writes "alive until" (CLOCK_MONOTONIC, the
//! clock of `bpf_ktime_get_ns`) into `LEASE` a few times per lease; when
//! the proxy dies, however it dies (SIGKILL, OOM kill, abort, its container
//! killed, frozen), nobody renews it, the match fails once the lease has
//! run out, and new connections go to their real destination. Fail-open by
//! construction: nothing has to run for the rules to stop redirecting.
//!
//! A separate object from the capture's programs, so that the proxy loads
//! one small map and program, not the capture's ring buffer and tables.
#![no_std]
#![no_main]
// The `socket_filter` macro's entry point takes the kernel's `__sk_buff`
// pointer in a public function; that is the program type's calling
// convention, not an API.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, socket_filter},
    maps::{Array, PerCpuArray},
    programs::SkBuffContext,
};

/// The time the lease runs out, in CLOCK_MONOTONIC nanoseconds (0:
/// expired). Written by the proxy.
#[map]
static LEASE: Array<u64> = Array::with_max_entries(1, 0);

/// New connections the rules let pass because the lease had run out, per
/// CPU (no atomics on this target; user space sums).
#[map]
static PASSED_EXPIRED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Matches (non-zero) while the lease holds. The nat table sees only a
/// connection's first packet, so this runs once per new connection to a
/// redirected port.
#[socket_filter]
pub fn proxy_alive(_ctx: SkBuffContext) -> i64 {
    let now = unsafe { bpf_ktime_get_ns() };
    match LEASE.get(0) {
        Some(&until) if now < until => 1,
        _ => {
            if let Some(passed) = PASSED_EXPIRED.get_ptr_mut(0) {
                // SAFETY: this CPU's slot, valid for the program's run;
                // nothing else on this CPU writes it meanwhile.
                unsafe { *passed += 1 };
            }
            0
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
