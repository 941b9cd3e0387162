//! `cargo xtask bench --only overhead`: what the agent costs a traced
//! server, as an operator would measure it.
//!
//! nginx (1 worker) serves a 512-byte file on loopback. Each round runs
//! every configuration, in the same order, so that this machine's drift
//! between rounds cancels out in the ratios:
//!
//! - at a fixed rate: wrk (one thread, `--connections`), each connection
//!   pacing its requests so that together they ask for about `--rate`
//!   requests/s, for `--seconds`; CPU read from /proc around the run: the
//!   whole machine, the agent process and, of it, its main thread
//!   (capture and correlation) and its span outputs' thread (run time per
//!   thread from schedstat), nginx's worker; the kernel
//!   programs' own run time from the kernel's BPF statistics
//!   (`kernel.bpf_stats_enabled`), which the traced server's system time is
//!   too noisy to show; p50 and p99 latency;
//! - at saturation: wrk `-t2 -c50` for 5 s, requests/s.
//!
//! The configurations: agent off; `agent run` writing OTLP/JSON to
//! /dev/null (every span built and encoded, no receiver's CPU counted);
//! the same with `tracing.random_sampling: 10`; `agent run` exporting
//! over OTLP/gRPC to a receiver process on this machine (the tests'
//! receiver, counting spans: its CPU is in the machine's figure, not the
//! agent's). Medians over the rounds.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{
    AGENT_RUN_READY, KillOnDrop, WRK_ARGS, median, parse_wrk, start_agent_ready, start_nginx,
    write_nginx_conf,
};

/// nginx's port for this benchmark.
const NGINX_PORT: u16 = 18280;

/// The OTLP receiver's gRPC and HTTP ports.
const RECEIVER_PORTS: (u16, u16) = (18290, 18291);

/// The receiver, built by `cargo xtask bench` from the tests crate.
const RECEIVER: &str = "target/release/otlp-receiver";

/// How the fixed-rate rounds run (`cargo xtask bench` options).
#[derive(Clone, Copy, Debug)]
pub struct OverheadOptions {
    /// Requests per second asked for, over all connections.
    pub rate: u32,
    /// wrk connections.
    pub connections: u32,
    /// Length of each fixed-rate run.
    pub seconds: u32,
    /// Rounds; medians are reported.
    pub rounds: usize,
}

/// An agent configuration measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Off,
    /// Every span built and written as OTLP/JSON to /dev/null.
    FileOutput,
    /// The same with 10 % of traces sampled.
    Sampled10,
    /// Every span exported over OTLP/gRPC to a receiver on this machine.
    GrpcOutput,
}

impl Setup {
    const ALL: [Setup; 4] = [
        Setup::Off,
        Setup::FileOutput,
        Setup::Sampled10,
        Setup::GrpcOutput,
    ];

    fn label(self) -> &'static str {
        match self {
            Setup::Off => "agent off",
            Setup::FileOutput => "agent on, JSON to /dev/null",
            Setup::Sampled10 => "agent on, random_sampling 10",
            Setup::GrpcOutput => "agent on, OTLP/gRPC to a local receiver",
        }
    }
}

/// One fixed-rate run's figures, per request where it says so.
#[derive(Clone, Copy, Debug, Default)]
struct Paced {
    /// Requests/s reached.
    rate: f64,
    /// CPU µs per request: all CPUs, busy time.
    machine_us: f64,
    /// The agent process (0 when off).
    agent_us: f64,
    /// nginx's worker (where the probes' in-kernel cost lands).
    nginx_us: f64,
    /// The agent's kernel programs, from the kernel's BPF statistics.
    bpf_us: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// The agent's resident memory at the end of the run, MB.
    agent_rss_mb: f64,
    /// Of the agent: its main thread (capture, correlation, the proxy's
    /// accept loops), from the scheduler's per-thread run time.
    main_thread_us: f64,
    /// Of the agent: the span outputs' thread (`span-export`).
    export_thread_us: f64,
}

/// One round of one setup.
#[derive(Clone, Copy, Debug, Default)]
struct Measured {
    paced: Paced,
    saturation_rps: f64,
}

