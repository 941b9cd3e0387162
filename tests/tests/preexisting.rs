//! Privileged: a connection opened before the capture started is still
//! captured, once its file descriptor is next used.
//!
//! A binary of its own, so that the capture starts only after the
//! connection exists.

use std::time::Duration;

use agent::capture::{Direction, Role};
use tests::{
    ScratchDir, bytes_of, capture, fixtures, free_port, messages, privileged, start_python,
    wait_listening,
};

#[test]
fn connection_opened_before_the_agent_is_captured_when_used() {
    if !privileged() {
        return;
    }
    let dir = ScratchDir::new("preexisting");
    let port = free_port();
    let port_arg = port.to_string();
    let out = dir.path().to_str().unwrap().to_string();
    let server = start_python(
        &dir,
        "recording_server.py",
        fixtures::RECORDING_SERVER,
        &[&port_arg, &out, "127.0.0.1"],
    );
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap());
    let mut client = start_python(&dir, "slow_client.py", fixtures::SLOW_CLIENT, &[&port_arg]);
    assert_eq!(client.read_line(), "CONNECTED");

    // Only now does the agent start.
    let capture = capture();
    let client_pid = client.pid();
    client.write_line("go");
    assert_eq!(client.read_line(), "DONE");

    let after = b"GET /after HTTP/1.1\r\nHost: test\r\n\r\n".to_vec();
    let again = b"GET /again HTTP/1.1\r\nHost: test\r\n\r\n".to_vec();
    let events = capture.wait_for_port(port, Duration::from_secs(20), |e| {
        bytes_of(e, client_pid, Direction::Ingress).ends_with(b"you asked for /again\n")
            && bytes_of(e, server.pid(), Direction::Egress).ends_with(b"you asked for /again\n")
    });
    // Every syscall that began after the probes attached is captured.
    assert_eq!(
        bytes_of(&events, client_pid, Direction::Egress),
        [after.clone(), again.clone()].concat()
    );
    assert_eq!(
        bytes_of(&events, server.pid(), Direction::Egress),
        [response("/after"), response("/again")].concat()
    );
    assert_eq!(
        bytes_of(&events, client_pid, Direction::Ingress),
        [response("/after"), response("/again")].concat()
    );
    // The server was already blocked in recv() for /after when the probes
    // attached: that one read has no enter record and is lost (documented in
    // docs/architecture.md). Its next read is captured.
    let server_in = bytes_of(&events, server.pid(), Direction::Ingress);
    assert!(
        server_in == again || server_in == [after, again.clone()].concat(),
        "server ingress: {:?}",
        String::from_utf8_lossy(&server_in)
    );
    for m in messages(&events) {
        // connect() and accept() happened before the probes: role unknown,
        // addresses read from the socket itself.
        assert_eq!(m.connection.role, Role::Unknown);
        if m.connection.pid == client_pid {
            assert_eq!(m.connection.remote.port(), port);
        } else {
            assert_eq!(m.connection.local.port(), port);
        }
    }
}

/// What the recording server answers for `path`.
fn response(path: &str) -> Vec<u8> {
    let body = format!("you asked for {path}\n");
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
