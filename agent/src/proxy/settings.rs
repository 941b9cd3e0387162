//! What the proxy intercepts, as the configuration states it: the mode,
//! CIDR blocks, and the checks of ports, interface names and the number of
//! relay threads. The proxy owns
//! these types and their validation; the configuration maps the YAML keys
//! onto them and names the key when a check fails.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// Where traffic is intercepted (`proxy.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// Intercept traffic of the pods on this node (their interfaces are
    /// `proxy.pod_interfaces`).
    #[default]
    Node,
    /// Intercept traffic of the host's own processes.
    Host,
}

/// An IP network such as `10.0.0.0/8`; a bare address is a /32 (or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address; its host bits are zero.
    pub addr: IpAddr,
    /// Prefix length: up to 32 for IPv4, 128 for IPv6.
    pub prefix_len: u8,
}

impl Cidr {
    /// Whether this is a network block: the prefix length fits the family
    /// and the host bits are zero. Always true of one parsed from text;
    /// one built field by field may not be.
    pub fn is_network(&self) -> bool {
        self.prefix_len <= max_prefix_len(self.addr)
            && network_of(self.addr, self.prefix_len) == self.addr
    }
}

impl Cidr {
    /// Whether `addr` lies in this block (never across families).
    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.addr.is_ipv4()
            && self.prefix_len <= max_prefix_len(addr)
            && network_of(addr, self.prefix_len) == self.addr
    }
}

/// Which destinations the REDIRECT rules send to the proxy, as one
/// predicate: what the rules match by destination (ports, excluded ports,
/// CIDR blocks, families), so that the correlator settles contexts only
/// for requests the proxy will see. What the rules match beyond the
/// destination (node mode's pod interfaces, host mode's exemption of the
/// proxy's own marked connections) is not known from a connection's
/// addresses; entries for requests that still never reach the proxy age
/// out of the agreement tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedirectScope {
    /// Destination ports redirected.
    pub ports: Vec<u16>,
    /// Destination ports never redirected.
    pub exclude_ports: Vec<u16>,
    /// Only destinations in these blocks, when not empty.
    pub include_cidrs: Vec<Cidr>,
    /// Destinations in these blocks never.
    pub exclude_cidrs: Vec<Cidr>,
    /// Whether IPv6 destinations are redirected at all.
    pub ipv6: bool,
}

impl RedirectScope {
    /// Every destination on `ports`, both families (no block, no
    /// exclusion): what a test's proxy with only ports sees.
    pub fn of_ports(ports: Vec<u16>) -> Self {
        Self {
            ports,
            ipv6: true,
            ..Self::default()
        }
    }

