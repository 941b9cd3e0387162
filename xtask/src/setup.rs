//! `cargo xtask setup`: installs what the project needs on a fresh Debian 12
//! machine. Every step checks first, so a second run costs a few process
//! spawns and no downloads.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{command_output, run};

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