/// Runs the benchmark and prints its tables.
pub fn overhead(options: OverheadOptions) -> Result<()> {
    if options.connections == 0 || options.rate < options.connections {
        bail!("--rate must be at least --connections (each connection sends at least 1/s)");
    }
    let dir = PathBuf::from("target/bench-overhead");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("www"))?;
    let dir = std::path::absolute(&dir)?;
    std::fs::write(dir.join("www/index.html"), "x".repeat(512))?;
    let conf = write_nginx_conf(
        &dir,
        "nginx",
        "1",
        &format!(
            "server {{ listen 127.0.0.1:{NGINX_PORT}; root {}/www; }}",
            dir.display()
        ),
    )?;
    let _nginx = start_nginx(&dir, &conf)?;
    std::thread::sleep(Duration::from_millis(500));
    let worker = nginx_worker(&dir.join("nginx.pid"))?;
    let url = format!("http://127.0.0.1:{NGINX_PORT}/index.html");
    // Each connection waits this long between a response and its next
    // request (wrk's delay() is in whole milliseconds).
    let delay_ms = (options.connections as f64 * 1000.0 / options.rate as f64).max(1.0);
    let script = dir.join("paced.lua");
    std::fs::write(
        &script,
        format!(
            "function delay()\n  return {}\nend\n",
            delay_ms.round() as u64
        ),
    )?;
    let sampled = dir.join("sampled.yaml");
    std::fs::write(&sampled, "tracing:\n  random_sampling: 10\n")?;
    // The kernel counts its programs' run time only while this is on.
    let _bpf_stats = BpfStats::enable()?;
    let receiver = Receiver::start()?;
    let grpc_endpoint = format!("http://127.0.0.1:{}", RECEIVER_PORTS.0);
    let file_output: [&OsStr; 2] = ["--output-file".as_ref(), "/dev/null".as_ref()];

    let mut results: Vec<(Setup, Vec<Measured>)> =
        Setup::ALL.iter().map(|s| (*s, Vec::new())).collect();
    for round in 1..=options.rounds {
        for (setup, measured) in &mut results {
            eprintln!("bench: round {round}/{}, {}", options.rounds, setup.label());
            let agent = match setup {
                Setup::Off => None,
                Setup::FileOutput => Some(start_agent(&file_output)?),
                Setup::Sampled10 => Some(start_agent(&[
                    file_output[0],
                    file_output[1],
                    "--config".as_ref(),
                    sampled.as_os_str(),
                ])?),
                Setup::GrpcOutput => Some(start_agent(&[
                    "--exporter-endpoint".as_ref(),
                    grpc_endpoint.as_ref(),
                ])?),
            };
            let paced = paced_run(&url, &script, options, worker, agent.as_ref())?;
            let saturation = super::wrk(&url)?;
            measured.push(Measured {
                paced,
                saturation_rps: saturation.requests_per_sec,
            });
            drop(agent);
        }
    }
    let received = receiver.stop()?;
    print_tables(options, delay_ms, &results);
    println!("\nthe OTLP receiver received {received} spans");
    Ok(())
}

/// The tests' OTLP receiver in a process of its own.
struct Receiver(std::process::Child);

