//! Host tools and guest programs that vm-test takes from Debian packages.

use std::path::Path;

use anyhow::{Context, Result};

/// Debian packages vm-test needs: qemu and the initramfs tools on the host,
/// and the programs copied into the guest (the static busybox, not the
/// dynamically linked one of the plain `busybox` package).
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "cpio",
    "xz-utils",
    "kmod",
    "busybox-static",
    "python3",
    "curl",
    "hey",
    "wrk",
    "nginx",
    "iproute2",
    "iptables",
];

/// Installs, with apt-get, whatever vm-test needs that the host lacks.
/// Does nothing (and runs no apt command) when everything is present.
pub fn ensure_packages() -> Result<()> {
    crate::setup::install_apt_packages(PACKAGES)
}

/// The first of `candidates` that exists on the host.
pub fn find_file(candidates: &[&'static str]) -> Result<&'static Path> {
    candidates
        .iter()
        .map(|candidate| Path::new(*candidate))
        .find(|path| path.exists())
        .with_context(|| format!("none of {candidates:?} exists on the host"))
}
