//! `cargo xtask bench`: the criterion benchmark of the user-space pipeline;
//! the agent's overhead on a traced server (the same wrk load against a
//! local nginx with the agent off and on, alternating, in one run); and the
//! proxy against nginx and haproxy doing the same hop (direct, through each,
//! in one run).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::run;

mod overhead;

pub use overhead::OverheadOptions;

/// wrk settings: bounded by duration, so the load stops by itself.
const WRK_ARGS: &[&str] = &["-t2", "-c50", "-d5s", "--latency"];

/// One wrk run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct WrkResult {
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// One of the benchmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// The user-space pipeline on recorded events (criterion).
    Pipeline,
    /// nginx under wrk with the agent off and on.
    Overhead,
    /// Direct, through this proxy, nginx and haproxy.
    Proxy,
}

/// Runs every benchmark, or only `only`; `criterion_args` go to criterion.
pub fn bench(
    only: Option<Part>,
    overhead_options: OverheadOptions,
    criterion_args: &[String],
) -> Result<()> {
    let runs = |part| only.is_none_or(|only| only == part);
    if runs(Part::Pipeline) {
        run(crate::toolchain::cargo()
            .args(["bench", "--package", "agent", "--bench", "pipeline", "--"])
            .args(criterion_args))?;
    }
    run(crate::toolchain::cargo().args(["build", "--release", "--package", "agent"]))?;
    if runs(Part::Overhead) {
        // The OTLP/gRPC row's receiver.
        run(crate::toolchain::cargo().args([
            "build",
            "--release",
            "--package",
            "tests",
            "--bin",
            "otlp-receiver",
        ]))?;
    }
    if runs(Part::Overhead) {
        overhead::overhead(overhead_options)?;
    }
    if runs(Part::Proxy) {
        proxies()?;
    }
    Ok(())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signal to our own child.
        unsafe { libc_kill(self.0.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

/// Ports of the proxy comparison: the backend, nginx and haproxy as
/// reverse proxies, and our proxy's listener.
const PROXY_BACKEND_PORT: u16 = 18281;
const NGINX_PROXY_PORT: u16 = 18282;
const HAPROXY_PORT: u16 = 18283;
const OUR_PROXY_LISTEN: u16 = 18284;
/// Redirected by the bench's own rule to nginx's and haproxy's ports, so
/// that they take the same hop as our proxy: a connection to one address
/// rewritten by REDIRECT to the proxy's.
const NGINX_REDIRECTED_PORT: u16 = 18286;
const HAPROXY_REDIRECTED_PORT: u16 = 18287;
/// The bench's nat chain for those two rules.
const BENCH_CHAIN: &str = "TTA_BENCH";
/// wrk at a fixed rate: 10 connections for 5 s, each sending its next
/// request 10 ms after the last response (the script below), so about
/// 1,000 requests/s, with wrk's microsecond resolution; hey, used before,
/// reports 0.1 ms steps, coarser than the proxies differ.
const WRK_FIXED_RATE: &[&str] = &["-t1", "-c10", "-d5s", "--latency", "-s"];
/// The wrk script that paces each connection.
const WRK_PACING_SCRIPT: &str =
    "-- 10 ms between a response and the next request.\nfunction delay()\n  return 10\nend\n";
/// Rounds of the proxy comparison: one-connection latencies differ by a
/// few microseconds, less than this machine's noise between two runs, so
/// more rounds than elsewhere.
const PROXY_ROUNDS: usize = 5;

/// One configuration's figures.
#[derive(Clone, Copy, Debug, Default)]
struct HopResult {
    saturation_rps: f64,
    /// At a fixed rate (wrk paced by a script; microsecond resolution).
    p50_ms: f64,
    p99_ms: f64,
    /// One connection, one request at a time (wrk; microsecond resolution).
    single_p50_ms: f64,
    single_p99_ms: f64,
}

/// wrk with one connection: latency without queueing, finely resolved.
const WRK_SINGLE: &[&str] = &["-t1", "-c1", "-d3s", "--latency"];

/// The ways from wrk to the backend that are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hop {
    Direct,
    /// `agent proxy`: the proxy alone, as nginx and haproxy are.
    OurProxy,
    /// `agent run` with `proxy.enabled`: the probes trace every process and
    /// the proxy takes each request's context from them.
    OurProxyInAgent,
    Nginx,
    /// nginx reached through a REDIRECT rule, as our proxy is.
    NginxRedirected,
    Haproxy,
    /// haproxy reached through a REDIRECT rule, as our proxy is.
    HaproxyRedirected,
}

impl Hop {
    const ALL: [Hop; 7] = [
        Hop::Direct,
        Hop::OurProxy,
        Hop::OurProxyInAgent,
        Hop::Nginx,
        Hop::NginxRedirected,
        Hop::Haproxy,
        Hop::HaproxyRedirected,
    ];

    fn label(self) -> &'static str {
        match self {
            Hop::Direct => "direct",
            Hop::OurProxy => "this proxy (`agent proxy`)",
            Hop::OurProxyInAgent => "this proxy in `agent run` (probes on)",
            Hop::Nginx => "nginx",
            Hop::NginxRedirected => "nginx behind the same REDIRECT",
            Hop::Haproxy => "haproxy",
            Hop::HaproxyRedirected => "haproxy behind the same REDIRECT",
        }
    }

    /// Where wrk sends its requests: our proxy is transparent, so its URL
    /// is the backend's, redirected by iptables.
    fn url(self) -> String {
        let port = match self {
            Hop::Direct | Hop::OurProxy | Hop::OurProxyInAgent => PROXY_BACKEND_PORT,
            Hop::Nginx => NGINX_PROXY_PORT,
            Hop::NginxRedirected => NGINX_REDIRECTED_PORT,
            Hop::Haproxy => HAPROXY_PORT,
            Hop::HaproxyRedirected => HAPROXY_REDIRECTED_PORT,
        };
        format!("http://127.0.0.1:{port}/index.html")
    }
}

fn proxies() -> Result<()> {
    let dir = std::path::absolute(PathBuf::from("target/bench-proxy"))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("www"))?;
    let pacing_script = dir.join("paced.lua");
    std::fs::write(&pacing_script, WRK_PACING_SCRIPT)?;
    std::fs::write(dir.join("www/index.html"), "x".repeat(512))?;
    let d = dir.display();
    // The backend and nginx-as-proxy are separate nginx instances: sharing
    // one worker, the proxy's hop to the backend would cost nginx no
    // wake-up at all, which is not the hop being compared.
    let backend = write_nginx_conf(
        &dir,
        "backend",
        "1",
        &format!("server {{ listen 127.0.0.1:{PROXY_BACKEND_PORT}; root {d}/www; }}"),
    )?;
    // As many workers as cores, like our proxy's runtime and haproxy's
    // threads.
    let nginx_proxy = write_nginx_conf(
        &dir,
        "nginx-proxy",
        "auto",
        &format!(
            "upstream backend {{ server 127.0.0.1:{PROXY_BACKEND_PORT}; keepalive 64; }}\n  \
             server {{ listen 127.0.0.1:{NGINX_PROXY_PORT}; location / {{ proxy_pass http://backend; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        ),
    )?;
    std::fs::write(
        dir.join("haproxy.cfg"),
        format!(
            "global\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend f\n  bind 127.0.0.1:{HAPROXY_PORT}\n  default_backend b\n\
             backend b\n  http-reuse always\n  server s 127.0.0.1:{PROXY_BACKEND_PORT}\n"
        ),
    )?;
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "proxy:\n  enabled: true\n  mode: host\n  listen_port: {OUR_PROXY_LISTEN}\n  ports: [{PROXY_BACKEND_PORT}]\n"
        ),
    )?;
    let backend_server = start_nginx(&dir, &backend)?;
    let nginx_proxy_server = start_nginx(&dir, &nginx_proxy)?;
    let haproxy_server = KillOnDrop(
        Command::new("haproxy")
            .args(["-f", &dir.join("haproxy.cfg").to_string_lossy(), "-db"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting haproxy")?,
    );
    let _redirects = BenchRedirects::install()?;
    std::thread::sleep(Duration::from_millis(500));

    let mut rows: Vec<(Hop, Vec<HopResult>)> = Hop::ALL.iter().map(|&h| (h, Vec::new())).collect();
    for round in 1..=PROXY_ROUNDS {
        for (hop, results) in &mut rows {
            eprintln!(
                "bench: proxy comparison, round {round}/{PROXY_ROUNDS}: {}",
                hop.label()
            );
            let _proxy = start_our_proxy(*hop, &config, None)?;
            results.push(measure_hop(&hop.url(), &pacing_script)?);
        }
    }
    // The same one-connection latency with every process on one core:
    // without the scheduler's choice of cores, which decides how many
    // wake-ups per request cross to the other core and moves results by
    // more than the hops differ, only each hop's own work is left.
    let core = last_core();
    for pid in [&backend_server, &nginx_proxy_server, &haproxy_server].map(|c| c.0.id()) {
        pin_process_tree(pid, core)?;
    }
    let mut one_core: Vec<(Hop, Vec<WrkResult>)> =
        Hop::ALL.iter().map(|&h| (h, Vec::new())).collect();
    for round in 1..=PROXY_ROUNDS {
        for (hop, results) in &mut one_core {
            eprintln!(
                "bench: proxy comparison on core {core}, round {round}/{PROXY_ROUNDS}: {}",
                hop.label()
            );
            let _proxy = start_our_proxy(*hop, &config, Some(core))?;
            let mut wrk = Command::new("taskset");
            wrk.args(["-c", &core.to_string(), "wrk"])
                .args(WRK_SINGLE)
                .arg(hop.url());
            results.push(wrk_command(&mut wrk)?);
        }
    }
    // Each comparison with direct is made within a round and the median
    // taken over rounds: this machine's speed drifts between rounds by
    // more than the differences measured, and a round runs every hop
    // within a minute.
    let direct = rows[0].1.clone();
    println!(
        "\nproxy comparison: nginx backend; saturation = wrk {}; latency = wrk {} paced.lua (10 ms between a response and the next request on each connection, about 1,000 requests/s); medians of {PROXY_ROUNDS} rounds, each hop compared with direct in the same round",
        WRK_ARGS.join(" "),
        WRK_FIXED_RATE.join(" ")
    );
    println!("| path | requests/s | vs direct | p50 ms | added p50 ms | p99 ms | added p99 ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (hop, results) in &rows {
        println!(
            "| {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            hop.label(),
            median(results, |r| r.saturation_rps),
            paired(
                results,
                &direct,
                |r| r.saturation_rps,
                |hop, direct| hop / direct
            ),
            median(results, |r| r.p50_ms),
            added(results, &direct, |r| r.p50_ms),
            median(results, |r| r.p99_ms),
            added(results, &direct, |r| r.p99_ms),
        );
    }
    println!(
        "\nlatency on one connection (wrk {}), microseconds; medians of {PROXY_ROUNDS} rounds, added = hop - direct in the same round",
        WRK_SINGLE.join(" ")
    );
    println!("| path | p50 µs | added p50 µs | p99 µs | added p99 µs | p50 of each round µs |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (hop, results) in &rows {
        let each: Vec<String> = results
            .iter()
            .map(|r| format!("{:.0}", r.single_p50_ms * 1000.0))
            .collect();
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
            hop.label(),
            median(results, |r| r.single_p50_ms) * 1000.0,
            added(results, &direct, |r| r.single_p50_ms) * 1000.0,
            median(results, |r| r.single_p99_ms) * 1000.0,
            added(results, &direct, |r| r.single_p99_ms) * 1000.0,
            each.join(" ")
        );
    }
    let direct = one_core[0].1.clone();
    println!(
        "\nlatency on one connection with every process on core {core} (taskset; wrk {}), microseconds; medians of {PROXY_ROUNDS} rounds, added = hop - direct in the same round",
        WRK_SINGLE.join(" ")
    );
    println!(
        "| path | requests/s | p50 µs | added p50 µs | p99 µs | added p99 µs | p50 of each round µs |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (hop, results) in &one_core {
        let each: Vec<String> = results
            .iter()
            .map(|r| format!("{:.0}", r.p50_ms * 1000.0))
            .collect();
        let added = |f: fn(&WrkResult) -> f64| {
            let each: Vec<f64> = results
                .iter()
                .zip(&direct)
                .map(|(h, d)| f(h) - f(d))
                .collect();
            median(&each, |&v| v)
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
            hop.label(),
            median(results, |r| r.requests_per_sec),
            median(results, |r| r.p50_ms) * 1000.0,
            added(|r| r.p50_ms) * 1000.0,
            median(results, |r| r.p99_ms) * 1000.0,
            added(|r| r.p99_ms) * 1000.0,
            each.join(" "),
        );
    }
    Ok(())
}

