//! The `agent` binary as a user runs it.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");

fn is_root() -> bool {
    // SAFETY: no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// Privileged tests skip without root, except under CI=true, where a skip
/// would hide that they never ran.
fn privileged() -> bool {
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

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a child's pipe, read on a thread so the test can wait with a deadline.
fn lines(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_line(
    rx: &mpsc::Receiver<String>,
    deadline: Instant,
    want: impl Fn(&str) -> bool,
) -> Option<String> {
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if want(&line) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

#[test]
fn run_prints_the_trace_of_a_curl_and_stops_cleanly_on_sigterm() {
    if !privileged() {
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = KillOnDrop(
        Command::new("/usr/bin/python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "python http.server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut agent = KillOnDrop(
        Command::new(AGENT)
            .args(["run"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = lines(agent.0.stdout.take().unwrap());
    let err = lines(agent.0.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_line(&err, deadline, |l| l.contains("tracing HTTP"))
        .expect("the agent reports it is tracing");

    let status = Command::new("curl")
        .args(["-s", "-o", "/dev/null"])
        .arg(format!("http://127.0.0.1:{port}/cli-view"))
        .status()
        .unwrap();
    assert!(status.success());
    // The default view: one block per trace, curl's CLIENT span with the
    // server's SERVER span under it (both ends are on this machine).
    let deadline = Instant::now() + Duration::from_secs(15);
    let header = wait_line(&out, deadline, |l| {
        l.starts_with("trace ") && l.contains("2 spans")
    })
    .expect("a trace block is printed");
    let client =
        wait_line(&out, deadline, |l| l.contains("curl: GET /cli-view")).expect("curl's span");
    let server_line =
        wait_line(&out, deadline, |l| l.contains(": GET /cli-view")).expect("the server's span");
    assert!(
        client.starts_with("  curl:"),
        "the client span is the root: {client}"
    );
    assert!(
        server_line.starts_with("    python"),
        "the server span is its child: {server_line}"
    );
    assert!(header.len() > 40, "{header}");

    // SAFETY: signal to our own child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let counters = wait_line(&err, deadline, |l| l.contains("counters"))
        .expect("counters are printed at exit");
    assert!(
        counters.contains("drop_ringbuf_full=0") && counters.contains("spans=2 "),
        "{counters}"
    );
    let status = loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "clean exit after SIGTERM: {status}");
}

#[test]
fn run_without_root_is_a_clear_error_not_a_panic() {
    if !privileged() {
        return;
    }
    // Drop to nobody for this one process.
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            AGENT,
            "run",
        ])
        .output()
        .expect("setpriv (util-linux) is installed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("must run as root"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn out_of_range_option_names_the_limit() {
    let output = Command::new(AGENT)
        .args(["run", "--max-message-bytes", "99999"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--max-message-bytes") && stderr.contains("between 1 and 16384"),
        "{stderr}"
    );
}

/// `iptables-save -t nat` lines of the proxy's own chains and jumps.
fn proxy_rules_in_nat() -> Vec<String> {
    let out = Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()
        .expect("iptables-save");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("TTA_"))
        .map(str::to_string)
        .collect()
}

fn start_proxy(config: &std::path::Path) -> KillOnDrop {
    let mut proxy = KillOnDrop(
        Command::new(AGENT)
            .args(["proxy", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let err = lines(proxy.0.stderr.take().unwrap());
    wait_line(&err, Instant::now() + Duration::from_secs(20), |l| {
        l.contains("proxy on port")
    })
    .expect("the proxy reports it is listening");
    proxy
}

#[test]
fn proxy_rules_exist_while_running_go_on_sigterm_and_survive_kill_9_once() {
    if !privileged() {
        return;
    }
    // Host mode for one unused port: nothing else on the machine is redirected.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("agent-cli-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "proxy:\n  enabled: true\n  mode: host\n  listen_port: {listen}\n  ports: [{port}]\n"
        ),
    )
    .unwrap();
    assert!(
        proxy_rules_in_nat().is_empty(),
        "no proxy rules before: {:?}",
        proxy_rules_in_nat()
    );

    let proxy = start_proxy(&config);
    let running = proxy_rules_in_nat();
    assert!(
        running
            .iter()
            .any(|l| l.contains(&format!("--dports {port}")) && l.contains("REDIRECT")),
        "{running:?}"
    );
    assert_eq!(
        running
            .iter()
            .filter(|l| l.starts_with("-A OUTPUT"))
            .count(),
        1,
        "one jump: {running:?}"
    );
    // SIGTERM: the rules go with the proxy.
    // SAFETY: signal to our own child.
    unsafe { libc::kill(proxy.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut proxy = proxy;
    while proxy.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the proxy did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        proxy_rules_in_nat().is_empty(),
        "rules left after SIGTERM: {:?}",
        proxy_rules_in_nat()
    );

    // kill -9 leaves the rules; a restart installs exactly one copy.
    let proxy = start_proxy(&config);
    let first = proxy_rules_in_nat();
    // SAFETY: signal to our own child.
    unsafe { libc::kill(proxy.0.id() as i32, libc::SIGKILL) };
    drop(proxy);
    assert_eq!(
        proxy_rules_in_nat(),
        first,
        "SIGKILL leaves the rules in place"
    );
    let mut proxy = start_proxy(&config);
    assert_eq!(
        proxy_rules_in_nat(),
        first,
        "after a restart: the same rules, one copy"
    );
    // SAFETY: signal to our own child.
    unsafe { libc::kill(proxy.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the proxy did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(proxy_rules_in_nat().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