    /// Whether a TCP connection to `destination` is redirected, in the
    /// order the rules check: excluded ports, excluded blocks, included
    /// blocks, then the ports.
    pub fn redirects(&self, destination: std::net::SocketAddr) -> bool {
        let (ip, port) = (destination.ip(), destination.port());
        if ip.is_ipv6() && !self.ipv6 {
            return false;
        }
        !self.exclude_ports.contains(&port)
            && !self.exclude_cidrs.iter().any(|c| c.contains(ip))
            && (self.include_cidrs.is_empty() || self.include_cidrs.iter().any(|c| c.contains(ip)))
            && self.ports.contains(&port)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr_text, len_text) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("expected a CIDR block such as 10.0.0.0/8, got {s:?}"))?;
        let max = max_prefix_len(addr);
        let prefix_len = match len_text {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("prefix length of {s} must be between 0 and {max}"))?,
        };
        let network = network_of(addr, prefix_len);
        // A set host part is almost always a typo for another block; iptables
        // would silently mask it, so say so instead.
        if network != addr {
            return Err(format!(
                "{s} has host bits set (did you mean {network}/{prefix_len}?)"
            ));
        }
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// The longest prefix of `addr`'s family: 32 or 128.
fn max_prefix_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// `addr` with every bit past `prefix_len` cleared (a prefix longer than
/// the family's clears nothing).
fn network_of(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX
                .checked_shl(32u32.saturating_sub(u32::from(prefix_len)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX
                .checked_shl(128u32.saturating_sub(u32::from(prefix_len)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// What is wrong with a proxy's ports ([`check_ports`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortProblem {
    /// The listen port is 0.
    ListenPortZero,
    /// The redirected ports include 0.
    ZeroInPorts,
    /// The excluded ports include 0.
    ZeroInExcludePorts,
    /// The redirected ports include the listen port (this one): the
    /// proxy's port redirected to itself would loop.
    ListenPortRedirected(u16),
    /// No port is redirected. Reported last, so that when it is reported
    /// every other check has passed.
    NoPorts,
}

impl fmt::Display for PortProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ListenPortZero => f.write_str("listen port 0"),
            Self::ZeroInPorts | Self::ZeroInExcludePorts => f.write_str("port 0 in the port lists"),
            Self::ListenPortRedirected(port) => {
                write!(f, "the redirected ports include the listen port {port}")
            }
            Self::NoPorts => f.write_str("no destination ports to redirect"),
        }
    }
}

/// Checks the proxy's listen port, the destination ports it redirects and
/// those it never redirects; the first problem found, in the order of
/// [`PortProblem`]'s variants.
pub fn check_ports(
    listen_port: u16,
    ports: &[u16],
    exclude_ports: &[u16],
) -> Result<(), PortProblem> {
    if listen_port == 0 {
        return Err(PortProblem::ListenPortZero);
    }
    if ports.contains(&0) {
        return Err(PortProblem::ZeroInPorts);
    }
    if exclude_ports.contains(&0) {
        return Err(PortProblem::ZeroInExcludePorts);
    }
    if ports.contains(&listen_port) {
        return Err(PortProblem::ListenPortRedirected(listen_port));
    }
    if ports.is_empty() {
        return Err(PortProblem::NoPorts);
    }
    Ok(())
}

/// Checks a pod interface name: at most 15 bytes (IFNAMSIZ - 1), `+` only
/// last (as in iptables), and no `/`, quotes or backslash, which could
/// break the tokenizing of an iptables-restore file.
pub fn check_interface_pattern(name: &str) -> Result<(), String> {
    let stem = name.strip_suffix('+').unwrap_or(name);
    let valid_chars = stem
        .chars()
        .all(|c| c.is_ascii_graphic() && !matches!(c, '/' | '+' | '"' | '\'' | '\\'));
    if name.is_empty() || name.len() > 15 || !valid_chars {
        return Err(format!(
            "expected interface names of at most 15 characters without quotes, \\ or /, \
             optionally ending in +, got {name:?}"
        ));
    }
    Ok(())
}

/// Most relay threads accepted ([`super::ProxySettings::workers`]): each
/// is a thread with its own runtime.
pub const MAX_WORKERS: usize = 1024;

/// Checks a number of relay threads as the configuration states it, 0
/// standing for one per CPU ([`workers_or_default`]).
pub fn check_workers(workers: usize) -> Result<(), String> {
    if workers > MAX_WORKERS {
        return Err(format!(
            "must be at most {MAX_WORKERS} (0: one per CPU), got {workers}"
        ));
    }
    Ok(())
}

/// The relay threads `workers` asks for: 0 is one per CPU
/// ([`super::default_workers`]).
pub fn workers_or_default(workers: usize) -> usize {
    match workers {
        0 => super::default_workers(),
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_text() {
        assert_eq!("0.0.0.0/0".parse::<Cidr>().map(|c| c.prefix_len), Ok(0));
        assert_eq!(
            "::/0".parse::<Cidr>().map(|c| c.to_string()),
            Ok("::/0".to_string())
        );
        assert_eq!(
            "10.96.0.1".parse::<Cidr>().map(|c| c.to_string()),
            Ok("10.96.0.1/32".to_string())
        );
        assert_eq!("fd00::1".parse::<Cidr>().map(|c| c.prefix_len), Ok(128));
        let e = "10.0.0.1/8".parse::<Cidr>().unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/8?"), "{e}");
        let e = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert!(e.contains("between 0 and 32"), "{e}");
        let e = "somewhere".parse::<Cidr>().unwrap_err();
        assert!(e.contains("expected a CIDR block"), "{e}");
    }

    #[test]
    fn cidrs_built_by_hand_are_checked() {
        let cidr = |addr: &str, prefix_len| Cidr {
            addr: addr.parse().unwrap(),
            prefix_len,
        };
        assert!(cidr("10.0.0.0", 8).is_network());
        assert!(cidr("0.0.0.0", 0).is_network());
        assert!(cidr("fd00::", 8).is_network());
        assert!(!cidr("10.0.0.1", 8).is_network());
        assert!(!cidr("10.0.0.0", 40).is_network());
        assert!(!cidr("fd00::", 129).is_network());
    }

    #[test]
    fn ports() {
        assert_eq!(check_ports(15001, &[80, 8080], &[]), Ok(()));
        let cases = [
            (0, &[80][..], &[][..], PortProblem::ListenPortZero),
            (15001, &[80, 0], &[], PortProblem::ZeroInPorts),
            (15001, &[80], &[0], PortProblem::ZeroInExcludePorts),
            (
                15001,
                &[80, 15001],
                &[],
                PortProblem::ListenPortRedirected(15001),
            ),
            (15001, &[], &[22], PortProblem::NoPorts),
        ];
        for (listen_port, ports, exclude_ports, problem) in cases {
            assert_eq!(check_ports(listen_port, ports, exclude_ports), Err(problem));
        }
    }

    #[test]
    fn workers() {
        assert_eq!(check_workers(0), Ok(()));
        assert_eq!(check_workers(MAX_WORKERS), Ok(()));
        assert_eq!(
            check_workers(5000),
            Err("must be at most 1024 (0: one per CPU), got 5000".into())
        );
        assert_eq!(workers_or_default(3), 3);
        assert_eq!(workers_or_default(0), super::super::default_workers());
    }

    #[test]
    fn interface_patterns() {
        for good in ["veth+", "eth0", "cali+", "a-very-long-na+"] {
            assert_eq!(check_interface_pattern(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "ve th+",
            "a+b",
            "averyveryverylongname",
            "eth/0",
            "eth\"0",
            "eth'0",
            "eth\\0",
        ] {
            assert!(check_interface_pattern(bad).is_err(), "{bad:?}");
        }
    }
    #[test]
    fn the_redirect_scope_follows_the_rules_order() {
        let cidr = |s: &str| s.parse::<Cidr>().unwrap();
        let scope = RedirectScope {
            ports: vec![80, 8080],
            exclude_ports: vec![8080],
            include_cidrs: vec![cidr("10.0.0.0/8"), cidr("fd00::/8")],
            exclude_cidrs: vec![cidr("10.96.0.0/12")],
            ipv6: true,
        };
        let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert!(scope.redirects(at("10.1.2.3:80")));
        assert!(!scope.redirects(at("10.1.2.3:8080")), "excluded port");
        assert!(!scope.redirects(at("10.1.2.3:443")), "not a proxied port");
        assert!(!scope.redirects(at("10.96.0.10:80")), "excluded block");
        assert!(
            !scope.redirects(at("192.168.1.1:80")),
            "outside the included blocks"
        );
        assert!(scope.redirects(at("[fd00::1]:80")));
        assert!(
            !RedirectScope {
                ipv6: false,
                ..scope.clone()
            }
            .redirects(at("[fd00::1]:80"))
        );
        let all = RedirectScope {
            ports: vec![80],
            ..RedirectScope::default()
        };
        assert!(
            all.redirects(at("192.168.1.1:80")),
            "no block: every destination"
        );
        assert!(cidr("10.0.0.0/8").contains("10.255.0.1".parse().unwrap()));
        assert!(!cidr("10.0.0.0/8").contains("::ffff:10.0.0.1".parse().unwrap()));
    }
}
