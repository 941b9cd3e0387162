//! Booting a kernel under qemu and streaming its serial console.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::console::ConsoleReport;

/// How one boot ended.
#[derive(Debug)]
pub struct BootOutcome {
    /// What the console said about the tests.
    pub report: ConsoleReport,
    /// Whether qemu had to be killed at the time limit.
    pub timed_out: bool,
    /// qemu's exit status.
    pub status: ExitStatus,
}

/// Boots `vmlinuz` with `initrd` and waits for the guest to power off, for at
/// most `timeout`. Every console line is printed as `[vm <label>] <line>`
/// as it arrives and fed to a [`ConsoleReport`]. The guest's /init skips
/// the test binaries named in `skip`.
pub fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    label: &str,
    skip: &[&str],
    timeout: Duration,
) -> Result<BootOutcome> {
    let mut command_line = "console=ttyS0 quiet panic=-1 oops=panic".to_string();
    if !skip.is_empty() {
        // The names are plain file names (checked by `guest_names`).
        command_line.push_str(" vmtest.skip=");
        command_line.push_str(&skip.join(","));
    }
    let mut child = Command::new("qemu-system-x86_64")
        // Nested KVM hangs on the CI machines; TCG is slow but dependable.
        .args(["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2"])
        // No default NIC, VGA or config files: the guest needs loopback only.
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        // The serial port on stdout. Unlike -nographic this needs no tty and
        // multiplexes no monitor, so stdin can be /dev/null.
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1 with -no-reboot turns a guest panic (also /init dying, or
        // an oops, which would likely hang later tests) into qemu exiting.
        .arg("-append")
        .arg(&command_line)
        .arg("-no-reboot")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;

    let (lines_tx, lines) = mpsc::channel();
    let readers = [
        child
            .stdout
            .take()
            .map(|out| forward_lines(out, lines_tx.clone())),
        child.stderr.take().map(|err| forward_lines(err, lines_tx)),
    ];

    let deadline = Instant::now() + timeout;
    let mut report = ConsoleReport::default();
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if !left.is_zero() => {
                println!("[vm {label}] {line}");
                report.feed(&line);
            }
            // Both pipes closed: qemu is gone.
            Err(RecvTimeoutError::Disconnected) => break,
            Ok(_) | Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                println!(
                    "[vm {label}] vm-test: time limit of {}s reached, killing qemu",
                    timeout.as_secs()
                );
                // An error means qemu already exited, which is what we want.
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    for reader in readers.into_iter().flatten() {
        // A reader only panics on a bug; its lines are lost either way.
        let _ = reader.join();
    }
    Ok(BootOutcome {
        report,
        timed_out,
        status,
    })
}

/// Sends each line read from `pipe` (lossily decoded, without its line
/// terminator, which is "\r\n" on a serial console) until end of file.
fn forward_lines(
    pipe: impl Read + Send + 'static,
    lines: Sender<String>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            match reader.read_until(b'\n', &mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buffer);
                    let line = line.trim_end_matches(['\r', '\n']).to_owned();
                    if lines.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    })
}
