//! The `agent` binary run as its users run it, for the fault and soak
//! tests: its stderr, its `/metrics`, its memory and file descriptors.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The agent binary cargo built next to this test binary
/// (`target/<profile>/agent`; `cargo test --workspace` builds it, and
/// `cargo xtask soak` builds it first).
pub fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> -> target/<profile>/agent
    let agent = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("agent"))
        .expect("a target directory");
    assert!(
        agent.exists(),
        "{} is missing: build it with `cargo build -p agent` (cargo test --workspace does)",
        agent.display()
    );
    agent
}

/// A running `agent run`; killed when dropped.
pub struct AgentProcess {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    metrics_port: u16,
}

impl AgentProcess {
    /// Starts `agent run --no-terminal` with `args`, serving its metrics on
    /// loopback `metrics_port`, and waits until it traces.
    pub fn start(args: &[&str], metrics_port: u16) -> Self {
        Self::start_command(Command::new(agent_binary()), args, metrics_port)
    }

    /// As [`Self::start`], from a prepared command (e.g. with a
    /// `pre_exec`); the agent's arguments are appended.
    pub fn start_command(mut command: Command, args: &[&str], metrics_port: u16) -> Self {
        let mut child = command
            .args(["run", "--no-terminal"])
            .arg(format!("--metrics-address=127.0.0.1:{metrics_port}"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the agent starts");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().unwrap();
        let lines = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let mut agent = Self {
            child,
            stderr,
            metrics_port,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !agent.stderr_text().contains("tracing HTTP") {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("the agent exited: {status}\n{}", agent.stderr_text());
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not start:\n{}",
                agent.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    /// Everything the agent wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The samples of its `/metrics` (`name{labels} value`), as read now.
    pub fn metrics(&self) -> Metrics {
        Metrics(http_get(self.metrics_port, "/metrics").unwrap_or_default())
    }

    /// Resident memory in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Open file descriptors.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// SIGTERM, then waits for the exit (at most 30 s): its status and
    /// everything it wrote to stderr.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The stderr thread reads to the end of the pipe.
        std::thread::sleep(Duration::from_millis(100));
        (status, self.stderr_text())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/metrics` text.
#[derive(Clone, Debug, Default)]
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the sample named exactly `name` (labels included).
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.trim().parse::<f64>().ok().map(|v| v as u64)
        })
    }

    /// The sum of the samples of family `family` whose labels contain
    /// every one of `labels` (`key="value"`).
    pub fn sum(&self, family: &str, labels: &[&str]) -> u64 {
        self.0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                let bare = name.split('{').next()?;
                (bare == family && labels.iter().all(|l| name.contains(l)))
                    .then(|| value.parse::<f64>().ok().map(|v| v as u64))?
            })
            .sum()
    }
}

/// GET `path` from loopback `port`: the body of a 200 answer.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    if !answer.starts_with("HTTP/1.1 200") {
        return None;
    }
    Some(answer.split_once("\r\n\r\n")?.1.to_string())
}