/// Starts what `hop` needs of ours (nothing for the others), pinned to
/// `core` if given.
fn start_our_proxy(hop: Hop, config: &Path, core: Option<usize>) -> Result<Option<KillOnDrop>> {
    let config = config.as_os_str();
    Ok(match hop {
        Hop::OurProxy => Some(start_agent_ready(
            &[OsStr::new("proxy"), OsStr::new("--config"), config],
            AGENT_PROXY_READY,
            core,
        )?),
        Hop::OurProxyInAgent => Some(start_agent_ready(
            &[
                OsStr::new("run"),
                OsStr::new("--output-file"),
                OsStr::new("/dev/null"),
                OsStr::new("--no-terminal"),
                OsStr::new("--config"),
                config,
            ],
            AGENT_RUN_READY,
            core,
        )?),
        _ => None,
    })
}

/// The highest-numbered core this process may use.
fn last_core() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get() - 1)
}

/// Pins `pid`, its threads and its child processes (nginx's workers) to
/// `core`.
fn pin_process_tree(pid: u32, core: usize) -> Result<()> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .with_context(|| format!("children of {pid}"))?;
    for pid in std::iter::once(pid.to_string()).chain(children.split_whitespace().map(String::from))
    {
        run(Command::new("taskset")
            .args(["-a", "-p", "-c", &core.to_string(), &pid])
            .stdout(Stdio::null()))?;
    }
    Ok(())
}

