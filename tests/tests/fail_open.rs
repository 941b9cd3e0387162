//! Privileged: a dead proxy must not break the node's traffic. Its REDIRECT
//! rules carry a lease the proxy renews (`agent::proxy::guard`); however
//! the proxy dies, new connections reach their real destination within a
//! second, and a restarted proxy takes over again with one copy of the
//! rules.
//!
//! The proxy runs as `agent run` runs it (its rules, their guard, the
//! renewal) in a child process: this test binary again ([`proxy_child`]),
//! so that it can be killed. A steady loop of requests goes through the
//! redirected port while the child is killed with SIGKILL, then by its
//! memory limit (a memory cgroup it exceeds); each request is scored by
//! what the server saw: traced (the proxy injected a `traceparent`),
//! direct (no proxy) or failed. In node mode the client and the server are
//! pods and the proxy runs in the root namespace; in host mode all three
//! share a namespace of their own.

use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use agent::config::ProxyConfig;
use agent::proxy::guard::LEASE;
use agent::proxy::rules::RedirectRules;
use agent::proxy::{ProxyMode, ProxySettings, RunningProxy, StandaloneContexts};
use tests::cgroup::MemoryCgroup;
use tests::chains::{remove_stale_chains, unique_chain_prefix};
use tests::netns::{Netns, Topology, pod_interface_wildcard, run_in};
use tests::{ChildGuard, free_port, privileged};

/// Set (to the child's settings) in the environment of [`proxy_child`].
const CHILD_MARKER: &str = "TTA_FAIL_OPEN_CHILD";

/// The most a dead proxy may keep new connections from their destination.
const WINDOW: Duration = Duration::from_secs(1);

/// How often the loop starts a request.
const EVERY: Duration = Duration::from_millis(10);

/// The fewest requests scored before each death.
const REQUESTS_BEFORE: usize = 10;

/// Tag of this binary's chain prefixes (see `tests::chains`).
const CHAIN_TAG: &str = "F";

/// The proxy process: starts the proxy with its rules for one port, says
/// READY, then reads one line: `allocate` makes it grow until its memory
/// limit kills it; end of input stops it cleanly (the rules go with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the proxy process of the fail-open tests, run by them"]
async fn proxy_child() {
    let Ok(spec) = std::env::var(CHILD_MARKER) else {
        return;
    };
    let words: Vec<&str> = spec.split(' ').collect();
    let [mode, listen_port, port, prefix, interface] = words[..] else {
        panic!("{CHILD_MARKER}: {spec:?}");
    };
    let config = ProxyConfig {
        enabled: true,
        listen_port: listen_port.parse().unwrap(),
        mode: if mode == "node" {
            ProxyMode::Node
        } else {
            ProxyMode::Host
        },
        ports: vec![port.parse().unwrap()],
        pod_interfaces: vec![interface.to_string()],
        ..ProxyConfig::default()
    };
    let rules = RedirectRules {
        chain_prefix: prefix.to_string(),
        ..config.redirect_rules()
    };
    let settings = ProxySettings {
        listen: config.proxy_settings().listen,
        ..ProxySettings::default()
    };
    let proxy = RunningProxy::start(settings, Some(rules), Arc::new(StandaloneContexts::new()))
        .await
        .expect("the proxy starts with its rules");
    println!("READY");
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await
    .unwrap()
    .unwrap_or_default();
    if line.trim() == "allocate" {
        // A leak, as fast as it goes: the kernel kills the process when
        // the cgroup's limit is reached.
        let mut hog: Vec<Vec<u8>> = Vec::new();
        loop {
            hog.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hog);
        }
    }
    proxy.stop().await.expect("the rules are removed");
}

/// What the server saw of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Through the proxy: it carried a traceparent.
    Traced,
    /// Straight to the server.
    Direct,
    /// Refused, reset or timed out.
    Failed,
}

/// One request of the loop: when it started, and how it went.
#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    outcome: Outcome,
    /// Why it failed (empty otherwise), to tell a redirect to the dead
    /// port (refused) from anything else.
    why: String,
}

/// One request to `addr`, scored, and why it failed if it did.
fn request(addr: SocketAddr) -> (Outcome, String) {
    let attempt = || -> std::io::Result<(Outcome, String)> {
        // A port nobody listens on refuses at once; only a starved guest
        // (TCG on a busy host) answers a SYN after more than a second,
        // which says nothing of the proxy: wait that out.
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /fail-open HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(if response.ends_with("traced") {
            (Outcome::Traced, String::new())
        } else if response.ends_with("direct") {
            (Outcome::Direct, String::new())
        } else {
            let local = stream.local_addr().map(|a| a.port()).unwrap_or(0);
            (
                Outcome::Failed,
                format!("unexpected answer {response:?} (from port {local})"),
            )
        })
    };
    // Why a request failed (refused, reset, timed out) tells the dead
    // proxy's port from a slow guest; shown with a failure.
    attempt().unwrap_or_else(|e| (Outcome::Failed, format!("{e} ({:?})", e.kind())))
}

