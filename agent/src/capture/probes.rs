//! Loading the kernel programs, configuring them, and attaching them to the
//! syscall tracepoints. The only part of the capture that needs a kernel.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use agent_common::{CaptureConfig, MAX_MESSAGE_BYTES, PythonProcess, counter};
use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, UProbe, uprobe::UProbeLinkId, uprobe::UProbeScope},
};

use super::kernel_offsets;
use super::python::{self, Interpreter, NotWatched};

/// The uprobe programs of Python watching: the copy program runs when
/// `python::COPY_FUNCTION` returns, the enter program when
/// `python::ENTER_FUNCTION` is called.
pub const PYTHON_PROGRAMS: [&str; 2] = ["python_context_copy", "python_context_enter"];

/// Python processes watched at most at once.
const MAX_PYTHON_PROCESSES: usize = 4096;

/// The kernel programs, built by agent/build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// Every tracepoint the capture attaches to, all in the `syscalls` category;
/// each program is named after its tracepoint. Receives have no enter
/// probe: their exit probe reads the arguments from the saved registers.
pub const TRACEPOINTS: &[&str] = &[
    "sys_enter_write",
    "sys_exit_write",
    "sys_enter_writev",
    "sys_exit_writev",
    "sys_enter_sendto",
    "sys_exit_sendto",
    "sys_enter_sendmsg",
    "sys_exit_sendmsg",
    "sys_exit_read",
    "sys_exit_readv",
    "sys_exit_recvfrom",
    "sys_exit_recvmsg",
    "sys_enter_sendfile64",
    "sys_exit_sendfile64",
    "sys_enter_connect",
    "sys_exit_connect",
    "sys_exit_accept",
    "sys_exit_accept4",
    "sys_enter_close",
];

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Settings of the kernel side.
#[derive(Clone, Debug)]
pub struct ProbeSettings {
    /// Bytes copied per message (up to 16 KiB).
    pub max_message_bytes: u32,
    /// Ring buffer size in bytes: a power of two, multiple of the page size.
    pub ring_buffer_bytes: u32,
    /// Destination ports whose client requests wake the reader at once: the
    /// proxy's, whose wait for the agent's view must not grow. Other
    /// records wake it by the [`WAKEUP_BYTES`] threshold or its timer.
    pub wake_ports: Vec<u16>,
}

/// The reader is woken once each time this many more bytes wait in the ring
/// (see `wakeup_flags` in the kernel programs): a few hundred records, well
/// under the ring's size.
pub const WAKEUP_BYTES: u32 = 1 << 20;

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: MAX_MESSAGE_BYTES,
            ring_buffer_bytes: 8 << 20,
            wake_ports: Vec::new(),
        }
    }
}

/// Smallest ring buffer the kernel accepts: one page.
pub const MIN_RING_BUFFER_BYTES: u32 = 4096;

/// A [`ProbeSettings`] value the kernel side cannot honour: which field,
/// and why (the reason names the value given).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeSettingsError {
    /// `max_message_bytes` is 0 or above [`MAX_MESSAGE_BYTES`].
    #[error("max_message_bytes: {0}")]
    MaxMessageBytes(String),
    /// `ring_buffer_bytes` is not a power of two of at least
    /// [`MIN_RING_BUFFER_BYTES`].
    #[error("ring_buffer_bytes: {0}")]
    RingBufferBytes(String),
}

impl ProbeSettingsError {
    /// Why the field's value was refused, without the field's name.
    pub fn reason(&self) -> &str {
        match self {
            Self::MaxMessageBytes(reason) | Self::RingBufferBytes(reason) => reason,
        }
    }
}

impl ProbeSettings {
    /// Rejects values the kernel side cannot honour.
    pub fn validate(&self) -> Result<(), ProbeSettingsError> {
        let n = self.max_message_bytes;
        if !(1..=MAX_MESSAGE_BYTES).contains(&n) {
            return Err(ProbeSettingsError::MaxMessageBytes(format!(
                "must be between 1 and {MAX_MESSAGE_BYTES}, got {n}"
            )));
        }
        let n = self.ring_buffer_bytes;
        if !n.is_power_of_two() || n < MIN_RING_BUFFER_BYTES {
            return Err(ProbeSettingsError::RingBufferBytes(format!(
                "must be a power of two of at least {MIN_RING_BUFFER_BYTES}, got {n}"
            )));
        }
        Ok(())
    }
}

/// Makes client requests to `ports` wake the reader at once, in addition to
/// those already set.
fn set_wake_ports(ebpf: &mut Ebpf, ports: &[u16]) -> Result<()> {
    let mut map: Array<_, u64> = Array::try_from(
        ebpf.map_mut("WAKE_PORTS")
            .context("WAKE_PORTS map missing")?,
    )?;
    for (word, bits) in wake_port_words(ports) {
        let before = map.get(&word, 0).unwrap_or(0);
        map.set(word, &(before | bits), 0)
            .context("writing the WAKE_PORTS map")?;
    }
    Ok(())
}

