//! `agent`: the node agent's command line.

use std::time::Duration;

use agent::capture::{Capture, CaptureEvent};
use agent::config::ConfigOverrides;
use agent::correlate::{Correlator, ProcessTable};
use agent::export::{ExportSettings, SpanSinks};
use anyhow::{Context, Result};
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
    /// Trace the HTTP traffic of every process on this machine. Spans go to
    /// an OTLP collector, a file, or (the default) the terminal.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigOverrides,
    /// Seconds between counter reports on stderr (0: only at exit).
    #[arg(long, default_value_t = 0)]
    stats_interval: u64,
}

/// Capture events queued between the ring-buffer reader and correlation.
const EVENT_QUEUE: usize = 4096;

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
    let config = args.config.load()?;
    let sampler = config.sampler()?;
    let mut correlator = Correlator::new(
        sampler,
        config.span_settings(),
        ProcessTable::new("/proc", config.process_filter()),
    );
    let outputs = config.exporters(|name| std::env::var(name).ok());
    let output_names: Vec<&str> = outputs.iter().map(|o| o.kind()).collect();
    let output_names = output_names.join(", ");
    let sinks = SpanSinks::start(outputs, &ExportSettings::default())
        .context("starting the span outputs")?;
    let (capture, mut events) = Capture::start(config.capture.probe_settings(), EVENT_QUEUE)?;
    eprintln!(
        "agent: tracing HTTP on all TCP connections, sampling {}%, spans to {output_names} (Ctrl-C to stop)",
        config.tracing.random_sampling
    );

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut stats = tokio::time::interval(Duration::from_secs(args.stats_interval.max(1)));
    let mut spans = Vec::new();
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => {
                    correlator.handle(&event, &mut spans);
                    for span in spans.drain(..) {
                        // Never block capture on a slow output: a full
                        // queue drops the span and counts it.
                        sinks.try_send(span);
                    }
                    log_event(&event);
                }
                None => break,
            },
            _ = stats.tick(), if args.stats_interval > 0 => report_counters(&capture, &correlator, &sinks),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    report_counters(&capture, &correlator, &sinks);
    // Dropping the capture detaches every probe; then deliver what is queued.
    drop(capture);
    sinks.shutdown().await;
    Ok(())
}

/// Every captured message at trace level (`RUST_LOG=agent=trace`), for
/// debugging what the kernel delivers.
fn log_event(event: &CaptureEvent) {
    if let CaptureEvent::Data(m) = event
        && log::log_enabled!(log::Level::Trace)
    {
        let c = &m.connection;
        log::trace!(
            "pid {} tid {} {:?} {} {:?} {} bytes: {:?}",
            c.pid,
            m.tid,
            c.role,
            c.local,
            m.direction,
            m.len,
            agent::http::start_line(&m.bytes).map(|l| l.to_string())
        );
    }
}

fn report_counters(capture: &Capture, correlator: &Correlator, sinks: &SpanSinks) {
    let mut line: Vec<String> = match capture.counters() {
        Ok(counters) => counters.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        Err(e) => vec![format!("capture_counters_unreadable=({e:#})")],
    };
    let c = correlator.counters();
    line.push(format!(
        "spans={} sampled_out={} filtered_out={}",
        c.spans, c.sampled_out, c.filtered_out
    ));
    line.push(format!(
        "broken_connections={} evicted_connections={}",
        c.broken_connections, c.evicted_connections
    ));
    for (output, counts) in sinks.counts() {
        for (k, v) in counts.pairs() {
            line.push(format!("{output}_{k}={v}"));
        }
    }
    eprintln!("agent: counters {}", line.join(" "));
}
