//! A memory cgroup of its own for a test's child process, so that a test
//! can have the kernel kill it for exceeding its memory limit, as a
//! container's limit does. cgroup v2 where its memory controller is
//! available (the VMs mount cgroup2), else the v1 memory hierarchy (the
//! host).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A memory cgroup, removed when dropped (once its processes are gone).
#[derive(Debug)]
pub struct MemoryCgroup {
    path: PathBuf,
    v2: bool,
}

const V2_ROOT: &str = "/sys/fs/cgroup";
const V1_MEMORY: &str = "/sys/fs/cgroup/memory";

impl MemoryCgroup {
    /// Creates `tta-mem-<pid>-<n>` limited to `limit_bytes`, without swap.
    pub fn new(limit_bytes: u64) -> io::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tta-mem-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let v2 = std::fs::read_to_string(Path::new(V2_ROOT).join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let path = if v2 {
            // Children get the controller only when the parent passes it on.
            let control = Path::new(V2_ROOT).join("cgroup.subtree_control");
            if !std::fs::read_to_string(&control)?.contains("memory") {
                std::fs::write(&control, "+memory")?;
            }
            Path::new(V2_ROOT).join(name)
        } else {
            Path::new(V1_MEMORY).join(name)
        };
        std::fs::create_dir(&path)?;
        let cgroup = Self { path, v2 };
        if v2 {
            cgroup.write("memory.max", &limit_bytes.to_string())?;
            // Absent without swap support; nothing to limit then.
            let _ = cgroup.write("memory.swap.max", "0");
        } else {
            cgroup.write("memory.limit_in_bytes", &limit_bytes.to_string())?;
        }
        Ok(cgroup)
    }

    /// Moves process `pid` into the cgroup.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// How many processes the kernel killed for exceeding the limit.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.path.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    fn write(&self, file: &str, value: &str) -> io::Result<()> {
        std::fs::write(self.path.join(file), value)
            .map_err(|e| io::Error::new(e.kind(), format!("{}/{file}: {e}", self.path.display())))
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // A killed process leaves its cgroup a moment after it is reaped.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("cgroup {} left behind", self.path.display());
    }
}
