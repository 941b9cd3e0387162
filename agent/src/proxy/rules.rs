//! The iptables `REDIRECT` rules that steer connections to the transparent
//! proxy, built from the configuration (`ProxyConfig::redirect_rules`) or
//! from [`RedirectRules::default`].
//!
//! All rules live in chains of their own in the `nat` table —
//! `<prefix>_PREROUTING` (node mode) or `<prefix>_OUTPUT` (host mode), with
//! the prefix `TTA` by default — entered by one jump rule from the built-in
//! chain. That keeps them easy to list (`iptables -t nat -S TTA_PREROUTING`)
//! and lets them be removed exactly, without touching anyone else's rules.
//!
//! # Installing, idempotently
//!
//! A chain's rules are written with `iptables-restore --noflush`: declaring
//! the chain (`:TTA_PREROUTING - [0:0]`) creates it, or flushes it if a
//! crashed run left it behind, and the new rules replace the old ones in one
//! kernel transaction, so there is never a moment with half a rule set.
//! `--noflush` leaves every other chain of the table alone. The jump from the
//! built-in chain cannot be made idempotent inside a restore file (`-A`
//! would add a second copy, and `-D` of an absent rule fails the whole
//! transaction), so it is checked with `iptables -C` and inserted with `-I`
//! only when missing. A restart after `kill -9` therefore ends with exactly
//! one chain and one jump, whichever state the crash left.
//!
//! The jump is inserted first in the built-in chain so that other `nat`
//! rules (kube-proxy, Docker) neither rewrite the destination before the
//! proxy sees it nor set marks that the host-mode exclusion would miss.
//!
//! IPv4 rules go to `iptables` and IPv6 ones to `ip6tables`; CIDR lists are
//! split by family.
//!
//! Every command runs through a [`CommandRunner`]: the host itself
//! ([`SystemRunner`]) unless [`RedirectRules::install_with`] is given
//! another, which the installed rules then also remove themselves with.
//! The unit tests give a fake iptables, so that the commands of installing,
//! reinstalling, removing and failing are checked without root; the
//! privileged tests (`tests/tests/proxy_rules.rs`) run the real ones.
//!
//! If a command fails halfway through [`RedirectRules::install`], what was
//! already installed is removed again before the error (which names the
//! command, its exit status, its standard error and any restore file) is
//! returned. Removal goes on past a failed command, so that one failure
//! leaves as little as possible: at worst an empty chain nothing jumps to.
//!
//! # Failing open when the proxy dies
//!
//! Every REDIRECT rule also matches the proxy's guard (`-m bpf
//! --object-pinned`, see [`super::guard`]): a lease the running proxy
//! renews. If the proxy dies, however it dies, the lease runs out and the
//! rules stop redirecting new connections within [`super::guard::LEASE`],
//! although they are still installed; a restart replaces the guard and the
//! rules.
//!
//! Not with iptables-legacy: there every change to a table re-checks all of
//! its rules in the mount namespace of whoever makes the change, and the
//! guard's pin would not resolve in, say, kube-proxy's container, failing
//! its updates. Legacy rules go without the guard (a warning says so), and
//! outlive a killed proxy as they did before.
//!
//! # Loops in host mode
//!
//! In host mode the proxy's own upstream connections are local traffic to a
//! configured port too; they escape through the firewall mark the proxy sets
//! on them (`RETURN` first in the chain). Loopback destinations are
//! deliberately redirected like any other (a local client calling a local
//! server is worth tracing); `exclude_cidrs: [127.0.0.0/8, ::1/128]` turns
//! that off. The proxy's listen port can never be redirected, because
//! [`RedirectRules::validate`] refuses it among the ports.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;

use super::guard::{GuardError, Lease, ProxyGuard};
use super::settings::{self, Cidr, ProxyMode};
use super::{DEFAULT_PORT, DEFAULT_UPSTREAM_MARK};

/// Prefix of the chain names: `TTA_PREROUTING`, `TTA_OUTPUT`.
pub const DEFAULT_CHAIN_PREFIX: &str = "TTA";

/// Longest chain prefix: iptables chain names are at most 28 characters and
/// `_PREROUTING` takes 11 of them.
pub const MAX_CHAIN_PREFIX_LEN: usize = 28 - "_PREROUTING".len();

/// Ports one `-m multiport` match takes at most (an iptables limit).
const MULTIPORT_MAX: usize = 15;

/// IP version of a rule set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4, managed with `iptables`.
    V4,
    /// IPv6, managed with `ip6tables`.
    V6,
}

impl Family {
    fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

/// Which iptables implementation the commands use.
///
/// Rules of the legacy (x_tables) and nf_tables back ends live in separate
/// kernel tables that both run: mixing them makes the order of evaluation
/// against kube-proxy's or the CNI's rules hard to predict, so the rules
/// should go wherever the node's other rules are ([`Backend::detect`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// `iptables` / `ip6tables` as installed (on Debian 12, iptables-nft).
    #[default]
    System,
    /// `iptables-nft` / `ip6tables-nft`.
    Nft,
    /// `iptables-legacy` / `ip6tables-legacy`.
    Legacy,
}

/// The three programs of one back end and family.
enum Tool {
    Main,
    Restore,
    Save,
}

impl Backend {
    fn program(self, family: Family, tool: Tool) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let variant = match self {
            Self::System => "",
            Self::Nft => "-nft",
            Self::Legacy => "-legacy",
        };
        let suffix = match tool {
            Tool::Main => "",
            Tool::Restore => "-restore",
            Tool::Save => "-save",
        };
        format!("{base}{variant}{suffix}")
    }

    /// Whether this back end is iptables-legacy (x_tables), where the
    /// rules cannot carry the proxy's guard (see [`super::guard`]).
    pub fn is_legacy(self) -> bool {
        self.is_legacy_with(&SystemRunner)
    }

    /// [`is_legacy`](Self::is_legacy), asking `runner`.
    pub fn is_legacy_with(self, runner: &dyn CommandRunner) -> bool {
        match self {
            Self::Legacy => true,
            Self::Nft => false,
            Self::System => runner
                .run("iptables", &["--version"], None)
                .is_ok_and(|out| out.contains("legacy")),
        }
    }

    /// The back end the host's existing `nat` rules use: if the other back
    /// end than the one `iptables` runs holds more `nat` rules (say
    /// kube-proxy runs in legacy mode while `iptables` is iptables-nft), that
    /// one; otherwise [`Backend::System`]. Any failure to find out also
    /// means `System`.
    pub fn detect() -> Backend {
        Self::detect_with(&SystemRunner)
    }

    /// [`detect`](Self::detect), asking `runner`.
    pub fn detect_with(runner: &dyn CommandRunner) -> Backend {
        let system_is_legacy = match runner.run("iptables", &["--version"], None) {
            Ok(out) if out.contains("legacy") => true,
            Ok(_) => false,
            Err(_) => return Backend::System,
        };
        // Only count legacy rules when the legacy nat table already exists:
        // merely running iptables-legacy-save would load x_tables modules on
        // a host that never used them.
        let count = |backend: Backend| -> usize {
            runner
                .run(
                    &backend.program(Family::V4, Tool::Save),
                    &["-t", "nat"],
                    None,
                )
                .map(|out| out.lines().filter(|l| l.starts_with("-A ")).count())
                .unwrap_or(0)
        };
        let legacy = if runner.legacy_nat_loaded() {
            count(Backend::Legacy)
        } else {
            0
        };
        let nft = count(Backend::Nft);
        match (system_is_legacy, legacy.cmp(&nft)) {
            (false, std::cmp::Ordering::Greater) => Backend::Legacy,
            (true, std::cmp::Ordering::Less) => Backend::Nft,
            _ => Backend::System,
        }
    }
}

/// Why rules could not be rendered, installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The settings cannot be expressed as rules (say a port of 0).
    #[error("invalid proxy redirect settings: {0}")]
    Invalid(String),
    /// An iptables program is not installed.
    #[error(
        "{program} not found: the transparent proxy needs iptables \
         (Debian/Ubuntu: apt-get install iptables)"
    )]
    MissingProgram {
        /// The program looked for, such as `ip6tables-restore`.
        program: String,
    },
    /// A program could not be started for another reason.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error(
        "`{command}` failed ({}): {}{}",
        exit_text(*.status),
        or_no_output(.stderr),
        input_text(.input.as_deref())
    )]
    Failed {
        /// The command line.
        command: String,
        /// Its exit code (`None` if killed by a signal).
        status: Option<i32>,
        /// Its standard error, trimmed.
        stderr: String,
        /// What was fed to its standard input (restore files), if anything.
        input: Option<String>,
    },
    /// The guard (the rules' lease on the proxy's life) could not be set up.
    #[error(transparent)]
    Guard(GuardError),
}

/// How a failed command ended, for [`RulesError::Failed`].
fn exit_text(status: Option<i32>) -> String {
    match status {
        Some(code) => format!("exit status {code}"),
        None => "killed by a signal".to_string(),
    }
}

/// A failed command's standard error, or a note that it had none.
fn or_no_output(stderr: &str) -> &str {
    if stderr.is_empty() {
        "(no error output)"
    } else {
        stderr
    }
}

