//! Host tools and guest programs that vm-test takes from Debian packages.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use super::run;

/// `(file, package)`: each package is installed when none of its files'
/// usual locations exists. The first path is the merged-/usr location
/// (Debian 12); the second covers hosts where /bin is not a link to /usr/bin.
const REQUIREMENTS: &[(&[&str], &str)] = &[
    (&["/usr/bin/qemu-system-x86_64"], "qemu-system-x86"),
    (&["/usr/bin/cpio", "/bin/cpio"], "cpio"),
    (&["/usr/bin/xz", "/bin/xz"], "xz-utils"),
    (&["/usr/sbin/depmod", "/sbin/depmod"], "kmod"),
    (&["/usr/bin/dpkg-deb"], "dpkg"),
    // Guest programs: copied from the host into the initramfs.
    (&["/usr/bin/python3"], "python3"),
    (&["/usr/bin/curl"], "curl"),
    (&["/usr/sbin/nginx"], "nginx"),
    (&["/usr/sbin/ip", "/sbin/ip", "/bin/ip"], "iproute2"),
    (&["/usr/sbin/iptables", "/sbin/iptables"], "iptables"),
];

/// Installs, with apt-get, whatever vm-test needs that the host lacks.
/// Does nothing (and runs no apt command) when everything is present.
pub fn ensure_packages() -> Result<()> {
    let mut missing: Vec<&str> = REQUIREMENTS
        .iter()
        .filter(|(paths, _)| !paths.iter().any(|path| Path::new(path).exists()))
        .map(|(_, package)| *package)
        .collect();
    // Debian's plain `busybox` package also installs /bin/busybox, but it is
    // dynamically linked; the guest needs the static one.
    if !package_installed("busybox-static")? {
        missing.push("busybox-static");
    }
    if missing.is_empty() {
        return Ok(());
    }
    println!("vm-test: installing {}", missing.join(" "));
    if apt_install(&missing).is_err() {
        // Fresh CI images often have no package lists yet.
        run(Command::new("apt-get").arg("update"))?;
        apt_install(&missing)?;
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn package_installed(package: &str) -> Result<bool> {
    // dpkg-query exits non-zero for packages it has never heard of, which
    // simply means "not installed" here.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output()
        .context("running dpkg-query (is this a Debian host?)")?;
    Ok(output.status.success() && output.stdout == b"installed")
}

/// The first of `candidates` that exists on the host.
pub fn find_file(candidates: &[&'static str]) -> Result<&'static Path> {
    candidates
        .iter()
        .map(|candidate| Path::new(*candidate))
        .find(|path| path.exists())
        .with_context(|| format!("none of {candidates:?} exists on the host"))
}
