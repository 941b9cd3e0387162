//! Builds the kernel programs (`agent-ebpf`) for the BPF target and leaves
//! the object in OUT_DIR, where `capture::loader` embeds it.
//!
//! The nested build uses the toolchain this build runs on, as rustup names
//! it in `RUSTUP_TOOLCHAIN` (the pin lives in xtask/src/toolchain.rs, and
//! `cargo xtask` selects it). build-std needs unstable cargo flags, which
//! RUSTC_BOOTSTRAP=1 enables for that nested build only.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-changed=../agent-common/src");
    println!("cargo::rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").map_err(|_| {
        anyhow::anyhow!(
            "RUSTUP_TOOLCHAIN is not set: build through rustup's cargo (`cargo xtask build`, \
             or cargo with the toolchain pinned in xtask/src/toolchain.rs), which names the toolchain for the kernel build"
        )
    })?;
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
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
