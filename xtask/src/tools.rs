//! Every program the project's tests, benchmarks and VM image run, and the
//! Debian package each comes from: the one list that `setup` installs, the
//! VM initramfs copies from, and the test below checks the code against.
//!
//! A new machine has only the base image and what `cargo xtask setup`
//! installs. A program installed by hand keeps working on the machine it
//! was installed on (and so in CI, which runs there), which is how a
//! missing install step goes unnoticed: `spawned_programs_come_from_setup`
//! reads the code for every program it spawns and fails when one is in
//! neither list.

/// A Debian package and the programs of it that the project runs.
#[derive(Debug)]
pub struct Package {
    /// The package name, as `apt-get install` takes it.
    pub name: &'static str,
    /// Absolute paths of the programs the project runs from it. A test that
    /// spawns one by bare name is matched on the file name.
    pub programs: &'static [&'static str],
    /// Whether the VM guest gets these programs (copied with their libraries).
    pub in_guest: bool,
}

const fn package(name: &'static str, programs: &'static [&'static str]) -> Package {
    Package {
        name,
        programs,
        in_guest: false,
    }
}

const fn guest_package(name: &'static str, programs: &'static [&'static str]) -> Package {
    Package {
        name,
        programs,
        in_guest: true,
    }
}

/// What `cargo xtask setup` installs with apt-get.
pub const SETUP_PACKAGES: &[Package] = &[
    // bpf-linker 0.13 is built against LLVM 22, the LLVM of rustc 1.98.
    package("llvm-22-dev", &[]),
    package("libpolly-22-dev", &[]),
    package("libzstd-dev", &[]),
    package("zlib1g-dev", &[]),
    // Real servers and clients the tests and benchmarks drive.
    guest_package("nginx", &["/usr/sbin/nginx"]),
    guest_package("curl", &["/usr/bin/curl"]),
    // Debian's interpreter, spawned by absolute path so that host and VM
    // run the same one (pyenv's python3 comes first on PATH here).
    guest_package("python3", &["/usr/bin/python3"]),
    guest_package("wrk", &["/usr/bin/wrk"]),
    package("haproxy", &["/usr/sbin/haproxy"]),
    // Network namespaces, veths and the proxy's rules.
    guest_package("iproute2", &["/usr/sbin/ip"]),
    guest_package(
        "iptables",
        &[
            "/usr/sbin/iptables",
            "/usr/sbin/iptables-save",
            "/usr/sbin/iptables-restore",
            "/usr/sbin/ip6tables",
            "/usr/sbin/ip6tables-save",
            "/usr/sbin/ip6tables-restore",
            "/usr/sbin/iptables-legacy",
            "/usr/sbin/ip6tables-legacy",
            "/usr/sbin/iptables-nft",
            "/usr/sbin/ip6tables-nft",
        ],
    ),
    // Benchmarks: CPU time of a process (xtask/scripts/proxy-ab.sh).
    package("linux-perf", &["/usr/bin/perf"]),
    // VM tests: the emulator, the guest's shell and tools, the initramfs,
    // the kernel modules (decompressed, indexed).
    package("qemu-system-x86", &["/usr/bin/qemu-system-x86_64"]),
    package("busybox-static", &["/usr/bin/busybox"]),
    package("cpio", &["/usr/bin/cpio"]),
    package("xz-utils", &["/usr/bin/xz"]),
    package("zstd", &["/usr/bin/zstd"]),
    package("kmod", &["/usr/sbin/depmod"]),
];

/// What the base image of this machine kind ships and the project relies
/// on without installing: kept short on purpose, essential packages only.
pub const BASE_PACKAGES: &[Package] = &[
    package(
        "coreutils",
        &[
            "/usr/bin/id",
            "/usr/bin/uname",
            "/usr/bin/realpath",
            "/usr/bin/sleep",
            "/usr/bin/seq",
            "/usr/bin/sort",
            "/usr/bin/paste",
            "/usr/bin/tr",
            "/usr/bin/timeout",
            "/usr/bin/nproc",
        ],
    ),
    package("util-linux", &["/usr/bin/taskset", "/usr/bin/setpriv"]),
    package("procps", &["/usr/bin/pgrep"]),
    package("mawk", &["/usr/bin/awk"]),
    package("grep", &["/usr/bin/grep"]),
    package("gzip", &["/usr/bin/gzip"]),
    package("findutils", &["/usr/bin/find"]),
    package("libc-bin", &["/usr/bin/ldd"]),
    package("binutils", &["/usr/bin/strip"]),
    package("dpkg", &["/usr/bin/dpkg-deb", "/usr/bin/dpkg-query"]),
    package("apt", &["/usr/bin/apt-get", "/usr/bin/apt-cache"]),
    // Node.js 20 from the image's nodesource apt source (Debian's own is
    // 18): the event-loop frontend of the link tests.
    package("nodejs", &["/usr/bin/node"]),
];

/// Names of the packages setup makes sure of: its own, and the base
/// image's (a no-op where the image has them, as it should).
pub fn setup_package_names() -> Vec<&'static str> {
    SETUP_PACKAGES
        .iter()
        .chain(BASE_PACKAGES)
        .map(|p| p.name)
        .collect()
}

/// Programs the VM guest gets, by absolute host path.
pub fn guest_programs() -> impl Iterator<Item = &'static str> {
    SETUP_PACKAGES
        .iter()
        .filter(|p| p.in_guest)
        .flat_map(|p| p.programs.iter().copied())
}

#[cfg(test)]
mod tests;