/// The input a failed command was fed, after a line break, if any.
fn input_text(input: Option<&str>) -> String {
    input.map_or_else(String::new, |input| format!("\ninput was:\n{input}"))
}

/// The redirect rules of one proxy: what is intercepted and where it goes.
///
/// Build it from the configuration (`config.proxy.redirect_rules()`) or
/// from the defaults ([`RedirectRules::default`]), then [`install`](Self::install) it once the proxy listens, or
/// [`render`](Self::render) it for `--dry-run`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectRules {
    /// Node mode redirects pod traffic in `PREROUTING`; host mode redirects
    /// the host's own traffic in `OUTPUT`.
    pub mode: ProxyMode,
    /// Port the proxy listens on; redirected connections arrive there.
    pub listen_port: u16,
    /// Destination ports whose TCP connections are redirected.
    pub ports: Vec<u16>,
    /// Node mode: the interfaces pod traffic arrives on (`veth+` matches
    /// every name starting with `veth`). Unused in host mode.
    pub pod_interfaces: Vec<String>,
    /// Only destinations in these blocks are redirected; empty means all.
    /// A family with no block here gets no rules when the list is not empty.
    pub include_cidrs: Vec<Cidr>,
    /// Destinations in these blocks are never redirected.
    pub exclude_cidrs: Vec<Cidr>,
    /// Destination ports never redirected (checked before anything else).
    pub exclude_ports: Vec<u16>,
    /// Host mode: connections carrying this firewall mark (the proxy's own
    /// upstream connections) are not redirected.
    pub mark: u32,
    /// Chain names are `<prefix>_PREROUTING` and `<prefix>_OUTPUT`; distinct
    /// prefixes keep separate rule sets (tests) apart.
    pub chain_prefix: String,
    /// Whether IPv6 rules are managed at all. Even when true, hosts whose
    /// kernel has no IPv6 are skipped at install time.
    pub ipv6: bool,
    /// Which iptables implementation is run.
    pub backend: Backend,
    /// Whether the REDIRECT rules carry the proxy's guard, so that they
    /// stop redirecting when the proxy dies: with every back end but
    /// iptables-legacy (see the module documentation).
    pub guarded: bool,
}

/// The defaults of the proxy's settings: node mode, pod interfaces
/// `veth+`, ports 80 and 8080 to [`DEFAULT_PORT`], the proxy's own
/// connections marked [`DEFAULT_UPSTREAM_MARK`], chains `TTA_*`, both
/// families, the system's iptables, guarded.
impl Default for RedirectRules {
    fn default() -> Self {
        Self {
            mode: ProxyMode::Node,
            listen_port: DEFAULT_PORT,
            ports: vec![80, 8080],
            pod_interfaces: vec!["veth+".to_string()],
            include_cidrs: Vec::new(),
            exclude_cidrs: Vec::new(),
            exclude_ports: Vec::new(),
            mark: DEFAULT_UPSTREAM_MARK,
            chain_prefix: DEFAULT_CHAIN_PREFIX.to_string(),
            ipv6: true,
            backend: Backend::System,
            guarded: true,
        }
    }
}

/// The built-in `nat` chains the rules hook into.
const HOOKS: [&str; 2] = ["PREROUTING", "OUTPUT"];

/// One family's chain and its rules, as iptables-save would print them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChainPlan {
    family: Family,
    hook: &'static str,
    chain: String,
    rules: Vec<String>,
}

