//! `cargo xtask vm-test`: boots other kernels under qemu and runs the
//! privileged integration tests inside them.
//!
//! For each kernel series (e.g. "6.1") the newest Debian image package is
//! downloaded once and cached under the work directory. The guest is an
//! initramfs holding busybox, Debian's python3, curl, nginx, iproute2 and
//! iptables, the kernel's netfilter/tc/veth modules, and the test binaries;
//! its `/init` (`xtask/assets/vm/init.sh`) runs each binary and prints
//! `@@VMTEST-EXIT <name> <code>`, which together with libtest's
//! `test result:` lines is what the host checks.
//!
//! Layout of the work directory:
//! - `kernels/<release>/`: kernel image and modules archive (cached);
//! - `base/`: archive of the stable userland (cached);
//! - `run/`: the tests archive and the per-kernel initrd (rebuilt each run).
//!
//! Each boot is killed after 20 minutes, or `VM_TEST_TIMEOUT_SECS` seconds.

mod console;
mod cpio;
mod initramfs;
mod kernel;
mod qemu;

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::libtest::TestCounts;
use anyhow::{Context, Result, bail};

use console::ConsoleReport;

/// What `vm_test` needs from its caller.
pub struct VmTestOptions {
    /// Kernel series to boot, e.g. `["6.1", "6.12"]`.
    pub kernels: Vec<String>,
    /// Test executables (cargo's `--no-run` artifacts) to run inside each VM.
    pub test_binaries: Vec<PathBuf>,
    /// Those of `test_binaries` that one kernel series only runs, when it
    /// is among `kernels` (else every kernel runs them): what they test
    /// depends on the kernel little enough that one kernel besides the
    /// host's covers it.
    pub one_kernel: Vec<(PathBuf, String)>,
    /// Cache and scratch directory, e.g. `target/vm`.
    pub work_dir: PathBuf,
}

/// Time limit for one boot, including all tests in it, unless the
/// environment variable [`TIMEOUT_VAR`] gives one in seconds.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Environment variable overriding [`DEFAULT_TIMEOUT`].
const TIMEOUT_VAR: &str = "VM_TEST_TIMEOUT_SECS";

/// Boots repeated when a guest dies before its first test starts.
const BOOT_RETRIES: u32 = 2;

/// Boots each kernel, runs every test binary, prints a summary, and fails if
/// any test failed or no test ran.
///
/// Kernels boot one after the other. Each summary line reads
/// `vm-test <series>: N passed, M failed, K ignored`, and the last line
/// `vm-test total: N passed, M failed`. The result is an error when a test
/// binary exits non-zero, a binary never reports its exit (the guest crashed
/// or hit the time limit), or no test ran under some kernel.
pub fn vm_test(opts: &VmTestOptions) -> Result<TestCounts> {
    validate_series(&opts.kernels)?;
    let binaries = guest_names(&opts.test_binaries)?;
    let timeout = timeout_from_env()?;
    let work_dir = std::path::absolute(&opts.work_dir)
        .with_context(|| format!("resolving {}", opts.work_dir.display()))?;

    // The host tools and the guest's programs come from `cargo xtask setup`
    // (xtask/src/tools.rs), which every command runs first.
    let kernels = opts
        .kernels
        .iter()
        .map(|series| {
            kernel::fetch(series, &work_dir.join("kernels"))
                .with_context(|| format!("fetching a {series} kernel"))
        })
        .collect::<Result<Vec<_>>>()?;
    let base = initramfs::base_archive(&work_dir.join("base"))?;
    let run_dir = work_dir.join("run");
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let tests = initramfs::tests_archive(&run_dir, &binaries, &base)?;

    // Guest names of the binaries each series leaves to another one.
    let left_to_another = |series: &str| -> Vec<&str> {
        binaries
            .iter()
            .filter(|(_, path)| {
                opts.one_kernel.iter().any(|(binary, only)| {
                    binary == path && only != series && opts.kernels.contains(only)
                })
            })
            .map(|(name, _)| name.as_str())
            .collect()
    };
    let boots: Vec<Boot> = opts
        .kernels
        .iter()
        .zip(&kernels)
        .map(|(series, kernel)| -> Result<Boot> {
            let initrd = run_dir.join(format!("initrd-{}.img", kernel.release));
            concatenate(&[&base.archive, &kernel.modules_archive, &tests], &initrd)?;
            let skipped = left_to_another(series);
            Ok(Boot {
                series,
                kernel,
                initrd,
                runs: binaries
                    .iter()
                    .map(|(name, _)| name.as_str())
                    .filter(|name| !skipped.contains(name))
                    .collect(),
                skipped,
            })
        })
        .collect::<Result<_>>()?;
    // One guest after the other. Booted together on a two-core machine,
    // each ran 1.7 times as long (docs/testing.md): a guest keeps about one
    // core busy on average, but not evenly.
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    let mut problems = Vec::new();
    for boot in &boots {
        let outcome = run_kernel(boot, timeout)?;
        println!(
            "vm-test {}: {} passed, {} failed, {} ignored",
            boot.series, outcome.passed, outcome.failed, outcome.ignored
        );
        passed += outcome.passed;
        failed += outcome.failed;
        ignored += outcome.ignored;
        for problem in outcome.problems {
            println!("vm-test {}: {problem}", boot.series);
            problems.push(format!("{}: {problem}", boot.series));
        }
    }
    println!("vm-test total: {passed} passed, {failed} failed");
    if !problems.is_empty() {
        bail!("vm-test failed:\n  {}", problems.join("\n  "));
    }
    Ok(TestCounts {
        passed,
        failed,
        ignored,
    })
}