/// The non-zero words of the `WAKE_PORTS` bitmap for `ports`.
fn wake_port_words(ports: &[u16]) -> Vec<(u32, u64)> {
    let mut words: Vec<(u32, u64)> = Vec::new();
    for &port in ports {
        let (word, bit) = (port as u32 / 64, 1u64 << (port % 64));
        match words.iter_mut().find(|(w, _)| *w == word) {
            Some((_, bits)) => *bits |= bit,
            None => words.push((word, bit)),
        }
    }
    words
}

/// Loaded and attached programs. Dropping this detaches them.
pub struct Probes {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    python: PythonWatch,
}

/// An interpreter file, by device and inode (as the kernel places uprobes).
type ObjectKey = (u64, u64);

/// The uprobes on one interpreter file, and the watched processes using it.
struct WatchedObject {
    links: Vec<(&'static str, UProbeLinkId)>,
    pids: HashSet<u32>,
}

/// The Python processes whose contexts the kernel reads.
///
/// The uprobes are attached once per interpreter file, for every process
/// (the programs skip the processes not in `PYTHON_PROCESSES`): kernels
/// that implement a per-process uprobe as a filter on one shared trace
/// event (6.1) run every attached program on each hit, so one attachment
/// per watched process would report each copy once per such process.
struct PythonWatch {
    /// The kernel's table of watched processes; None when the uprobe
    /// programs could not be loaded (watching is then off).
    processes: Option<BpfHashMap<MapData, u32, PythonProcess>>,
    /// Each watched process: its start time (a pid reused by a later
    /// process is another process) and its interpreter file.
    watched: HashMap<u32, (Option<u64>, ObjectKey)>,
    objects: HashMap<ObjectKey, WatchedObject>,
    files: python::InterpreterFiles,
}

/// Where tracefs is mounted, mounting it first if it is not (as on this
/// project's build machines, where nothing mounts it at boot).
pub fn ensure_tracefs() -> Result<&'static str> {
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(dir);
        }
    }
    let target = std::ffi::CString::new(TRACEFS).expect("no NUL");
    let fstype = c"tracefs";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!("tracefs is not mounted and mounting it at {TRACEFS} failed: {err}");
    }
    Ok(TRACEFS)
}

