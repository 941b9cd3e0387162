//! Helpers the agent binary's integration tests share.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

pub const AGENT: &str = env!("CARGO_BIN_EXE_agent");

pub fn is_root() -> bool {
    // SAFETY: no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// Privileged tests skip without root, except under CI=true, where a skip
/// would hide that they never ran.
pub fn privileged() -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "privileged test cannot run: not root under CI=true"
    );
    eprintln!("SKIPPED: needs root");
    false
}

/// One test at a time runs an agent: the proxy's iptables chains have
/// fixed names, and an agent traces every process on the machine, other
/// tests' traffic included.
static AGENT_RUNNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn one_agent_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    AGENT_RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a child's pipe, read on a thread so the test can wait with a
/// deadline. The pipe is read to its end even when the receiver is gone, so
/// the child never writes into a closed pipe.
pub fn lines(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

pub fn wait_line(
    rx: &mpsc::Receiver<String>,
    deadline: Instant,
    want: impl Fn(&str) -> bool,
) -> Option<String> {
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if want(&line) => return Some(line),
            // Shown with the failure, if there is one.
            Ok(line) => eprintln!("(skipped) {line}"),
            Err(_) => return None,
        }
    }
    None
}

/// `agent run --no-terminal` with `args`, stdout discarded: the process
/// and its stderr lines.
pub fn start_agent<I, S>(args: I) -> (KillOnDrop, mpsc::Receiver<String>)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut agent = KillOnDrop(
        Command::new(AGENT)
            .args(["run", "--no-terminal"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let err = lines(agent.0.stderr.take().unwrap());
    (agent, err)
}

/// A port free on loopback right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Python's http.server on loopback `port`, once it accepts connections.
pub fn start_http_server(port: u16) -> KillOnDrop {
    let server = KillOnDrop(
        Command::new("/usr/bin/python3")
            .args(["-m", "http.server", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "python http.server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    server
}
