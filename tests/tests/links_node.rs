//! Privileged, host only: a Node.js frontend's outbound calls never get a
//! wrong parent (an event loop: no thread signal). Its own binary because
//! the VM guest has no Node.js (see `HOST_ONLY_TESTS` in xtask).

use tests::links::{assert_never_linked_by_thread, python_services};
use tests::{ChildGuard, ScratchDir, capture, fixtures, free_port, privileged};

#[test]
fn node_frontend_gets_no_wrong_parent() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("links-node");
    // The python backend; its own frontend is not used.
    let (_backend, back_port, _python_front, _) = python_services(&dir, "threads");
    let front_port = free_port();
    let script = dir.write("link_service.js", fixtures::LINK_SERVICE_JS.as_bytes());
    let mut frontend = ChildGuard(
        std::process::Command::new("/usr/bin/node")
            .arg(script)
            .args([front_port.to_string(), back_port.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("node is installed (cargo xtask setup)"),
    );
    assert_eq!(frontend.read_line(), "READY");
    assert_never_linked_by_thread(
        "node",
        &frontend,
        front_port,
        back_port,
        &[(20, 1), (200, 8)],
    );
}