/// One guest to boot: a kernel and the initramfs made for it.
struct Boot<'a> {
    series: &'a str,
    kernel: &'a kernel::Kernel,
    initrd: PathBuf,
    /// Guest names of the test binaries it runs, in order.
    runs: Vec<&'a str>,
    /// Those its /init skips (`vmtest.skip=` on the kernel command line).
    skipped: Vec<&'a str>,
}

/// What one guest's tests gave.
struct KernelOutcome {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// What went wrong, if anything (see [`boot_problems`]).
    problems: Vec<String>,
}

/// Boots one guest (again, at most [`BOOT_RETRIES`] times, if it dies
/// before its first test) and judges its console.
fn run_kernel(boot: &Boot, timeout: Duration) -> Result<KernelOutcome> {
    let Boot {
        series,
        kernel,
        initrd,
        runs,
        skipped,
    } = boot;
    println!("vm-test {series}: booting {}", kernel.release);
    let started = Instant::now();
    let mut outcome = qemu::boot(&kernel.vmlinuz, initrd, series, skipped, timeout)
        .with_context(|| format!("booting {}", kernel.release))?;
    // Under TCG a guest kernel occasionally dies while booting (e.g. an
    // oops patching code across vCPUs on a loaded host). That says
    // nothing about the tests, which had not started: boot again, at
    // most twice. Anything after the first test started still counts.
    for retry in 1..=BOOT_RETRIES {
        if outcome.report.tests_started {
            break;
        }
        println!(
            "vm-test {series}: the guest died before running any test; booting again ({retry}/{BOOT_RETRIES})"
        );
        outcome = qemu::boot(&kernel.vmlinuz, initrd, series, skipped, timeout)
            .with_context(|| format!("booting {}", kernel.release))?;
    }
    let report = &outcome.report;
    println!(
        "vm-test {series}: guest ran for {}s ({})",
        started.elapsed().as_secs(),
        kernel.release
    );
    let qemu_ok = outcome.status.success() || outcome.timed_out;
    let mut problems = boot_problems(report, runs, outcome.timed_out, timeout);
    if !qemu_ok {
        problems.push(format!("qemu exited with {}", outcome.status));
    }
    Ok(KernelOutcome {
        passed: report.passed,
        failed: report.failed,
        ignored: report.ignored,
        problems,
    })
}

