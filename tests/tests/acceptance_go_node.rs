//! Privileged, host only: the acceptance topology (see `tests::acceptance`)
//! with a Go net/http frontend and a Node.js http frontend, 8 concurrent
//! callers. Neither runtime has an exact signal yet (goroutines move between
//! threads; Node.js is an event loop): their calls must never get a wrong
//! parent, and the share right is reported. Their own binary because the VM
//! guest has neither Go nor Node.js (see `HOST_ONLY_TESTS` in xtask).

use tests::acceptance::{GO, NODE, assert_rounds, run_topology};
use tests::privileged;

/// No floor on the share right: only "never wrong, every other hop right".
const NO_FLOOR: usize = 0;

#[test]
fn go_frontend_never_a_wrong_parent() {
    if !privileged() {
        return;
    }
    let results = run_topology(&GO, &[(200, 8)]);
    assert_rounds(&results, NO_FLOOR);
}

#[test]
fn node_frontend_never_a_wrong_parent() {
    if !privileged() {
        return;
    }
    let results = run_topology(&NODE, &[(200, 8)]);
    assert_rounds(&results, NO_FLOOR);
}
