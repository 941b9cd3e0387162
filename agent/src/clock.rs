//! The kernel's clock as the probes read it: `bpf_ktime_get_ns` is
//! CLOCK_MONOTONIC, so every capture timestamp and every time a kernel
//! program compares with (the proxy's lease) is on this clock.

fn now(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a local timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// CLOCK_MONOTONIC now, in nanoseconds: the probes' clock.
pub fn monotonic_ns() -> u64 {
    now(libc::CLOCK_MONOTONIC) as u64
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, in nanoseconds: added to a probe's
/// timestamp, it gives Unix time.
pub fn monotonic_to_unix_offset_ns() -> i128 {
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC)
}
