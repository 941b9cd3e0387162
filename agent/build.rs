//! Builds the kernel programs (`agent-ebpf`) for the BPF target and leaves
//! the object in OUT_DIR, where `capture::loader` embeds it.
//!
//! The pinned toolchain (rust-toolchain.toml) is stable 1.98.0; build-std
//! needs unstable cargo flags, which RUSTC_BOOTSTRAP=1 enables for that
//! nested build only.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-changed=../agent-common/src");
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = toolchain_from_file().unwrap_or_else(|| "1.98.0".to_string());
    let package = Package {
        name: "agent-ebpf",
        root_dir: "../agent-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf(
        [package],
        Toolchain::Custom(Box::leak(toolchain.into_boxed_str())),
    )
}

/// The channel named in rust-toolchain.toml, so there is one place to bump it.
fn toolchain_from_file() -> Option<String> {
    println!("cargo::rerun-if-changed=../rust-toolchain.toml");
    let text = std::fs::read_to_string("../rust-toolchain.toml").ok()?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("channel"))?;
    Some(line.split('"').nth(1)?.to_string())
}
