//! Faults of a real node, survived and counted: the `agent` binary as its
//! users run it, against nginx, with its `/metrics` read.
//!
//! - the collector down from the start, then up: spans resume, memory
//!   stays bounded, and every span is exported or dropped by reason;
//! - a burst that overflows a small ring buffer: drops counted, later
//!   requests traced;
//! - a kernel without BTF, or without a tracepoint the agent needs
//!   (simulated by bind mounts in a private mount namespace): a clear
//!   error and exit status 1, no panic.
//!
//! The proxy's faults (a downstream that resets or never answers) are in
//! proxy.rs; the agent dying is fail_open.rs's.

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::agent_process::{AgentProcess, Metrics, agent_binary};
use tests::otlp_receiver::OtlpReceiver;
use tests::{ScratchDir, free_port, privileged, start_nginx};

/// One agent at a time on the machine: each traces every process.
static ONE_AGENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `count` GETs of `path_prefix-<i>` to nginx on `port`, each on its own
/// connection; how many got an answer.
fn requests(port: u16, path_prefix: &str, count: usize) -> usize {
    (0..count)
        .filter(|i| {
            let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            // One write: `write!` on the stream makes one syscall per
            // piece, one record each in the ring under test.
            let request =
                format!("GET {path_prefix}-{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
            let sent = stream.write_all(request.as_bytes());
            let mut answer = Vec::new();
            sent.is_ok()
                && stream.read_to_end(&mut answer).is_ok()
                && answer.starts_with(b"HTTP/1.1 ")
        })
        .count()
}

/// Polls `what` every 100 ms for at most `timeout`.
fn eventually<T>(timeout: Duration, mut what: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = what() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Spans built, and spans the outputs exported or dropped (by reason).
fn accounted(metrics: &Metrics) -> (u64, u64, u64, u64) {
    (
        metrics.get("agent_spans_total").unwrap_or(0),
        metrics.sum("agent_export_spans_total", &["result=\"exported\""]),
        metrics.sum(
            "agent_export_spans_total",
            &["result=\"dropped_after_retries\""],
        ),
        metrics.sum(
            "agent_export_spans_total",
            &["result=\"dropped_queue_full\""],
        ),
    )
}

fn nginx(dir: &ScratchDir, port: u16) -> tests::ChildGuard {
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    dir.write("www/index.html", b"hello\n");
    start_nginx(dir, port, 1, "default_type text/plain;")
}

#[test]
fn collector_down_from_the_start_then_up() {
    if !privileged() {
        return;
    }
    let _one = ONE_AGENT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("faults-collector");
    let port = free_port();
    let _nginx = nginx(&dir, port);
    let collector = free_port();
    let metrics_port = free_port();
    let endpoint = format!("--exporter-endpoint=http://127.0.0.1:{collector}");
    let agent = AgentProcess::start(&[&endpoint, "--include-process", "nginx"], metrics_port);

    // Down: nothing listens on the collector's port.
    assert_eq!(requests(port, "/while-down", 200), 200);
    let errors = eventually(Duration::from_secs(20), || {
        let m = agent.metrics();
        (m.sum("agent_export_errors_total", &[]) > 0).then_some(m)
    })
    .unwrap_or_else(|| panic!("failed exports are counted:\n{}", agent.metrics().0));
    assert_eq!(accounted(&errors).1, 0, "nothing exported while down");
    let rss_down = agent.rss_kib();

    // Up: the same address, a real OTLP receiver.
    let receiver = OtlpReceiver::start_at(
        format!("127.0.0.1:{collector}").parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .expect("the collector's port is free again");
    assert_eq!(requests(port, "/after-up", 20), 20);
    let after_up = eventually(Duration::from_secs(60), || {
        let got = receiver
            .spans()
            .iter()
            .filter(|s| s.span.name.starts_with("GET /after-up"))
            .count();
        (got >= 20).then_some(got)
    });
    assert_eq!(
        after_up,
        Some(20),
        "spans resume once the collector is up; the collector has {:?}\n{}\n{}",
        receiver
            .spans()
            .iter()
            .map(|s| s.span.name.clone())
            .collect::<Vec<_>>(),
        agent.metrics().0,
        agent.stderr_text()
    );

    // Every span built is exported or dropped by reason (retries end).
    let (built, exported, after_retries, queue_full) = eventually(Duration::from_secs(90), || {
        let counts = accounted(&agent.metrics());
        (counts.0 >= 220 && counts.0 == counts.1 + counts.2 + counts.3).then_some(counts)
    })
    .unwrap_or_else(|| panic!("spans unaccounted for:\n{}", agent.metrics().0));
    assert!(
        receiver.span_count() as u64 >= exported,
        "what the agent counts exported, the collector has"
    );
    let rss = agent.rss_kib();
    println!(
        "collector down then up: {built} spans built, {exported} exported, {after_retries} dropped \
         after retries, {queue_full} dropped queue full; RSS {rss_down} KiB while down, {rss} KiB after"
    );
    assert!(rss < 100 * 1024, "memory bounded: {rss} KiB");
    let (status, _) = agent.stop();
    assert!(status.success());
}

#[test]
fn a_burst_that_overflows_the_ring_buffer_is_counted_and_later_requests_are_traced() {
    if !privileged() {
        return;
    }
    let _one = ONE_AGENT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("faults-burst");
    let port = free_port();
    let _nginx = nginx(&dir, port);
    let spans_file = dir.path().join("spans.jsonl");
    let output = format!("--output-file={}", spans_file.display());
    // The smallest ring the kernel takes, records of at most 1 KiB.
    let agent = AgentProcess::start(
        &[
            &output,
            "--ring-buffer-bytes=4096",
            "--max-message-bytes=1024",
            "--include-process",
            "nginx",
        ],
        free_port(),
    );
    // A burst: 8 clients at once, as fast as nginx answers.
    let burst: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || requests(port, "/burst", 300)))
        .collect();
    let answered: usize = burst.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(answered, 8 * 300);
    let dropped = eventually(Duration::from_secs(10), || {
        let m = agent.metrics();
        let n = m.sum("agent_capture_dropped_total", &["reason=\"ringbuf_full\""]);
        (n > 0).then_some(n)
    })
    .unwrap_or_else(|| panic!("the overflow is counted:\n{}", agent.metrics().0));

    // Afterwards, one request at a time is traced again. One at a time,
    // each once the one before is traced (so the ring was drained): back to
    // back, a few requests' records (the client's too) fill a 4 KiB ring
    // before a busy reader wakes, and dropping those is what it is for.
    std::thread::sleep(Duration::from_secs(1));
    let mut traced = 0;
    for i in 0..5 {
        let path = format!("/after-burst-{i}");
        assert_eq!(requests(port, &path, 1), 1);
        let name = format!("\"GET {path}-0\"");
        let seen = eventually(Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&spans_file).unwrap_or_default();
            text.contains(&name).then_some(())
        });
        if seen.is_none() {
            panic!(
                "request {i} after the burst is traced ({traced} before it were)\nmetrics:\n{}\nstderr:\n{}",
                agent.metrics().0,
                agent.stderr_text()
            );
        }
        traced += 1;
    }
    println!(
        "ring buffer burst: {dropped} records dropped (ringbuf_full), then {traced} of 5 traced one at a time"
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// Runs `agent run` in a private mount namespace where `target` is
/// covered by an empty directory: its exit status and stderr.
fn agent_without(target: &str) -> (Option<i32>, String) {
    let empty = ScratchDir::new("faults-empty");
    let source = CString::new(empty.path().as_os_str().as_encoded_bytes()).unwrap();
    let target_c = CString::new(target).unwrap();
    let root = CString::new("/").unwrap();
    let mut command = Command::new(agent_binary());
    // SAFETY: only async-signal-safe calls (unshare, mount) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Nothing done here may reach the host's mounts.
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                source.as_ptr(),
                target_c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .args(["run", "--no-terminal", "--output-file=/dev/null"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the agent starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the agent kept running without {target}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

#[test]
fn a_kernel_without_btf_or_a_tracepoint_is_a_clear_error() {
    if !privileged() {
        return;
    }
    let _one = ONE_AGENT.lock().unwrap_or_else(|e| e.into_inner());
    assert!(Path::new("/sys/kernel/btf/vmlinux").exists());
    let (code, stderr) = agent_without("/sys/kernel/btf");
    println!("without BTF: exit {code:?}: {stderr}");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("BTF"), "the error names BTF: {stderr}");

    let tracepoint = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(|root| format!("{root}/events/syscalls/sys_exit_recvfrom"))
        .find(|path| Path::new(path).join("id").exists())
        .expect("tracefs with the syscall tracepoints");
    let (code, stderr) = agent_without(&tracepoint);
    println!("without sys_exit_recvfrom: exit {code:?}: {stderr}");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("sys_exit_recvfrom"),
        "the error names the tracepoint: {stderr}"
    );
}
