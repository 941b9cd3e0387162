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
    // aya-build's own switch: with AYA_BUILD_SKIP=1 nothing is built for the
    // kernel. The fuzz targets (`cargo xtask fuzz`) set it: they call the
    // parsers only, and the nested build would cost them a minute. Empty
    // objects stand in, which the loaders refuse with a clear error.
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        for object in ["agent-ebpf", "proxy-guard"] {
            std::fs::write(out_dir.join(object), [])?;
        }
        return Ok(());
    }
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
