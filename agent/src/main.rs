//! `agent`: the node agent's command line.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use agent::capture::{Capture, CaptureEvent, Direction, Message, ProbeSettings, Role};
use agent::http::{StartLine, start_line};
use anyhow::Result;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(version, about = "eBPF-assisted transparent HTTP tracing agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture HTTP traffic of every process on this machine and print each
    /// request and response line.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Bytes of each message the kernel copies (1 to 16384).
    #[arg(long, default_value_t = ProbeSettings::default().max_message_bytes)]
    max_message_bytes: u32,
    /// Size of the kernel-to-agent ring buffer in bytes (a power of two).
    #[arg(long, default_value_t = ProbeSettings::default().ring_buffer_bytes)]
    ring_buffer_bytes: u32,
    /// Seconds between counter reports on stderr (0: only at exit).
    #[arg(long, default_value_t = 0)]
    stats_interval: u64,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let result = runtime
        .map_err(anyhow::Error::from)
        .and_then(|rt| match cli.command {
            Command::Run(args) => rt.block_on(run(args)),
        });
    if let Err(e) = result {
        eprintln!("agent: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let settings = ProbeSettings {
        max_message_bytes: args.max_message_bytes,
        ring_buffer_bytes: args.ring_buffer_bytes,
    };
    let (capture, mut events) = Capture::start(settings, 4096)?;
    eprintln!("agent: capturing HTTP on all TCP connections (Ctrl-C to stop)");
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut stats = tokio::time::interval(Duration::from_secs(args.stats_interval.max(1)));
    let mut view = RequestLineView::default();
    let stdout = std::io::stdout();
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => view.show(&event, &mut stdout.lock()),
                None => break,
            },
            _ = stats.tick(), if args.stats_interval > 0 => report_counters(&capture),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    report_counters(&capture);
    // Dropping the capture detaches every probe before the process exits.
    drop(capture);
    Ok(())
}

fn report_counters(capture: &Capture) {
    match capture.counters() {
        Ok(counters) => {
            let line: Vec<String> = counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
            eprintln!("agent: counters {}", line.join(" "));
        }
        Err(e) => eprintln!("agent: cannot read counters: {e:#}"),
    }
}

/// The terminal view until spans replace it: one line per HTTP start line.
#[derive(Default)]
struct RequestLineView {
    process_names: HashMap<u32, String>,
}

impl RequestLineView {
    fn show(&mut self, event: &CaptureEvent, out: &mut impl Write) {
        let CaptureEvent::Data(message) = event else {
            return;
        };
        let Some(line) = start_line(&message.bytes) else {
            return;
        };
        let name = self.process_name(message.connection.pid);
        let _ = writeln!(out, "{}", format_line(message, &line, name));
    }

    fn process_name(&mut self, pid: u32) -> &str {
        self.process_names.entry(pid).or_insert_with(|| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| s.trim_end().to_string())
                .unwrap_or_else(|_| "?".to_string())
        })
    }
}

/// `pid 42 (curl) client 127.0.0.1:5000 -> 127.0.0.1:8000  GET / HTTP/1.1`
fn format_line(message: &Message, line: &StartLine, process: &str) -> String {
    let c = &message.connection;
    let side = match (c.role, line) {
        (Role::Client, _) => "client",
        (Role::Server, _) => "server",
        // Unknown role: whoever sends a request is the client.
        (Role::Unknown, StartLine::Request { .. }) if message.direction == Direction::Egress => {
            "client"
        }
        (Role::Unknown, StartLine::Response { .. }) if message.direction == Direction::Ingress => {
            "client"
        }
        (Role::Unknown, _) => "server",
    };
    let arrow = match message.direction {
        Direction::Egress => "->",
        Direction::Ingress => "<-",
    };
    format!(
        "pid {} ({process}) {side} {} {arrow} {}  {line}",
        c.pid, c.local, c.remote
    )
}
