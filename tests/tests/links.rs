//! Privileged: how outbound calls find their parent, measured against a
//! known true tree (see `tests::links`). The rule under test: never a wrong
//! parent. Thread-per-request servers get every link right; event loops
//! get no parent from the thread signal.

use tests::links::{assert_never_linked_by_thread, measure, python_services};
use tests::{ScratchDir, capture, in_vm, privileged};

/// A thread-per-request frontend: every link right, every trace whole.
#[test]
fn thread_per_request_frontend_links_every_call_right() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("links-threads");
    let (_backend, back_port, frontend, front_port) = python_services(&dir, "threads");
    let (requests, concurrency) = if in_vm() { (100, 8) } else { (1000, 16) };
    let counts = measure(
        "python-threads",
        &frontend,
        front_port,
        back_port,
        requests,
        concurrency,
    );
    // Never wrong. A call made before curl's side of the same request was
    // seen (the server's trace may still change) gets no parent
    // (`none-trace-pending`): rare on the host, more frequent in the slow
    // VMs. Every other link is right.
    assert_eq!(counts.wrong, 0, "{counts:?}");
    // The VMs' share is not measured yet: there only "never wrong" and
    // "some right" are asserted.
    let least_right = if in_vm() { 1 } else { requests * 95 / 100 };
    assert!(counts.right >= least_right, "right: {counts:?}");
}

/// An asyncio frontend: its event loop thread never gives a parent, at
/// concurrency 1 (where a guess would often be right) as at 8.
#[test]
fn asyncio_frontend_gets_no_wrong_parent() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("links-asyncio");
    let (_backend, back_port, frontend, front_port) = python_services(&dir, "asyncio");
    let rounds = [(20, 1), (if in_vm() { 50 } else { 200 }, 8)];
    assert_never_linked_by_thread("python-asyncio", &frontend, front_port, back_port, &rounds);
}
