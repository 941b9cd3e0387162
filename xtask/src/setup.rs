//! `cargo xtask setup`: installs what the project needs on a fresh Debian 12
//! machine. Every step checks first, so a second run costs a few process
//! spawns and no downloads.

use std::fs;
use std::path::{Path, PathBuf};
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
    // The same interpreter by its versioned name, which makes the tests'
    // venv (`install_test_venv`); its `venv` module needs ensurepip's
    // wheels, from the -venv packages.
    package("python3.11", &["/usr/bin/python3.11"]),
    package("python3.11-venv", &[]),
    package("python3-venv", &[]),
    guest_package("wrk", &["/usr/bin/wrk"]),
    package("haproxy", &["/usr/sbin/haproxy"]),
    // Renders the kustomizations in deploy/ (`crate::manifests`); from the
    // Google Cloud apt source this machine kind is set up with.
    package("kubectl", &["/usr/bin/kubectl"]),
    // Builds and runs the agent's image (`cargo xtask image`, the image
    // test); runc because crun fails on this machine's mixed cgroups.
    package("podman", &["/usr/bin/podman"]),
    package("runc", &["/usr/sbin/runc"]),
    // The agent's /metrics checked by Prometheus' linter and scraped by a
    // real server (agent/tests/metrics.rs).
    package("prometheus", &["/usr/bin/prometheus", "/usr/bin/promtool"]),
    // Builds the Go net/http frontend of the parent-link tests.
    package("golang-go", &["/usr/bin/go"]),
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

/// Programs setup installs without apt-get, by absolute path: the code
/// spawns them by that path (`crate::tools` accepts them there, and asks
/// dpkg about none of them).
pub const SETUP_PROGRAMS_OUTSIDE_APT: &[&str] = &[TEST_VENV_PYTHON, KUBERNETES_VALIDATE];

/// The Python venv of the tests' asyncio web frameworks (FastAPI on
/// uvicorn, aiohttp, httpx), made with Debian's python3.11 from the pins of
/// [`PYTHON_REQUIREMENTS`].
pub const TEST_VENV: &str = "/opt/agent-tests/venv";

/// The venv's interpreter, the one the tests run the framework fixtures
/// with (`tests/fixtures/asgi_service.py`, `aiohttp_service.py`).
pub const TEST_VENV_PYTHON: &str = "/opt/agent-tests/venv/bin/python";

/// The manifest validator from the same venv (`crate::manifests`).
pub const KUBERNETES_VALIDATE: &str = "/opt/agent-tests/venv/bin/kubernetes-validate";

/// The venv's exact pins, relative to the workspace root.
pub const PYTHON_REQUIREMENTS: &str = "tests/fixtures/python-requirements.txt";

/// The modules the tests import from the venv.
pub const TEST_VENV_MODULES: &[&str] = &[
    "fastapi",
    "uvicorn",
    "uvloop",
    "httptools",
    "aiohttp",
    "httpx",
    "kubernetes_validate",
];

/// Inside the venv: the content of [`PYTHON_REQUIREMENTS`] it was
/// installed from, written once the install succeeded.
const TEST_VENV_STAMP: &str = "/opt/agent-tests/venv/installed-requirements.txt";

/// The bpf-linker release whose LLVM matches the pinned rustc.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// The cargo-fuzz release `cargo xtask fuzz` runs.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Installs whatever is missing.
pub fn setup() -> Result<()> {
    crate::toolchain::install()?;
    install_apt_packages(&crate::tools::setup_package_names())?;
    install_test_venv()?;
    install_bpf_linker()?;
    install_cargo_fuzz()?;
    for program in SETUP_PROGRAMS_OUTSIDE_APT {
        if !Path::new(program).exists() {
            bail!("setup did not install {program}");
        }
    }
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

fn python_requirements() -> PathBuf {
    crate::workspace_root().join(PYTHON_REQUIREMENTS)
}

/// What is wrong with the tests' venv, or None when it holds exactly the
/// pins of [`PYTHON_REQUIREMENTS`] and its modules import.
pub fn test_venv_problem() -> Option<String> {
    let wanted = match fs::read_to_string(python_requirements()) {
        Ok(text) => text,
        Err(e) => return Some(format!("cannot read {PYTHON_REQUIREMENTS}: {e}")),
    };
    if !Path::new(TEST_VENV_PYTHON).exists() {
        return Some(format!("{TEST_VENV_PYTHON} is missing"));
    }
    match fs::read_to_string(TEST_VENV_STAMP) {
        Ok(installed) if installed == wanted => {}
        Ok(_) => {
            return Some(format!(
                "{TEST_VENV} holds other pins than {PYTHON_REQUIREMENTS}"
            ));
        }
        Err(_) => return Some(format!("{TEST_VENV} was not installed completely")),
    }
    let imports = format!("import {}", TEST_VENV_MODULES.join(", "));
    match Command::new(TEST_VENV_PYTHON)
        .args(["-c", &imports])
        .output()
    {
        Ok(output) if output.status.success() => None,
        Ok(output) => Some(format!(
            "`{TEST_VENV_PYTHON} -c '{imports}'` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run {TEST_VENV_PYTHON}: {e}")),
    }
}

/// Makes the tests' venv anew when it is missing, broken or installed from
/// other pins: a fresh venv, so that a pin taken out of the file is gone
/// too. Wheels only (no compiler, no build step).
fn install_test_venv() -> Result<()> {
    let Some(problem) = test_venv_problem() else {
        return Ok(());
    };
    if !is_root() {
        bail!("{problem} (run `cargo xtask setup` as root)");
    }
    eprintln!("setup: installing the tests' Python venv {TEST_VENV} ({problem})");
    let requirements = python_requirements();
    // What the stamp will say: the file as it was before pip read it.
    let wanted = fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    if Path::new(TEST_VENV).exists() {
        fs::remove_dir_all(TEST_VENV).with_context(|| format!("removing {TEST_VENV}"))?;
    }
    run(Command::new("/usr/bin/python3.11").args(["-m", "venv", TEST_VENV]))
        .context("creating the tests' venv")?;
    run(Command::new(TEST_VENV_PYTHON)
        .args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
        ])
        .args(["--only-binary=:all:", "-r"])
        .arg(&requirements))
    .with_context(|| format!("installing {PYTHON_REQUIREMENTS} into {TEST_VENV}"))?;
    fs::write(TEST_VENV_STAMP, wanted).with_context(|| format!("writing {TEST_VENV_STAMP}"))?;
    if let Some(problem) = test_venv_problem() {
        bail!("after installing the tests' venv: {problem}");
    }
    Ok(())
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

fn installed_cargo_fuzz() -> String {
    command_output(crate::toolchain::cargo().args(["fuzz", "--version"]))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn install_cargo_fuzz() -> Result<()> {
    let wanted = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    if installed_cargo_fuzz() == wanted {
        return Ok(());
    }
    eprintln!("setup: building cargo-fuzz {CARGO_FUZZ_VERSION} (about 2 minutes, once)");
    run(crate::toolchain::cargo().args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--force",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
    .context("installing cargo-fuzz")?;
    let installed = installed_cargo_fuzz();
    if installed != wanted {
        bail!("after installing cargo-fuzz, `cargo fuzz --version` says {installed:?}");
    }
    Ok(())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    command_output(Command::new("id").arg("-u"))
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}