/// What went wrong in one boot, judged from its console: `expected` lists
/// the test binaries in the order the guest runs them.
fn boot_problems(
    report: &ConsoleReport,
    expected: &[&str],
    timed_out: bool,
    timeout: Duration,
) -> Vec<String> {
    let mut problems = Vec::new();
    if timed_out {
        problems.push(format!("time limit of {}s reached", timeout.as_secs()));
    }
    for name in expected {
        match report.exits.iter().find(|(exited, _)| exited == name) {
            None => problems.push(format!(
                "{name} never reported its exit (guest crashed, panicked or timed out)"
            )),
            Some((_, 0)) => {}
            Some((_, code)) => problems.push(format!("{name} exited with code {code}")),
        }
    }
    if report.failed > 0 {
        problems.push(format!("{} tests failed", report.failed));
    }
    if report.passed + report.failed == 0 {
        problems.push("no test ran".to_owned());
    }
    problems
}

/// Kernel series look like "6.1": they end up in apt search patterns and
/// file names, so nothing else is accepted.
fn validate_series(kernels: &[String]) -> Result<()> {
    if kernels.is_empty() {
        bail!("no kernel series given (e.g. 6.1 6.12)");
    }
    for series in kernels {
        let valid = series
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
        if !valid {
            bail!("kernel series {series:?} is not of the form 6.1");
        }
    }
    Ok(())
}

/// Pairs each test binary with the name it gets in the guest (its file
/// name), which must be unique and shell-safe since /init handles it.
fn guest_names(binaries: &[PathBuf]) -> Result<Vec<(String, PathBuf)>> {
    if binaries.is_empty() {
        bail!("no test binaries given");
    }
    let mut seen = HashSet::new();
    binaries
        .iter()
        .map(|path| {
            if !path.is_file() {
                bail!("test binary {} is not a file", path.display());
            }
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .filter(|name| {
                    !name.starts_with('.')
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                })
                .with_context(|| {
                    format!(
                        "test binary {}: file name must be made of letters, digits, '.', '_' and '-'",
                        path.display()
                    )
                })?;
            if !seen.insert(name) {
                bail!("two test binaries are named {name}");
            }
            Ok((name.to_owned(), path.clone()))
        })
        .collect()
}

fn timeout_from_env() -> Result<Duration> {
    match std::env::var(TIMEOUT_VAR) {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(value) => value
            .trim()
            .parse()
            .map(Duration::from_secs)
            .with_context(|| format!("{TIMEOUT_VAR}={value:?} is not a number of seconds")),
    }
}

/// Writes `parts` one after the other into `out`; the kernel unpacks
/// concatenated cpio archives in order.
fn concatenate(parts: &[&Path], out: &Path) -> Result<()> {
    let mut file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    for part in parts {
        let mut input = File::open(part).with_context(|| format!("opening {}", part.display()))?;
        io::copy(&mut input, &mut file).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// Runs `command` with inherited output; fails unless it exits successfully.
fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {}", describe(command)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(command));
    }
    Ok(())
}

/// Runs `command` and returns its stdout; fails unless it exits successfully.
fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("starting {}", describe(command)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(command),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("{} printed non-UTF-8", describe(command)))
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(60);

    #[test]
    fn clean_boot_has_no_problems() {
        let report = ConsoleReport::parse(
            "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             @@VMTEST-EXIT a 0\n@@VMTEST-EXIT b 0\n",
        );
        assert!(boot_problems(&report, &["a", "b"], false, LIMIT).is_empty());
    }

    #[test]
    fn failures_missing_markers_and_empty_runs_are_problems() {
        let report = ConsoleReport::parse(
            "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n\
             @@VMTEST-EXIT a 101\n",
        );
        assert_eq!(
            boot_problems(&report, &["a", "b"], true, LIMIT),
            [
                "time limit of 60s reached",
                "a exited with code 101",
                "b never reported its exit (guest crashed, panicked or timed out)",
                "1 tests failed",
            ]
        );
        let empty = ConsoleReport::parse("@@VMTEST-EXIT a 0\n");
        assert_eq!(boot_problems(&empty, &["a"], false, LIMIT), ["no test ran"]);
    }

    #[test]
    fn series_must_be_numeric() {
        assert!(validate_series(&["6.1".into(), "6.12".into()]).is_ok());
        for bad in ["", "6.", "6.1; rm", "latest"] {
            assert!(validate_series(&[bad.into()]).is_err(), "{bad:?}");
        }
        assert!(validate_series(&[]).is_err());
    }
}
