//! `agent`: the node agent's command line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::capture::{Capture, CaptureEvent, Woken};
use agent::config::ConfigOverrides;
use agent::correlate::{Correlator, ProcessTable, ProxyContexts};
use agent::export::{ExportSettings, SpanSinks};
use agent::kubernetes::{self, Enablement, KubernetesSettings, PodDirectory};
use agent::metrics::{Health, Reading};
use agent::proxy::{RunningProxy, StandaloneContexts};
use agent::span::Span;
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
    /// an OTLP collector, a file, or (the default) the terminal. With
    /// `proxy.enabled` it also runs the traceparent-injecting proxy.
    Run(RunArgs),
    /// Run only the transparent proxy and its iptables rules (for
    /// debugging): every proxied request starts a new trace.
    Proxy(ProxyArgs),
}

#[derive(clap::Args)]
struct ProxyArgs {
    #[command(flatten)]
    config: ConfigOverrides,
    /// Print the iptables rules the `proxy:` section describes, and exit.
    #[arg(long)]
    dry_run: bool,
    /// Do not install iptables rules (they are set up by someone else).
    #[arg(long)]
    no_rules: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigOverrides,
    /// Seconds between counter reports on stderr (0: only at exit).
    #[arg(long, default_value_t = 0)]
    stats_interval: u64,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => ExportRuntime::start().and_then(|export| {
            agent_runtime().and_then(|rt| rt.block_on(run(args, export.handle())))
        }),
        Command::Proxy(args) => agent_runtime().and_then(|rt| rt.block_on(proxy_only(args))),
    };
    if let Err(e) = result {
        eprintln!("agent: {e:#}");
        std::process::exit(1);
    }
}

/// The longest the span outputs' thread is waited for at exit.
const EXPORT_SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// The runtime of the capture and correlation loop (and the proxy's
/// accept loops): one thread, so the ring buffer's readiness wakes exactly
/// the thread that reads it. The proxy's connections and the span outputs
/// have threads of their own.
fn agent_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the agent's runtime")
}

/// The span outputs' runtime, one thread. Encoding and sending spans is
/// the agent's heaviest work and nothing waits on it, while the proxy waits
/// on the correlation loop for each request's context: on a thread of
/// their own, the outputs never hold up that loop.
///
/// Dropping it shuts the runtime down with a bounded wait, however `main`
/// is left (a panic in `run` included): queued spans were delivered by
/// `run`, and a plain drop would wait without limit for a thread that may
/// be stuck in a blocking write.
struct ExportRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl ExportRuntime {
    fn start() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("span-export")
            .enable_all()
            .build()
            .context("starting the span outputs' thread")?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for ExportRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(EXPORT_SHUTDOWN_WAIT);
        }
    }
}

