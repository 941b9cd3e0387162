//! Network namespaces shaped like a Kubernetes node, for tests that need
//! traffic crossing interfaces (the proxy's redirect rules).
//!
//! A [`Topology`] is one namespace per "pod", each joined to the root
//! namespace (the "node", where the agent under test runs) by a veth pair.
//! The root end is named `veth-<pid>x<subnet>`, so the default
//! `pod_interfaces: [veth+]` matches it; tests pass the narrower
//! [`pod_interface_wildcard`] so that their rules redirect only their own
//! pods' traffic. The pod end is `eth0`. Pods route everything through the
//! root namespace, which forwards between them, like a node does.
//!
//! Names and subnets are unique per run so that test binaries can run in
//! parallel: namespaces are `tta-<pod>-<pid>-<n>`, and each pod gets a free
//! `/24` of 10.241.0.0/16 (pod `.2`, root side `.1`) and the matching
//! `fd00:241:<n>::/64`, chosen under a host-wide lock. Everything is removed
//! on drop, including when a test fails.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

use crate::ChildGuard;

/// Serializes subnet choice and the forwarding bookkeeping among all test
/// processes of the host.
const LOCK_FILE: &str = "/run/lock/tta-netns.lock";

/// Who needs forwarding on, and the values to restore when nobody does.
const FORWARDING_DIR: &str = "/run/tta-netns-forwarding";

/// Numbers namespaces within this process.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs `program` inside the namespace `netns` (`ip netns exec`).
pub fn exec(netns: &str, program: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns, program]);
    command
}

