//! `cargo xtask demo`: the walkthrough, on this machine. Two services with
//! no tracing code, bands-api calling reviews-api for each band (FastAPI on
//! uvicorn, from the tests' venv), each in a network namespace of its own
//! like two pods of a node, a client in a third; the agent runs in the root
//! namespace with its proxy in node mode. A handful of calls, then the
//! traces: in the terminal, or sent to a collector (`--otlp URL`).
//! Everything it creates is removed when it ends, also on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What `cargo xtask demo` was asked.
pub struct DemoOptions {
    /// Calls of `GET /bands` to make.
    pub calls: usize,
    /// A collector's OTLP URL to send the spans to instead of the terminal.
    pub otlp: Option<String>,
    /// The OTLP protocol for `otlp` (grpc or http).
    pub otlp_protocol: Option<String>,
}

/// The demo's "pods": namespace, its address, the root side's address.
const PODS: [(&str, &str, &str); 3] = [
    ("tta-demo-client", "10.242.0.2", "10.242.0.1"),
    ("tta-demo-bands", "10.242.1.2", "10.242.1.1"),
    ("tta-demo-reviews", "10.242.2.2", "10.242.2.1"),
];
const BANDS_PORT: u16 = 8000;
const REVIEWS_PORT: u16 = 8001;
/// The agent's proxy port (not the default, so a running agent is not met).
const PROXY_PORT: u16 = 15_061;

