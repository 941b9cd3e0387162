//! Privileged: the proxy's iptables REDIRECT rules, installed for real.
//!
//! Rule bookkeeping (present, removed, one copy after a crash, equal to the
//! dry run) is checked in namespaces of their own, whose `nat` tables hold
//! nothing else. The traffic tests use a [`Topology`]: node-mode rules in
//! the root namespace redirect pod-to-pod connections to a listener on the
//! proxy port, which reads the original destination back with
//! `SO_ORIGINAL_DST`. Every test has its own chain prefix, namespaces and
//! ports, so tests (and test binaries) can run in parallel; guards remove
//! everything even when an assertion fails.

use std::io::{self, ErrorKind};
use std::mem::{size_of, zeroed};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use agent::config::ProxyConfig;
use agent::proxy::rules::{Backend, RedirectRules};
use agent::proxy::{Cidr, DEFAULT_UPSTREAM_MARK, ProxyMode, RedirectScope};
use tests::chains::{remove_stale_chains, unique_chain_prefix};
use tests::netns::{Netns, Topology, pod_interface_wildcard};
use tests::{free_port, privileged};

/// Set in the environment of the child that installs rules and is then
/// killed: `<mode> <chain prefix>`.
const CRASH_CHILD_ENV: &str = "TTA_PROXY_RULES_CRASH_CHILD";

/// `SO_ORIGINAL_DST` (and `IP6T_SO_ORIGINAL_DST`): the destination a
/// connection had before NAT, kept by conntrack.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// How long a connection that should arrive somewhere is waited for; a
/// connection that should not arrive is given the same time to show up.
const ARRIVAL: Duration = Duration::from_secs(3);

fn rules(mode: ProxyMode, prefix: &str, listen_port: u16, ports: Vec<u16>) -> RedirectRules {
    let config = ProxyConfig {
        enabled: true,
        mode,
        listen_port,
        ports,
        ..ProxyConfig::default()
    };
    RedirectRules {
        chain_prefix: prefix.to_string(),
        ..config.redirect_rules()
    }
}

/// `iptables-save -t nat` (or ip6tables) of the calling thread's namespace,
/// reduced to the lines naming a chain of `prefix`.
fn saved(program: &str, prefix: &str) -> Vec<String> {
    let output = std::process::Command::new(program)
        .args(["-t", "nat"])
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(output.status.success(), "{program} failed");
    let own = |word: &str| {
        word.trim_start_matches(':')
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('_'))
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with('#') && line.split_whitespace().any(own))
        .map(str::to_string)
        .collect()
}

/// What `iptables-save` shows once `render`'s script has run, per family
/// (IPv4, IPv6): the chain declaration, the jump, then the chain's rules.
fn expected_from_render(render: &str) -> (Vec<String>, Vec<String>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    let mut restore_lines = Vec::new();
    let mut in_restore = false;
    for line in render.lines() {
        if line.contains("-restore ") {
            in_restore = true;
            restore_lines.clear();
        } else if line == "EOF" {
            in_restore = false;
        } else if in_restore {
            if line.starts_with(':') || line.starts_with("-A ") {
                restore_lines.push(line.to_string());
            }
        } else if let Some(insert) = line.split(" -I ").nth(1) {
            // `... || iptables -w -t nat -I HOOK 1 -j CHAIN`
            let words: Vec<&str> = insert.split_whitespace().collect();
            let jump = format!("-A {} {} {}", words[0], words[2], words[3]);
            let family = if line.starts_with("ip6tables") {
                &mut v6
            } else {
                &mut v4
            };
            family.push(restore_lines[0].clone());
            family.push(jump);
            family.extend(restore_lines[1..].iter().cloned());
        }
    }
    (v4, v6)
}

/// A listener on the proxy port that reports who connected and where the
/// connection was originally going.
struct RedirectListener {
    listeners: Vec<TcpListener>,
}

/// One connection the listener accepted.
#[derive(Debug)]
struct Arrival {
    peer: SocketAddr,
    /// The accepted socket's own address (the proxy's side).
    local: SocketAddr,
    original_destination: SocketAddr,
    _stream: TcpStream,
}