/// The bench's REDIRECT rules for nginx's and haproxy's redirected ports,
/// in a nat chain of its own; removed when dropped.
struct BenchRedirects;

impl BenchRedirects {
    fn install() -> Result<Self> {
        // A bench killed before its cleanup left the chain behind.
        Self::remove();
        run(Command::new("iptables").args(["-t", "nat", "-N", BENCH_CHAIN]))?;
        let redirects = Self;
        for (from, to) in [
            (NGINX_REDIRECTED_PORT, NGINX_PROXY_PORT),
            (HAPROXY_REDIRECTED_PORT, HAPROXY_PORT),
        ] {
            run(Command::new("iptables").args([
                "-t",
                "nat",
                "-A",
                BENCH_CHAIN,
                "-p",
                "tcp",
                "-d",
                "127.0.0.1",
                "--dport",
                &from.to_string(),
                "-j",
                "REDIRECT",
                "--to-ports",
                &to.to_string(),
            ]))?;
        }
        run(Command::new("iptables").args(["-t", "nat", "-I", "OUTPUT", "-j", BENCH_CHAIN]))?;
        Ok(redirects)
    }

    fn remove() {
        for args in [
            &["-t", "nat", "-D", "OUTPUT", "-j", BENCH_CHAIN][..],
            &["-t", "nat", "-F", BENCH_CHAIN],
            &["-t", "nat", "-X", BENCH_CHAIN],
        ] {
            let _ = Command::new("iptables")
                .args(args)
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for BenchRedirects {
    fn drop(&mut self) {
        Self::remove();
    }
}

/// The median over rounds of what a hop adds to direct's `f`.
fn added(results: &[HopResult], direct: &[HopResult], f: fn(&HopResult) -> f64) -> f64 {
    paired(results, direct, f, |hop, direct| hop - direct)
}

/// The median over rounds of `compare(f(hop), f(direct))`, each hop's
/// result compared with direct's of the same round.
fn paired(
    results: &[HopResult],
    direct: &[HopResult],
    f: fn(&HopResult) -> f64,
    compare: fn(f64, f64) -> f64,
) -> f64 {
    let compared: Vec<f64> = results
        .iter()
        .zip(direct)
        .map(|(hop, direct)| compare(f(hop), f(direct)))
        .collect();
    median(&compared, |&v| v)
}

/// What `agent run` prints once its probes are loaded and attached (and
/// its proxy, if enabled, serves behind its rules).
const AGENT_RUN_READY: &str = "agent: tracing HTTP";

/// What `agent proxy` prints once it serves behind its rules.
const AGENT_PROXY_READY: &str = "agent: proxy on port";

/// How long the agent may take to load its probes.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts `target/release/agent` with `args`, pinned to `core` if given,
/// and returns once it has printed a line starting with `ready`, and a
/// second more to settle. Not a fixed wait: loading the probes (the
/// kernel's verifier) takes seconds of CPU on a slow machine, longer on a
/// busy or single core, and a fixed wait both counted some of it in the
/// first round measured and, with the agent pinned to one core, let wrk
/// open its one keep-alive connection before the proxy's rules existed
/// (that round went direct).
fn start_agent_ready(
    args: &[&OsStr],
    ready: &'static str,
    core: Option<usize>,
) -> Result<KillOnDrop> {
    let mut command = match core {
        Some(core) => {
            let mut taskset = Command::new("taskset");
            taskset.args(["-c", &core.to_string(), "target/release/agent"]);
            taskset
        }
        None => Command::new("target/release/agent"),
    };
    let mut agent = KillOnDrop(
        command
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the agent")?,
    );
    let stderr = agent.0.stderr.take().context("the agent's stderr")?;
    let (ready_tx, is_ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end, so that the agent never blocks on a full pipe.
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if line.starts_with(ready) {
                let _ = ready_tx.send(());
            }
        }
    });
    is_ready
        .recv_timeout(AGENT_START_TIMEOUT)
        .with_context(|| {
            format!("the agent did not print {ready:?} within {AGENT_START_TIMEOUT:?}")
        })?;
    std::thread::sleep(Duration::from_secs(1));
    Ok(agent)
}

/// Starts nginx with the configuration file `conf` (prefix `dir`).
fn start_nginx(dir: &Path, conf: &Path) -> Result<KillOnDrop> {
    Ok(KillOnDrop(
        Command::new("nginx")
            .args(["-c", &conf.to_string_lossy(), "-p", &dir.to_string_lossy()])
            .spawn()
            .context("starting nginx")?,
    ))
}

/// Saturation throughput, latency on one connection, then latency at a
/// fixed rate paced by `pacing_script`, all with wrk.
fn measure_hop(url: &str, pacing_script: &Path) -> Result<HopResult> {
    let saturation = wrk(url)?;
    let single = wrk_with(WRK_SINGLE, url)?;
    let paced = wrk_command(
        Command::new("wrk")
            .args(WRK_FIXED_RATE)
            .arg(pacing_script)
            .arg(url),
    )?;
    Ok(HopResult {
        saturation_rps: saturation.requests_per_sec,
        p50_ms: paced.p50_ms,
        p99_ms: paced.p99_ms,
        single_p50_ms: single.p50_ms,
        single_p99_ms: single.p99_ms,
    })
}

/// The median of `f` over the rounds' results.
fn median<T>(results: &[T], f: impl Fn(&T) -> f64) -> f64 {
    let mut values: Vec<f64> = results.iter().map(f).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Writes `<name>.conf`, an nginx configuration with `workers` worker
/// processes, everything it writes under `dir`, no access log, and the
/// `http` block's `servers`; returns its path.
fn write_nginx_conf(dir: &Path, name: &str, workers: &str, servers: &str) -> Result<PathBuf> {
    let d = dir.display();
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(
        &path,
        format!(
            "daemon off;\nworker_processes {workers};\npid {d}/{name}.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             keepalive_requests 1000000;\n  {servers}\n}}\n"
        ),
    )?;
    Ok(path)
}

fn wrk(url: &str) -> Result<WrkResult> {
    wrk_with(WRK_ARGS, url)
}

fn wrk_with(args: &[&str], url: &str) -> Result<WrkResult> {
    wrk_command(Command::new("wrk").args(args).arg(url))
}

/// Runs a prepared wrk command line and reads its report.
fn wrk_command(command: &mut Command) -> Result<WrkResult> {
    let output = command.output().context("running wrk")?;
    if !output.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&output.stdout))
}