impl RedirectRules {
    /// The built-in chain this mode hooks into.
    fn hook(&self) -> &'static str {
        match self.mode {
            ProxyMode::Node => "PREROUTING",
            ProxyMode::Host => "OUTPUT",
        }
    }

    /// The name of the own chain jumped to from `hook`.
    pub fn chain_name(&self, hook: &str) -> String {
        format!("{}_{hook}", self.chain_prefix)
    }

    /// The chain this mode installs (`TTA_PREROUTING` or `TTA_OUTPUT`).
    pub fn chain(&self) -> String {
        self.chain_name(self.hook())
    }

    /// Checks that the settings make valid, loop-free rules.
    pub fn validate(&self) -> Result<(), RulesError> {
        let invalid = |reason: String| Err(RulesError::Invalid(reason));
        settings::check_ports(self.listen_port, &self.ports, &self.exclude_ports)
            .map_err(|problem| RulesError::Invalid(problem.to_string()))?;
        // With mark 0 every unmarked connection would count as the proxy's.
        if self.mark == 0 {
            return invalid("the proxy mark must not be 0".into());
        }
        let prefix_ok = !self.chain_prefix.is_empty()
            && self.chain_prefix.len() <= MAX_CHAIN_PREFIX_LEN
            && self
                .chain_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !prefix_ok {
            return invalid(format!(
                "chain prefix {:?} must be 1 to {MAX_CHAIN_PREFIX_LEN} letters, digits, _ or -",
                self.chain_prefix
            ));
        }
        if self.mode == ProxyMode::Node && self.pod_interfaces.is_empty() {
            return invalid("node mode needs at least one pod interface".into());
        }
        for name in &self.pod_interfaces {
            settings::check_interface_pattern(name).map_err(RulesError::Invalid)?;
        }
        for cidr in self.include_cidrs.iter().chain(&self.exclude_cidrs) {
            // iptables would silently mask host bits, and then the installed
            // rules would differ from the rendered ones.
            if !cidr.is_network() {
                return invalid(format!("{cidr} is not a network block"));
            }
        }
        Ok(())
    }

    /// The rules of `family`, or `None` when that family has nothing to
    /// redirect (IPv6 off, or `include_cidrs` lists only other-family
    /// blocks).
    fn plan(&self, family: Family) -> Option<ChainPlan> {
        if family == Family::V6 && !self.ipv6 {
            return None;
        }
        let of_family = |cidrs: &[Cidr]| -> Vec<Cidr> {
            dedup(
                cidrs
                    .iter()
                    .copied()
                    .filter(|c| Family::of(c.addr) == family),
            )
        };
        let include = of_family(&self.include_cidrs);
        let exclude = of_family(&self.exclude_cidrs);
        // A non-empty include list names the only destinations redirected:
        // if none is of this family, no destination of this family is.
        if !self.include_cidrs.is_empty() && include.is_empty() {
            return None;
        }
        let hook = self.hook();
        let chain = self.chain_name(hook);
        let mut rules = Vec::new();
        if self.mode == ProxyMode::Host {
            rules.push(format!(
                "-A {chain} -m mark --mark {:#x} -j RETURN",
                self.mark
            ));
        }
        for ports in dedup(self.exclude_ports.iter().copied()).chunks(MULTIPORT_MAX) {
            rules.push(format!(
                "-A {chain} -p tcp -m multiport --dports {} -j RETURN",
                port_list(ports)
            ));
        }
        for cidr in &exclude {
            rules.push(format!("-A {chain} -d {cidr} -j RETURN"));
        }
        let destinations: Vec<Option<Cidr>> = if include.is_empty() {
            vec![None]
        } else {
            include.into_iter().map(Some).collect()
        };
        let interfaces: Vec<Option<String>> = match self.mode {
            ProxyMode::Node => dedup(self.pod_interfaces.iter().cloned())
                .into_iter()
                .map(Some)
                .collect(),
            ProxyMode::Host => vec![None],
        };
        let ports = dedup(self.ports.iter().copied());
        let guarded = self.guarded;
        // The option order is iptables-save's (-d, -i, -p, matches, -j), so
        // the rendered rules compare equal to what the kernel reports.
        for destination in &destinations {
            for interface in &interfaces {
                for chunk in ports.chunks(MULTIPORT_MAX) {
                    let mut rule = format!("-A {chain}");
                    if let Some(cidr) = destination {
                        rule.push_str(&format!(" -d {cidr}"));
                    }
                    if let Some(name) = interface {
                        rule.push_str(&format!(" -i {name}"));
                    }
                    rule.push_str(&format!(
                        " -p tcp -m multiport --dports {}",
                        port_list(chunk)
                    ));
                    if guarded {
                        rule.push_str(&format!(
                            " -m bpf --object-pinned {}",
                            self.guard_pin().display()
                        ));
                    }
                    rule.push_str(&format!(" -j REDIRECT --to-ports {}", self.listen_port));
                    rules.push(rule);
                }
            }
        }
        Some(ChainPlan {
            family,
            hook,
            chain,
            rules,
        })
    }

    /// Which destinations these rules redirect (see [`super::RedirectScope`]).
    pub fn scope(&self) -> super::RedirectScope {
        super::RedirectScope {
            ports: self.ports.clone(),
            exclude_ports: self.exclude_ports.clone(),
            include_cidrs: self.include_cidrs.clone(),
            exclude_cidrs: self.exclude_cidrs.clone(),
            ipv6: self.ipv6,
        }
    }

    /// Where the guard program the rules match is pinned.
    pub fn guard_pin(&self) -> std::path::PathBuf {
        super::guard::pin_path(&self.chain_prefix)
    }

    fn plans(&self) -> Vec<ChainPlan> {
        [Family::V4, Family::V6]
            .into_iter()
            .filter_map(|family| self.plan(family))
            .collect()
    }

    /// The `iptables-restore` input that (re)fills the own chain.
    fn restore_input(plan: &ChainPlan) -> String {
        let mut text = format!("*nat\n:{} - [0:0]\n", plan.chain);
        for rule in &plan.rules {
            text.push_str(rule);
            text.push('\n');
        }
        text.push_str("COMMIT\n");
        text
    }

    /// The arguments of the jump rule (after `-t nat -C/-I <hook>`).
    fn jump_args(plan: &ChainPlan) -> [&str; 2] {
        ["-j", &plan.chain]
    }

    /// What [`install`](Self::install) does, as a shell script an operator
    /// could run (`--dry-run` prints it): per family, the `iptables-restore`
    /// input that fills the own chain, then the check-then-insert of the
    /// jump. Nothing is run. Install also removes chains a previous run in
    /// another mode left; that step depends on the host's state and is only
    /// mentioned in a comment. Settings that fail [`validate`](Self::validate)
    /// render as a comment saying why.
    pub fn render(&self) -> String {
        if let Err(e) = self.validate() {
            return format!("# not installable: {e}\n");
        }
        let mut out = String::new();
        let what = match self.mode {
            ProxyMode::Node => format!(
                "node mode: TCP arriving on {} to port(s) {}",
                self.pod_interfaces.join(", "),
                port_list(&self.ports)
            ),
            ProxyMode::Host => format!(
                "host mode: locally generated TCP to port(s) {} (not mark {:#x})",
                port_list(&self.ports),
                self.mark
            ),
        };
        out.push_str(&format!(
            "# transparent proxy redirect, {what}, goes to port {}\n",
            self.listen_port
        ));
        out.push_str(&format!(
            "# (leftover {} chains of other modes are removed first)\n",
            self.chain_prefix
        ));
        let plans = self.plans();
        for family in [Family::V4, Family::V6] {
            let Some(plan) = plans.iter().find(|p| p.family == family) else {
                let why = if family == Family::V6 && !self.ipv6 {
                    "IPv6 disabled"
                } else {
                    "include_cidrs has no block of this family"
                };
                let name = match family {
                    Family::V4 => "IPv4",
                    Family::V6 => "IPv6",
                };
                out.push_str(&format!("# {name}: nothing to redirect ({why})\n"));
                continue;
            };
            let main = self.backend.program(family, Tool::Main);
            let restore = self.backend.program(family, Tool::Restore);
            out.push_str(&format!("{restore} -w --noflush <<'EOF'\n"));
            out.push_str(&Self::restore_input(plan));
            out.push_str("EOF\n");
            let jump = Self::jump_args(plan).join(" ");
            out.push_str(&format!(
                "{main} -w -t nat -C {hook} {jump} 2>/dev/null || {main} -w -t nat -I {hook} 1 {jump}\n",
                hook = plan.hook
            ));
        }
        out
    }

    /// Installs the rules: removes leftovers of other modes, (re)fills the
    /// own chain of each family and makes sure exactly one jump leads to
    /// it. Safe to call after a crash that left rules behind. The rules stay
    /// until the returned guard is removed or dropped.
    ///
    /// Runs iptables synchronously (a few short commands); call it from a
    /// blocking context in async code.
    pub fn install(&self) -> Result<InstalledRules, RulesError> {
        self.install_with(Arc::new(SystemRunner))
    }

    /// [`install`](Self::install), running the commands with `runner`, which
    /// the returned rules keep to remove themselves.
    pub fn install_with(
        &self,
        runner: Arc<dyn CommandRunner>,
    ) -> Result<InstalledRules, RulesError> {
        self.validate()?;
        let ipv6_present = runner.ipv6_present();
        let plans: Vec<ChainPlan> = self
            .plans()
            .into_iter()
            .filter(|p| p.family == Family::V4 || ipv6_present)
            .collect();
        // The guard first: the rules name its pin, and the kernel resolves
        // the pin when a rule is added.
        let proxy_guard = if self.guarded {
            Some(ProxyGuard::load(&self.guard_pin()).map_err(RulesError::Guard)?)
        } else {
            log::warn!(
                "proxy: iptables-legacy: the rules go without their guard, so if the agent \
                 is killed they keep redirecting to its port until it restarts (see docs/proxy.md)"
            );
            None
        };
        let guard = InstalledRules {
            rules: self.clone(),
            active: true,
            guard: proxy_guard,
            runner: Arc::clone(&runner),
        };
        // From here on, a failure drops `guard`, which removes whatever part
        // was already installed.
        for family in self.families(ipv6_present) {
            for hook in HOOKS {
                let wanted = plans.iter().any(|p| p.family == family && p.hook == hook);
                if !wanted {
                    self.remove_chain(&*runner, family, hook)?;
                }
            }
        }
        for plan in &plans {
            let restore = self.backend.program(plan.family, Tool::Restore);
            runner.run(
                &restore,
                &["-w", "--noflush"],
                Some(&Self::restore_input(plan)),
            )?;
            self.ensure_jump(&*runner, plan)?;
        }
        Ok(guard)
    }

    /// The families managed on this host.
    fn families(&self, ipv6_present: bool) -> Vec<Family> {
        if self.ipv6 && ipv6_present {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }

    /// Inserts the jump to the own chain unless it is already there.
    fn ensure_jump(&self, runner: &dyn CommandRunner, plan: &ChainPlan) -> Result<(), RulesError> {
        let main = self.backend.program(plan.family, Tool::Main);
        let jump = Self::jump_args(plan);
        let mut check = vec!["-w", "-t", "nat", "-C", plan.hook];
        check.extend(jump);
        match runner.run(&main, &check, None) {
            Ok(_) => return Ok(()),
            // Exit status 1 is "no such rule"; anything else is a real error.
            Err(RulesError::Failed {
                status: Some(1), ..
            }) => {}
            Err(e) => return Err(e),
        }
        let mut insert = vec!["-w", "-t", "nat", "-I", plan.hook, "1"];
        insert.extend(jump);
        runner.run(&main, &insert, None).map(|_| ())
    }

    /// Removes every chain of this prefix (both modes, both families) and
    /// the jumps to them: what a restart runs to clean up after a crash, and
    /// what removal runs. Chains that do not exist are not an error.
    ///
    /// Families go in the reverse of [`install`](Self::install)'s order,
    /// and in each the jumps go before the chain they lead to.
    pub fn remove_leftovers(&self) -> Result<(), RulesError> {
        self.remove_leftovers_with(&SystemRunner)
    }

    /// [`remove_leftovers`](Self::remove_leftovers), running the commands
    /// with `runner`.
    pub fn remove_leftovers_with(&self, runner: &dyn CommandRunner) -> Result<(), RulesError> {
        let mut first_error = None;
        for family in self.families(runner.ipv6_present()).into_iter().rev() {
            for hook in HOOKS {
                // Keep going: one failure should not leave the other
                // chains behind.
                if let Err(e) = self.remove_chain(runner, family, hook) {
                    first_error.get_or_insert(e);
                }
            }
        }
        if first_error.is_none() {
            // The rules that named it are gone.
            super::guard::remove_pin(&self.guard_pin());
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Deletes every jump from `hook` to the own chain, then the chain.
    fn remove_chain(
        &self,
        runner: &dyn CommandRunner,
        family: Family,
        hook: &str,
    ) -> Result<(), RulesError> {
        let main = self.backend.program(family, Tool::Main);
        let chain = self.chain_name(hook);
        if !chain_exists(runner, &main, &chain)? {
            // No such chain, so no jump to it either.
            return Ok(());
        }
        let listing = runner.run(&main, &["-w", "-t", "nat", "-S", hook], None)?;
        // Deleting by specification rather than by rule number: numbers
        // shift when another program edits the chain meanwhile, and a stale
        // number would delete someone else's rule.
        for line in listing.lines() {
            let words = split_words(line);
            let jumps_here = words
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1] == chain);
            if words.len() > 2 && words[0] == "-A" && words[1] == hook && jumps_here {
                let mut args = vec!["-w", "-t", "nat", "-D", hook];
                args.extend(words[2..].iter().map(String::as_str));
                runner.run(&main, &args, None)?;
            }
        }
        runner.run(&main, &["-w", "-t", "nat", "-F", &chain], None)?;
        runner.run(&main, &["-w", "-t", "nat", "-X", &chain], None)?;
        Ok(())
    }
}

/// Installed rules; dropping this removes them (errors are logged), and
/// [`remove`](Self::remove) does so reporting errors.
///
/// Removal deletes every chain of the rules' prefix, so dropping one of two
/// guards of the same prefix removes the rules of both. It runs its
/// commands with the runner the rules were installed with.
#[derive(Debug)]
#[must_use = "dropping the guard removes the rules at once"]
pub struct InstalledRules {
    rules: RedirectRules,
    active: bool,
    /// The rules' lease on the proxy's life; removed with the rules.
    guard: Option<ProxyGuard>,
    /// Runs the commands that remove the rules.
    runner: Arc<dyn CommandRunner>,
}