/// Fails with the list of tracepoints this kernel lacks.
fn check_tracepoints(tracefs: &str) -> Result<()> {
    let missing: Vec<&str> = TRACEPOINTS
        .iter()
        .copied()
        .filter(|tp| !Path::new(tracefs).join("events/syscalls").join(tp).is_dir())
        .collect();
    if !missing.is_empty() {
        bail!(
            "this kernel lacks the syscall tracepoints {} (needs CONFIG_FTRACE_SYSCALLS)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Whether the process has the privileges to load BPF programs.
pub fn ensure_privileged() -> Result<()> {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the agent must run as root (it loads eBPF programs and attaches to syscall tracepoints)"
        );
    }
    Ok(())
}

impl Probes {
    /// Loads, configures and attaches every program. Returns the probes and
    /// the ring buffer their records arrive in.
    pub fn attach(settings: ProbeSettings) -> Result<(Self, RingBuf<MapData>)> {
        settings.validate()?;
        if PROGRAMS.is_empty() {
            bail!(
                "this agent was built without its kernel programs (AYA_BUILD_SKIP was set): build it again without"
            );
        }
        if !cfg!(target_arch = "x86_64") {
            bail!(
                "the capture reads syscall arguments from x86_64 registers: this architecture is not supported"
            );
        }
        ensure_privileged()?;
        let tracefs = ensure_tracefs()?;
        check_tracepoints(tracefs)?;
        let offsets = kernel_offsets::from_running_kernel()?;
        raise_memlock_limit();

        // One scratch record per possible CPU (the programs index it by CPU).
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("EVENTS", settings.ring_buffer_bytes)
            .map_max_entries("SCRATCH", cpus.get())
            .load(PROGRAMS)
            .context(
                "loading the eBPF programs failed (is BPF enabled, and are we allowed to use it?)",
            )?;

        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_kernel_log_reader(logger),
            Err(e) => log::debug!("kernel-side logging unavailable: {e}"),
        }

        let config = CaptureConfig {
            agent_pid: std::process::id(),
            max_message_bytes: settings.max_message_bytes,
            offsets,
            wakeup_bytes: WAKEUP_BYTES.min(settings.ring_buffer_bytes / 4),
            _pad: 0,
        };
        let mut config_map: Array<_, CaptureConfig> =
            Array::try_from(ebpf.map_mut("CONFIG").context("CONFIG map missing")?)?;
        config_map
            .set(0, &config, 0)
            .context("writing the CONFIG map")?;
        set_wake_ports(&mut ebpf, &settings.wake_ports)?;

        for name in TRACEPOINTS {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("the kernel verifier rejected {name}"))?;
            program
                .attach("syscalls", name)
                .with_context(|| format!("attaching to tracepoint syscalls/{name}"))?;
        }

        let python = match load_python_programs(&mut ebpf) {
            Ok(processes) => PythonWatch {
                processes: Some(processes),
                watched: HashMap::new(),
                objects: HashMap::new(),
                files: python::InterpreterFiles::new(),
            },
            Err(e) => {
                eprintln!(
                    "agent: Python contexts will not be read (asyncio calls get no parent): {e:#}"
                );
                PythonWatch {
                    processes: None,
                    watched: HashMap::new(),
                    objects: HashMap::new(),
                    files: python::InterpreterFiles::new(),
                }
            }
        };
        let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map missing")?)?;
        let counters =
            PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("COUNTERS map missing")?)?;
        Ok((
            Self {
                ebpf,
                counters,
                python,
            },
            events,
        ))
    }

    /// Client requests to `ports` wake the reader at once from now on.
    pub fn wake_on_requests_to(&mut self, ports: &[u16]) -> Result<()> {
        set_wake_ports(&mut self.ebpf, ports)
    }

    /// Starts reading the contexts of process `pid` if it is a Python
    /// interpreter this agent knows how to read. Already watched: Ok(None).
    pub fn watch_python(&mut self, pid: u32) -> Result<Option<Interpreter>, NotWatched> {
        if self.python.processes.is_none() {
            return Err(NotWatched::Unreadable("uprobes unavailable".into()));
        }
        let started = python::start_time(Path::new("/proc"), pid);
        match self.python.watched.get(&pid) {
            Some((watched_start, _)) if *watched_start == started => return Ok(None),
            Some(_) => self.unwatch_python(pid),
            None => {}
        }
        if self.python.watched.len() >= MAX_PYTHON_PROCESSES {
            return Err(NotWatched::Unreadable(
                "too many Python processes watched".into(),
            ));
        }
        let interpreter = python::locate(Path::new("/proc"), pid, &mut self.python.files)?;
        let meta = std::fs::metadata(&interpreter.object).map_err(|e| {
            NotWatched::Unreadable(format!("{}: {e}", interpreter.object.display()))
        })?;
        let object = (meta.dev(), meta.ino());
        if !self.python.objects.contains_key(&object) {
            let links = self
                .attach_python_programs(&interpreter)
                .map_err(NotWatched::Unreadable)?;
            self.python.objects.insert(
                object,
                WatchedObject {
                    links,
                    pids: HashSet::new(),
                },
            );
        }
        if let Some(watched) = self.python.objects.get_mut(&object) {
            watched.pids.insert(pid);
        }
        self.python.watched.insert(pid, (started, object));
        self.python
            .processes
            .as_mut()
            .ok_or_else(|| NotWatched::Unreadable("uprobes unavailable".into()))?
            .insert(&pid, &interpreter.kernel, 0)
            .map_err(|e| {
                self.unwatch_python(pid);
                NotWatched::Unreadable(format!("PYTHON_PROCESSES: {e}"))
            })?;
        Ok(Some(interpreter))
    }

    /// Attaches both uprobe programs to `interpreter`'s file, for every
    /// process; all or none.
    fn attach_python_programs(
        &mut self,
        interpreter: &Interpreter,
    ) -> Result<Vec<(&'static str, UProbeLinkId)>, String> {
        let mut links = Vec::new();
        let offsets = [interpreter.copy_offset, interpreter.enter_offset];
        for (name, offset) in PYTHON_PROGRAMS.into_iter().zip(offsets) {
            let attached = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| format!("program {name} missing"))
                .and_then(|p| <&mut UProbe>::try_from(p).map_err(|e| e.to_string()))
                .and_then(|p| {
                    p.attach([offset], &interpreter.object, UProbeScope::AllProcesses)
                        .map_err(|e| format!("attaching {name}: {e:#}"))
                });
            match attached {
                Ok(link) => links.push((name, link)),
                Err(e) => {
                    self.detach_python_programs(links);
                    return Err(e);
                }
            }
        }
        Ok(links)
    }

    fn detach_python_programs(&mut self, links: Vec<(&'static str, UProbeLinkId)>) {
        for (name, link) in links {
            if let Some(program) = self.ebpf.program_mut(name)
                && let Ok(program) = <&mut UProbe>::try_from(program)
            {
                let _ = program.detach(link);
            }
        }
    }

    /// Stops watching `pid` (it exited); the uprobes go with the last
    /// watched process using their file.
    pub fn unwatch_python(&mut self, pid: u32) {
        let Some((_, object)) = self.python.watched.remove(&pid) else {
            return;
        };
        if let Some(processes) = self.python.processes.as_mut() {
            let _ = processes.remove(&pid);
        }
        let unused = self.python.objects.get_mut(&object).is_some_and(|watched| {
            watched.pids.remove(&pid);
            watched.pids.is_empty()
        });
        if unused && let Some(watched) = self.python.objects.remove(&object) {
            self.detach_python_programs(watched.links);
        }
    }

    /// Stops watching the Python processes that exited (also those whose
    /// pid a later process was given).
    pub fn forget_exited_python(&mut self) {
        let exited: Vec<u32> = self
            .python
            .watched
            .iter()
            .filter(|(pid, (started, _))| {
                python::start_time(Path::new("/proc"), **pid)
                    .is_none_or(|now| Some(now) != *started)
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in exited {
            self.unwatch_python(pid);
        }
    }

    /// Python processes watched now.
    pub fn python_watched(&self) -> usize {
        self.python.watched.len()
    }

    /// Whether the contexts of process `pid` are read.
    pub fn is_python_watched(&self, pid: u32) -> bool {
        self.python.watched.contains_key(&pid)
    }

    /// The kernel counters, summed over CPUs, by name.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut out = Vec::with_capacity(counter::COUNT as usize);
        for (index, name) in counter::NAMES.iter().enumerate() {
            let per_cpu = self.counters.get(&(index as u32), 0)?;
            out.push((*name, per_cpu.iter().sum()));
        }
        Ok(out)
    }

    /// Number of attached programs.
    pub fn program_count(&self) -> usize {
        self.ebpf.programs().count()
    }
}

/// Loads (without attaching) the Python uprobe programs, and takes the
/// table of watched processes.
fn load_python_programs(ebpf: &mut Ebpf) -> Result<BpfHashMap<MapData, u32, PythonProcess>> {
    for name in PYTHON_PROGRAMS {
        let program: &mut UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("the kernel verifier rejected {name}"))?;
    }
    Ok(BpfHashMap::try_from(
        ebpf.take_map("PYTHON_PROCESSES")
            .context("PYTHON_PROCESSES map missing")?,
    )?)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the
/// cgroup, where raising the limit fails harmlessly.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to a local struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Kernel-side diagnostics are rare (cold paths only): a plain thread
/// sleeps in poll(2) on their ring buffer, woken only when the kernel wrote
/// one (a timed poll woke an idle agent twice a second), so they never
/// compete with the capture for the runtime.
fn spawn_kernel_log_reader(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    use std::os::fd::AsRawFd as _;
    std::thread::Builder::new()
        .name("ebpf-log".into())
        .spawn(move || {
            loop {
                let mut ready = libc::pollfd {
                    fd: logger.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for the duration of the call.
                let polled = unsafe { libc::poll(&mut ready, 1, -1) };
                if polled < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    // Not expected on a ring buffer's fd: fall back to
                    // reading now and then rather than spin or stop.
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                logger.flush();
            }
        })
        .ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_out_of_range_are_rejected_with_the_limit() {
        let too_big = ProbeSettings {
            max_message_bytes: MAX_MESSAGE_BYTES + 1,
            ..Default::default()
        };
        assert_eq!(
            too_big.validate(),
            Err(ProbeSettingsError::MaxMessageBytes(
                "must be between 1 and 16384, got 16385".into()
            ))
        );
        let odd_ring = ProbeSettings {
            ring_buffer_bytes: 5000,
            ..Default::default()
        };
        let e = odd_ring.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "ring_buffer_bytes: must be a power of two of at least 4096, got 5000"
        );
        assert_eq!(
            e.reason(),
            "must be a power of two of at least 4096, got 5000"
        );
        for ring_buffer_bytes in [0, 2048, 4097] {
            let s = ProbeSettings {
                ring_buffer_bytes,
                ..Default::default()
            };
            assert!(s.validate().is_err(), "{ring_buffer_bytes}");
        }
        for ok in [(1, 4096), (MAX_MESSAGE_BYTES, 1 << 31)] {
            let s = ProbeSettings {
                max_message_bytes: ok.0,
                ring_buffer_bytes: ok.1,
                ..Default::default()
            };
            assert_eq!(s.validate(), Ok(()), "{ok:?}");
        }
        assert!(ProbeSettings::default().validate().is_ok());
    }

    #[test]
    fn every_tracepoint_has_a_program_in_the_object() {
        let object = aya_obj::Object::parse(PROGRAMS).unwrap();
        for tp in TRACEPOINTS {
            assert!(object.programs.contains_key(*tp), "no program {tp}");
        }
        for program in PYTHON_PROGRAMS {
            assert!(
                object.programs.contains_key(program),
                "no program {program}"
            );
        }
    }
}
