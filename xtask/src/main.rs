//! `cargo xtask`: the project's developer commands.
//!
//! - `setup`: install what the project needs (idempotent, fast when done);
//! - `build`: build the agent (its build script builds the kernel programs);
//! - `run`: build and run the agent (as root);
//! - `lint`: rustfmt and clippy on host and kernel crates;
//! - `test`: lint, unit tests, privileged host tests, VM tests;
//! - `vm-test`: the privileged tests inside VMs with other kernels;
//! - `bench`: benchmarks (see docs/benchmarks.md);
//! - `demo`: the walkthrough (bands-api -> reviews-api) in namespaces.

mod bench;
mod demo;
mod fuzz;
mod image;
mod libtest;
mod manifests;
mod setup;
mod toolchain;
mod tools;
mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use libtest::TestCounts;

#[derive(Parser)]
#[command(about = "Developer commands for the tracing agent")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the pinned Rust toolchain, Debian packages and bpf-linker.
    Setup,
    /// The walkthrough: bands-api calling reviews-api (FastAPI, no tracing
    /// code) in network namespaces, the agent with its proxy, a few calls,
    /// their traces (as root).
    Demo {
        /// How many calls to make.
        #[arg(long, default_value_t = 3)]
        calls: usize,
        /// Send the spans to this OTLP collector instead of the terminal.
        #[arg(long, value_name = "URL")]
        otlp: Option<String>,
        /// The collector's protocol, grpc or http (default grpc).
        #[arg(long, value_name = "PROTOCOL", requires = "otlp")]
        otlp_protocol: Option<String>,
    },
    /// Build the agent and its kernel programs in release mode.
    Build,
    /// Render deploy/'s kustomizations and validate them strictly for the
    /// oldest and newest Kubernetes versions claimed.
    CheckDeploy,
    /// Build the agent's OCI image (FROM scratch, with podman) as
    /// localhost/tracing-agent:<version> (docs/deploy.md).
    Image,
    /// Build and run the agent; arguments after `--` go to `agent run`.
    Run {
        /// Arguments for `agent run`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// rustfmt and clippy (warnings are errors).
    Lint,
    /// Lint, unit tests, privileged host tests, then the VM tests.
    Test {
        /// Skip the VM tests.
        #[arg(long)]
        no_vm: bool,
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Kernel series for the VM tests (repeatable); default: all.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
    },
    /// Benchmarks: the user-space pipeline on recorded events (criterion),
    /// then the agent's overhead on nginx under wrk (agent off vs on).
    Bench {
        /// Run only this part: pipeline, overhead or proxy.
        #[arg(long, value_enum)]
        only: Option<bench::Part>,
        /// Overhead: requests/s asked for in the fixed-rate runs.
        #[arg(long, default_value_t = 4500)]
        rate: u32,
        /// Overhead: wrk connections of the fixed-rate runs.
        #[arg(long, default_value_t = 20)]
        connections: u32,
        /// Overhead: seconds of each fixed-rate run.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Overhead: rounds (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Arguments for criterion, e.g. a benchmark name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Fuzz the parsers (cargo-fuzz): each target for `--seconds`, or up to
    /// `--runs` executions; a crash fails with its input saved.
    Fuzz {
        /// Only this target (repeatable): http_parser, proxy_head_rewrite,
        /// tracecontext, event_decoder, config_yaml. Default: all.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Executions per target (0: as many as fit in the time).
        #[arg(long, default_value_t = 0)]
        runs: u64,
    },
    /// The soak (tests/tests/soak.rs): the agent at a fixed rate with the
    /// collector down for the middle half; CI runs 120 s of it.
    Soak {
        /// Length of the run.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// Run the privileged integration tests inside VMs with other kernels.
    VmTest {
        /// Kernel series to boot (repeatable): 6.1, 6.12. Default: all.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Integration test binaries to run (repeatable), e.g. `fail_open`.
        /// Default: all but the host-only ones.
        #[arg(long = "test")]
        tests: Vec<String>,
    },
}

/// Integration test binaries the VMs do not run: what they test does not
/// depend on the kernel beyond what the other binaries cover there, or
/// their programs are not in the guest. `export`: the exporters against a
/// receiver, no kernel at all; `proxy`: the proxy's handling of real
/// clients and servers (opaque streams, uploads, upgrades, resets), its own
/// logic: what the kernel does for it (the REDIRECT rules for IPv4 and IPv6,
/// `SO_ORIGINAL_DST`, conntrack, the guard) `proxy_rules`, `proxy_spans` and
/// `fail_open` check under every kernel; `links_node`: Node.js (a 100 MB
/// binary) is not copied into the initramfs; `links_go`: neither is the Go
/// toolchain that builds its frontend; `image`: podman and the image are
/// not in the guest (the agent inside runs on the host's kernel anyway);
/// `faults`, `soak`: they run the agent binary, which is not in the guest,
/// and the soak's minutes would be an hour under TCG.
const HOST_ONLY_TESTS: &[&str] = &[
    "export",
    "proxy",
    "links_node",
    "links_go",
    "acceptance_go_node",
    "image",
    "faults",
    "soak",
];

/// Integration test binaries that one VM kernel runs, not each (when that
/// kernel boots): the longest in a guest (2-3 minutes each under TCG),
/// whose cases are the agent's own logic on kernel facilities that other
/// binaries check under every kernel, split so that each guest runs about
/// as long. `acceptance` and `links`: parent links against a true tree,
/// both through the Python frontends, so each kernel runs one of them; the
/// signals they come from (the thread of each read and write, the Python
/// interpreter's contexts through uprobes) `capture` and `spans` check
/// under every kernel. `otlp_pipeline`: captured spans through the OTLP
/// exporters, whose capture side `spans` checks under every kernel.
const ONE_KERNEL_TESTS: &[(&str, &str)] = &[
    ("acceptance", "6.1"),
    ("links", "6.12"),
    ("otlp_pipeline", "6.12"),
];

/// Seconds each fuzz target runs in `cargo xtask test`.
const CI_FUZZ_SECONDS: u64 = 20;

/// Kernels the VM tests boot besides the host's own.
const VM_KERNELS: &[&str] = &["6.1", "6.12"];

fn main() {
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli.command) {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(task: Task) -> Result<()> {
    std::env::set_current_dir(workspace_root())?;
    match task {
        Task::Setup => setup::setup(),
        Task::Demo {
            calls,
            otlp,
            otlp_protocol,
        } => {
            setup::setup()?;
            demo::demo(&demo::DemoOptions {
                calls,
                otlp,
                otlp_protocol,
            })
        }
        Task::Build => {
            setup::setup()?;
            build_agent()
        }
        Task::CheckDeploy => {
            setup::setup()?;
            manifests::validate()
        }
        Task::Image => {
            setup::setup()?;
            image::build().map(|_| ())
        }
        Task::Run { args } => {
            setup::setup()?;
            build_agent()?;
            let status = Command::new("target/release/agent")
                .arg("run")
                .args(args)
                .status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Lint => {
            setup::setup()?;
            lint()
        }
        Task::Test {
            no_vm,
            no_lint,
            kernels,
        } => {
            let started = Instant::now();
            timed("setup", setup::setup)?;
            if !no_lint {
                timed("lint", lint)?;
            }
            // The image test (tests/tests/image.rs) runs the image built here.
            timed("image", image::build)?;
            let host = timed("host tests", host_tests)?;
            println!("host tests (kernel {}): {}", host_kernel(), host.summary());
            // Each parser's fuzz target briefly; long runs are `cargo xtask fuzz`.
            timed("fuzz", || {
                fuzz::fuzz(&fuzz::FuzzOptions {
                    targets: Vec::new(),
                    seconds: CI_FUZZ_SECONDS,
                    runs: 0,
                })
            })?;
            let mut total = host;
            if !no_vm {
                let vm = timed("vm tests", || vm_tests(kernels, &[]))?;
                total.add(&vm);
            }
            println!("xtask test: {} s in all", started.elapsed().as_secs());
            println!("total: {} passed, {} failed", total.passed, total.failed);
            if total.failed > 0 {
                bail!("{} tests failed", total.failed);
            }
            Ok(())
        }
        Task::Bench {
            only,
            rate,
            connections,
            seconds,
            rounds,
            args,
        } => {
            setup::setup()?;
            let overhead = bench::OverheadOptions {
                rate,
                connections,
                seconds,
                rounds: rounds.max(1),
            };
            bench::bench(only, overhead, &args)
        }
        Task::Fuzz {
            targets,
            seconds,
            runs,
        } => {
            setup::setup()?;
            fuzz::fuzz(&fuzz::FuzzOptions {
                targets,
                seconds,
                runs,
            })
        }
        Task::Soak { seconds } => {
            setup::setup()?;
            // The test runs the agent binary built next to it.
            run(toolchain::cargo().args(["build", "--package", "agent"]))?;
            run(toolchain::cargo()
                .args([
                    "test",
                    "--package",
                    "tests",
                    "--test",
                    "soak",
                    "--",
                    "--nocapture",
                ])
                .env("SOAK_SECONDS", seconds.to_string()))
        }
        Task::VmTest { kernels, tests } => {
            setup::setup()?;
            vm_tests(kernels, &tests).map(|_| ())
        }
    }
}

/// Runs one stage of a command and prints its wall time, so that CI's log
/// shows where its time goes (the CI limit is 90 minutes).
fn timed<T>(stage: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    let result = f();
    println!(
        "xtask stage {stage}: {} s{} ({} GB free for target/)",
        started.elapsed().as_secs(),
        if result.is_err() { " (failed)" } else { "" },
        free_gigabytes(&workspace_root()).map_or("?".to_string(), |gb| gb.to_string()),
    );
    result
}

/// Free space of the file system holding `path`, in whole gigabytes. A
/// clean build needs tens of them; a full disk fails a build with an error
/// that is easy to miss, so each stage prints what is left.
fn free_gigabytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes only into the zeroed struct it is given; the
    // path is a valid NUL-terminated string that outlives the call.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return None;
    }
    Some(stats.f_bavail as u64 * stats.f_frsize as u64 / 1_000_000_000)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn host_kernel() -> String {
    command_output(Command::new("uname").arg("-r"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn build_agent() -> Result<()> {
    run(toolchain::cargo().args(["build", "--release", "--package", "agent"]))
}

fn lint() -> Result<()> {
    run(toolchain::cargo().args(["fmt", "--all", "--check"]))?;
    // The fuzz targets are a workspace of their own.
    run(toolchain::cargo().args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--check"]))?;
    run(toolchain::cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel crate builds only for the BPF target.
    run(toolchain::cargo()
        .args([
            "clippy",
            "--package",
            "agent-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--", "-D", "warnings"])
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", "target/ebpf-lint"))
}

/// Unit tests and the privileged integration tests on this machine's kernel.
fn host_tests() -> Result<TestCounts> {
    let mut cmd = toolchain::cargo();
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--no-fail-fast",
    ]);
    let (counts, ok) = libtest::run_and_count(&mut cmd)?;
    if !ok && counts.failed == 0 {
        bail!("cargo test failed before running its tests");
    }
    Ok(counts)
}

/// Builds the integration test binaries and runs them in each VM kernel.
/// Runs the integration tests in VMs; `only` names the test binaries to
/// run (empty: all that the VMs run).
fn vm_tests(kernels: Vec<String>, only: &[String]) -> Result<TestCounts> {
    let kernels = if kernels.is_empty() {
        VM_KERNELS.iter().map(|k| k.to_string()).collect()
    } else {
        kernels
    };
    let binaries = integration_test_binaries(only)?;
    let opts = vm::VmTestOptions {
        kernels,
        one_kernel: binaries
            .iter()
            .filter_map(|(name, path)| {
                let (_, series) = ONE_KERNEL_TESTS.iter().find(|(n, _)| n == name)?;
                Some((path.clone(), series.to_string()))
            })
            .collect(),
        test_binaries: binaries.into_iter().map(|(_, path)| path).collect(),
        work_dir: "target/vm".into(),
    };
    vm::vm_test(&opts)
}

/// Names and paths of the `tests` package's integration test executables
/// that the VMs run, only those named in `only` unless it is empty.
fn integration_test_binaries(only: &[String]) -> Result<Vec<(String, PathBuf)>> {
    // The same package selection as `host_tests`, so that after the host
    // tests nothing is built again (with `--package tests` alone, cargo
    // unifies features differently and rebuilds part of the graph).
    let output = toolchain::cargo()
        .args([
            "test",
            "--workspace",
            "--exclude",
            "agent-ebpf",
            "--tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !output.status.success() {
        // With JSON output, cargo writes the compiler's errors (and a full
        // disk's "No space left on device") to stdout: show them.
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if let Some(rendered) = message["message"]["rendered"].as_str() {
                eprint!("{rendered}");
            }
        }
        bail!("building the integration tests failed");
    }
    let tests_manifest = workspace_root().join("tests/Cargo.toml");
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = message["profile"]["test"].as_bool() == Some(true);
        let is_integration = message["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        let name = message["target"]["name"].as_str().unwrap_or_default();
        let of_tests_package = message["manifest_path"]
            .as_str()
            .is_some_and(|path| Path::new(path) == tests_manifest);
        let left_out = !only.is_empty() && !only.iter().any(|o| o == name);
        if HOST_ONLY_TESTS.contains(&name) || left_out {
            continue;
        }
        if let (true, true, true, Some(path)) = (
            is_test,
            is_integration,
            of_tests_package,
            message["executable"].as_str(),
        ) {
            binaries.push((name.to_string(), PathBuf::from(path)));
        }
    }
    if binaries.is_empty() {
        bail!("no integration test binaries were built (or none is named {only:?})");
    }
    Ok(binaries)
}

/// Runs a command with inherited output; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, or None if it could not run or failed.
pub fn command_output(cmd: &mut Command) -> Option<String> {
    let output = cmd.stderr(Stdio::null()).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_left_to_one_kernel_name_a_vm_kernel_and_a_vm_test() {
        for (name, series) in ONE_KERNEL_TESTS {
            assert!(
                VM_KERNELS.contains(series),
                "{name}: {series} is not booted"
            );
            assert!(!HOST_ONLY_TESTS.contains(name), "{name} is host-only");
            let source = workspace_root().join(format!("tests/tests/{name}.rs"));
            assert!(
                source.is_file(),
                "{} is not a test binary",
                source.display()
            );
        }
    }
}