impl Receiver {
    fn start() -> Result<Self> {
        let mut child = Command::new(RECEIVER)
            .args([
                format!("127.0.0.1:{}", RECEIVER_PORTS.0),
                format!("127.0.0.1:{}", RECEIVER_PORTS.1),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {RECEIVER}"))?;
        // It prints one line once it listens.
        let mut line = String::new();
        let stdout = child.stdout.as_mut().context("the receiver's stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        if !line.contains("listening") {
            let _ = child.kill();
            bail!("the OTLP receiver did not start: {line:?}");
        }
        Ok(Self(child))
    }

    /// Stops it and returns the spans it received.
    fn stop(mut self) -> Result<u64> {
        // SAFETY: a signal to our own child.
        unsafe { super::libc_kill(self.0.id() as i32, 15) };
        let mut out = String::new();
        if let Some(mut stdout) = self.0.stdout.take() {
            std::io::Read::read_to_string(&mut stdout, &mut out)?;
        }
        self.0.wait()?;
        out.lines()
            .find_map(|l| {
                l.strip_prefix("otlp-receiver: ")?
                    .strip_suffix(" spans")?
                    .parse()
                    .ok()
            })
            .with_context(|| format!("the receiver's count in {out:?}"))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `agent run` without the terminal view, with `extra` arguments (its
/// outputs), once it has loaded its probes and settled.
fn start_agent(extra: &[&OsStr]) -> Result<KillOnDrop> {
    let mut args: Vec<&OsStr> = vec![OsStr::new("run"), OsStr::new("--no-terminal")];
    args.extend_from_slice(extra);
    start_agent_ready(&args, AGENT_RUN_READY, None)
}

/// The pid of nginx's one worker (the master's child).
fn nginx_worker(pid_file: &Path) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(master) = std::fs::read_to_string(pid_file) {
            let master = master.trim();
            let children =
                std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
                    .unwrap_or_default();
            if let Some(worker) = children.split_whitespace().next() {
                return Ok(worker.parse()?);
            }
        }
        if Instant::now() > deadline {
            bail!("nginx's worker not found");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Busy CPU time of the whole machine, in clock ticks (/proc/stat).
fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    // cpu user nice system idle iowait irq softirq steal ...
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let busy = |i: usize| fields.get(i).copied().unwrap_or(0);
    Ok(busy(0) + busy(1) + busy(2) + busy(5) + busy(6) + busy(7))
}

/// utime + stime of `pid`, in clock ticks (all its threads).
fn process_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command may contain spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 here.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Resident memory of `pid`, MB.
fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Run time of the kernel programs `pid` holds (its probes), ns: the
/// `run_time_ns` of each program's fdinfo, which the kernel counts while
/// `kernel.bpf_stats_enabled` is 1.
fn bpf_run_time_ns(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .filter(|info| info.lines().any(|l| l.starts_with("prog_type:")))
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("run_time_ns:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Turns the kernel's BPF run-time statistics on, and back to what they
/// were when dropped.
struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self> {
        let before =
            std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(Self { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.before.trim());
    }
}

/// One fixed-rate wrk run, with the CPU it cost.
fn paced_run(
    url: &str,
    script: &Path,
    options: OverheadOptions,
    worker: u32,
    agent: Option<&KillOnDrop>,
) -> Result<Paced> {
    let ticks_per_sec = clock_ticks_per_sec();
    let agent_pid = agent.map(|a| a.0.id());
    let agent_ticks = || agent_pid.map_or(Ok(0), process_ticks);
    let agent_threads = || agent_pid.map(thread_run_ns).unwrap_or_default();
    let (machine0, agent0, nginx0, bpf0, threads0) = (
        machine_busy_ticks()?,
        agent_ticks()?,
        process_ticks(worker)?,
        bpf_run_time_ns(agent_pid),
        agent_threads(),
    );
    let output = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{}", options.connections),
            &format!("-d{}s", options.seconds),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .context("running wrk")?;
    let (machine1, agent1, nginx1, bpf1, threads1) = (
        machine_busy_ticks()?,
        agent_ticks()?,
        process_ticks(worker)?,
        bpf_run_time_ns(agent_pid),
        agent_threads(),
    );
    if !output.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let report = parse_wrk(&text)?;
    let requests = requests_done(&text)?;
    let per_request_us = |ticks: u64| ticks as f64 / ticks_per_sec * 1_000_000.0 / requests as f64;
    Ok(Paced {
        rate: report.requests_per_sec,
        machine_us: per_request_us(machine1 - machine0),
        agent_us: per_request_us(agent1 - agent0),
        nginx_us: per_request_us(nginx1 - nginx0),
        bpf_us: (bpf1 - bpf0) as f64 / 1000.0 / requests as f64,
        p50_ms: report.p50_ms,
        p99_ms: report.p99_ms,
        agent_rss_mb: agent_pid.map_or(0.0, rss_mb),
        main_thread_us: thread_us(&threads0, &threads1, "agent", requests),
        export_thread_us: thread_us(&threads0, &threads1, "span-export", requests),
    })
}

/// Run time in ns of each thread of `pid` (`/proc/PID/task/*/schedstat`,
/// nanoseconds, where `/proc/PID/stat` counts clock ticks), summed by
/// thread name.
fn thread_run_ns(pid: u32) -> Vec<(String, u64)> {
    let mut by_name: Vec<(String, u64)> = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let read = |file: &str| std::fs::read_to_string(task.path().join(file));
        let (Ok(name), Ok(schedstat)) = (read("comm"), read("schedstat")) else {
            continue;
        };
        let Some(ns) = run_ns(&schedstat) else {
            continue;
        };
        let name = name.trim();
        match by_name.iter_mut().find(|(n, _)| n == name) {
            Some((_, total)) => *total += ns,
            None => by_name.push((name.to_string(), ns)),
        }
    }
    by_name
}

/// The run time of one schedstat line: its first field, in ns.
fn run_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// µs per request the threads named `name` ran between two readings of
/// [`thread_run_ns`] (a thread that exited in between is not counted).
fn thread_us(before: &[(String, u64)], after: &[(String, u64)], name: &str, requests: u64) -> f64 {
    let of = |threads: &[(String, u64)]| {
        threads
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, ns)| *ns)
    };
    of(after).saturating_sub(of(before)) as f64 / 1000.0 / requests as f64
}

/// `N requests in 10.00s, ...` from wrk's report.
fn requests_done(text: &str) -> Result<u64> {
    text.lines()
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [n, "requests", "in", ..] => n.parse().ok(),
                _ => None,
            }
        })
        .filter(|n| *n > 0)
        .context("no request count in wrk's output")
}

/// The checked-out commit of the repository at `git_dir`, short, read from
/// its files (no git program needed).
fn head_commit(git_dir: &Path) -> Option<String> {
    let head = std::fs::read_to_string(git_dir.join("HEAD")).ok()?;
    let full = match head.trim().strip_prefix("ref: ") {
        None => head.trim().to_string(),
        Some(reference) => std::fs::read_to_string(git_dir.join(reference))
            .ok()
            .map(|id| id.trim().to_string())
            .or_else(|| {
                // A packed ref: "<id> <name>" lines.
                std::fs::read_to_string(git_dir.join("packed-refs"))
                    .ok()?
                    .lines()
                    .find_map(|line| {
                        let (id, name) = line.split_once(' ')?;
                        (name == reference).then(|| id.to_string())
                    })
            })?,
    };
    Some(full.chars().take(7).collect())
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory effects.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn print_tables(options: OverheadOptions, delay_ms: f64, results: &[(Setup, Vec<Measured>)]) {
    let commit = head_commit(Path::new(".git")).unwrap_or_else(|| "unknown".into());
    let off = &results[0].1;
    let med = |m: &[Measured], f: fn(&Paced) -> f64| median(m, |x| f(&x.paced));
    println!(
        "\nagent overhead, fixed rate: nginx static file, wrk -t1 -c{} -d{}s paced at {} ms \
         per connection (asked: about {} requests/s); medians of {} rounds; commit {commit}",
        options.connections,
        options.seconds,
        delay_ms.round(),
        options.rate,
        options.rounds
    );
    println!(
        "| setup | requests/s reached | machine µs/request | added | agent µs/request | \
         nginx worker µs/request | added | kernel programs µs/request | p50 ms | p99 ms | agent RSS MB |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let machine_off = med(off, |p| p.machine_us);
    let nginx_off = med(off, |p| p.nginx_us);
    for (setup, measured) in results {
        let machine = med(measured, |p| p.machine_us);
        let nginx = med(measured, |p| p.nginx_us);
        println!(
            "| {} | {:.0} | {machine:.1} | {:+.1} | {:.1} | {nginx:.1} | {:+.1} | {:.2} | {:.3} | {:.3} | {:.1} |",
            setup.label(),
            med(measured, |p| p.rate),
            machine - machine_off,
            med(measured, |p| p.agent_us),
            nginx - nginx_off,
            med(measured, |p| p.bpf_us),
            med(measured, |p| p.p50_ms),
            med(measured, |p| p.p99_ms),
            med(measured, |p| p.agent_rss_mb),
        );
    }
    println!(
        "\nthe agent's threads, fixed rate (run time from /proc/PID/task/*/schedstat; medians)"
    );
    println!("| setup | main thread µs/request | span-export µs/request |");
    println!("| --- | --- | --- |");
    for (setup, measured) in &results[1..] {
        println!(
            "| {} | {:.2} | {:.2} |",
            setup.label(),
            med(measured, |p| p.main_thread_us),
            med(measured, |p| p.export_thread_us),
        );
    }
    let sampled_ratio = med(&results[2].1, |p| p.agent_us) / med(&results[1].1, |p| p.agent_us);
    println!(
        "\nagent CPU per request with random_sampling 10 / with 100: {sampled_ratio:.2} (target: at most 0.40)"
    );
    println!(
        "\nagent overhead, saturation: wrk {} (medians of {} rounds)",
        WRK_ARGS.join(" "),
        options.rounds
    );
    println!("| setup | requests/s | vs agent off |");
    println!("| --- | --- | --- |");
    let saturation_off = median(off, |m| m.saturation_rps);
    for (setup, measured) in results {
        let rps = median(measured, |m| m.saturation_rps);
        println!(
            "| {} | {rps:.0} | {:.3} |",
            setup.label(),
            rps / saturation_off
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_count_is_read_from_wrk() {
        let text =
            "Running 10s test\n  45012 requests in 10.00s, 30.1MB read\nRequests/sec:   4501.20\n";
        assert_eq!(requests_done(text).unwrap(), 45012);
        assert!(requests_done("Requests/sec: 1\n").is_err());
    }

    #[test]
    fn the_commit_is_read_from_git() {
        // The workspace is a git checkout.
        let git_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.git");
        let commit = head_commit(&git_dir).expect("a commit");
        assert_eq!(commit.len(), 7);
        assert!(commit.chars().all(|c| c.is_ascii_hexdigit()), "{commit}");
    }

    #[test]
    fn thread_run_time_is_read_by_name() {
        assert_eq!(run_ns("123456 789 10\n"), Some(123_456));
        assert_eq!(run_ns(""), None);
        let threads = thread_run_ns(std::process::id());
        assert!(!threads.is_empty(), "this process has threads");
        let before = vec![("agent".to_string(), 1_000_000)];
        let after = vec![("agent".to_string(), 3_000_000), ("span-export".into(), 5)];
        assert_eq!(thread_us(&before, &after, "agent", 1000), 2.0);
        assert_eq!(thread_us(&before, &after, "missing", 1000), 0.0);
    }

    #[test]
    fn this_process_has_cpu_ticks() {
        assert!(process_ticks(std::process::id()).is_ok());
        assert!(machine_busy_ticks().unwrap() > 0);
    }
}