/// Runs `f` on a thread that has entered the namespace `netns`, and returns
/// its result. Sockets created there stay in that namespace when handed
/// back, so a test can open a listener in a pod and accept on it from
/// anywhere. A panic in `f` is passed on.
pub fn run_in<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let path = netns_path(netns);
    let file = File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || {
            // SAFETY: a valid namespace fd; setns only changes the calling
            // thread, which ends with the scope.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        });
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn netns_path(netns: &str) -> PathBuf {
    Path::new("/run/netns").join(netns)
}

/// Runs `ip` with `args`; the error names the command and its stderr.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2 must be installed)")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A network namespace that is deleted, with any process left in it, when
/// dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `tta-<label>-<pid>-<n>` with its loopback up.
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("tta-{label}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name])?;
        let netns = Self { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name (for `ip netns exec`, `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` to be run inside the namespace.
    pub fn exec(&self, program: &str) -> Command {
        exec(&self.name, program)
    }

    /// Runs `f` on a thread inside the namespace; see [`run_in`].
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        run_in(&self.name, f)
    }

    /// Starts `program args` inside the namespace, stdin and stdout piped;
    /// the guard kills it when dropped.
    pub fn spawn(&self, program: &str, args: &[&str]) -> io::Result<ChildGuard> {
        self.exec(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map(ChildGuard)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Every process in a namespace this test created was started by the
        // test; one left running would keep the namespace (and its veth)
        // alive after the name is gone.
        if let Ok(pids) = ip(&["netns", "pids", &self.name]) {
            let me = std::process::id();
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                if pid != me {
                    // SAFETY: plain syscall on a pid of our own namespace.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("netns cleanup: {e:#}");
        }
    }
}

/// One pod: a namespace, its veth pair and its addresses.
#[derive(Debug)]
pub struct Pod {
    /// The name given to [`Topology::new`], such as `pod-a`.
    pub name: String,
    /// The root-namespace end of the veth pair (`veth-…`).
    pub veth: String,
    /// The pod's IPv4 address (on its `eth0`).
    pub ipv4: Ipv4Addr,
    /// The root namespace's IPv4 address on `veth`: the pod's gateway, and
    /// where node-mode REDIRECT delivers the pod's redirected connections.
    pub gateway_v4: Ipv4Addr,
    /// The pod's IPv6 address, if the kernel has IPv6.
    pub ipv6: Option<Ipv6Addr>,
    /// The root namespace's IPv6 address on `veth`, if the kernel has IPv6.
    pub gateway_v6: Option<Ipv6Addr>,
    netns: Netns,
}

impl Pod {
    /// The pod's namespace name.
    pub fn netns(&self) -> &str {
        self.netns.name()
    }

    /// The pod's namespace, for code that handles pods and plain
    /// namespaces alike.
    pub fn namespace(&self) -> &Netns {
        &self.netns
    }

    /// The pod's IPv4 address with `port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ipv4), port)
    }

    /// The pod's IPv6 address with `port`, if it has one.
    pub fn addr_v6(&self, port: u16) -> Option<SocketAddr> {
        self.ipv6.map(|a| SocketAddr::new(IpAddr::V6(a), port))
    }

    /// `program` to be run inside the pod (`ip netns exec`).
    pub fn exec(&self, program: &str) -> Command {
        self.netns.exec(program)
    }

    /// Starts `program args` inside the pod; see [`Netns::spawn`].
    pub fn spawn(&self, program: &str, args: &[&str]) -> io::Result<ChildGuard> {
        self.netns.spawn(program, args)
    }

    /// Runs `f` on a thread inside the pod; see [`run_in`].
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        self.netns.run(f)
    }
}

/// Pods joined to the root namespace, which forwards between them. Dropping
/// it removes the pods and restores the forwarding settings.
#[derive(Debug)]
pub struct Topology {
    pods: Vec<Pod>,
    // Dropped after the pods (fields drop in order): forwarding is only
    // turned back off once nothing of ours needs it.
    _forwarding: Forwarding,
}

impl Topology {
    /// Creates one pod per name (names are short labels such as `pod-a`;
    /// letters, digits and `-` only).
    pub fn new(names: &[&str]) -> anyhow::Result<Self> {
        for name in names {
            if name.is_empty()
                || name.len() > 20
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                bail!("pod name {name:?}: expected 1 to 20 letters, digits or -");
            }
        }
        let lock = HostLock::acquire()?;
        remove_stale(&lock);
        let forwarding = Forwarding::enable(&lock)?;
        let ipv6 = Path::new("/proc/net/if_inet6").exists();
        let mut pods = Vec::new();
        let made = (|| -> anyhow::Result<()> {
            let mut used = used_subnets()?;
            for name in names {
                let Some(subnet) = (1u8..=254).find(|s| !used.contains(s)) else {
                    bail!("no free /24 left in 10.241.0.0/16");
                };
                used.push(subnet);
                pods.push(make_pod(name, subnet, ipv6)?);
            }
            Ok(())
        })();
        // Released before `topology` can drop: its forwarding guard takes
        // the lock again, and a second flock in one process would block.
        drop(lock);
        let topology = Topology {
            pods,
            _forwarding: forwarding,
        };
        // On failure, dropping `topology` removes the pods made so far.
        made?;
        Ok(topology)
    }

    /// The pods, in the order given.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod called `name`, if any.
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting the root end destroys the pair at once; waiting for the
        // namespace to go could take as long as a socket in it stays open.
        for pod in &self.pods {
            if let Err(e) = ip(&["link", "del", &pod.veth]) {
                eprintln!("topology cleanup: {e:#}");
            }
        }
    }
}

/// Deletes namespaces (and with them their veths and subnets) that test
/// processes which no longer exist left behind, say after `kill -9`. The
/// processes in them are not touched: a namespace with one still running
/// lingers, nameless, until it exits.
fn remove_stale(_lock: &HostLock) {
    let Ok(listing) = ip(&["netns", "list"]) else {
        return;
    };
    for name in listing.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix("tta-") else {
            continue;
        };
        // tta-<label>-<pid>-<n>: the label may itself contain dashes.
        let mut parts = rest.rsplitn(3, '-');
        let (Some(_n), Some(pid), Some(_label)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let dead = pid.parse::<u32>().is_ok_and(|pid| {
            pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists()
        });
        if dead && let Err(e) = ip(&["netns", "del", name]) {
            eprintln!("stale namespace {name}: {e:#}");
        }
    }
}