impl InstalledRules {
    /// The rules installed.
    pub fn rules(&self) -> &RedirectRules {
        &self.rules
    }

    /// The lease the running proxy renews (see [`super::guard`]).
    pub fn lease(&self) -> Option<Lease> {
        self.guard.as_ref().map(ProxyGuard::lease)
    }

    /// Removes the rules now, then their guard.
    pub fn remove(mut self) -> Result<(), RulesError> {
        self.active = false;
        let removed = self.rules.remove_leftovers_with(&*self.runner);
        if let Some(guard) = self.guard.take() {
            guard.remove();
        }
        removed
    }

    /// Stops redirecting new connections and leaves the rules in place: the
    /// guard's lease ends now (stop renewing it first). The nat table only
    /// sees a connection's first packet, so connections already redirected
    /// go on through the proxy, which can drain them.
    ///
    /// Deleting the rules instead also ended the translation of those
    /// connections' replies when they were the namespace's only nat rules:
    /// the proxy's reset at the end of the shutdown grace left with its own
    /// address (seen with tshark) and never reached the client.
    pub fn stop_redirecting(&self) {
        if let Some(guard) = &self.guard {
            guard.lease().expire();
        }
    }
}

impl Drop for InstalledRules {
    fn drop(&mut self) {
        if self.active
            && let Err(e) = self.rules.remove_leftovers_with(&*self.runner)
        {
            log::warn!("could not remove the proxy's iptables rules: {e}");
        }
        if let Some(guard) = self.guard.take() {
            guard.remove();
        }
    }
}