async fn run(args: RunArgs, export: &tokio::runtime::Handle) -> Result<()> {
    let config = args.config.load()?;
    let sampler = config.sampler()?;
    let pods = watch_pods(&config.kubernetes.kubernetes_settings(), export)?;
    let mut processes = ProcessTable::new("/proc", config.process_filter());
    if let Some(pods) = &pods {
        processes = processes.with_pods(pods.clone());
    }
    let mut correlator = Correlator::new(sampler, config.span_settings(), processes);
    let health = Arc::new(Health::default());
    if let Some(address) = config.metrics.metrics_settings().address {
        start_metrics(export, address, health.clone());
    }
    let outputs = config.exporters(|name| std::env::var(name).ok());
    let output_names: Vec<&str> = outputs.iter().map(|o| o.kind()).collect();
    let output_names = if output_names.is_empty() {
        "no output (counters only)".to_string()
    } else {
        output_names.join(", ")
    };
    let sinks = {
        let _on_export_thread = export.enter();
        SpanSinks::start(outputs, &ExportSettings::default())
    }
    .context("starting the span outputs")?;
    let mut probe_settings = config.capture.probe_settings();
    if config.proxy.enabled {
        // The proxy waits for the agent's view of these requests.
        probe_settings.wake_ports = config.proxy.ports.clone();
    }
    let (capture, mut reader) = Capture::start(probe_settings)?;
    // The proxy starts after the probes, so that they already see the
    // applications' requests it will be asked about.
    let contexts = config.proxy.enabled.then(|| Arc::new(ProxyContexts::new()));
    let proxy = if let Some(contexts) = &contexts {
        let rules = config.proxy.redirect_rules();
        // One predicate for the rules and the correlator: contexts are
        // settled only for requests these rules send to the proxy.
        correlator.share_with_proxy(contexts.clone(), rules.scope());
        let proxy =
            RunningProxy::start(config.proxy.proxy_settings(), Some(rules), contexts.clone())
                .await?;
        eprintln!(
            "agent: proxy on port {} ({:?} mode) for destination ports {:?}",
            config.proxy.listen_port, config.proxy.mode, config.proxy.ports
        );
        Some(proxy)
    } else {
        None
    };
    eprintln!(
        "agent: tracing HTTP on all TCP connections, sampling {}%, spans to {output_names} (Ctrl-C to stop)",
        config.tracing.random_sampling
    );

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut stats = tokio::time::interval(Duration::from_secs(args.stats_interval.max(1)));
    let mut published = Instant::now();
    let gather = |correlator: &Correlator| {
        readings(
            &capture,
            correlator,
            &sinks,
            contexts.as_deref(),
            proxy.as_ref(),
            pods.as_deref(),
        )
    };
    health.publish(gather(&correlator));
    health.beat();
    health.set_ready(true);
    let mut spans = Vec::with_capacity(HANDOFF_SPANS);
    // When the oldest span not handed off yet was gathered.
    let mut gathered_since: Option<Instant> = None;
    loop {
        tokio::select! {
            read = reader.read(|event| {
                correlator.handle(&event, &mut spans);
                log_event(&event);
            }) => match read {
                Ok(woken) => {
                    if woken == Woken::Timer {
                        // The periodic work rides on the drain timer's
                        // wake-up (a timer of its own shared it only while
                        // the runtime fired both in the same millisecond;
                        // a wake-up costs more than the work on a VM):
                        // SERVER spans held for their local client's
                        // request go out by time.
                        health.beat();
                        correlator.release_held(&mut spans);
                    }
                    if spans.is_empty() {
                        gathered_since = None;
                    } else if gathered_since.is_none() {
                        gathered_since = Some(Instant::now());
                    }
                    let due = spans.len() >= HANDOFF_SPANS
                        || (woken == Woken::Timer
                            && gathered_since.is_some_and(|t| t.elapsed() >= HANDOFF_AFTER));
                    if due {
                        hand_off(&sinks, &mut spans);
                        gathered_since = None;
                    }
                    // Checked at every read, not only at the timer's: a
                    // loop that is behind reads without waiting, and its
                    // counters are the ones to see.
                    if published.elapsed() >= PUBLISH_EVERY {
                        published = Instant::now();
                        health.publish(gather(&correlator));
                    }
                }
                Err(e) => {
                    eprintln!("agent: reading the ring buffer failed: {e}");
                    break;
                }
            },
            _ = stats.tick(), if args.stats_interval > 0 => report_counters(&gather(&correlator)),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    health.set_ready(false);
    correlator.finish(&mut spans);
    hand_off(&sinks, &mut spans);
    let last = gather(&correlator);
    report_counters(&last);
    health.publish(last);
    if let Some(proxy) = proxy {
        stop_proxy(proxy).await;
    }
    // Dropping the reader (which ends the Python watcher's thread) and the
    // capture detaches every probe; then deliver what is queued.
    drop(reader);
    drop(capture);
    let delivered = sinks.shutdown().await;
    // The counters above were read before the outputs delivered what was
    // queued; these are their final ones.
    let delivered: Vec<String> = delivered
        .iter()
        .flat_map(|(output, counts)| counts.readings(output))
        .map(|reading| reading.to_string())
        .collect();
    eprintln!("agent: span outputs at exit {}", delivered.join(" "));
    Ok(())
}

/// The counters /metrics serves are at most about this old (published at
/// the first read of the ring after it, at the latest the next drain tick:
/// no timer of their own, see [`Woken::Timer`]).
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Spans the correlation loop gathers at most before handing them to the
/// outputs' thread; fewer go at the first drain tick ([`Woken::Timer`])
/// [`HANDOFF_AFTER`] after the oldest of them was gathered.
///
/// Each hand-off wakes that thread, and a wake-up costs more than
/// encoding a few spans (an interrupt to the other core, a hypervisor exit
/// in a VM); sent one by one, each drain woke it several times. The outputs
/// batch for up to a second anyway, so spans gathered for a while lose
/// little. Measured against one output batch (64) in docs/benchmarks.md;
/// this bound keeps the burst well inside the outputs' queue
/// (`ExportSettings::queue_capacity`).
const HANDOFF_SPANS: usize = 512;

/// How long gathered spans wait for [`HANDOFF_SPANS`] at most: a few
/// spans a tick (sampled traffic, a quiet node) are handed off a few times
/// a second rather than at every tick, each hand-off costing the outputs'
/// thread a wake-up or two (docs/benchmarks.md).
const HANDOFF_AFTER: Duration = Duration::from_millis(500);

/// Hands `spans` to the outputs in one message each, emptying it. Never
/// blocks the capture on a slow output: what a full queue has no room for
/// is dropped and counted.
fn hand_off(sinks: &SpanSinks, spans: &mut Vec<Span>) {
    if !spans.is_empty() {
        sinks.try_send_all(std::mem::replace(spans, Vec::with_capacity(HANDOFF_SPANS)));
    }
}

async fn proxy_only(args: ProxyArgs) -> Result<()> {
    let config = args.config.load()?;
    let rules = config.proxy.redirect_rules();
    if args.dry_run {
        print!("{}", rules.render());
        return Ok(());
    }
    let rules = (!args.no_rules).then_some(rules);
    let proxy = RunningProxy::start(
        config.proxy.proxy_settings(),
        rules,
        Arc::new(StandaloneContexts::new()),
    )
    .await?;
    eprintln!(
        "agent: proxy on port {} (Ctrl-C to stop)",
        config.proxy.listen_port
    );
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    stop_proxy(proxy).await;
    Ok(())
}

/// Removes the rules, drains the proxy, and reports its counters.
async fn stop_proxy(proxy: RunningProxy) {
    match proxy.stop().await {
        Ok(counters) => eprintln!("agent: proxy counters {counters:?}"),
        Err(e) => eprintln!("agent: removing the proxy's iptables rules failed: {e}"),
    }
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

/// `<output>_<counter>=<value>` for each output's counters.
/// Every counter of the running agent, as metrics (and the `counters`
/// lines on stderr).
fn readings(
    capture: &Capture,
    correlator: &Correlator,
    sinks: &SpanSinks,
    contexts: Option<&ProxyContexts>,
    proxy: Option<&RunningProxy>,
    pods: Option<&PodDirectory>,
) -> Vec<Reading> {
    let mut all = capture.readings().unwrap_or_else(|e| {
        log::warn!("the capture's counters are unreadable: {e:#}");
        Vec::new()
    });
    all.extend(correlator.counters().readings());
    for (output, counts) in sinks.counts() {
        all.extend(counts.readings(output));
    }
    if let Some(contexts) = contexts {
        all.extend(contexts.counters().readings());
    }
    if let Some(proxy) = proxy {
        all.extend(proxy.counters().readings());
    }
    if let Some(pods) = pods {
        all.extend(pods.readings());
    }
    all
}

/// Starts watching this node's pods on the export runtime when `settings`
/// and the environment say the agent runs in Kubernetes. With `auto`, a
/// watcher that cannot start is a warning (spans go without pod names);
/// with `true`, an error.
fn watch_pods(
    settings: &KubernetesSettings,
    export: &tokio::runtime::Handle,
) -> Result<Option<Arc<PodDirectory>>> {
    let started = settings
        .target(|name| std::env::var(name).ok())
        .and_then(|target| {
            let Some(target) = target else {
                return Ok(None);
            };
            // The client spawns its connection tasks where it is built.
            let client = {
                let _on_export_thread = export.enter();
                kubernetes::client(&target)?
            };
            let directory = Arc::new(PodDirectory::default());
            export.spawn(kubernetes::watch(
                client,
                target.node_name.clone(),
                directory.clone(),
            ));
            eprintln!(
                "agent: naming the pods of node {} from {}",
                target.node_name,
                target
                    .api_server
                    .as_deref()
                    .unwrap_or("the cluster's API server")
            );
            Ok(Some(directory))
        });
    match started {
        Ok(pods) => Ok(pods),
        Err(e) if settings.enabled == Enablement::Auto => {
            eprintln!("agent: kubernetes: {e}; spans go without pod names");
            Ok(None)
        }
        Err(e) => Err(e).context("kubernetes"),
    }
}

fn report_counters(readings: &[Reading]) {
    let line: Vec<String> = readings.iter().map(Reading::to_string).collect();
    eprintln!("agent: counters {}", line.join(" "));
}

/// Serves /metrics, /healthz and /readyz on the span outputs' thread, so
/// that a scrape never waits on the capture loop. An address that cannot
/// be bound is reported and the agent goes on without the endpoint: it
/// only observes, and nothing it traces depends on it.
fn start_metrics(export: &tokio::runtime::Handle, address: SocketAddr, health: Arc<Health>) {
    let listener = std::net::TcpListener::bind(address).and_then(|listener| {
        listener.set_nonblocking(true)?;
        Ok(listener)
    });
    let listener = match listener {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "agent: cannot serve /metrics, /healthz, /readyz on {address}: {e}; going on without them"
            );
            return;
        }
    };
    let _on_export_thread = export.enter();
    match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => {
            export.spawn(agent::metrics::serve(listener, health));
            eprintln!("agent: metrics and health on http://{address}/metrics, /healthz, /readyz");
        }
        Err(e) => eprintln!("agent: cannot serve /metrics on {address}: {e}; going on without it"),
    }
}