impl RedirectListener {
    /// Listens on 0.0.0.0:`port` and, separately (v6-only), [::]:`port`.
    fn bind(port: u16) -> Self {
        let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind IPv4 listener");
        let v6 = bind_v6_only(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
            .expect("bind IPv6 listener");
        for l in [&v4, &v6] {
            l.set_nonblocking(true).expect("nonblocking");
        }
        Self {
            listeners: vec![v4, v6],
        }
    }

    /// The next connection, if one arrives within `timeout`.
    fn accept_within(&self, timeout: Duration) -> Option<Arrival> {
        let deadline = Instant::now() + timeout;
        loop {
            for l in &self.listeners {
                match l.accept() {
                    Ok((stream, peer)) => {
                        let original_destination = original_destination(&stream)
                            .expect("SO_ORIGINAL_DST of a redirected connection");
                        return Some(Arrival {
                            peer,
                            local: stream.local_addr().expect("local address"),
                            original_destination,
                            _stream: stream,
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept: {e}"),
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A plain server socket, nonblocking, for connections that must *not* be
/// redirected.
fn server(addr: SocketAddr) -> TcpListener {
    let l = if addr.is_ipv6() {
        bind_v6_only(addr)
    } else {
        TcpListener::bind(addr)
    }
    .unwrap_or_else(|e| {
        panic!(
            "bind {addr}: {e}; sockets on the port here:\n{}",
            sockets_on(addr.port())
        )
    });
    l.set_nonblocking(true).expect("nonblocking");
    l
}

/// The lines of this thread's namespace's TCP socket tables naming `port`
/// (as a local or remote port), shown when a bind finds the port taken.
fn sockets_on(port: u16) -> String {
    let needle = format!(":{port:04X} ");
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|table| {
            // thread-self: /proc/net is the process's namespace, not this thread's.
            std::fs::read_to_string(format!("/proc/thread-self/net/{table}"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(&needle))
                .map(|l| format!("{table}: {}", l.trim()))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn accepted_within(l: &TcpListener, timeout: Duration) -> Option<SocketAddr> {
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((_, peer)) => return Some(peer),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The destination before REDIRECT, as the proxy recovers it.
fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    match stream.local_addr()? {
        SocketAddr::V4(_) => {
            // SAFETY: zeroed sockaddr_in is valid; the length matches.
            let mut sa: libc::sockaddr_in = unsafe { zeroed() };
            let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: valid fd and out-pointers sized by `len`.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IP,
                    SO_ORIGINAL_DST,
                    (&raw mut sa).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                u16::from_be(sa.sin_port),
            )))
        }
        SocketAddr::V6(_) => {
            // SAFETY: as above, for sockaddr_in6.
            let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
            let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            // SAFETY: valid fd and out-pointers sized by `len`.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IPV6,
                    SO_ORIGINAL_DST,
                    (&raw mut sa).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sa.sin6_addr.s6_addr),
                u16::from_be(sa.sin6_port),
                0,
                0,
            )))
        }
    }
}

/// A TCP socket of `addr`'s family, created with libc so options can be
/// set before bind or connect.
fn raw_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_int_option(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: valid fd; the value is a c_int as the option expects.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
}

/// `addr` as a sockaddr for bind/connect.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // sockaddr.
            let sa = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in>() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = a.port().to_be();
            sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sa = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in6>() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = a.port().to_be();
            sa.sin6_addr.s6_addr = a.ip().octets();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A listener on an IPv6 address that does not also take IPv4 (dual-stack
/// [::] would collide with the 0.0.0.0 listener on the same port).
fn bind_v6_only(addr: SocketAddr) -> io::Result<TcpListener> {
    let fd = raw_socket(&addr)?;
    set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1);
    set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    let (sa, len) = sockaddr(&addr);
    // SAFETY: valid fd and sockaddr of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: valid fd.
    if unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

/// Connects to `addr`, with firewall mark `mark` if given (as the proxy
/// marks its upstream connections).
fn connect(addr: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    connect_from(addr, mark, None)
}

/// [`connect`], from local address `from` if given (SO_REUSEADDR, so that
/// one local port can connect to two destinations at once).
fn connect_from(
    addr: SocketAddr,
    mark: Option<u32>,
    from: Option<SocketAddr>,
) -> io::Result<TcpStream> {
    let fd = raw_socket(&addr)?;
    if let Some(mark) = mark {
        set_int_option(&fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int);
    }
    if let Some(from) = from {
        set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        let (sa, len) = sockaddr(&from);
        // SAFETY: valid fd and sockaddr of `len` bytes.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let stream = TcpStream::from(fd);
    // Bounded: a connection nobody answers must fail the test, not hang it.
    let timeout = Duration::from_secs(5);
    stream.set_write_timeout(Some(timeout))?;
    let (sa, len) = sockaddr(&addr);
    // SAFETY: valid fd and sockaddr of `len` bytes. With SO_SNDTIMEO set, a
    // blocking connect gives up after the timeout.
    if unsafe { libc::connect(stream.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// Runs iptables-style `program args` in the calling thread's namespace.
fn sh(program: &str, args: &[&str]) {
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

#[test]
fn rules_are_installed_once_match_the_dry_run_and_are_removed() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("rules").expect("namespace");
    ns.run(|| {
        // Someone else's nat rules, which must survive untouched.
        sh(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "udp",
                "--dport",
                "9",
                "-j",
                "RETURN",
            ],
        );
        for mode in [ProxyMode::Node, ProxyMode::Host] {
            let prefix = unique_chain_prefix("R");
            let mut r = rules(mode, &prefix, 15001, vec![80, 8080]);
            // Here (a fresh namespace) that is the system's iptables.
            r.backend = Backend::detect();
            r.exclude_ports = vec![22];
            r.include_cidrs = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
            r.exclude_cidrs = vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00:1::/32".parse().unwrap(),
            ];
            let (want_v4, want_v6) = expected_from_render(&r.render());
            assert!(want_v4.len() >= 5 && want_v6.len() >= 5, "{want_v4:#?}");
            let installed = r.install().expect("install");
            assert_eq!(saved("iptables-save", &prefix), want_v4, "{mode:?}");
            assert_eq!(saved("ip6tables-save", &prefix), want_v6, "{mode:?}");

            // Installing again (a restart without removal) changes nothing.
            std::mem::forget(r.install().expect("second install"));
            assert_eq!(saved("iptables-save", &prefix), want_v4, "{mode:?}");
            assert_eq!(saved("ip6tables-save", &prefix), want_v6, "{mode:?}");

            // The jump comes first, ahead of the rules already there.
            let hook = if mode == ProxyMode::Node {
                "PREROUTING"
            } else {
                "OUTPUT"
            };
            let listing = String::from_utf8(
                std::process::Command::new("iptables")
                    .args(["-t", "nat", "-S", hook])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap();
            assert_eq!(
                listing.lines().nth(1),
                Some(format!("-A {hook} -j {}", r.chain()).as_str()),
                "{listing}"
            );

            installed.remove().expect("remove");
            assert_eq!(saved("iptables-save", &prefix), Vec::<String>::new());
            assert_eq!(saved("ip6tables-save", &prefix), Vec::<String>::new());
        }
        let nat = String::from_utf8(
            std::process::Command::new("iptables-save")
                .args(["-t", "nat"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert!(
            nat.contains("-A PREROUTING -p udp -m udp --dport 9 -j RETURN"),
            "{nat}"
        );
    })
    .expect("enter namespace");
}

#[test]
fn rules_dropped_on_panic_are_removed() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("unwind").expect("namespace");
    let prefix = unique_chain_prefix("U");
    let r = rules(ProxyMode::Host, &prefix, 15001, vec![80]);
    let outcome = std::panic::catch_unwind(|| {
        ns.run(|| {
            let _installed = r.install().expect("install");
            panic!("a failing test");
        })
    });
    assert!(outcome.is_err());
    ns.run(|| {
        assert_eq!(saved("iptables-save", &prefix), Vec::<String>::new());
        assert_eq!(saved("ip6tables-save", &prefix), Vec::<String>::new());
    })
    .expect("enter namespace");
}

/// Not a test of its own: the child process of
/// `restart_after_sigkill_leaves_one_copy`, which installs rules and then
/// waits to be killed; run by it with `--ignored`. Does nothing unless its
/// variable is set.
#[test]
#[ignore = "the child process of restart_after_sigkill_leaves_one_copy, run by it"]
fn crash_child() {
    let Ok(spec) = std::env::var(CRASH_CHILD_ENV) else {
        return;
    };
    let (mode, prefix) = spec.split_once(' ').expect("<mode> <prefix>");
    let mode = if mode == "host" {
        ProxyMode::Host
    } else {
        ProxyMode::Node
    };
    let installed = rules(mode, prefix, 15001, vec![80, 8080])
        .install()
        .expect("install in the child");
    println!("INSTALLED");
    // Bounded, in case the parent dies before killing us.
    std::thread::sleep(Duration::from_secs(60));
    drop(installed);
}

/// Starts `crash_child` in `ns`, waits until its rules are in, and kills it
/// with SIGKILL, so no guard runs.
fn install_and_kill(ns: &Netns, mode: &str, prefix: &str) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = ns
        .exec(exe.to_str().expect("utf-8 path"))
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, format!("{mode} {prefix}"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map(tests::ChildGuard)
        .expect("spawn the crash child");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = child.read_line();
        // libtest may print `test crash_child ... ` on the same line.
        if line.ends_with("INSTALLED") {
            break;
        }
        assert!(
            Instant::now() < deadline && child.0.try_wait().ok().flatten().is_none(),
            "crash child ended before installing (last line {line:?})"
        );
    }
    // `ip netns exec` execs the binary, so this pid is the installer.
    // SAFETY: plain syscall on our own child's pid.
    unsafe { libc::kill(child.pid() as i32, libc::SIGKILL) };
    let status = child.0.wait().expect("wait for the crash child");
    assert!(!status.success(), "killed, so no exit status");
}

#[test]
fn restart_after_sigkill_leaves_one_copy() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("crash").expect("namespace");
    let prefix = unique_chain_prefix("C");

    // Same mode again: the chain is refilled and the jump not duplicated.
    install_and_kill(&ns, "node", &prefix);
    let r = rules(ProxyMode::Node, &prefix, 15001, vec![80, 8080]);
    let (want_v4, want_v6) = expected_from_render(&r.render());
    ns.run(|| {
        assert_eq!(
            saved("iptables-save", &prefix),
            want_v4,
            "left by the crash"
        );
        let installed = r.install().expect("install after the crash");
        assert_eq!(saved("iptables-save", &prefix), want_v4);
        assert_eq!(saved("ip6tables-save", &prefix), want_v6);
        // Left installed for the next restart.
        std::mem::forget(installed);
    })
    .expect("enter namespace");

    // Another mode: the old mode's chains go.
    install_and_kill(&ns, "host", &prefix);
    ns.run(|| {
        let installed = r.install().expect("install after a crash in host mode");
        assert_eq!(saved("iptables-save", &prefix), want_v4);
        assert_eq!(saved("ip6tables-save", &prefix), want_v6);
        installed.remove().expect("remove");
    })
    .expect("enter namespace");

    // remove_leftovers alone cleans up after a crash.
    install_and_kill(&ns, "host", &prefix);
    ns.run(|| {
        assert!(!saved("iptables-save", &prefix).is_empty());
        r.remove_leftovers().expect("remove leftovers");
        assert_eq!(saved("iptables-save", &prefix), Vec::<String>::new());
        assert_eq!(saved("ip6tables-save", &prefix), Vec::<String>::new());
        // And again, with nothing left: not an error.
        r.remove_leftovers().expect("remove leftovers twice");
    })
    .expect("enter namespace");
}

#[test]
fn node_mode_redirects_pod_traffic_to_the_proxy_port() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(&["pod-a", "pod-b", "pod-c"]).expect("topology");
    let [a, b, c] = topology.pods() else {
        panic!("three pods")
    };
    let proxy_port = free_port();
    let redirected_port = free_port();
    let other_port = free_port();
    let proxy = RedirectListener::bind(proxy_port);

    // Real servers in the pods, to see what is *not* redirected.
    let b_redirected = b
        .run(|| server(SocketAddr::from((Ipv4Addr::UNSPECIFIED, redirected_port))))
        .expect("pod-b");
    let b_other = b
        .run(|| server(SocketAddr::from((Ipv4Addr::UNSPECIFIED, other_port))))
        .expect("pod-b");
    let c_redirected = c
        .run(|| server(SocketAddr::from((Ipv4Addr::UNSPECIFIED, redirected_port))))
        .expect("pod-c");
    let b_v6 = b.addr_v6(redirected_port);
    let b_redirected_v6 = b_v6.map(|addr| b.run(|| server(addr)).expect("pod-b"));

    remove_stale_chains("N");
    let prefix = unique_chain_prefix("N");
    let mut r = rules(ProxyMode::Node, &prefix, proxy_port, vec![redirected_port]);
    r.pod_interfaces = vec![pod_interface_wildcard()];
    r.exclude_cidrs = vec![Cidr {
        addr: c.ipv4.into(),
        prefix_len: 32,
    }];
    let installed = r.install().expect("install node-mode rules");
    // The proxy's part: keep the rules' lease (see agent::proxy::guard).
    let renewed = installed.lease().expect("a guard").keep_renewed();

    // pod-a -> pod-b:redirected arrives at the proxy port, from pod-a, and
    // the original destination is recoverable.
    let _client = a
        .run(|| connect(b.addr(redirected_port), None))
        .expect("pod-a")
        .expect("connect pod-a -> pod-b");
    let arrival = proxy
        .accept_within(ARRIVAL)
        .expect("redirected to the proxy");
    assert_eq!(arrival.peer.ip(), IpAddr::V4(a.ipv4));
    assert_eq!(arrival.original_destination, b.addr(redirected_port));
    assert_eq!(accepted_within(&b_redirected, Duration::ZERO), None);

    // The same over IPv6.
    if let (Some(b_v6), Some(b_redirected_v6)) = (b_v6, &b_redirected_v6) {
        let _client = a
            .run(|| connect(b_v6, None))
            .expect("pod-a")
            .expect("connect pod-a -> pod-b over IPv6");
        let arrival = proxy.accept_within(ARRIVAL).expect("IPv6 redirected");
        assert_eq!(arrival.peer.ip(), IpAddr::V6(a.ipv6.unwrap()));
        assert_eq!(arrival.original_destination, b_v6);
        assert_eq!(accepted_within(b_redirected_v6, Duration::ZERO), None);
    }

    // A port not configured goes to pod-b itself.
    let _client = a
        .run(|| connect(b.addr(other_port), None))
        .expect("pod-a")
        .expect("connect pod-a -> pod-b:other");
    let peer = accepted_within(&b_other, ARRIVAL).expect("pod-b:other reached");
    assert_eq!(peer.ip(), IpAddr::V4(a.ipv4));
    assert!(proxy.accept_within(Duration::from_millis(200)).is_none());

    // An excluded destination goes to pod-c itself.
    let _client = a
        .run(|| connect(c.addr(redirected_port), None))
        .expect("pod-a")
        .expect("connect pod-a -> pod-c");
    assert!(accepted_within(&c_redirected, ARRIVAL).is_some());
    assert!(proxy.accept_within(Duration::from_millis(200)).is_none());

    // Renewal stops (a stalled or dead proxy): once the lease runs out the
    // rules let new connections through to pod-b, and the guard counts
    // each (agent_proxy_connections_bypassed_total).
    let lease = installed.lease().expect("a guard");
    assert_eq!(lease.passed_expired(), 0, "nothing bypassed while renewed");
    drop(renewed);
    std::thread::sleep(agent::proxy::guard::LEASE + Duration::from_millis(200));
    let _client = a
        .run(|| connect(b.addr(redirected_port), None))
        .expect("pod-a")
        .expect("connect pod-a -> pod-b with the lease run out");
    assert!(accepted_within(&b_redirected, ARRIVAL).is_some());
    assert!(proxy.accept_within(Duration::from_millis(200)).is_none());
    assert!(lease.passed_expired() >= 1, "the bypass is counted");

    installed.remove().expect("remove");
    // Without the rules pod-b:redirected reaches pod-b.
    let _client = a
        .run(|| connect(b.addr(redirected_port), None))
        .expect("pod-a")
        .expect("connect pod-a -> pod-b without rules");
    assert!(accepted_within(&b_redirected, ARRIVAL).is_some());
    assert!(proxy.accept_within(Duration::from_millis(200)).is_none());
    assert_eq!(saved("iptables-save", &prefix), Vec::<String>::new());
    assert_eq!(saved("ip6tables-save", &prefix), Vec::<String>::new());
}

#[test]
fn host_mode_redirects_local_traffic_but_not_marked_traffic() {
    if !privileged() {
        return;
    }
    // The host is a namespace of its own, so the rules catch only this
    // test's connections.
    let ns = Netns::new("host").expect("namespace");
    ns.run(|| {
        let proxy_port = free_port();
        let redirected_port = free_port();
        let other_port = free_port();
        let prefix = unique_chain_prefix("H");
        let r = rules(ProxyMode::Host, &prefix, proxy_port, vec![redirected_port]);
        let proxy = RedirectListener::bind(proxy_port);
        let real = server(SocketAddr::from((Ipv4Addr::LOCALHOST, redirected_port)));
        let real_v6 = server(SocketAddr::from((Ipv6Addr::LOCALHOST, redirected_port)));
        let other = server(SocketAddr::from((Ipv4Addr::LOCALHOST, other_port)));
        let installed = r.install().expect("install host-mode rules");
        let _renewed = installed.lease().expect("a guard").keep_renewed();

        for (target, real) in [
            (
                SocketAddr::from((Ipv4Addr::LOCALHOST, redirected_port)),
                &real,
            ),
            (
                SocketAddr::from((Ipv6Addr::LOCALHOST, redirected_port)),
                &real_v6,
            ),
        ] {
            // An ordinary client: redirected to the proxy.
            let _client = connect(target, None).expect("connect");
            let arrival = proxy.accept_within(ARRIVAL).expect("redirected");
            assert_eq!(arrival.original_destination, target);
            assert_eq!(accepted_within(real, Duration::ZERO), None);

            // The proxy's own upstream connection (marked): not redirected.
            let _upstream = connect(target, Some(DEFAULT_UPSTREAM_MARK)).expect("connect marked");
            assert!(accepted_within(real, ARRIVAL).is_some(), "{target}");
            assert!(proxy.accept_within(Duration::from_millis(200)).is_none());

            // Another mark is not the proxy's.
            let _client = connect(target, Some(0x1)).expect("connect other mark");
            assert!(proxy.accept_within(ARRIVAL).is_some(), "{target}");
        }

        // A port not configured: not redirected.
        let _client =
            connect(SocketAddr::from((Ipv4Addr::LOCALHOST, other_port)), None).expect("connect");
        assert!(accepted_within(&other, ARRIVAL).is_some());
        assert!(proxy.accept_within(Duration::from_millis(200)).is_none());
    })
    .expect("enter namespace");
}

/// One client port connecting to two redirected destinations at once: the
/// second connection's reply tuple (proxy address and port, client address
/// and port) is the first's, so NAT changes its source port, and the
/// proxy's peer is not the application's address. Conntrack still names
/// it: what the proxy uses to agree with the probes on the request.
#[test]
fn conntrack_gives_back_the_client_port_nat_changed() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("remap").expect("namespace");
    ns.run(|| {
        let proxy_port = free_port();
        let (first, second) = (free_port(), free_port());
        let prefix = unique_chain_prefix("C");
        let r = rules(ProxyMode::Host, &prefix, proxy_port, vec![first, second]);
        let proxy = RedirectListener::bind(proxy_port);
        let installed = r.install().expect("install host-mode rules");
        let _renewed = installed.lease().expect("a guard").keep_renewed();
        let from = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let target = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));

        let _a = connect_from(target(first), None, Some(from)).expect("connect to the first");
        let a = proxy.accept_within(ARRIVAL).expect("the first redirected");
        assert_eq!(a.peer, from, "no remap for the first");
        let _b = connect_from(target(second), None, Some(from)).expect("connect to the second");
        let b = proxy.accept_within(ARRIVAL).expect("the second redirected");
        assert_eq!(b.original_destination, target(second));
        assert_ne!(b.peer, from, "NAT changed the second's source port");

        let local = b.local;
        assert_eq!(
            agent::proxy::conntrack::original_source(local, b.peer),
            Some(from),
            "conntrack names the application's own address"
        );
        assert_eq!(
            agent::proxy::conntrack::original_source(local, a.peer),
            Some(from)
        );
    })
    .expect("enter namespace");
}

#[test]
fn topology_is_removed_on_drop() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(&["pod-x", "pod-y"]).expect("topology");
    let names: Vec<(String, String)> = topology
        .pods()
        .iter()
        .map(|p| (p.netns().to_string(), p.veth.clone()))
        .collect();
    let [x, y] = topology.pods() else {
        panic!("two pods")
    };
    assert!(
        x.veth.starts_with("veth") && x.veth.len() <= 15,
        "{}",
        x.veth
    );
    assert_ne!(x.ipv4, y.ipv4);
    // pod-x reaches pod-y through the root namespace (forwarding on).
    let port = free_port();
    let listener = y
        .run(|| server(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))
        .expect("pod-y");
    let _client = x
        .run(|| connect(y.addr(port), None))
        .expect("pod-x")
        .expect("pod-x -> pod-y");
    assert!(accepted_within(&listener, ARRIVAL).is_some());
    if let Some(addr) = y.addr_v6(port) {
        let listener = y.run(|| server(addr)).expect("pod-y");
        let _client = x
            .run(|| connect(addr, None))
            .expect("pod-x")
            .expect("pod-x -> pod-y over IPv6");
        assert!(accepted_within(&listener, ARRIVAL).is_some());
    }
    // A process started in a pod sees the pod's address.
    let out = x
        .exec("ip")
        .args(["-o", "-4", "addr", "show", "dev", "eth0"])
        .output()
        .expect("ip in pod-x");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&x.ipv4.to_string()),
        "{out:?}"
    );
    drop(listener);
    drop(topology);
    let namespaces = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let links = String::from_utf8(
        std::process::Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for (netns, veth) in names {
        assert!(!namespaces.contains(&netns), "{netns} left behind");
        assert!(!links.contains(&format!(" {veth}@")), "{veth} left behind");
    }
}

/// Where a test connection arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Reached {
    /// The proxy's listen port, with the destination as the original one.
    Proxy,
    /// The destination itself.
    Destination,
    /// Nowhere within [`ARRIVAL`], or the connection failed (why).
    Nowhere(String),
}

/// Servers on every address (IPv4, and IPv6 if `ipv6`) on each of `ports`,
/// in the calling thread's namespace.
fn servers_on(ports: &[u16], ipv6: bool) -> Vec<TcpListener> {
    let mut servers = Vec::new();
    for &port in ports {
        servers.push(server(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))));
        if ipv6 {
            servers.push(server(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))));
        }
    }
    servers
}

