//! Privileged, host only: a Go net/http frontend's outbound calls never get
//! a wrong parent (goroutines move between threads: no thread signal). Its
//! own binary because the VM guest has no Go toolchain (see
//! `HOST_ONLY_TESTS` in xtask).

use tests::links::{assert_never_linked_by_thread, build_go_link_service, python_services};
use tests::{ChildGuard, ScratchDir, capture, free_port, privileged};

#[test]
fn go_frontend_gets_no_wrong_parent() {
    if !privileged() {
        return;
    }
    capture();
    let dir = ScratchDir::new("links-go");
    // The python backend; its own frontend is not used.
    let (_backend, back_port, _python_front, _) = python_services(&dir, "threads");
    let binary = build_go_link_service(&dir);
    let front_port = free_port();
    let mut frontend = ChildGuard(
        std::process::Command::new(&binary)
            .args([front_port.to_string(), back_port.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the Go frontend starts"),
    );
    assert_eq!(frontend.read_line(), "READY");
    assert_never_linked_by_thread("go", &frontend, front_port, back_port, &[(20, 1), (200, 8)]);
}