/// The start of the root-end names of this process's veths.
fn veth_prefix() -> String {
    format!("veth-{:x}x", std::process::id())
}

/// An iptables interface wildcard (`veth-<pid>x+`) matching the veths of
/// this test process's pods and no other interface on the host: the
/// wildcard form of the default `veth+`, without redirecting traffic of
/// pods that other tests or the host's own containers run.
pub fn pod_interface_wildcard() -> String {
    format!("{}+", veth_prefix())
}

/// Creates pod `name` on subnet 10.241.`subnet`.0/24.
fn make_pod(name: &str, subnet: u8, ipv6: bool) -> anyhow::Result<Pod> {
    let netns = Netns::new(name)?;
    let ns = netns.name().to_string();
    // At most 15 bytes (IFNAMSIZ - 1): "veth-" + pid in hex (up to 6) +
    // "x" + subnet. Unique on the host because the subnet is.
    let veth = format!("{}{subnet:02x}", veth_prefix());
    ip(&[
        "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ])?;
    let gateway_v4 = Ipv4Addr::new(10, 241, subnet, 1);
    let ipv4 = Ipv4Addr::new(10, 241, subnet, 2);
    let mut pod = Pod {
        name: name.to_string(),
        veth,
        ipv4,
        gateway_v4,
        ipv6: None,
        gateway_v6: None,
        netns,
    };
    let result = (|| -> anyhow::Result<()> {
        if ipv6 {
            // No duplicate detection on either end, set before the links
            // come up: `nodad` below covers the global addresses, but the
            // link-local ones each end makes at link-up stay tentative
            // for a second or more, and neighbour discovery between the
            // gateway and the pod could fail in that window (a connect
            // over IPv6 right after setup once got "No route to host").
            let accept_dad =
                |interface: &str| format!("/proc/sys/net/ipv6/conf/{interface}/accept_dad");
            std::fs::write(accept_dad(&pod.veth), "0").with_context(|| accept_dad(&pod.veth))?;
            pod.netns
                .run(|| std::fs::write(accept_dad("eth0"), "0"))?
                .with_context(|| format!("{} in {ns}", accept_dad("eth0")))?;
        }
        ip(&["addr", "add", &format!("{gateway_v4}/24"), "dev", &pod.veth])?;
        ip(&["link", "set", &pod.veth, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ipv4}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &gateway_v4.to_string(),
        ])?;
        if ipv6 {
            let segment = u16::from(subnet);
            let gateway_v6 = Ipv6Addr::new(0xfd00, 0x241, segment, 0, 0, 0, 0, 1);
            let pod_v6 = Ipv6Addr::new(0xfd00, 0x241, segment, 0, 0, 0, 0, 2);
            // nodad: the addresses are usable at once instead of after a
            // second of duplicate detection.
            ip(&[
                "-6",
                "addr",
                "add",
                &format!("{gateway_v6}/64"),
                "dev",
                &pod.veth,
                "nodad",
            ])?;
            ip(&[
                "-n",
                &ns,
                "-6",
                "addr",
                "add",
                &format!("{pod_v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&[
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gateway_v6.to_string(),
            ])?;
            pod.ipv6 = Some(pod_v6);
            pod.gateway_v6 = Some(gateway_v6);
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = ip(&["link", "del", &pod.veth]);
        return Err(e.context(format!("setting up pod {name}")));
    }
    Ok(pod)
}

/// The third octets of the 10.241.x.0/24 subnets with an address in the
/// root namespace (in use by a live or crashed topology).
fn used_subnets() -> anyhow::Result<Vec<u8>> {
    let listing = ip(&["-o", "-4", "addr", "show"])?;
    Ok(listing
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("10.241."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect())
}

/// An exclusive lock shared by every test process of the host, released
/// when dropped (the file closes).
struct HostLock {
    _file: File,
}

impl HostLock {
    fn acquire() -> anyhow::Result<Self> {
        let path = if Path::new("/run/lock").is_dir() {
            PathBuf::from(LOCK_FILE)
        } else {
            std::env::temp_dir().join("tta-netns.lock")
        };
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

/// The forwarding sysctls of the root namespace this harness turns on.
const FORWARDING_SYSCTLS: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

/// A registration as a user of forwarding in the root namespace. The first
/// user (host-wide) saves the original values and turns forwarding on; the
/// last one puts the saved values back, so parallel test binaries do not
/// turn it off under each other. Users whose process died are ignored.
#[derive(Debug)]
struct Forwarding {
    marker: PathBuf,
}

impl Forwarding {
    fn enable(_lock: &HostLock) -> anyhow::Result<Self> {
        let dir = Path::new(FORWARDING_DIR);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let saved = dir.join("saved");
        // A saved file with no live user left is from a crashed run: it
        // holds the true original values, so it is kept, not overwritten.
        if live_users(dir).is_empty() && !saved.exists() {
            let mut text = String::new();
            for sysctl in FORWARDING_SYSCTLS {
                if let Ok(value) = std::fs::read_to_string(sysctl) {
                    text.push_str(&format!("{sysctl} {}\n", value.trim()));
                }
            }
            std::fs::write(&saved, text).with_context(|| format!("writing {}", saved.display()))?;
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let marker = dir.join(format!("user-{}-{n}", std::process::id()));
        std::fs::write(&marker, b"").with_context(|| format!("writing {}", marker.display()))?;
        for sysctl in FORWARDING_SYSCTLS {
            if !Path::new(sysctl).exists() {
                continue;
            }
            if let Err(e) = std::fs::write(sysctl, b"1") {
                // Not via Drop: that takes the lock, which the caller holds.
                let _ = std::fs::remove_file(&marker);
                restore_if_unused(dir);
                return Err(e).with_context(|| format!("writing {sysctl}"));
            }
        }
        Ok(Self { marker })
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        let Ok(_lock) = HostLock::acquire() else {
            eprintln!("forwarding cleanup: cannot take the host lock");
            return;
        };
        let _ = std::fs::remove_file(&self.marker);
        restore_if_unused(Path::new(FORWARDING_DIR));
    }
}

/// Puts the saved forwarding values back if no live user is left. The
/// caller holds the host lock.
fn restore_if_unused(dir: &Path) {
    if !live_users(dir).is_empty() {
        return;
    }
    let saved = dir.join("saved");
    if let Ok(text) = std::fs::read_to_string(&saved) {
        for line in text.lines() {
            if let Some((sysctl, value)) = line.split_once(' ')
                && FORWARDING_SYSCTLS.contains(&sysctl)
                && let Err(e) = std::fs::write(sysctl, value)
            {
                eprintln!("forwarding cleanup: restoring {sysctl}: {e}");
            }
        }
    }
    let _ = std::fs::remove_file(saved);
}

/// Markers in `dir` of processes still alive; markers of dead ones are
/// deleted.
fn live_users(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut live = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("user-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && Path::new("/proc").join(pid).exists() {
            live.push(entry.path());
        } else {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    live
}

/// Starts the agent's proxy in node mode on `runtime`, as `agent run` does:
/// listening on `listen_port` with its REDIRECT rules for `ports` on this
/// test process's pod interfaces, taking each request's context from
/// `contexts`.
pub fn start_node_proxy(
    runtime: &tokio::runtime::Runtime,
    listen_port: u16,
    ports: Vec<u16>,
    contexts: std::sync::Arc<dyn agent::proxy::TraceContextSource>,
) -> agent::proxy::RunningProxy {
    use agent::config::ProxyConfig;
    use agent::proxy::ProxyMode;
    let config = ProxyConfig {
        enabled: true,
        listen_port,
        mode: ProxyMode::Node,
        ports,
        pod_interfaces: vec![pod_interface_wildcard()],
        ..ProxyConfig::default()
    };
    let settings = agent::proxy::ProxySettings {
        listen: config.proxy_settings().listen,
        ..agent::proxy::ProxySettings::default()
    };
    runtime
        .block_on(agent::proxy::RunningProxy::start(
            settings,
            Some(config.redirect_rules()),
            contexts,
        ))
        .expect("the proxy starts with its rules")
}