/// Opens a connection to `destination` with `connect` and reports whether
/// it arrived at `proxy` or at one of `servers`.
fn reached(
    destination: SocketAddr,
    connect: impl FnOnce() -> io::Result<TcpStream>,
    proxy: &RedirectListener,
    servers: &[TcpListener],
) -> Reached {
    let client = match connect() {
        Ok(client) => client,
        Err(e) => return Reached::Nowhere(format!("connect: {e}")),
    };
    let from = client.local_addr().expect("client address");
    let deadline = Instant::now() + ARRIVAL;
    loop {
        if let Some(arrival) = proxy.accept_within(Duration::ZERO) {
            // One connection at a time, so it can only be this one.
            assert_eq!(
                (arrival.original_destination, arrival.peer),
                (destination, from),
                "the proxy's connection"
            );
            return Reached::Proxy;
        }
        for server in servers {
            match server.accept() {
                Ok((stream, peer)) => {
                    assert_eq!(
                        (stream.local_addr().expect("local address"), peer),
                        (destination, from),
                        "the server's connection"
                    );
                    return Reached::Destination;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
        }
        if Instant::now() >= deadline {
            return Reached::Nowhere("no connection arrived".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Asserts that every destination of `rows` reached the proxy exactly when
/// `scope` (the predicate the correlator uses) says the rules redirect it;
/// prints the whole matrix otherwise.
fn assert_agreement(what: &str, scope: &RedirectScope, rows: &[(SocketAddr, Reached)]) {
    let mut table = format!(
        "{what}: ports {:?}, exclude_ports {:?}, include_cidrs {:?}, exclude_cidrs {:?}, ipv6 {}\n",
        scope.ports,
        scope.exclude_ports,
        scope
            .include_cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        scope
            .exclude_cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        scope.ipv6
    );
    table.push_str(&format!(
        "{:<28} {:<14} reached\n",
        "destination", "scope says"
    ));
    let mut disagreements = 0;
    for (destination, reached) in rows {
        let redirects = scope.redirects(*destination);
        let agrees = match reached {
            Reached::Proxy => redirects,
            Reached::Destination => !redirects,
            Reached::Nowhere(_) => false,
        };
        if !agrees {
            disagreements += 1;
        }
        table.push_str(&format!(
            "{:<28} {:<14} {:?}{}\n",
            destination.to_string(),
            if redirects { "redirected" } else { "not" },
            reached,
            if agrees { "" } else { "   <-- DISAGREES" }
        ));
    }
    assert!(rows.len() >= 9, "{table}");
    assert_eq!(
        disagreements, 0,
        "the rules and the scope disagree:\n{table}"
    );
    eprintln!("{table}");
}

fn cidrs(list: &[&str]) -> Vec<Cidr> {
    list.iter()
        .map(|c| c.parse().expect("a valid block"))
        .collect()
}

/// The block of `prefix_len` bits around `addr`.
fn block(addr: IpAddr, prefix_len: u8) -> Cidr {
    let addr = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    };
    Cidr { addr, prefix_len }
}

/// Issue 15 item 4: the one predicate the correlator uses
/// (`RedirectRules::scope().redirects`) agrees with the installed host-mode
/// rules for every destination of a matrix (in, out of and excluded from
/// the blocks; ports redirected, excluded, other; both families), under
/// several settings. Destinations are addresses on the namespace's
/// loopback, each port served on every address, so a connection arrives
/// either at the proxy's port or at its destination.
#[test]
fn host_mode_rules_redirect_what_the_scope_says() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("scope").expect("namespace");
    let ipv6 = std::path::Path::new("/proc/net/if_inet6").exists();
    let mut addresses: Vec<IpAddr> = ["10.77.0.10", "10.77.1.10", "10.78.0.10"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    if ipv6 {
        addresses.extend(
            ["fd77::10", "fd77:1::10", "fd78::10"]
                .iter()
                .map(|a| a.parse::<IpAddr>().unwrap()),
        );
    }
    for addr in &addresses {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        let status = ns
            .exec("ip")
            .args(["addr", "add", &format!("{addr}/{len}"), "dev", "lo"])
            .status()
            .expect("ip addr add");
        assert!(status.success(), "ip addr add {addr}");
    }
    ns.run(|| {
        let proxy_port = free_port();
        let (redirected, excluded, other) = (free_port(), free_port(), free_port());
        let proxy = RedirectListener::bind(proxy_port);
        let servers = servers_on(&[redirected, excluded, other], ipv6);
        let settings = [
            (
                "blocks of both families",
                cidrs(&["10.77.0.0/16", "fd77::/16"]),
                cidrs(&["10.77.1.0/24", "fd77:1::/32"]),
                true,
            ),
            (
                "IPv4 blocks only",
                cidrs(&["10.77.0.0/16"]),
                cidrs(&["10.77.1.0/24", "fd77:1::/32"]),
                true,
            ),
            (
                "exclusions only, IPv6 off",
                Vec::new(),
                cidrs(&["10.77.1.0/24", "fd77:1::/32"]),
                false,
            ),
            ("every destination", Vec::new(), Vec::new(), true),
        ];
        for (what, include, exclude, ipv6_rules) in settings {
            let prefix = unique_chain_prefix("S");
            let mut r = rules(
                ProxyMode::Host,
                &prefix,
                proxy_port,
                vec![redirected, excluded],
            );
            r.exclude_ports = vec![excluded];
            r.include_cidrs = include;
            r.exclude_cidrs = exclude;
            r.ipv6 = ipv6_rules;
            let scope = r.scope();
            let installed = r.install().expect("install host-mode rules");
            let renewed = installed.lease().map(|lease| lease.keep_renewed());
            let mut rows = Vec::new();
            for &ip in &addresses {
                for port in [redirected, excluded, other] {
                    let destination = SocketAddr::new(ip, port);
                    let outcome =
                        reached(destination, || connect(destination, None), &proxy, &servers);
                    rows.push((destination, outcome));
                }
            }
            drop(renewed);
            installed.remove().expect("remove");
            assert_agreement(&format!("host mode, {what}"), &scope, &rows);
        }
    })
    .expect("enter namespace");
}

/// The same agreement in node mode: rules in the root namespace, a client
/// pod connecting to pods whose addresses are in the blocks, excluded from
/// them, or outside them.
#[test]
fn node_mode_rules_redirect_what_the_scope_says() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(&["client", "pod-in", "pod-out", "pod-far"]).expect("topology");
    let [client, inside, excluded_pod, far] = topology.pods() else {
        panic!("four pods")
    };
    let ipv6 = client.ipv6.is_some();
    let proxy_port = free_port();
    let (redirected, excluded, other) = (free_port(), free_port(), free_port());
    let proxy = RedirectListener::bind(proxy_port);
    let mut servers = Vec::new();
    let mut addresses = Vec::new();
    for pod in [inside, excluded_pod, far] {
        servers.extend(
            pod.run(|| servers_on(&[redirected, excluded, other], ipv6))
                .expect("enter pod"),
        );
        addresses.push(IpAddr::V4(pod.ipv4));
        addresses.extend(pod.ipv6.map(IpAddr::V6));
    }
    // The pods' subnets (/24, /64) of pod-in and pod-out, pod-out's own
    // addresses excluded; pod-far is in no block.
    let mut include = Vec::new();
    let mut exclude = Vec::new();
    for pod in [inside, excluded_pod] {
        include.push(block(pod.ipv4.into(), 24));
        include.extend(pod.ipv6.map(|a| block(a.into(), 64)));
    }
    exclude.push(block(excluded_pod.ipv4.into(), 32));
    exclude.extend(excluded_pod.ipv6.map(|a| block(a.into(), 128)));

    remove_stale_chains("A");
    let settings = [
        ("pod blocks", include, exclude.clone(), true),
        ("exclusions only, IPv6 off", Vec::new(), exclude, false),
    ];
    for (what, include, exclude, ipv6_rules) in settings {
        let prefix = unique_chain_prefix("A");
        let mut r = rules(
            ProxyMode::Node,
            &prefix,
            proxy_port,
            vec![redirected, excluded],
        );
        r.pod_interfaces = vec![pod_interface_wildcard()];
        r.exclude_ports = vec![excluded];
        r.include_cidrs = include;
        r.exclude_cidrs = exclude;
        r.ipv6 = ipv6_rules;
        let scope = r.scope();
        let installed = r.install().expect("install node-mode rules");
        let renewed = installed.lease().map(|lease| lease.keep_renewed());
        let mut rows = Vec::new();
        for &ip in &addresses {
            for port in [redirected, excluded, other] {
                let destination = SocketAddr::new(ip, port);
                let outcome = reached(
                    destination,
                    || client.run(|| connect(destination, None))?,
                    &proxy,
                    &servers,
                );
                rows.push((destination, outcome));
            }
        }
        drop(renewed);
        installed.remove().expect("remove");
        assert_agreement(&format!("node mode, {what}"), &scope, &rows);
    }
}
