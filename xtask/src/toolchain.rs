//! The pinned Rust toolchain: the one place that names it.
//!
//! xtask itself builds with whatever toolchain rustup has as its default
//! (there is deliberately no `rust-toolchain.toml` at the workspace root:
//! with `RUSTUP_AUTO_INSTALL=0` rustup refuses to run any cargo command
//! under a pin it has not installed, so `cargo xtask` could not even start
//! to install it). Setup installs the pin, and every cargo command xtask
//! runs goes through [`cargo`], which selects it with `RUSTUP_TOOLCHAIN`.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{command_output, run};

/// aya 0.16 / aya-ebpf 0.3 need rustc >= 1.98; 1.98.0 ships LLVM 22, the
/// LLVM bpf-linker is built against (see `setup`).
pub const CHANNEL: &str = "1.98.0";

/// Components the build, the kernel build (`rust-src` for build-std) and
/// the lint need.
pub const COMPONENTS: &[&str] = &["rust-src", "clippy", "rustfmt"];

/// A `cargo` command on the pinned toolchain. The kernel programs' build
/// (agent/build.rs) reads the same variable, so it uses the same toolchain.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env("RUSTUP_TOOLCHAIN", CHANNEL);
    cmd
}

/// Installs the pinned toolchain and its components if any is missing.
/// Looks first, so that a machine that has them makes no network request.
pub fn install() -> Result<()> {
    let installed = command_output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        CHANNEL,
    ]))
    .unwrap_or_default();
    let has = |component: &str| {
        installed
            .lines()
            .any(|line| line.trim() == component || line.starts_with(&format!("{component}-")))
    };
    if !installed.is_empty() && COMPONENTS.iter().all(|c| has(c)) {
        return Ok(());
    }
    eprintln!("setup: installing the Rust toolchain {CHANNEL}");
    let mut cmd = Command::new("rustup");
    cmd.args(["toolchain", "install", CHANNEL, "--profile", "minimal"]);
    for component in COMPONENTS {
        cmd.args(["--component", component]);
    }
    run(&mut cmd).context("installing the pinned Rust toolchain with rustup")
}