/// Reads requests/s and the 50 % / 99 % latencies from wrk's report.
fn parse_wrk(text: &str) -> Result<WrkResult> {
    let mut result = WrkResult::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => result.requests_per_sec = value.parse()?,
            ["50%", value] => result.p50_ms = duration_ms(value)?,
            ["99%", value] => result.p99_ms = duration_ms(value)?,
            _ => {}
        }
    }
    if result.requests_per_sec == 0.0 {
        bail!("no Requests/sec in wrk's output:\n{text}");
    }
    Ok(result)
}

/// `812.00us`, `1.23ms`, `2.00s` -> milliseconds.
fn duration_ms(value: &str) -> Result<f64> {
    let (number, factor) = if let Some(n) = value.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unknown duration {value}")
    };
    Ok(number.parse::<f64>()? * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_report_is_parsed() {
        let text = "  Latency Distribution\n     50%  812.00us\n     75%    1.10ms\n     90%    2.00ms\n     99%    5.21ms\n  100 requests\nRequests/sec:  61234.56\nTransfer/sec:      9.12MB\n";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.requests_per_sec, 61234.56);
        assert!((r.p50_ms - 0.812).abs() < 1e-9);
        assert!((r.p99_ms - 5.21).abs() < 1e-9);
    }

    #[test]
    fn report_without_throughput_is_an_error() {
        assert!(parse_wrk("garbage").is_err());
    }
}
