//! The proxy's lease on its REDIRECT rules (kernel side:
//! `agent-ebpf/src/proxy_guard.rs`).
//!
//! Rules that outlive the proxy would send every new connection to a port
//! nobody listens on. So each REDIRECT rule also matches `-m bpf
//! --object-pinned <pin>`: a socket-filter program that holds only while
//! "alive until", in its map, lies in the future. The running proxy renews
//! the lease every [`RENEW_EVERY`] for [`LEASE`]; however it ends, renewal
//! stops and within one lease the rules let new connections through to
//! their real destination, with nothing left to run. When a proxy starts
//! again it loads a fresh program, pins it in place of the old one and
//! reinstalls the rules, which then follow the new lease.
//!
//! The pin must stay while the rules exist: the kernel resolves the path
//! again whenever a rule is re-validated (iptables-legacy replaces whole
//! tables). It lives on the bpf filesystem at `/sys/fs/bpf`, mounted here if
//! the host has not mounted it (a DaemonSet mounts the host's).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::SocketFilter;

/// The kernel object: one program, one two-slot map.
static GUARD_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-guard"));

/// How long the rules keep redirecting after the last renewal: the most a
/// dead proxy can keep new connections from their destination.
pub const LEASE: Duration = Duration::from_millis(600);

/// How often the running proxy renews the lease. A proxy that misses
/// `LEASE / RENEW_EVERY` renewals in a row (stalled, starved of CPU) lets
/// connections pass untraced meanwhile; they are counted.
pub const RENEW_EVERY: Duration = Duration::from_millis(100);

/// Where bpf objects are pinned.
const BPF_FS: &str = "/sys/fs/bpf";

/// `statfs` magic of the bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why the guard could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The bpf filesystem is neither mounted nor mountable.
    #[error("the bpf filesystem at {BPF_FS} is not mounted and cannot be: {0}")]
    BpfFs(std::io::Error),
    /// Loading or pinning the program failed.
    #[error("the proxy's guard program cannot be loaded: {0}")]
    Load(String),
}

/// The pinned guard program and a handle on its lease.
#[derive(Debug)]
pub struct ProxyGuard {
    lease: Lease,
    pin: PathBuf,
    /// Keeps the program loaded (the pin does too).
    _object: aya::Ebpf,
}

/// A handle on the lease of a [`ProxyGuard`], shared with the task that
/// renews it.
#[derive(Clone, Debug)]
pub struct Lease(Arc<LeaseMaps>);

struct LeaseMaps {
    /// "Alive until", CLOCK_MONOTONIC nanoseconds.
    alive_until: Mutex<Array<MapData, u64>>,
    /// Connections let through after the lease ran out, per CPU.
    passed_expired: PerCpuArray<MapData, u64>,
}

/// The pin path of the guard of the rules whose chains start with `prefix`.
pub fn pin_path(prefix: &str) -> PathBuf {
    Path::new(BPF_FS).join(format!("{}_proxy_guard", prefix.to_ascii_lowercase()))
}