/// Requests to `addr` from namespace `netns`, one every [`EVERY`], until
/// `stop` is set (at most 60 s); `done` counts the requests finished.
fn request_loop(
    netns: String,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Vec<Sample>> {
    std::thread::spawn(move || {
        run_in(&netns, || {
            let mut samples = Vec::new();
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Acquire) && Instant::now() < end {
                let at = Instant::now();
                let (outcome, why) = request(addr);
                samples.push(Sample { at, outcome, why });
                done.fetch_add(1, Ordering::Release);
                std::thread::sleep(EVERY.saturating_sub(at.elapsed()));
            }
            samples
        })
        .expect("the client's namespace")
    })
}

/// Where a scenario's parts run.
struct Lab {
    mode: &'static str,
    /// The client's namespace, and the address it calls.
    client_netns: String,
    target: SocketAddr,
    /// The proxy's namespace (None: the root namespace).
    proxy_netns: Option<String>,
    listen_port: u16,
    prefix: String,
    interface: String,
}

impl Lab {
    /// Starts the proxy child and waits for its READY.
    fn start_proxy(&self) -> ChildGuard {
        let exe = std::env::current_exe().unwrap();
        let mut command = match &self.proxy_netns {
            Some(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = ChildGuard(
            command
                .args([
                    "--exact",
                    "proxy_child",
                    "--ignored",
                    "--nocapture",
                    "--quiet",
                ])
                .env(
                    CHILD_MARKER,
                    format!(
                        "{} {} {} {} {}",
                        self.mode,
                        self.listen_port,
                        self.target.port(),
                        self.prefix,
                        self.interface
                    ),
                )
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("the proxy child starts"),
        );
        // The test harness prints its own lines first.
        loop {
            let line = child.read_line();
            if line == "READY" {
                break;
            }
            if line.is_empty() {
                let exited = child.0.try_wait().unwrap();
                assert!(exited.is_none(), "the proxy child exited: {exited:?}");
            }
        }
        child
    }

    /// The proxy's nat rules (its chain and the jump to it), as saved.
    /// The proxy namespace's conntrack entries for the target port (the
    /// NAT happens there), shown with a failure: a connection the rules
    /// redirected keeps its translation while its entry lives.
    fn conntrack_entries(&self) -> String {
        let port = format!("dport={}", self.target.port());
        // thread-self: /proc/net is the process's namespace, not this thread's.
        let read =
            || std::fs::read_to_string("/proc/thread-self/net/nf_conntrack").unwrap_or_default();
        let table = match &self.proxy_netns {
            Some(netns) => run_in(netns, read).unwrap_or_default(),
            None => read(),
        };
        table
            .lines()
            .filter(|l| l.contains(&port))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn saved_rules(&self) -> Vec<String> {
        let mut command = match &self.proxy_netns {
            Some(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns, "iptables-save"]);
                c
            }
            None => Command::new("iptables-save"),
        };
        let out = command.args(["-t", "nat"]).output().expect("iptables-save");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&self.prefix) && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    /// Connections opened through the proxy and left idle, to be used
    /// after it dies.
    fn open_idle(&self, count: usize) -> Vec<TcpStream> {
        let target = self.target;
        run_in(&self.client_netns, || {
            (0..count)
                .map(|_| TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap())
                .collect()
        })
        .unwrap()
    }
}

/// How the proxy dies.
#[derive(Clone, Copy, Debug)]
enum Death {
    Sigkill,
    MemoryLimit,
}

/// When a proxy died.
#[derive(Clone, Copy, Debug)]
struct Died {
    /// From when it may no longer serve: the kill itself, or for death by
    /// memory limit the start of its allocating (a process at its memory
    /// limit stalls in reclaim before the kernel kills it).
    failing_from: Instant,
    /// When the kernel killed it: SIGKILL sent, or the cgroup's
    /// `oom_kill` count seen to move.
    killed: Instant,
}

/// Kills the proxy child the way `death` says, and returns once it is
/// reaped.
fn kill(child: &mut ChildGuard, death: Death) -> Died {
    let cgroup = match death {
        Death::Sigkill => {
            let at = Instant::now();
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(child.pid() as i32, libc::SIGKILL) };
            let status = child.0.wait().unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(libc::SIGKILL)
            );
            return Died {
                failing_from: at,
                killed: at,
            };
        }
        Death::MemoryLimit => {
            // Room for what the proxy has, not for a leak.
            let cgroup = MemoryCgroup::new(64 << 20).expect("a memory cgroup");
            // `ip netns exec` has exec'd the test binary: same pid.
            cgroup.add(child.pid()).expect("the proxy joins the cgroup");
            cgroup
        }
    };
    let failing_from = Instant::now();
    let stdin = child.0.stdin.as_mut().unwrap();
    stdin.write_all(b"allocate\n").unwrap();
    stdin.flush().unwrap();
    // The kill is seen in the cgroup's count; the exit of a process that
    // large can take a while longer in a slow VM.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut killed = None;
    let status = loop {
        if killed.is_none() && cgroup.oom_kills() >= 1 {
            killed = Some(Instant::now());
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the memory limit did not kill the proxy"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let reaped = Instant::now();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert!(cgroup.oom_kills() >= 1, "killed by its memory limit");
    Died {
        failing_from,
        killed: killed.unwrap_or(reaped),
    }
}

/// The guard's "alive until" of the rules with chain prefix `prefix`, in
/// ms after `killed` (negative: before it), read from its program's lease
/// map, with the program's id. The last renewal was at most [`LEASE`]
/// before the kill, so more than [`LEASE`] after it means something renewed
/// it after. Where the pin is not visible from here (host mode: `ip netns
/// exec` gives the proxy a mount namespace of its own, where it mounts the
/// bpf filesystem it pins in), every guard program loaded since
/// `proxy_started` (the other mode's test may have loaded one too).
fn lease_after_kill_ms(
    prefix: &str,
    killed: Instant,
    proxy_started: SystemTime,
) -> Vec<(u32, i64)> {
    // Instant is CLOCK_MONOTONIC here, as the lease is.
    let killed_ns = agent::clock::monotonic_ns() as i64 - killed.elapsed().as_nanos() as i64;
    let lease_of = |info: &aya::programs::ProgramInfo| -> Option<(u32, i64)> {
        let alive_until = info.map_ids().ok()??.into_iter().find_map(|id| {
            let map = aya::maps::Map::from_map_data(aya::maps::MapData::from_id(id).ok()?).ok()?;
            // The lease is the program's one plain array (the count is per CPU).
            let aya::maps::Map::Array(_) = map else {
                return None;
            };
            let lease = aya::maps::Array::<_, u64>::try_from(map).ok()?;
            lease.get(&0, 0).ok()
        })?;
        Some((info.id(), (alive_until as i64 - killed_ns) / 1_000_000))
    };
    let pin = agent::proxy::guard::pin_path(prefix);
    if let Ok(info) = aya::programs::ProgramInfo::from_pin(&pin) {
        return lease_of(&info).into_iter().collect();
    }
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| info.name_as_str() == Some("proxy_alive"))
        .filter(|info| info.loaded_at().is_some_and(|at| at >= proxy_started))
        .filter_map(|info| lease_of(&info))
        .collect()
}