/// Set by SIGINT (Ctrl-C): the demo stops and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Runs the demo.
pub fn demo(options: &DemoOptions) -> Result<()> {
    if let Some(problem) = crate::setup::test_venv_problem() {
        bail!("the demo's Python services need the venv ({problem}): run `cargo xtask setup`");
    }
    if !crate::setup::is_root() {
        bail!("the demo needs root (network namespaces and the agent's probes)");
    }
    crate::build_agent()?;
    // Ctrl-C reaches the whole process group: the agent stops on its own
    // (removing its rules), the services die, and this process cleans up.
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        )
    };

    let dir = crate::workspace_root().join("target/demo");
    std::fs::create_dir_all(&dir)?;
    let _pods = Pods::create()?;
    let mut children = Children::default();
    for (name, source) in [
        ("bands_api.py", include_str!("../demo/bands_api.py")),
        ("reviews_api.py", include_str!("../demo/reviews_api.py")),
    ] {
        std::fs::write(dir.join(name), source)?;
    }
    let (bands, reviews) = (PODS[1], PODS[2]);
    children.start(
        "reviews-api",
        in_pod(reviews.0, crate::setup::TEST_VENV_PYTHON)
            .arg(dir.join("reviews_api.py"))
            .arg(REVIEWS_PORT.to_string()),
    )?;
    children.start(
        "bands-api",
        in_pod(bands.0, crate::setup::TEST_VENV_PYTHON)
            .arg(dir.join("bands_api.py"))
            .arg(BANDS_PORT.to_string())
            .arg(format!("http://{}:{REVIEWS_PORT}", reviews.1)),
    )?;
    wait_until_answering(&format!("http://{}:{REVIEWS_PORT}/reviews/x", reviews.1))?;
    wait_until_answering(&format!("http://{}:{BANDS_PORT}/docs", bands.1))?;

    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "# cargo xtask demo: the proxy in node mode for reviews-api's port.\n\
             proxy:\n  enabled: true\n  mode: node\n  listen_port: {PROXY_PORT}\n  \
             ports: [{REVIEWS_PORT}]\n  pod_interfaces: [\"tta-demo+\"]\n"
        ),
    )?;
    let mut agent = Command::new("target/release/agent");
    agent.args(["run", "--config"]).arg(&config);
    if let Some(url) = &options.otlp {
        agent.args(["--exporter-endpoint", url]);
        if let Some(protocol) = &options.otlp_protocol {
            agent.args(["--exporter-protocol", protocol]);
        }
    }
    let agent = children.start_agent(agent.stderr(Stdio::piped()))?;
    println!(
        "demo: bands-api ({}:{BANDS_PORT}) and reviews-api ({}:{REVIEWS_PORT}) run in network namespaces, \
         the agent and its proxy on the node",
        bands.1, reviews.1
    );

    for call in 1..=options.calls {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        let output = in_pod(PODS[0].0, "curl")
            .args(["-s", "-S", "--max-time", "10"])
            .arg(format!("http://{}:{BANDS_PORT}/bands", bands.1))
            .output()
            .context("running curl in the client namespace")?;
        println!(
            "demo: call {call}: GET /bands -> {}",
            String::from_utf8_lossy(&output.stdout)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Spans are printed when their trace is complete.
    sleep_unless_interrupted(Duration::from_secs(2));
    // SAFETY: signal to our own child.
    unsafe { libc::kill(agent as i32, libc::SIGINT) };
    children.wait_agent(Duration::from_secs(15));
    if let Some(url) = &options.otlp {
        println!("demo: the spans went to {url}");
    }
    Ok(())
}

/// `program` run inside the network namespace `pod`.
fn in_pod(pod: &str, program: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", pod, program]);
    command
}

fn sleep_unless_interrupted(duration: Duration) {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline && !INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `url` answers from the client namespace.
fn wait_until_answering(url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answered = in_pod(PODS[0].0, "curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "2", url])
            .status()
            .is_ok_and(|s| s.success());
        if answered {
            return Ok(());
        }
        if Instant::now() > deadline || INTERRUPTED.load(Ordering::SeqCst) {
            bail!("{url} did not answer");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The demo's namespaces and veth pairs, with forwarding on; all removed
/// on drop.
struct Pods {
    forwarding_before: String,
}

const FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";

impl Pods {
    fn create() -> Result<Self> {
        // A demo killed hard leaves its namespaces behind: start clean.
        remove_pods();
        let forwarding_before = std::fs::read_to_string(FORWARDING)
            .unwrap_or_else(|_| "0".into())
            .trim()
            .to_string();
        let pods = Self { forwarding_before };
        for (pod, address, gateway) in PODS {
            let host_side = host_interface(pod);
            for args in [
                vec!["netns", "add", pod],
                vec![
                    "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", pod,
                ],
                vec!["addr", "add", &format!("{gateway}/24"), "dev", &host_side],
                vec!["link", "set", &host_side, "up"],
            ] {
                ip(&args)?;
            }
            for args in [
                vec!["addr", "add", &format!("{address}/24"), "dev", "eth0"],
                vec!["link", "set", "eth0", "up"],
                vec!["link", "set", "lo", "up"],
                vec!["route", "add", "default", "via", gateway],
            ] {
                let mut full = vec!["-n", pod];
                full.extend(args);
                ip(&full)?;
            }
        }
        std::fs::write(FORWARDING, "1").context("turning IPv4 forwarding on")?;
        Ok(pods)
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        remove_pods();
        let _ = std::fs::write(FORWARDING, &self.forwarding_before);
    }
}

/// The root namespace's end of a pod's veth pair (at most 15 characters,
/// matched by the demo's `pod_interfaces: ["tta-demo+"]`).
fn host_interface(pod: &str) -> String {
    format!("tta-demo{}", &pod["tta-demo-".len()..][..1])
}

fn remove_pods() {
    for (pod, _, _) in PODS {
        // Deleting the namespace deletes its veth end, and so the pair.
        let _ = Command::new("ip")
            .args(["netns", "delete", pod])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "delete", &host_interface(pod)])
            .stderr(Stdio::null())
            .status();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    crate::run(Command::new("ip").args(args))
}

/// The demo's processes; the services are killed on drop, the agent asked
/// to stop first.
#[derive(Default)]
struct Children {
    services: Vec<(&'static str, Child)>,
    agent: Option<Child>,
}

impl Children {
    fn start(&mut self, name: &'static str, command: &mut Command) -> Result<()> {
        let child = command
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.services.push((name, child));
        Ok(())
    }

    /// Starts the agent and waits until it traces; returns its pid. Its
    /// stderr is passed through.
    fn start_agent(&mut self, command: &mut Command) -> Result<u32> {
        let mut agent = command.spawn().context("starting the agent")?;
        let stderr = agent.stderr.take().context("the agent's stderr")?;
        let pid = agent.id();
        self.agent = Some(agent);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("tracing HTTP") {
                    let _ = ready_tx.send(());
                }
                eprintln!("{line}");
            }
        });
        let started = ready_rx.recv_timeout(Duration::from_secs(60)).is_ok();
        if !started {
            bail!("the agent did not start (see its messages above)");
        }
        Ok(pid)
    }

    fn wait_agent(&mut self, timeout: Duration) {
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = agent.try_wait() {
                self.agent = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.as_mut() {
            // SAFETY: signal to our own child; it removes its rules on it.
            unsafe { libc::kill(agent.id() as i32, libc::SIGINT) };
        }
        self.wait_agent(Duration::from_secs(15));
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        for (_, child) in &mut self.services {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_interfaces_are_short_and_match_the_pod_pattern() {
        let names: Vec<String> = PODS.iter().map(|(pod, _, _)| host_interface(pod)).collect();
        assert_eq!(names, ["tta-democ", "tta-demob", "tta-demor"]);
        assert!(
            names
                .iter()
                .all(|n| n.len() <= 15 && n.starts_with("tta-demo"))
        );
        let unique: std::collections::HashSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        assert!(std::path::Path::new(FORWARDING).is_absolute());
    }
}