impl ProxyGuard {
    /// Loads a fresh guard, pins it at `pin` (replacing what a previous
    /// run left there) and grants a first lease.
    pub fn load(pin: &Path) -> Result<Self, GuardError> {
        ensure_bpf_fs().map_err(GuardError::BpfFs)?;
        let load = |e: &dyn std::fmt::Display| GuardError::Load(e.to_string());
        if GUARD_OBJECT.is_empty() {
            return Err(load(
                &"this agent was built without its kernel programs (AYA_BUILD_SKIP was set)",
            ));
        }
        let mut object = aya::Ebpf::load(GUARD_OBJECT).map_err(|e| load(&e))?;
        let mut map = |name: &str| {
            object
                .take_map(name)
                .ok_or_else(|| load(&format!("the object has no {name} map")))
        };
        let alive_until = Array::<MapData, u64>::try_from(map("LEASE")?).map_err(|e| load(&e))?;
        let passed_expired =
            PerCpuArray::<MapData, u64>::try_from(map("PASSED_EXPIRED")?).map_err(|e| load(&e))?;
        let program: &mut SocketFilter = object
            .program_mut("proxy_alive")
            .ok_or_else(|| load(&"the object has no proxy_alive program"))?
            .try_into()
            .map_err(|e| load(&e))?;
        program.load().map_err(|e| load(&e))?;
        match std::fs::remove_file(pin) {
            Ok(()) => log::info!("proxy: replacing the guard a previous run pinned"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(load(&format!("removing {}: {e}", pin.display()))),
        }
        program.pin(pin).map_err(|e| load(&e))?;
        let guard = Self {
            lease: Lease(Arc::new(LeaseMaps {
                alive_until: Mutex::new(alive_until),
                passed_expired,
            })),
            pin: pin.to_path_buf(),
            _object: object,
        };
        guard.lease.renew();
        Ok(guard)
    }

    /// Where the program is pinned (what the rules name).
    pub fn pin(&self) -> &Path {
        &self.pin
    }

    /// The lease, to renew from the running proxy.
    pub fn lease(&self) -> Lease {
        self.lease.clone()
    }

    /// Expires the lease and removes the pin: call once the rules are gone.
    pub fn remove(self) {
        self.lease.expire();
        remove_pin(&self.pin);
    }
}

impl Lease {
    /// Extends the lease to [`LEASE`] from now.
    pub fn renew(&self) {
        self.set(crate::clock::monotonic_ns().saturating_add(LEASE.as_nanos() as u64));
    }

    /// Ends the lease now: new connections go to their destination.
    pub fn expire(&self) {
        self.set(0);
    }

    /// Renews the lease from a thread of its own until the returned value is
    /// dropped: for rules installed without a running proxy (an operator's
    /// tool, tests). The running proxy renews from its own runtime instead,
    /// so that its lease ends with its accept loop.
    ///
    /// Renews once before it returns: installing the rules may have taken
    /// longer than a lease (iptables in a slow VM), and the first
    /// connection after this call must not race the thread's first renewal.
    pub fn keep_renewed(&self) -> KeptRenewed {
        self.renew();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lease = self.clone();
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Acquire) {
                lease.renew();
                std::thread::park_timeout(RENEW_EVERY);
            }
        });
        KeptRenewed {
            stop,
            thread: Some(thread),
        }
    }

    /// New connections the rules let pass because the lease had run out.
    pub fn passed_expired(&self) -> u64 {
        self.0
            .passed_expired
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    fn set(&self, alive_until: u64) {
        let mut map = self.0.alive_until.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = map.set(0, &alive_until, 0) {
            // Nothing to do but say so: the lease then runs out, and the
            // rules fail open.
            log::warn!("proxy: cannot write the guard's lease: {e}");
        }
    }
}

/// A thread renewing a lease; dropping it stops the renewal (the lease then
/// runs out by itself).
#[derive(Debug)]
pub struct KeptRenewed {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for KeptRenewed {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for LeaseMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseMaps").finish_non_exhaustive()
    }
}

/// Removes the pin at `pin`, if any (a crashed run's, or one's own once its
/// rules are gone).
pub fn remove_pin(pin: &Path) {
    if let Err(e) = std::fs::remove_file(pin)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        log::warn!("proxy: cannot remove {}: {e}", pin.display());
    }
}

/// Mounts the bpf filesystem at [`BPF_FS`] unless it is there (systemd
/// mounts it at boot; minimal hosts and VMs may not).
fn ensure_bpf_fs() -> std::io::Result<()> {
    let path = CString::new(Path::new(BPF_FS).as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: zeroed statfs is a valid output buffer.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is writable.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    let kind = CString::new("bpf").expect("no NUL");
    let options = CString::new("mode=0700").expect("no NUL");
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let mounted = unsafe {
        libc::mount(
            kind.as_ptr(),
            path.as_ptr(),
            kind.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if mounted != 0 {
        return Err(std::io::Error::last_os_error());
    }
    log::info!("proxy: mounted the bpf filesystem at {BPF_FS}");
    Ok(())
}