/// What one death did to the request loop.
struct Scored {
    /// From the death to the start of the last failed request.
    window: Duration,
    failed: usize,
    /// Requests after the window.
    after: usize,
}

/// Scores the samples of one death: traced before it, never a failure
/// later than [`WINDOW`] after the kill, and direct from then on.
/// `explain`: the lease and the NAT's entries, read only for a failure.
fn score(what: &str, samples: &[Sample], died: Died, explain: impl Fn() -> String) -> Scored {
    let before: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at + Duration::from_millis(100) < died.failing_from)
        .collect();
    assert!(
        before.len() >= REQUESTS_BEFORE,
        "{what}: too few requests before: {samples:?}"
    );
    assert!(
        before.iter().all(|s| s.outcome == Outcome::Traced),
        "{what}: not all through the proxy before it died: {:?}",
        before.iter().map(|s| s.outcome).collect::<Vec<_>>()
    );
    let failed: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.outcome == Outcome::Failed)
        .collect();
    let window = failed
        .iter()
        .map(|s| s.at.saturating_duration_since(died.killed))
        .max()
        .unwrap_or_default();
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > died.killed + WINDOW)
        .collect();
    assert!(after.len() >= 10, "{what}: too few requests after");
    if !after.iter().all(|s| s.outcome == Outcome::Direct) {
        let late: Vec<String> = after
            .iter()
            .filter(|s| s.outcome != Outcome::Direct)
            .map(|s| {
                let ms = s.at.saturating_duration_since(died.killed).as_millis();
                format!("{:?} {ms} ms after the kill: {}", s.outcome, s.why)
            })
            .collect();
        panic!(
            "{what}: not all direct a second after the proxy died: {} of {}: {late:?}\n\
             {}",
            late.len(),
            after.len(),
            explain()
        );
    }
    assert!(window <= WINDOW, "{what}: failures for {window:?}");
    Scored {
        window,
        failed: failed.len(),
        after: after.len(),
    }
}

/// Whether `stream`, opened through the proxy before it died, still
/// carries a request.
fn still_works(mut stream: TcpStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /idle HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).is_ok() && response.starts_with("HTTP/1.1 200")
}

