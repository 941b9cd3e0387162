//! Privileged: the acceptance topology (see `tests::acceptance`) with
//! Python frontends: a thread per request, uvicorn/FastAPI and aiohttp.
//! The Go and Node.js frontends are in `acceptance_go_node.rs` (host only).

use tests::acceptance::{
    AIOHTTP, THREADS, UVICORN, assert_rounds, event_loop_least_right, run_topology,
};
use tests::links::event_loop_rounds;
use tests::{in_vm, privileged};

#[test]
fn thread_per_request_frontend_every_trace_whole_and_nearly_every_link_right() {
    if !privileged() {
        return;
    }
    let rounds: &[(usize, usize)] = if in_vm() { &[(100, 16)] } else { &[(1000, 16)] };
    let results = run_topology(&THREADS, rounds);
    // In the slow VMs the proxy may have to decide before the probes (its
    // wait is 10 ms): such a call has no parent, never a wrong one. On a
    // loaded host, rarely, the frontend's call is read before its own
    // inbound request's client side (the events of two processes on two
    // CPUs): the inbound trace may still change, so the call gets no parent
    // (`none-trace-pending`, by design). Seen once in CI on c4d077a: 999 of
    // 1000 right, 1 of those. Wrong parents fail the test in every case.
    assert_rounds(&results, if in_vm() { 95 } else { 99 });
}

#[test]
fn uvicorn_frontend_never_a_wrong_parent() {
    if !privileged() {
        return;
    }
    let results = run_topology(&UVICORN, event_loop_rounds());
    assert_rounds(&results, event_loop_least_right());
}

#[test]
fn aiohttp_frontend_never_a_wrong_parent() {
    if !privileged() {
        return;
    }
    let results = run_topology(&AIOHTTP, event_loop_rounds());
    assert_rounds(&results, event_loop_least_right());
}