/// Whether the nat table has `chain` (`-S` exits with status 1 when not).
fn chain_exists(
    runner: &dyn CommandRunner,
    program: &str,
    chain: &str,
) -> Result<bool, RulesError> {
    match runner.run(program, &["-w", "-t", "nat", "-S", chain], None) {
        Ok(_) => Ok(true),
        Err(RulesError::Failed {
            status: Some(1), ..
        }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// What the rules need of the host: the iptables programs run, and two
/// facts that decide which of them are run. Installing, removing and
/// dropping [`InstalledRules`] all go through one; [`SystemRunner`], the
/// host itself, unless [`RedirectRules::install_with`] is given another
/// (tests give a fake, so that the commands are checked without root).
pub trait CommandRunner: Send + Sync + std::fmt::Debug {
    /// Runs `program args`, feeding `input` on its standard input, and
    /// returns its standard output. A program that ran and failed is
    /// [`RulesError::Failed`], with its exit status (status 1 is how
    /// iptables says "no such rule or chain") and standard error.
    fn run(&self, program: &str, args: &[&str], input: Option<&str>) -> Result<String, RulesError>;

    /// Whether the kernel has IPv6 at all; without it ip6tables cannot work
    /// and there is no IPv6 traffic to redirect.
    fn ipv6_present(&self) -> bool;

    /// Whether the legacy (x_tables) `nat` table is loaded: only then does
    /// [`Backend::detect`] count its rules, since merely running
    /// iptables-legacy-save would load x_tables modules on a host that
    /// never used them.
    fn legacy_nat_loaded(&self) -> bool;
}

/// The host: runs the programs as child processes (in the calling thread's
/// network namespace) and reads `/proc`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemRunner;

impl CommandRunner for SystemRunner {
    fn run(&self, program: &str, args: &[&str], input: Option<&str>) -> Result<String, RulesError> {
        run(program, args, input)
    }

    fn ipv6_present(&self) -> bool {
        std::path::Path::new("/proc/net/if_inet6").exists()
    }

    fn legacy_nat_loaded(&self) -> bool {
        std::fs::read_to_string("/proc/net/ip_tables_names")
            .is_ok_and(|names| names.lines().any(|l| l.trim() == "nat"))
    }
}

/// Runs `program args` (feeding `input` on stdin) and returns its stdout;
/// errors name the command and carry its stderr.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, RulesError> {
    let command_line = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let spawned = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // iptables-nft prints messages in the locale; errors are matched on
        // exit codes, but keep them readable in logs.
        .env("LC_ALL", "C")
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RulesError::MissingProgram {
                program: program.to_string(),
            });
        }
        Err(source) => {
            return Err(RulesError::Spawn {
                command: command_line,
                source,
            });
        }
    };
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error means the program exited early; its status and
        // stderr below say why.
        let _ = stdin.write_all(text.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|source| RulesError::Spawn {
            command: command_line.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(RulesError::Failed {
            command: command_line,
            status: output.status.code(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            input: input.map(str::to_string),
        })
    }
}

/// Splits an `iptables -S` line into words; double-quoted words (comments)
/// may hold spaces and backslash escapes.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// `items` without repeats, first occurrence kept.
fn dedup<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

fn port_list(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("valid CIDR")
    }

    fn node() -> RedirectRules {
        RedirectRules::default()
    }

    fn host() -> RedirectRules {
        RedirectRules {
            mode: ProxyMode::Host,
            ..node()
        }
    }

    fn rules_of(r: &RedirectRules, family: Family) -> Vec<String> {
        r.plan(family).map(|p| p.rules).unwrap_or_default()
    }

    #[test]
    fn node_mode_from_the_default_config() {
        let r = node();
        assert_eq!(r.chain(), "TTA_PREROUTING");
        let expected = [
            "-A TTA_PREROUTING -i veth+ -p tcp -m multiport --dports 80,8080 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001",
        ];
        assert_eq!(rules_of(&r, Family::V4), expected);
        assert_eq!(rules_of(&r, Family::V6), expected);
        assert_eq!(
            r.render(),
            "\
# transparent proxy redirect, node mode: TCP arriving on veth+ to port(s) 80,8080, goes to port 15001
# (leftover TTA chains of other modes are removed first)
iptables-restore -w --noflush <<'EOF'
*nat
:TTA_PREROUTING - [0:0]
-A TTA_PREROUTING -i veth+ -p tcp -m multiport --dports 80,8080 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001
COMMIT
EOF
iptables -w -t nat -C PREROUTING -j TTA_PREROUTING 2>/dev/null || iptables -w -t nat -I PREROUTING 1 -j TTA_PREROUTING
ip6tables-restore -w --noflush <<'EOF'
*nat
:TTA_PREROUTING - [0:0]
-A TTA_PREROUTING -i veth+ -p tcp -m multiport --dports 80,8080 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001
COMMIT
EOF
ip6tables -w -t nat -C PREROUTING -j TTA_PREROUTING 2>/dev/null || ip6tables -w -t nat -I PREROUTING 1 -j TTA_PREROUTING
"
        );
    }

    #[test]
    fn legacy_rules_go_without_the_guard_and_the_pin_follows_the_prefix() {
        let legacy = RedirectRules {
            guarded: false,
            ..node()
        };
        assert_eq!(
            rules_of(&legacy, Family::V4),
            [
                "-A TTA_PREROUTING -i veth+ -p tcp -m multiport --dports 80,8080 -j REDIRECT --to-ports 15001"
            ]
        );
        let other = RedirectRules {
            chain_prefix: "TEST7".into(),
            ..node()
        };
        assert_eq!(
            other.guard_pin(),
            std::path::Path::new("/sys/fs/bpf/test7_proxy_guard")
        );
    }

    #[test]
    fn node_mode_several_interfaces() {
        let r = RedirectRules {
            pod_interfaces: vec!["cali+".into(), "eth1".into(), "cali+".into()],
            ports: vec![80],
            ..node()
        };
        assert_eq!(
            rules_of(&r, Family::V4),
            [
                "-A TTA_PREROUTING -i cali+ -p tcp -m multiport --dports 80 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001",
                "-A TTA_PREROUTING -i eth1 -p tcp -m multiport --dports 80 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001",
            ]
        );
    }

    #[test]
    fn host_mode_lets_marked_traffic_pass() {
        let r = RedirectRules {
            mark: 0x2a,
            ..host()
        };
        assert_eq!(r.chain(), "TTA_OUTPUT");
        let expected = [
            "-A TTA_OUTPUT -m mark --mark 0x2a -j RETURN",
            "-A TTA_OUTPUT -p tcp -m multiport --dports 80,8080 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001",
        ];
        assert_eq!(rules_of(&r, Family::V4), expected);
        assert_eq!(rules_of(&r, Family::V6), expected);
        let text = host().render();
        assert!(
            text.contains("-A TTA_OUTPUT -m mark --mark 0x1e7 -j RETURN\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "iptables -w -t nat -C OUTPUT -j TTA_OUTPUT 2>/dev/null || iptables -w -t nat -I OUTPUT 1 -j TTA_OUTPUT\n"
            ),
            "{text}"
        );
        assert!(!text.contains("PREROUTING -j"), "{text}");
    }

    #[test]
    fn exclusions_come_first_and_split_by_family() {
        let r = RedirectRules {
            include_cidrs: vec![cidr("10.0.0.0/8"), cidr("fd00::/8"), cidr("192.168.0.0/16")],
            exclude_cidrs: vec![cidr("10.96.0.0/12"), cidr("fd00:1::/32"), cidr("10.1.2.3")],
            exclude_ports: vec![22, 8081],
            ..host()
        };
        assert_eq!(
            rules_of(&r, Family::V4),
            [
                "-A TTA_OUTPUT -m mark --mark 0x1e7 -j RETURN",
                "-A TTA_OUTPUT -p tcp -m multiport --dports 22,8081 -j RETURN",
                "-A TTA_OUTPUT -d 10.96.0.0/12 -j RETURN",
                "-A TTA_OUTPUT -d 10.1.2.3/32 -j RETURN",
                "-A TTA_OUTPUT -d 10.0.0.0/8 -p tcp -m multiport --dports 80,8080 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001",
                "-A TTA_OUTPUT -d 192.168.0.0/16 -p tcp -m multiport --dports 80,8080 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001",
            ]
        );
        assert_eq!(
            rules_of(&r, Family::V6),
            [
                "-A TTA_OUTPUT -m mark --mark 0x1e7 -j RETURN",
                "-A TTA_OUTPUT -p tcp -m multiport --dports 22,8081 -j RETURN",
                "-A TTA_OUTPUT -d fd00:1::/32 -j RETURN",
                "-A TTA_OUTPUT -d fd00::/8 -p tcp -m multiport --dports 80,8080 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001",
            ]
        );
    }

    #[test]
    fn node_mode_with_include_cidrs_and_interfaces() {
        let r = RedirectRules {
            include_cidrs: vec![cidr("10.0.0.0/8")],
            pod_interfaces: vec!["veth+".into(), "cni0".into()],
            ports: vec![80],
            ..node()
        };
        assert_eq!(
            rules_of(&r, Family::V4),
            [
                "-A TTA_PREROUTING -d 10.0.0.0/8 -i veth+ -p tcp -m multiport --dports 80 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001",
                "-A TTA_PREROUTING -d 10.0.0.0/8 -i cni0 -p tcp -m multiport --dports 80 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001",
            ]
        );
    }

    #[test]
    fn include_list_of_one_family_leaves_the_other_alone() {
        let r = RedirectRules {
            include_cidrs: vec![cidr("10.0.0.0/8")],
            ..node()
        };
        assert!(r.plan(Family::V6).is_none());
        let text = r.render();
        assert!(!text.contains("ip6tables"), "{text}");
        assert!(
            text.contains(
                "# IPv6: nothing to redirect (include_cidrs has no block of this family)"
            ),
            "{text}"
        );
        // Exclusions alone never stop a family from being redirected.
        let r = RedirectRules {
            exclude_cidrs: vec![cidr("10.0.0.0/8")],
            ..node()
        };
        assert_eq!(
            rules_of(&r, Family::V6),
            [
                "-A TTA_PREROUTING -i veth+ -p tcp -m multiport --dports 80,8080 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001"
            ]
        );
        let r = RedirectRules {
            ipv6: false,
            ..node()
        };
        assert!(
            r.render()
                .contains("# IPv6: nothing to redirect (IPv6 disabled)")
        );
    }

    #[test]
    fn many_ports_are_split_into_multiport_groups() {
        let r = RedirectRules {
            ports: (1000..1020).collect(),
            exclude_ports: vec![1, 1, 2],
            ..host()
        };
        let rules = rules_of(&r, Family::V4);
        assert_eq!(
            rules[1],
            "-A TTA_OUTPUT -p tcp -m multiport --dports 1,2 -j RETURN"
        );
        assert_eq!(
            rules[2],
            "-A TTA_OUTPUT -p tcp -m multiport --dports 1000,1001,1002,1003,1004,1005,1006,1007,1008,1009,1010,1011,1012,1013,1014 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001"
        );
        assert_eq!(
            rules[3],
            "-A TTA_OUTPUT -p tcp -m multiport --dports 1015,1016,1017,1018,1019 -m bpf --object-pinned /sys/fs/bpf/tta_proxy_guard -j REDIRECT --to-ports 15001"
        );
        assert_eq!(rules.len(), 4);
    }

    #[test]
    fn chain_prefix_names_the_chains() {
        let r = RedirectRules {
            chain_prefix: "TEST7".into(),
            ..node()
        };
        assert_eq!(r.chain(), "TEST7_PREROUTING");
        assert_eq!(r.chain_name("OUTPUT"), "TEST7_OUTPUT");
        assert!(r.render().contains(":TEST7_PREROUTING - [0:0]\n"));
    }

    #[test]
    fn backends_name_their_programs() {
        let r = RedirectRules {
            backend: Backend::Legacy,
            ..node()
        };
        let text = r.render();
        assert!(
            text.contains("iptables-legacy-restore -w --noflush"),
            "{text}"
        );
        assert!(
            text.contains("ip6tables-legacy -w -t nat -C PREROUTING"),
            "{text}"
        );
        assert_eq!(
            Backend::Nft.program(Family::V6, Tool::Save),
            "ip6tables-nft-save"
        );
        assert_eq!(Backend::System.program(Family::V4, Tool::Main), "iptables");
    }

    #[test]
    fn invalid_settings_are_errors_not_panics() {
        let bad = [
            RedirectRules {
                listen_port: 0,
                ..node()
            },
            RedirectRules {
                ports: vec![],
                ..node()
            },
            RedirectRules {
                ports: vec![80, 15001],
                ..node()
            },
            RedirectRules {
                exclude_ports: vec![0],
                ..node()
            },
            RedirectRules { mark: 0, ..host() },
            RedirectRules {
                pod_interfaces: vec![],
                ..node()
            },
            RedirectRules {
                pod_interfaces: vec!["ve th+".into()],
                ..node()
            },
            RedirectRules {
                pod_interfaces: vec!["a+b".into()],
                ..node()
            },
            RedirectRules {
                pod_interfaces: vec!["averyveryverylongname".into()],
                ..node()
            },
            RedirectRules {
                chain_prefix: "WAY_TOO_LONG_A_PREFIX".into(),
                ..node()
            },
            RedirectRules {
                chain_prefix: "A B".into(),
                ..node()
            },
            RedirectRules {
                include_cidrs: vec![Cidr {
                    addr: "10.0.0.1".parse().unwrap(),
                    prefix_len: 8,
                }],
                ..node()
            },
            RedirectRules {
                exclude_cidrs: vec![Cidr {
                    addr: "10.0.0.0".parse().unwrap(),
                    prefix_len: 40,
                }],
                ..node()
            },
        ];
        for r in bad {
            let e = r.validate().expect_err("invalid");
            assert!(matches!(e, RulesError::Invalid(_)), "{e}");
            assert!(r.render().starts_with("# not installable: "), "{r:?}");
            let host = FakeHost::new(true);
            let installed = r.install_with(host.clone());
            assert!(matches!(installed, Err(RulesError::Invalid(_))));
            assert_eq!(host.calls(), Vec::<String>::new(), "nothing run");
        }
        // Host mode does not need pod interfaces.
        let r = RedirectRules {
            pod_interfaces: vec![],
            ..host()
        };
        assert!(r.validate().is_ok());
    }

    #[test]
    fn errors_name_the_command_and_its_output() {
        let e = run("/nonexistent/iptables", &["-S"], None).unwrap_err();
        assert!(matches!(e, RulesError::MissingProgram { .. }), "{e}");
        assert!(
            e.to_string().contains("/nonexistent/iptables not found"),
            "{e}"
        );
        let e = run("sh", &["-c", "echo oops >&2; exit 3"], Some("input text")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("`sh -c echo oops >&2; exit 3` failed (exit status 3): oops"),
            "{text}"
        );
        assert!(text.contains("input was:\ninput text"), "{text}");
    }

    #[test]
    fn words_of_listed_rules() {
        assert_eq!(
            split_words("-A PREROUTING -m comment --comment \"a \\\"b\\\" c\" -j TTA_PREROUTING"),
            [
                "-A",
                "PREROUTING",
                "-m",
                "comment",
                "--comment",
                "a \"b\" c",
                "-j",
                "TTA_PREROUTING"
            ]
        );
        assert_eq!(split_words("  "), Vec::<String>::new());
        assert_eq!(
            split_words("-A X --comment \"\""),
            ["-A", "X", "--comment", ""]
        );
    }

    #[test]
    fn error_messages() {
        let failed = |status, stderr: &str, input: Option<&str>| RulesError::Failed {
            command: "iptables -w -t nat -S".into(),
            status,
            stderr: stderr.into(),
            input: input.map(str::to_string),
        };
        let cases = [
            (
                RulesError::Invalid("listen port 0".into()),
                "invalid proxy redirect settings: listen port 0",
            ),
            (
                RulesError::MissingProgram {
                    program: "ip6tables-restore".into(),
                },
                "ip6tables-restore not found: the transparent proxy needs iptables \
                 (Debian/Ubuntu: apt-get install iptables)",
            ),
            (
                RulesError::Spawn {
                    command: "iptables -S".into(),
                    source: std::io::Error::other("no memory"),
                },
                "could not run `iptables -S`: no memory",
            ),
            (
                failed(Some(4), "", None),
                "`iptables -w -t nat -S` failed (exit status 4): (no error output)",
            ),
            (
                failed(None, "bad", Some("*nat\nCOMMIT\n")),
                "`iptables -w -t nat -S` failed (killed by a signal): bad\ninput was:\n*nat\nCOMMIT\n",
            ),
            (
                RulesError::Guard(GuardError::Load("no BTF".into())),
                "the proxy's guard program cannot be loaded: no BTF",
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
        }
        use std::error::Error as _;
        let spawn = RulesError::Spawn {
            command: "iptables".into(),
            source: std::io::Error::other("no memory"),
        };
        assert_eq!(
            spawn.source().map(ToString::to_string).as_deref(),
            Some("no memory")
        );
        assert!(failed(Some(1), "", None).source().is_none());
    }

    /// A fake host for [`CommandRunner`]: the `nat` table of each iptables
    /// program (`iptables`, `ip6tables-legacy`, ...) in memory, and every
    /// command run recorded. It behaves like iptables where the rules code
    /// depends on it: status 1 for a missing rule or chain, a chain that is
    /// still jumped to or not empty cannot be deleted, a jump needs its
    /// chain, and a restore file applies whole or not at all.
    #[derive(Debug)]
    struct FakeHost {
        ipv6: bool,
        legacy_nat: bool,
        version: String,
        state: std::sync::Mutex<FakeState>,
    }

    type Table = std::collections::BTreeMap<String, Vec<String>>;

    #[derive(Debug, Default)]
    struct FakeState {
        /// Command lines, in the order run.
        calls: Vec<String>,
        /// What restore commands were fed, in order.
        inputs: Vec<String>,
        /// Per main program: chain -> rules (what follows `-A <chain> `).
        tables: std::collections::BTreeMap<String, Table>,
        /// Command lines that fail, with their status and stderr.
        failing: Vec<(String, i32, String)>,
    }

    const BUILT_IN: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

    /// Someone else's rule, in both families' PREROUTING before the tests
    /// install anything.
    const FOREIGN: &str = "-p udp -m udp --dport 9 -j RETURN";

    impl FakeHost {
        /// A host with (or without) IPv6, iptables-nft as `iptables`, and
        /// [`FOREIGN`] in `iptables` and `ip6tables`.
        fn new(ipv6: bool) -> Arc<Self> {
            let host = Self {
                ipv6,
                legacy_nat: false,
                version: "iptables v1.8.9 (nf_tables)".into(),
                state: Default::default(),
            };
            host.add("iptables", "PREROUTING", FOREIGN);
            host.add("ip6tables", "PREROUTING", FOREIGN);
            Arc::new(host)
        }

        fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
            self.state.lock().unwrap()
        }

        /// Appends `rule` to `chain` of `program`'s table.
        fn add(&self, program: &str, chain: &str, rule: &str) {
            let mut state = self.state();
            let table = state.table(program);
            table
                .entry(chain.to_string())
                .or_default()
                .push(rule.into());
        }

        /// Makes the command `line` fail with `status` and `stderr` from
        /// now on.
        fn fail(&self, line: &str, status: i32, stderr: &str) {
            self.state()
                .failing
                .push((line.into(), status, stderr.into()));
        }

        /// The command lines run so far, and forgets them.
        fn take_calls(&self) -> Vec<String> {
            std::mem::take(&mut self.state().calls)
        }

        fn calls(&self) -> Vec<String> {
            self.state().calls.clone()
        }

        fn inputs(&self) -> Vec<String> {
            self.state().inputs.clone()
        }

        /// `program`'s table as iptables-save lists it: the chains declared
        /// beyond the built-in ones, then every rule.
        fn saved(&self, program: &str) -> Vec<String> {
            let mut state = self.state();
            let table = state.table(program);
            let declared = table
                .keys()
                .filter(|c| !BUILT_IN.contains(&c.as_str()))
                .map(|c| format!(":{c}"));
            let rules = table
                .iter()
                .flat_map(|(chain, rules)| rules.iter().map(move |r| format!("-A {chain} {r}")));
            declared.chain(rules).collect()
        }
    }

    impl FakeState {
        fn table(&mut self, program: &str) -> &mut Table {
            self.tables.entry(program.to_string()).or_insert_with(|| {
                BUILT_IN
                    .iter()
                    .map(|c| (c.to_string(), Vec::new()))
                    .collect()
            })
        }
    }

    impl CommandRunner for FakeHost {
        fn run(
            &self,
            program: &str,
            args: &[&str],
            input: Option<&str>,
        ) -> Result<String, RulesError> {
            let line = std::iter::once(program)
                .chain(args.iter().copied())
                .collect::<Vec<_>>()
                .join(" ");
            let mut state = self.state();
            state.calls.push(line.clone());
            if let Some(input) = input {
                state.inputs.push(input.to_string());
            }
            let failure = |status: i32, stderr: &str| RulesError::Failed {
                command: line.clone(),
                status: Some(status),
                stderr: stderr.to_string(),
                input: input.map(str::to_string),
            };
            if let Some((_, status, stderr)) = state.failing.iter().find(|(l, ..)| *l == line) {
                return Err(failure(*status, stderr));
            }
            if let Some(main) = program.strip_suffix("-restore") {
                assert_eq!(args, ["-w", "--noflush"], "{line}");
                let mut table = state.table(main).clone();
                for (n, text) in input.expect("a restore file").lines().enumerate() {
                    let bad = || failure(1, &format!("{program}: line {} failed", n + 1));
                    if let Some(declared) = text.strip_prefix(':') {
                        let chain = declared.split_whitespace().next().ok_or_else(bad)?;
                        // Created, or flushed when it exists.
                        table.insert(chain.to_string(), Vec::new());
                    } else if let Some(rule) = text.strip_prefix("-A ") {
                        let (chain, rule) = rule.split_once(' ').ok_or_else(bad)?;
                        table.get_mut(chain).ok_or_else(bad)?.push(rule.into());
                    } else if text != "*nat" && text != "COMMIT" {
                        return Err(bad());
                    }
                }
                *state.table(main) = table;
                return Ok(String::new());
            }
            if let Some(main) = program.strip_suffix("-save") {
                assert_eq!(args, ["-t", "nat"], "{line}");
                drop(state);
                return Ok(self
                    .saved(main)
                    .into_iter()
                    .map(|l| l + "\n")
                    .collect::<String>());
            }
            if args == ["--version"] {
                return Ok(self.version.clone());
            }
            let ["-w", "-t", "nat", op, chain, rest @ ..] = args else {
                panic!("unexpected command {line}");
            };
            let table = state.table(program);
            let no_chain = || failure(1, "iptables: No chain/target/match by that name.");
            let no_rule = || {
                failure(
                    1,
                    "iptables: Bad rule (does a matching rule exist in that chain?).",
                )
            };
            let spec = rest.join(" ");
            match *op {
                "-S" if rest.is_empty() => {
                    let rules = table.get(*chain).ok_or_else(no_chain)?;
                    let head = if BUILT_IN.contains(chain) {
                        format!("-P {chain} ACCEPT\n")
                    } else {
                        format!("-N {chain}\n")
                    };
                    Ok(head
                        + &rules
                            .iter()
                            .map(|r| format!("-A {chain} {r}\n"))
                            .collect::<String>())
                }
                "-C" => match table.get(*chain) {
                    Some(rules) if rules.contains(&spec) => Ok(String::new()),
                    Some(_) => Err(no_rule()),
                    None => Err(no_chain()),
                },
                "-I" => {
                    let ["1", "-j", target] = rest else {
                        panic!("unexpected insert {line}");
                    };
                    if !table.contains_key(*target) {
                        return Err(failure(
                            2,
                            "iptables v1.8.9 (nf_tables): Chain does not exist",
                        ));
                    }
                    let rules = table.get_mut(*chain).ok_or_else(no_chain)?;
                    rules.insert(0, format!("-j {target}"));
                    Ok(String::new())
                }
                "-D" => {
                    let rules = table.get_mut(*chain).ok_or_else(no_chain)?;
                    let at = rules.iter().position(|r| *r == spec).ok_or_else(no_rule)?;
                    rules.remove(at);
                    Ok(String::new())
                }
                "-F" if rest.is_empty() => {
                    table.get_mut(*chain).ok_or_else(no_chain)?.clear();
                    Ok(String::new())
                }
                "-X" if rest.is_empty() => {
                    let rules = table.get(*chain).ok_or_else(no_chain)?;
                    let jumped_to = table.values().flatten().any(|r| {
                        r.split_whitespace()
                            .collect::<Vec<_>>()
                            .windows(2)
                            .any(|w| w == ["-j", *chain])
                    });
                    if BUILT_IN.contains(chain) || !rules.is_empty() || jumped_to {
                        return Err(failure(1, "iptables: Directory not empty."));
                    }
                    table.remove(*chain);
                    Ok(String::new())
                }
                _ => panic!("unexpected command {line}"),
            }
        }

        fn ipv6_present(&self) -> bool {
            self.ipv6
        }

        fn legacy_nat_loaded(&self) -> bool {
            self.legacy_nat
        }
    }

    /// Rules of the prefix `UT` (whose guard pin no real run uses), as
    /// iptables-legacy has them: without the guard, which needs root.
    fn unit(mode: ProxyMode) -> RedirectRules {
        RedirectRules {
            mode,
            chain_prefix: "UT".into(),
            guarded: false,
            ..node()
        }
    }

    /// [`unit`] rules of `mode` installed on `host`.
    fn install_unit(mode: ProxyMode, host: &Arc<FakeHost>) -> InstalledRules {
        unit(mode).install_with(host.clone()).expect("install")
    }

    /// The commands that remove one family's chain under `hook` and the
    /// jump to it, `main` being that family's iptables.
    fn removal(main: &str, hook: &str) -> Vec<String> {
        [
            format!("{main} -w -t nat -S UT_{hook}"),
            format!("{main} -w -t nat -S {hook}"),
            format!("{main} -w -t nat -D {hook} -j UT_{hook}"),
            format!("{main} -w -t nat -F UT_{hook}"),
            format!("{main} -w -t nat -X UT_{hook}"),
        ]
        .into()
    }

    /// The command that finds no chain under `hook`.
    fn absent(main: &str, hook: &str) -> String {
        format!("{main} -w -t nat -S UT_{hook}")
    }

    fn lines(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// What the node-mode rules of [`unit`] leave in a table of
    /// [`FakeHost::new`].
    fn node_installed() -> Vec<String> {
        lines(&[
            ":UT_PREROUTING",
            "-A PREROUTING -j UT_PREROUTING",
            &format!("-A PREROUTING {FOREIGN}"),
            "-A UT_PREROUTING -i veth+ -p tcp -m multiport --dports 80,8080 -j REDIRECT --to-ports 15001",
        ])
    }

    fn untouched() -> Vec<String> {
        vec![format!("-A PREROUTING {FOREIGN}")]
    }

    #[test]
    fn install_in_node_mode_runs_each_family_in_turn() {
        let host = FakeHost::new(true);
        let installed = install_unit(ProxyMode::Node, &host);
        assert_eq!(
            host.take_calls(),
            lines(&[
                // Chains of the other mode, from a run in host mode: none.
                "iptables -w -t nat -S UT_OUTPUT",
                "ip6tables -w -t nat -S UT_OUTPUT",
                "iptables-restore -w --noflush",
                "iptables -w -t nat -C PREROUTING -j UT_PREROUTING",
                "iptables -w -t nat -I PREROUTING 1 -j UT_PREROUTING",
                "ip6tables-restore -w --noflush",
                "ip6tables -w -t nat -C PREROUTING -j UT_PREROUTING",
                "ip6tables -w -t nat -I PREROUTING 1 -j UT_PREROUTING",
            ])
        );
        let file = "*nat\n:UT_PREROUTING - [0:0]\n\
                    -A UT_PREROUTING -i veth+ -p tcp -m multiport --dports 80,8080 -j REDIRECT --to-ports 15001\n\
                    COMMIT\n";
        assert_eq!(host.inputs(), [file, file]);
        // The jump comes first, ahead of the rule already there.
        assert_eq!(host.saved("iptables"), node_installed());
        assert_eq!(host.saved("ip6tables"), node_installed());
        std::mem::forget(installed);
    }

    #[test]
    fn install_in_host_mode_with_legacy_and_no_ipv6_kernel() {
        let host = FakeHost::new(false);
        let r = RedirectRules {
            backend: Backend::Legacy,
            ..unit(ProxyMode::Host)
        };
        let installed = r.install_with(host.clone()).expect("install");
        assert_eq!(
            host.take_calls(),
            lines(&[
                "iptables-legacy -w -t nat -S UT_PREROUTING",
                "iptables-legacy-restore -w --noflush",
                "iptables-legacy -w -t nat -C OUTPUT -j UT_OUTPUT",
                "iptables-legacy -w -t nat -I OUTPUT 1 -j UT_OUTPUT",
            ])
        );
        assert_eq!(
            host.inputs(),
            ["*nat\n:UT_OUTPUT - [0:0]\n\
              -A UT_OUTPUT -m mark --mark 0x1e7 -j RETURN\n\
              -A UT_OUTPUT -p tcp -m multiport --dports 80,8080 -j REDIRECT --to-ports 15001\n\
              COMMIT\n"]
        );
        assert_eq!(
            host.saved("iptables-legacy"),
            lines(&[
                ":UT_OUTPUT",
                "-A OUTPUT -j UT_OUTPUT",
                "-A UT_OUTPUT -m mark --mark 0x1e7 -j RETURN",
                "-A UT_OUTPUT -p tcp -m multiport --dports 80,8080 -j REDIRECT --to-ports 15001",
            ])
        );
        installed.remove().expect("remove");
        let mut removal_calls = vec![absent("iptables-legacy", "PREROUTING")];
        removal_calls.extend(removal("iptables-legacy", "OUTPUT"));
        assert_eq!(host.take_calls(), removal_calls);
        assert_eq!(host.saved("iptables-legacy"), Vec::<String>::new());
    }

    #[test]
    fn without_ipv6_no_ip6tables_runs() {
        // IPv6 turned off in the settings, on a kernel that has it.
        let host = FakeHost::new(true);
        let r = RedirectRules {
            ipv6: false,
            ..unit(ProxyMode::Node)
        };
        drop(r.install_with(host.clone()).expect("install"));
        let mut expected = lines(&[
            "iptables -w -t nat -S UT_OUTPUT",
            "iptables-restore -w --noflush",
            "iptables -w -t nat -C PREROUTING -j UT_PREROUTING",
            "iptables -w -t nat -I PREROUTING 1 -j UT_PREROUTING",
        ]);
        expected.extend(removal("iptables", "PREROUTING"));
        expected.push(absent("iptables", "OUTPUT"));
        assert_eq!(host.take_calls(), expected);
        assert_eq!(host.saved("ip6tables"), untouched());

        // Only IPv4 blocks included: IPv6 is managed, so a leftover IPv6
        // chain goes, but nothing of IPv6 is installed.
        let host = FakeHost::new(true);
        host.add("ip6tables", "UT_PREROUTING", "-j RETURN");
        host.add("ip6tables", "PREROUTING", "-j UT_PREROUTING");
        let r = RedirectRules {
            include_cidrs: vec![cidr("10.0.0.0/8")],
            ..unit(ProxyMode::Node)
        };
        let installed = r.install_with(host.clone()).expect("install");
        let calls = host.take_calls();
        let mut expected = vec![absent("iptables", "OUTPUT")];
        expected.extend(removal("ip6tables", "PREROUTING"));
        expected.push(absent("ip6tables", "OUTPUT"));
        expected.extend(lines(&[
            "iptables-restore -w --noflush",
            "iptables -w -t nat -C PREROUTING -j UT_PREROUTING",
            "iptables -w -t nat -I PREROUTING 1 -j UT_PREROUTING",
        ]));
        assert_eq!(calls, expected);
        assert_eq!(host.saved("ip6tables"), untouched());
        std::mem::forget(installed);
    }

    #[test]
    fn removal_undoes_install_in_reverse_order() {
        let mut expected = removal("ip6tables", "PREROUTING");
        expected.push(absent("ip6tables", "OUTPUT"));
        expected.extend(removal("iptables", "PREROUTING"));
        expected.push(absent("iptables", "OUTPUT"));

        // Removed explicitly.
        let host = FakeHost::new(true);
        let installed = install_unit(ProxyMode::Node, &host);
        host.take_calls();
        installed.remove().expect("remove");
        assert_eq!(host.take_calls(), expected);
        assert_eq!(host.saved("iptables"), untouched());
        assert_eq!(host.saved("ip6tables"), untouched());

        // Dropped: the same.
        let host = FakeHost::new(true);
        let installed = install_unit(ProxyMode::Node, &host);
        host.take_calls();
        drop(installed);
        assert_eq!(host.take_calls(), expected);
        assert_eq!(host.saved("iptables"), untouched());
        assert_eq!(host.saved("ip6tables"), untouched());
    }

    #[test]
    fn stop_redirecting_runs_nothing_and_keeps_the_rules() {
        let host = FakeHost::new(true);
        let installed = install_unit(ProxyMode::Node, &host);
        host.take_calls();
        installed.stop_redirecting();
        assert_eq!(host.take_calls(), Vec::<String>::new());
        assert_eq!(host.saved("iptables"), node_installed());
        assert_eq!(host.saved("ip6tables"), node_installed());
        // Removal is still the guard's to do.
        drop(installed);
        assert_eq!(host.saved("iptables"), untouched());
        assert_eq!(host.saved("ip6tables"), untouched());
    }

    #[test]
    fn reinstalling_over_leftovers_leaves_one_copy() {
        let r = unit(ProxyMode::Node);
        // A previous run killed with its rules in place.
        let host = FakeHost::new(true);
        std::mem::forget(r.install_with(host.clone()).expect("install"));
        host.take_calls();

        // Installing again, without removal: the chain is refilled, the
        // jump is found and not added again.
        let again = r.install_with(host.clone()).expect("install again");
        assert_eq!(
            host.take_calls(),
            lines(&[
                "iptables -w -t nat -S UT_OUTPUT",
                "ip6tables -w -t nat -S UT_OUTPUT",
                "iptables-restore -w --noflush",
                "iptables -w -t nat -C PREROUTING -j UT_PREROUTING",
                "ip6tables-restore -w --noflush",
                "ip6tables -w -t nat -C PREROUTING -j UT_PREROUTING",
            ])
        );
        assert_eq!(host.saved("iptables"), node_installed());
        assert_eq!(host.saved("ip6tables"), node_installed());
        std::mem::forget(again);

        // What the running proxy does: leftovers removed first, then a
        // fresh install. Two copies of a jump (an older run's) both go.
        host.add("iptables", "PREROUTING", "-j UT_PREROUTING");
        r.remove_leftovers_with(&*host).expect("remove leftovers");
        let installed = r.install_with(host.clone()).expect("install");
        let mut expected = removal("ip6tables", "PREROUTING");
        expected.push(absent("ip6tables", "OUTPUT"));
        let mut v4 = removal("iptables", "PREROUTING");
        v4.insert(
            3,
            "iptables -w -t nat -D PREROUTING -j UT_PREROUTING".into(),
        );
        expected.extend(v4);
        expected.push(absent("iptables", "OUTPUT"));
        expected.extend(lines(&[
            "iptables -w -t nat -S UT_OUTPUT",
            "ip6tables -w -t nat -S UT_OUTPUT",
            "iptables-restore -w --noflush",
            "iptables -w -t nat -C PREROUTING -j UT_PREROUTING",
            "iptables -w -t nat -I PREROUTING 1 -j UT_PREROUTING",
            "ip6tables-restore -w --noflush",
            "ip6tables -w -t nat -C PREROUTING -j UT_PREROUTING",
            "ip6tables -w -t nat -I PREROUTING 1 -j UT_PREROUTING",
        ]));
        assert_eq!(host.take_calls(), expected);
        assert_eq!(host.saved("iptables"), node_installed());
        assert_eq!(host.saved("ip6tables"), node_installed());

        // A restart in the other mode: the host-mode chains go first.
        std::mem::forget(installed);
        let host_mode = unit(ProxyMode::Host);
        let installed = host_mode.install_with(host.clone()).expect("install");
        let calls = host.take_calls();
        assert_eq!(calls[..5], removal("iptables", "PREROUTING")[..]);
        assert_eq!(calls[5..10], removal("ip6tables", "PREROUTING")[..]);
        assert_eq!(calls.len(), 10 + 6, "{calls:#?}");
        for family in ["iptables", "ip6tables"] {
            let saved = host.saved(family);
            assert_eq!(saved[..2], lines(&[":UT_OUTPUT", "-A OUTPUT -j UT_OUTPUT"]));
            assert!(
                saved.iter().all(|l| !l.contains("UT_PREROUTING")),
                "{saved:#?}"
            );
        }
        drop(installed);
        assert_eq!(host.saved("iptables"), untouched());
        assert_eq!(host.saved("ip6tables"), untouched());
    }

    #[test]
    fn a_failed_install_names_the_command_and_leaves_nothing() {
        // The IPv6 jump fails, after the IPv4 rules and the IPv6 chain are in.
        let host = FakeHost::new(true);
        let insert = "ip6tables -w -t nat -I PREROUTING 1 -j UT_PREROUTING";
        host.fail(insert, 4, "ip6tables: Resource temporarily unavailable.");
        let e = unit(ProxyMode::Node)
            .install_with(host.clone())
            .expect_err("the insert fails");
        assert_eq!(
            e.to_string(),
            format!(
                "`{insert}` failed (exit status 4): ip6tables: Resource temporarily unavailable."
            )
        );
        let calls = host.take_calls();
        let failed_at = calls.iter().position(|c| c == insert).expect("ran");
        // Then everything already installed is removed again.
        let mut expected = lines(&[
            "ip6tables -w -t nat -S UT_PREROUTING",
            "ip6tables -w -t nat -S PREROUTING",
            "ip6tables -w -t nat -F UT_PREROUTING",
            "ip6tables -w -t nat -X UT_PREROUTING",
        ]);
        expected.push(absent("ip6tables", "OUTPUT"));
        expected.extend(removal("iptables", "PREROUTING"));
        expected.push(absent("iptables", "OUTPUT"));
        assert_eq!(calls[failed_at + 1..], expected[..]);
        assert_eq!(host.saved("iptables"), untouched());
        assert_eq!(host.saved("ip6tables"), untouched());

        // A restore file the kernel refuses: the error shows it, and the
        // other family is not tried.
        let host = FakeHost::new(true);
        host.fail(
            "iptables-restore -w --noflush",
            1,
            "iptables-restore: line 3 failed",
        );
        let e = unit(ProxyMode::Node)
            .install_with(host.clone())
            .expect_err("the restore fails");
        let text = e.to_string();
        assert!(
            text.starts_with(
                "`iptables-restore -w --noflush` failed (exit status 1): iptables-restore: line 3 failed\n\
                 input was:\n*nat\n:UT_PREROUTING - [0:0]\n"
            ),
            "{text}"
        );
        let calls = host.calls();
        assert!(
            !calls.iter().any(|c| c.starts_with("ip6tables-restore")),
            "{calls:#?}"
        );
        assert_eq!(host.saved("iptables"), untouched());
        assert_eq!(host.saved("ip6tables"), untouched());
    }

    #[test]
    fn a_failed_removal_names_the_command_and_removes_the_rest() {
        let host = FakeHost::new(true);
        let installed = install_unit(ProxyMode::Node, &host);
        let delete = "ip6tables -w -t nat -X UT_PREROUTING";
        host.fail(delete, 1, "ip6tables: Device or resource busy.");
        let e = installed.remove().expect_err("the delete fails");
        assert_eq!(
            e.to_string(),
            format!("`{delete}` failed (exit status 1): ip6tables: Device or resource busy.")
        );
        // Left: the IPv6 chain, empty and jumped to by nothing, so that
        // nothing is redirected any more. IPv4 is gone all the same.
        assert_eq!(
            host.saved("ip6tables"),
            lines(&[":UT_PREROUTING", &format!("-A PREROUTING {FOREIGN}")])
        );
        assert_eq!(host.saved("iptables"), untouched());

        // A failed install whose clean-up fails too returns the install's
        // error (the clean-up's is logged) and leaves the same.
        let host = FakeHost::new(true);
        let insert = "ip6tables -w -t nat -I PREROUTING 1 -j UT_PREROUTING";
        host.fail(insert, 4, "ip6tables: Resource temporarily unavailable.");
        host.fail(delete, 1, "ip6tables: Device or resource busy.");
        let e = unit(ProxyMode::Node)
            .install_with(host.clone())
            .expect_err("the insert fails");
        assert!(e.to_string().starts_with(&format!("`{insert}`")), "{e}");
        assert_eq!(
            host.saved("ip6tables"),
            lines(&[":UT_PREROUTING", &format!("-A PREROUTING {FOREIGN}")])
        );
        assert_eq!(host.saved("iptables"), untouched());
    }

    #[test]
    fn backend_detection_asks_the_runner() {
        let host = |version: &str, legacy_nat: bool| {
            let mut host = Arc::into_inner(FakeHost::new(false)).expect("one owner");
            host.version = version.into();
            host.legacy_nat = legacy_nat;
            for _ in 0..3 {
                host.add("iptables-legacy", "PREROUTING", "-j KUBE-SERVICES");
            }
            host.add("iptables-nft", "PREROUTING", "-j CNI-HOSTPORT-DNAT");
            host
        };
        // kube-proxy in legacy mode on an nft system: its back end wins.
        let nft_system = host("iptables v1.8.9 (nf_tables)", true);
        assert_eq!(Backend::detect_with(&nft_system), Backend::Legacy);
        assert_eq!(
            nft_system.calls(),
            [
                "iptables --version",
                "iptables-legacy-save -t nat",
                "iptables-nft-save -t nat"
            ]
        );
        assert!(!Backend::System.is_legacy_with(&nft_system));
        // The legacy table not loaded: not counted, and not loaded by
        // asking.
        let unloaded = host("iptables v1.8.9 (nf_tables)", false);
        assert_eq!(Backend::detect_with(&unloaded), Backend::System);
        assert_eq!(
            unloaded.calls(),
            ["iptables --version", "iptables-nft-save -t nat"]
        );
        // A legacy system whose rules are mostly nft's.
        let legacy_system = host("iptables v1.8.9 (legacy)", true);
        legacy_system.add("iptables-nft", "PREROUTING", "-j A");
        legacy_system.add("iptables-nft", "PREROUTING", "-j B");
        legacy_system.add("iptables-nft", "PREROUTING", "-j C");
        assert_eq!(Backend::detect_with(&legacy_system), Backend::Nft);
        assert!(Backend::System.is_legacy_with(&legacy_system));
        // No iptables at all: the system's, whose absence install reports.
        let broken = host("", true);
        broken.fail("iptables --version", 127, "not found");
        assert_eq!(Backend::detect_with(&broken), Backend::System);
        assert_eq!(broken.calls(), ["iptables --version"]);
    }
}