/// The whole story in one mode: serve, die each way, restart, stop.
fn scenario(lab: &Lab) {
    // Whole seconds: the kernel's load time of a program is read back
    // through the boot time, which can be off by a fraction.
    let since = || SystemTime::now() - Duration::from_secs(1);
    let mut proxy_started = since();
    let mut proxy = lab.start_proxy();
    let installed = lab.saved_rules();
    assert!(
        installed
            .iter()
            .any(|l| l.contains("-m bpf --object-pinned")),
        "the rules carry the guard: {installed:#?}"
    );
    for death in [Death::Sigkill, Death::MemoryLimit] {
        let what = format!("{} {death:?}", lab.mode);
        let stop = Arc::new(AtomicBool::new(false));
        let idle = lab.open_idle(3);
        let done = Arc::new(AtomicUsize::new(0));
        let requests = request_loop(
            lab.client_netns.clone(),
            lab.target,
            Arc::clone(&stop),
            Arc::clone(&done),
        );
        // A second of requests before the death, and at least
        // `REQUESTS_BEFORE` of them: a slow VM (CI's, under load) may not
        // finish that many in a second.
        let started = Instant::now();
        while (started.elapsed() < Duration::from_secs(1)
            || done.load(Ordering::Acquire) < REQUESTS_BEFORE + 2)
            && started.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(EVERY);
        }
        let died = kill(&mut proxy, death);
        std::thread::sleep(WINDOW + Duration::from_millis(1500));
        stop.store(true, Ordering::Release);
        let samples = requests.join().unwrap();
        let lost = idle
            .into_iter()
            .filter(|s| !still_works(s.try_clone().unwrap()))
            .count();
        let lease = lease_after_kill_ms(&lab.prefix, died.killed, proxy_started);
        let scored = score(&what, &samples, died, || {
            format!(
                "the lease ran until (program id, ms after the kill): {lease:?}\nconntrack entries for the port:\n{}",
                lab.conntrack_entries()
            )
        });
        println!(
            "fail-open {what}: failed requests for {} ms after the death ({} failed; lease {} ms, \
             ran until {lease:?} ms after the kill, by program id); then all {} direct; connections open through \
             the proxy lost: {lost} of 3",
            scored.window.as_millis(),
            scored.failed,
            LEASE.as_millis(),
            scored.after
        );
        // The rules are still there: only their lease ran out.
        assert_eq!(
            lab.saved_rules(),
            installed,
            "{what}: rules after the death"
        );

        // A restart takes over again, with the same rules, once.
        proxy_started = since();
        proxy = lab.start_proxy();
        let target = lab.target;
        let (after_restart, why) = run_in(&lab.client_netns, || request(target)).unwrap();
        assert_eq!(
            after_restart,
            Outcome::Traced,
            "{what}: injection resumes ({why})"
        );
        assert_eq!(
            lab.saved_rules(),
            installed,
            "{what}: rules after the restart"
        );
    }
    // End of input: a clean stop removes the rules and the guard's pin.
    drop(proxy.0.stdin.take());
    let status = proxy.0.wait().unwrap();
    assert!(status.success(), "the proxy stops cleanly: {status:?}");
    assert_eq!(
        lab.saved_rules(),
        Vec::<String>::new(),
        "rules after the stop"
    );
}

#[test]
fn host_mode_dead_proxy_lets_traffic_through_within_a_second() {
    if !privileged() {
        return;
    }
    let netns = Netns::new("fail-open").expect("namespace");
    let port = free_port();
    let listener = netns
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap())
        .unwrap();
    tests::serve_traced_or_direct(listener);
    let lab = Lab {
        mode: "host",
        client_netns: netns.name().to_string(),
        target: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        proxy_netns: Some(netns.name().to_string()),
        listen_port: free_port(),
        prefix: unique_chain_prefix(CHAIN_TAG),
        interface: "unused".into(),
    };
    scenario(&lab);
}

#[test]
fn node_mode_dead_proxy_lets_traffic_through_within_a_second() {
    if !privileged() {
        return;
    }
    remove_stale_chains(CHAIN_TAG);
    let topology = Topology::new(&["fo-client", "fo-server"]).expect("topology");
    let client = topology.pod("fo-client").unwrap();
    let server = topology.pod("fo-server").unwrap();
    let port = free_port();
    let listener = server
        .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap())
        .unwrap();
    tests::serve_traced_or_direct(listener);
    let lab = Lab {
        mode: "node",
        client_netns: client.netns().to_string(),
        target: server.addr(port),
        proxy_netns: None,
        listen_port: free_port(),
        prefix: unique_chain_prefix(CHAIN_TAG),
        interface: pod_interface_wildcard(),
    };
    scenario(&lab);
}
