//! `cargo xtask setup`: installs what the project needs on a fresh Debian 12
//! machine. Every step checks first, so a second run costs a few process
//! spawns and no downloads.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::tools::{Package, guest_package, package};
use crate::{command_output, run};

/// What setup installs with apt-get: each package with the programs the
/// project runs from it (see `crate::tools`, which checks the code against
/// this list and the base image's).
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

/// The bpf-linker release whose LLVM matches the pinned rustc.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs whatever is missing.
pub fn setup() -> Result<()> {
    crate::toolchain::install()?;
    install_apt_packages(&crate::tools::setup_package_names())?;
    install_bpf_linker()?;
    Ok(())
}

fn apt_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the packages of `packages` that are not installed yet.
pub fn install_apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !apt_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {} (run `cargo xtask setup` as root, or apt-get install them)",
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn install_bpf_linker() -> Result<()> {
    let current = command_output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if current.trim() == format!("bpf-linker {BPF_LINKER_VERSION}") {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 5 minutes, once)"
    );
    run(crate::toolchain::cargo()
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        // Without this the build looks for libLLVM in /usr/lib64.
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
    .context("installing bpf-linker")
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    command_output(Command::new("id").arg("-u"))
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}
