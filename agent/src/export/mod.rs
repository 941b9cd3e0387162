//! Span export: OTLP (gRPC, HTTP/protobuf), OTLP/JSON file, terminal view.
//!
//! Both OTLP encodings are written straight from the span model:
//! [`otlp_proto`] for gRPC and HTTP/protobuf, [`otlp_json`] for the file;
//! the tests hold them to the message the official conversion builds (the
//! SDK's `SpanData` through `opentelemetry_proto::transform`).
//!
//! The agent hands finished spans to a [`SpanSink`] and does not care which
//! exporter is behind it. The sink queues them (bounded: when the queue is
//! full a span is dropped and counted, so a slow or absent collector never
//! makes the agent grow or stall the capture), and one task per sink drains
//! the queue:
//! - OTLP and file: batches of at most [`ExportSettings::max_batch_size`]
//!   spans, each encoded as soon as it is full; the file writes each as a
//!   line, OTLP sends the encoded batches together once they hold
//!   [`ExportSettings::max_request_spans`]. Whatever waits goes
//!   [`ExportSettings::max_batch_delay`] after its first span. A send is
//!   retried with exponential backoff up to [`ExportSettings::max_attempts`]
//!   times, then its spans are dropped and counted;
//! - terminal: spans collect by trace in a [`terminal::TraceBuffer`] and a
//!   trace is printed once it went idle.
//!
//! Counters ([`ExportCounts`]) tell what happened to every span.

pub mod otlp;
pub mod otlp_json;
pub mod otlp_proto;
mod queue;
#[cfg(test)]
pub(crate) mod reference;
mod settings;
pub mod terminal;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::span::Span;
use queue::{SpanQueueReceiver, SpanQueueSender, span_queue};

pub use otlp::{OtlpExporter, OtlpProtocol, OtlpSettings};
pub use otlp_json::JsonFileExporter;
pub use settings::{ExporterConfigError, MAX_EXPORT_TIMEOUT_MS};
pub use terminal::{TraceBuffer, render_trace};

/// Instrumentation scope name of every exported span.
pub const SCOPE_NAME: &str = "transparent-tracing-agent";
/// Instrumentation scope version: the agent's.
pub const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The resource attribute [`crate::span::Resource::service_name`] becomes.
pub const SERVICE_NAME: &str = "service.name";

/// Where spans go.
#[derive(Clone, Debug, PartialEq)]
pub enum ExporterConfig {
    /// A tree per finished trace on standard output (the default).
    Terminal,
    /// An OpenTelemetry collector over OTLP (gRPC or HTTP/protobuf, see
    /// [`OtlpSettings::protocol`]).
    Otlp(OtlpSettings),
    /// OTLP/JSON lines appended to a file.
    File(PathBuf),
}

impl ExporterConfig {
    /// `terminal`, `otlp` or `file`, for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Terminal => "terminal",
            Self::Otlp(_) => "otlp",
            Self::File(_) => "file",
        }
    }
}

/// Queueing, batching, retry and terminal-view limits.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportSettings {
    /// Spans the queue holds; beyond it spans are dropped (and counted).
    pub queue_capacity: usize,
    /// Spans per export request (or file line) at most. A batch is
    /// encoded in one go on the export thread, and the threads that share
    /// its core wait that out: 64 rather than the OpenTelemetry SDK's 512,
    /// which in `agent run` cut the proxy's p99 from 1.5-1.8 to 0.4 ms for
    /// OTLP and from 1.2 to 0.4 ms for the file (docs/benchmarks.md).
    pub max_batch_size: usize,
    /// OTLP: spans per request at most. Batches are encoded as they fill,
    /// in bursts no longer than [`max_batch_size`](Self::max_batch_size)
    /// allows, and go out together: the cost of a request (the gRPC or
    /// HTTP call, its wake-ups, the collector's reply) is paid once per
    /// this many spans. 128 rather than the SDK's 512: sending a request
    /// (and a collector on the same node reading it) is one burst too, and
    /// the proxy's p99 in `agent run` grew with the request's size
    /// (docs/benchmarks.md).
    pub max_request_spans: usize,
    /// Longest a span waits for its batch to fill (counted from the end of
    /// the 1 ms the task lingers after the batch's first span woke it).
    pub max_batch_delay: Duration,
    /// Tries per batch, the first included, before it is dropped.
    pub max_attempts: u32,
    /// Wait before the first retry; doubles each retry.
    pub initial_backoff: Duration,
    /// Longest wait between retries.
    pub max_backoff: Duration,
    /// How long [`SpanSink::shutdown`] may take to deliver what is queued;
    /// whatever is left then is dropped (and counted).
    pub shutdown_timeout: Duration,
    /// Terminal: a trace is shown once no span of it came for this long.
    pub trace_idle: Duration,
    /// Terminal: traces held at most; the oldest is shown early beyond it.
    pub max_pending_traces: usize,
    /// Terminal: spans held per trace at most; a trace is shown early at it.
    pub max_spans_per_trace: usize,
    /// Terminal: line width; `None` asks the terminal (else 100).
    pub terminal_width: Option<usize>,
}

impl Default for ExportSettings {
    fn default() -> Self {
        Self {
            queue_capacity: 4096,
            max_batch_size: 64,
            max_request_spans: 128,
            max_batch_delay: Duration::from_secs(1),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(5),
            trace_idle: Duration::from_secs(2),
            max_pending_traces: 1024,
            max_spans_per_trace: 1000,
            terminal_width: None,
        }
    }
}

/// Why an exporter could not start or a batch could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// A setting (endpoint, protocol, header, file path) is unusable.
    #[error("export configuration: {0}")]
    Config(String),
    /// Sending or writing a batch failed (retried by the sink).
    #[error("export failed: {0}")]
    Export(String),
    /// [`SpanSink::start`] was called outside a tokio runtime.
    #[error("span export needs a tokio runtime")]
    NoRuntime,
}

/// Live counters of a sink, shared with its task.
#[derive(Debug, Default)]
pub struct ExportCounters {
    exported: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_after_retries: AtomicU64,
    export_errors: AtomicU64,
}

impl ExportCounters {
    /// The current values.
    pub fn snapshot(&self) -> ExportCounts {
        ExportCounts {
            exported: self.exported.load(Ordering::Relaxed),
            dropped_queue_full: self.dropped_queue_full.load(Ordering::Relaxed),
            dropped_after_retries: self.dropped_after_retries.load(Ordering::Relaxed),
            export_errors: self.export_errors.load(Ordering::Relaxed),
        }
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What happened to the spans handed to a sink. Once the sink has shut
/// down, every span is in exactly one of `exported`, `dropped_queue_full`
/// and `dropped_after_retries` (unless an output that blocked past the
/// shutdown timeout had to be abandoned).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportCounts {
    /// Spans delivered (sent, written, or shown).
    pub exported: u64,
    /// Spans dropped because the queue was full (or the sink was gone).
    pub dropped_queue_full: u64,
    /// Spans dropped after their batch failed every attempt, or left
    /// undelivered when the shutdown time ran out.
    pub dropped_after_retries: u64,
    /// Failed export attempts (one batch may fail several times).
    pub export_errors: u64,
}

impl ExportCounts {
    /// The counts of output `output` (its kind: otlp, file, terminal) as
    /// metrics.
    pub fn readings(&self, output: &'static str) -> Vec<crate::metrics::Reading> {
        use crate::metrics::Reading;
        const SPANS: &str = "agent_export_spans";
        const SPANS_HELP: &str = "Spans each output delivered or dropped, by result";
        vec![
            Reading::counter(SPANS, SPANS_HELP, self.exported)
                .with("output", output)
                .with("result", "exported"),
            Reading::counter(SPANS, SPANS_HELP, self.dropped_queue_full)
                .with("output", output)
                .with("result", "dropped_queue_full"),
            Reading::counter(SPANS, SPANS_HELP, self.dropped_after_retries)
                .with("output", output)
                .with("result", "dropped_after_retries"),
            Reading::counter(
                "agent_export_errors",
                "Failed export attempts (a batch may fail several times)",
                self.export_errors,
            )
            .with("output", output),
        ]
    }
}

/// The entrance to span export: a bounded queue and the task behind it.
#[derive(Debug)]
pub struct SpanSink {
    queue: SpanQueueSender,
    counters: Arc<ExportCounters>,
    /// Set by [`SpanSink::shutdown`]: the instant by which the task stops
    /// trying to deliver.
    deadline: watch::Sender<Option<Instant>>,
    task: JoinHandle<()>,
    shutdown_timeout: Duration,
}

impl SpanSink {
    /// Starts the exporter `config` names and its task on the current tokio
    /// runtime. Fails on unusable settings or outside a runtime; a
    /// collector that is down is not an error (spans wait and are retried).
    pub fn start(config: ExporterConfig, settings: ExportSettings) -> Result<Self, ExportError> {
        // Checked first: the gRPC channel below needs the runtime too.
        tokio::runtime::Handle::try_current().map_err(|_| ExportError::NoRuntime)?;
        let backend = match config {
            ExporterConfig::Terminal => {
                let width = settings.terminal_width.unwrap_or_else(stdout_width);
                return Self::start_terminal(
                    Box::new(std::io::stdout()),
                    ExportSettings {
                        terminal_width: Some(width),
                        ..settings
                    },
                );
            }
            ExporterConfig::Otlp(otlp) => {
                let exporter = OtlpExporter::new(&otlp)?;
                log::info!(
                    "exporting spans over OTLP {} to {}",
                    exporter.target().protocol,
                    exporter.target().endpoint
                );
                BatchBackend::Otlp(Box::new(exporter))
            }
            ExporterConfig::File(path) => BatchBackend::File {
                exporter: JsonFileExporter::open(&path)?,
                staged: Vec::new(),
            },
        };
        Self::spawn(settings, |queue, counters, deadline, settings| {
            run_batches(queue, backend, counters, deadline, settings)
        })
    }

    /// Starts the terminal view writing to `out` (standard output for
    /// [`ExporterConfig::Terminal`]), on the current tokio runtime.
    pub fn start_terminal(
        out: Box<dyn Write + Send>,
        settings: ExportSettings,
    ) -> Result<Self, ExportError> {
        Self::spawn(settings, |queue, counters, deadline, settings| {
            run_terminal(queue, out, counters, deadline, settings)
        })
    }

    fn spawn<F, Fut>(settings: ExportSettings, run: F) -> Result<Self, ExportError>
    where
        F: FnOnce(
            SpanQueueReceiver,
            Arc<ExportCounters>,
            watch::Receiver<Option<Instant>>,
            ExportSettings,
        ) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ExportError::NoRuntime)?;
        let (queue, receiver) = span_queue(settings.queue_capacity);
        let counters = Arc::new(ExportCounters::default());
        let (deadline, deadline_rx) = watch::channel(None);
        let shutdown_timeout = settings.shutdown_timeout;
        let task = runtime.spawn(run(receiver, counters.clone(), deadline_rx, settings));
        Ok(Self {
            queue,
            counters,
            deadline,
            task,
            shutdown_timeout,
        })
    }

    /// Queues a span without waiting. When the queue is full the span is
    /// dropped and counted in `dropped_queue_full`; returns whether it was
    /// queued. One message per span: the capture path hands its spans over
    /// with [`SpanSink::try_send_all`].
    pub fn try_send(&self, span: Span) -> bool {
        self.try_send_all(vec![span])
    }

    /// Queues `spans` in one hand-off, without waiting: as many as the queue
    /// has room for, the rest dropped and counted in `dropped_queue_full`.
    /// Returns whether all were queued. The capture path's call: one
    /// message for a batch, where [`SpanSink::try_send`] is one per span.
    pub fn try_send_all(&self, spans: Vec<Span>) -> bool {
        let dropped = self.queue.try_send(spans);
        ExportCounters::add(&self.counters.dropped_queue_full, dropped);
        dropped == 0
    }

    /// Queues a span, waiting for room when the queue is full (for callers
    /// that prefer backpressure to dropping). A span is only dropped (and
    /// counted in `dropped_queue_full`) if the export task has ended.
    pub async fn send(&self, span: Span) {
        if !self.queue.send(span).await {
            ExportCounters::add(&self.counters.dropped_queue_full, 1);
        }
    }

    /// Current counter values.
    pub fn counts(&self) -> ExportCounts {
        self.counters.snapshot()
    }

    /// The live counters, to read after the sink has moved elsewhere.
    pub fn counters(&self) -> Arc<ExportCounters> {
        self.counters.clone()
    }

    /// Delivers what is queued (within the shutdown timeout), shows every
    /// trace still buffered (terminal), and stops. Returns the final counts.
    pub async fn shutdown(self) -> ExportCounts {
        let Self {
            queue,
            counters,
            deadline,
            mut task,
            shutdown_timeout,
        } = self;
        let limit = Instant::now() + shutdown_timeout;
        let _ = deadline.send(Some(limit));
        // Closing the queue lets the task see the end once it drained it.
        drop(queue);
        // The task honours the deadline itself; the margin covers one
        // export call that does not (a stuck write to the terminal).
        let margin = Duration::from_secs(1);
        if tokio::time::timeout_at(limit + margin, &mut task)
            .await
            .is_err()
        {
            log::warn!("span export did not stop in time; abandoning it");
            task.abort();
        }
        counters.snapshot()
    }
}

/// Several sinks fed the same spans, for when the configuration asks for
/// more than one output (OTLP, a file and the terminal may all be on).
#[derive(Debug)]
pub struct SpanSinks {
    sinks: Vec<(&'static str, SpanSink)>,
}

impl SpanSinks {
    /// Starts one sink per configuration, all with `settings`. On an error
    /// the sinks already started are dropped (their tasks end on their own).
    pub fn start(
        configs: Vec<ExporterConfig>,
        settings: &ExportSettings,
    ) -> Result<Self, ExportError> {
        let sinks = configs
            .into_iter()
            .map(|config| {
                let kind = config.kind();
                SpanSink::start(config, settings.clone()).map(|sink| (kind, sink))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { sinks })
    }

    /// [`SpanSinks::try_send_all`] of one span.
    pub fn try_send(&self, span: Span) -> bool {
        self.try_send_all(vec![span])
    }

    /// [`SpanSink::try_send_all`] to every sink: a copy each, except the
    /// last, which gets the batch itself. Returns whether every sink queued
    /// all of it.
    pub fn try_send_all(&self, spans: Vec<Span>) -> bool {
        let Some(((_, last), others)) = self.sinks.split_last() else {
            return true;
        };
        let mut all = true;
        for (_, sink) in others {
            all &= sink.try_send_all(spans.clone());
        }
        all & last.try_send_all(spans)
    }

    /// [`SpanSink::send`] to every sink, in turn.
    pub async fn send(&self, span: Span) {
        if let Some(((_, last), others)) = self.sinks.split_last() {
            for (_, sink) in others {
                sink.send(span.clone()).await;
            }
            last.send(span).await;
        }
    }

    /// Counts of each sink, named by its kind.
    pub fn counts(&self) -> Vec<(&'static str, ExportCounts)> {
        self.sinks
            .iter()
            .map(|(kind, sink)| (*kind, sink.counts()))
            .collect()
    }

    /// Shuts every sink down (concurrently, so their timeouts do not add
    /// up) and returns their final counts.
    pub async fn shutdown(self) -> Vec<(&'static str, ExportCounts)> {
        let tasks: Vec<_> = self
            .sinks
            .into_iter()
            .map(|(kind, sink)| (kind, tokio::spawn(sink.shutdown())))
            .collect();
        let mut counts = Vec::with_capacity(tasks.len());
        for (kind, task) in tasks {
            counts.push((kind, task.await.unwrap_or_default()));
        }
        counts
    }
}

/// Terminal width from the terminal driver, else 100 columns.
fn stdout_width() -> usize {
    // SAFETY: TIOCGWINSZ only writes a winsize into the struct we pass.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        100
    }
}

/// The exporters that take batches.
enum BatchBackend {
    // Boxed: far larger than the file variant.
    Otlp(Box<OtlpExporter>),
    File {
        exporter: JsonFileExporter,
        /// The batch to write as the next line.
        staged: Vec<Span>,
    },
}

impl BatchBackend {
    /// Longest one send may take before the task gives up on it: the
    /// exporter's own request timeout plus a margin, as a backstop for a
    /// call that overruns it (a connect that hangs, a stuck disk).
    fn call_limit(&self) -> Duration {
        match self {
            Self::Otlp(exporter) => exporter.target().timeout + Duration::from_secs(5),
            Self::File { .. } => Duration::from_secs(30),
        }
    }

    /// Staged spans at which to send: a request's worth for OTLP, every
    /// batch for the file (a line per batch).
    fn send_at(&self, settings: &ExportSettings) -> usize {
        match self {
            Self::Otlp(_) => settings.max_request_spans.max(1),
            Self::File { .. } => 1,
        }
    }

    /// Takes `batch` (emptied) into what the next send delivers.
    fn stage(&mut self, batch: &mut Vec<Span>) {
        match self {
            Self::Otlp(exporter) => exporter.stage(batch),
            Self::File { staged, .. } => {
                if staged.is_empty() {
                    // The batch moves as a whole; its allocation is reused.
                    std::mem::swap(staged, batch);
                } else {
                    staged.append(batch);
                }
            }
        }
    }

    /// Spans staged and not yet delivered.
    fn staged(&self) -> usize {
        match self {
            Self::Otlp(exporter) => exporter.staged(),
            Self::File { staged, .. } => staged.len(),
        }
    }

    /// Delivers everything staged; returns how many spans. On error they
    /// stay staged.
    async fn send_staged(&mut self) -> Result<usize, ExportError> {
        match self {
            Self::Otlp(exporter) => exporter.send_staged().await,
            Self::File { exporter, staged } => {
                let count = staged.len();
                exporter.export(staged).map(|()| count)
            }
        }
    }

    /// Drops everything staged; returns how many spans.
    fn drop_staged(&mut self) -> usize {
        match self {
            Self::Otlp(exporter) => exporter.drop_staged(),
            Self::File { staged, .. } => {
                let count = staged.len();
                staged.clear();
                count
            }
        }
    }
}

/// How long a batching export task lets spans gather after waking for one.
///
/// A task parked on an empty queue is woken by the next span, a wake-up
/// the correlation loop pays for (a system call) and the scheduler must
/// place. A batch waits to fill anyway, so taking spans one by one buys
/// nothing: lingering bounds the wake-ups to one per `LINGER`. (The
/// terminal task does not linger: its work per span is larger, and done
/// in bursts it delays the threads it shares a core with.)
const LINGER: Duration = Duration::from_millis(1);

/// Moves up to `limit` spans from `queue` into `spans`, waiting for the
/// first and then lingering (see [`LINGER`]) unless that one wait already
/// gave `limit`. Returns how many came; 0 only once the queue is closed and
/// empty. Cancel-safe: what was received is already in `spans`.
async fn recv_lingering(
    queue: &mut SpanQueueReceiver,
    spans: &mut Vec<Span>,
    limit: usize,
) -> usize {
    let first = queue.recv_many(spans, limit).await;
    if first == 0 || first >= limit {
        return first;
    }
    tokio::time::sleep(LINGER).await;
    first + queue.try_recv_many(spans, limit - first)
}

async fn run_batches(
    mut queue: SpanQueueReceiver,
    mut backend: BatchBackend,
    counters: Arc<ExportCounters>,
    mut deadline: watch::Receiver<Option<Instant>>,
    settings: ExportSettings,
) {
    let max_batch = settings.max_batch_size.max(1);
    let send_at = backend.send_at(&settings);
    let mut batch: Vec<Span> = Vec::with_capacity(max_batch);
    let mut flush_at = Instant::now();
    loop {
        let room = max_batch - batch.len();
        let waiting = !batch.is_empty() || backend.staged() > 0;
        let received = tokio::select! {
            n = recv_lingering(&mut queue, &mut batch, room) => Some(n),
            () = tokio::time::sleep_until(flush_at), if waiting => None,
        };
        match received {
            // recv_many returns 0 only once the queue is closed and empty.
            Some(0) => break,
            Some(_) => {
                if !waiting {
                    flush_at = Instant::now() + settings.max_batch_delay;
                }
                if batch.len() >= max_batch {
                    backend.stage(&mut batch);
                    if backend.staged() >= send_at {
                        deliver(&mut backend, &counters, &mut deadline, &settings).await;
                    }
                }
            }
            None => {
                backend.stage(&mut batch);
                deliver(&mut backend, &counters, &mut deadline, &settings).await;
            }
        }
    }
    backend.stage(&mut batch);
    if backend.staged() > 0 {
        deliver(&mut backend, &counters, &mut deadline, &settings).await;
    }
}

/// Sends what `backend` has staged, with retries; afterwards nothing is
/// staged, every span counted as exported or dropped.
async fn deliver(
    backend: &mut BatchBackend,
    counters: &ExportCounters,
    deadline: &mut watch::Receiver<Option<Instant>>,
    settings: &ExportSettings,
) {
    let max_attempts = settings.max_attempts.max(1);
    let mut attempt = 0;
    let mut last_error = None;
    while attempt < max_attempts && backend.staged() > 0 {
        let shutdown_by = *deadline.borrow();
        if shutdown_by.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        attempt += 1;
        let call_limit = Instant::now() + backend.call_limit();
        let limit = shutdown_by.map_or(call_limit, |d| d.min(call_limit));
        let result = match tokio::time::timeout_at(limit, backend.send_staged()).await {
            Ok(result) => result,
            Err(_) => Err(ExportError::Export("export call timed out".into())),
        };
        match result {
            Ok(sent) => {
                ExportCounters::add(&counters.exported, sent);
                return;
            }
            Err(e) => {
                ExportCounters::add(&counters.export_errors, 1);
                log::debug!("attempt {attempt}/{max_attempts}: {e}");
                last_error = Some(e);
            }
        }
        if attempt < max_attempts && !backoff(attempt, settings, deadline).await {
            break;
        }
    }
    if backend.staged() > 0 {
        let reason = last_error.map_or_else(|| "shutting down".to_string(), |e| e.to_string());
        let dropped = backend.drop_staged();
        log::warn!("dropping {dropped} spans after {attempt} attempts: {reason}");
        ExportCounters::add(&counters.dropped_after_retries, dropped);
    }
}

/// Waits before retry number `attempt` (1-based). Returns false, at once,
/// when the wait would end past the shutdown deadline: then there is no
/// time left to retry.
async fn backoff(
    attempt: u32,
    settings: &ExportSettings,
    deadline: &mut watch::Receiver<Option<Instant>>,
) -> bool {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let delay = settings
        .initial_backoff
        .saturating_mul(factor)
        .min(settings.max_backoff);
    let wake = Instant::now() + delay;
    loop {
        if deadline.borrow_and_update().is_some_and(|d| wake > d) {
            return false;
        }
        tokio::select! {
            () = tokio::time::sleep_until(wake) => return true,
            changed = deadline.changed() => if changed.is_err() {
                // The sink is gone without a shutdown; nothing to wait for.
                tokio::time::sleep_until(wake).await;
                return true;
            },
        }
    }
}

async fn run_terminal(
    mut queue: SpanQueueReceiver,
    mut out: Box<dyn Write + Send>,
    counters: Arc<ExportCounters>,
    _deadline: watch::Receiver<Option<Instant>>,
    settings: ExportSettings,
) {
    let width = settings.terminal_width.unwrap_or(100);
    let mut buffer = TraceBuffer::new(
        settings.trace_idle,
        settings.max_pending_traces,
        settings.max_spans_per_trace,
    );
    let check_every =
        (settings.trace_idle / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
    let mut ticks = tokio::time::interval(check_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let show = |trace: Vec<Span>, out: &mut Box<dyn Write + Send>| {
        let text = render_trace(&trace, width);
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => ExportCounters::add(&counters.exported, trace.len()),
            Err(e) => {
                log::debug!("terminal view: {e}");
                ExportCounters::add(&counters.export_errors, 1);
                ExportCounters::add(&counters.dropped_after_retries, trace.len());
            }
        }
    };
    let mut received = Vec::new();
    loop {
        tokio::select! {
            n = queue.recv_many(&mut received, 64) => {
                if n == 0 {
                    break;
                }
                for span in received.drain(..) {
                    if let Some(trace) = buffer.push(span, Instant::now().into_std()) {
                        show(trace, &mut out);
                    }
                }
            },
            _ = ticks.tick() => {
                for trace in buffer.take_idle(Instant::now().into_std()) {
                    show(trace, &mut out);
                }
            }
        }
    }
    for trace in buffer.take_all() {
        show(trace, &mut out);
    }
}

/// Indices of `spans` grouped by resource, groups in order of first
/// appearance. Spans of one process share one `Arc`, so pointer equality
/// settles most comparisons; equal resources behind different `Arc`s still
/// share a group.
pub fn group_by_resource(spans: &[Span]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, span) in spans.iter().enumerate() {
        let same = |group: &&mut Vec<usize>| {
            let other = &spans[group[0]].resource;
            Arc::ptr_eq(other, &span.resource) || **other == *span.resource
        };
        match groups.iter_mut().find(same) {
            Some(group) => group.push(i),
            None => groups.push(vec![i]),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::span::{Resource, SpanId, SpanKind, SpanStatus, TraceId};

    /// A SERVER span of `resource` (also for `queue`'s tests).
    pub(super) fn span(trace: u8, id: u8, resource: &Arc<Resource>) -> Span {
        Span {
            trace_id: TraceId([trace; 16]),
            span_id: SpanId([id; 8]),
            parent_span_id: None,
            trace_state: String::new(),
            flags: 1,
            name: "GET".into(),
            kind: SpanKind::Server,
            start_unix_nano: 1_000_000,
            end_unix_nano: 2_000_000,
            attributes: vec![],
            status: SpanStatus::Unset,
            resource: resource.clone(),
        }
    }

    /// A resource named `name` and nothing else.
    pub(super) fn resource(name: &str) -> Arc<Resource> {
        Arc::new(Resource {
            service_name: name.into(),
            attributes: vec![],
        })
    }

    #[test]
    fn groups_by_resource_value_in_order_of_appearance() {
        let a = resource("a");
        let b = resource("b");
        let a_again = resource("a");
        let spans = vec![
            span(1, 1, &a),
            span(1, 2, &b),
            span(1, 3, &a_again),
            span(1, 4, &b),
        ];
        assert_eq!(group_by_resource(&spans), vec![vec![0, 2], vec![1, 3]]);
        assert!(group_by_resource(&[]).is_empty());
    }

    /// A `Write` the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn terminal_sink_shows_idle_traces_and_the_rest_at_shutdown() {
        let out = Shared::default();
        let settings = ExportSettings {
            trace_idle: Duration::from_millis(50),
            terminal_width: Some(60),
            ..Default::default()
        };
        let sink = SpanSink::start_terminal(Box::new(out.clone()), settings).unwrap();
        let r = resource("svc");
        assert!(sink.try_send(span(1, 1, &r)));
        sink.send(span(1, 2, &r)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while out.0.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The idle trace is out before the shutdown: printed by idleness.
        let before_shutdown = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(
            before_shutdown.starts_with(&format!("trace {}  2 spans", "01".repeat(16))),
            "the idle trace was not printed within 10 s: {before_shutdown:?}"
        );
        assert!(sink.try_send(span(2, 1, &r)));
        let counts = sink.shutdown().await;
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.starts_with(&format!("trace {}  2 spans", "01".repeat(16))),
            "{text}"
        );
        assert!(
            text.contains(&format!("trace {}  1 span ", "02".repeat(16))),
            "{text}"
        );
        assert_eq!(counts.exported, 3);
        assert_eq!(counts.dropped_queue_full + counts.dropped_after_retries, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn spans_sent_one_by_one_are_received_together() {
        let (queue, mut receiver) = span_queue(64);
        let r = resource("svc");
        let sender = tokio::spawn(async move {
            for id in 1..=4 {
                assert!(queue.send(span(1, id, &r)).await);
                tokio::task::yield_now().await;
            }
            queue
        });
        let mut spans = Vec::new();
        // The first span wakes the receiver; the other three come while it
        // lingers.
        assert_eq!(recv_lingering(&mut receiver, &mut spans, 64).await, 4);
        // A full receive does not linger; a closed, empty queue gives 0.
        let queue = sender.await.unwrap();
        let r = resource("svc");
        for id in 5..=7 {
            assert!(queue.send(span(1, id, &r)).await);
        }
        let before = Instant::now();
        assert_eq!(recv_lingering(&mut receiver, &mut spans, 2).await, 2);
        assert_eq!(before.elapsed(), Duration::ZERO);
        drop(queue);
        assert_eq!(recv_lingering(&mut receiver, &mut spans, 64).await, 1);
        assert_eq!(recv_lingering(&mut receiver, &mut spans, 64).await, 0);
        assert_eq!(spans.len(), 7);
    }

    #[tokio::test]
    async fn file_sink_writes_batches_and_flushes_at_shutdown() {
        let path =
            std::env::temp_dir().join(format!("span-sink-test-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let settings = ExportSettings {
            max_batch_size: 2,
            max_batch_delay: Duration::from_secs(60),
            ..Default::default()
        };
        let sink = SpanSink::start(ExporterConfig::File(path.clone()), settings).unwrap();
        let r = resource("svc");
        for id in 1..=5 {
            sink.send(span(1, id, &r)).await;
        }
        let counts = sink.shutdown().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(counts.exported, 5);
        // Two full batches, then the rest at shutdown (the 60 s delay never
        // came).
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[tokio::test]
    async fn file_lines_hold_at_most_a_default_batch() {
        let path =
            std::env::temp_dir().join(format!("span-sink-lines-test-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let settings = ExportSettings {
            max_batch_delay: Duration::from_secs(60),
            ..Default::default()
        };
        let batch = settings.max_batch_size;
        let sink = SpanSink::start(ExporterConfig::File(path.clone()), settings).unwrap();
        let r = resource("svc");
        let total = 2 * batch + 3;
        for id in 0..total {
            sink.send(span(1, id as u8, &r)).await;
        }
        let counts = sink.shutdown().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(counts.exported, total as u64);
        let spans_per_line: Vec<usize> = text
            .lines()
            .map(|line| line.matches("\"spanId\"").count())
            .collect();
        assert_eq!(spans_per_line, [batch, batch, 3]);
    }

    #[tokio::test]
    async fn several_sinks_each_get_every_span() {
        let out = Shared::default();
        let path =
            std::env::temp_dir().join(format!("span-sinks-test-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let settings = ExportSettings {
            terminal_width: Some(60),
            ..Default::default()
        };
        let file = SpanSink::start(ExporterConfig::File(path.clone()), settings.clone()).unwrap();
        let terminal = SpanSink::start_terminal(Box::new(out.clone()), settings).unwrap();
        let sinks = SpanSinks {
            sinks: vec![("file", file), ("terminal", terminal)],
        };
        let r = resource("svc");
        assert!(sinks.try_send(span(1, 1, &r)));
        sinks.send(span(1, 2, &r)).await;
        let counts = sinks.shutdown().await;
        let _ = std::fs::remove_file(&path);
        assert_eq!(counts.len(), 2);
        assert!(counts.iter().all(|(_, c)| c.exported == 2), "{counts:?}");
        assert!(!out.0.lock().unwrap().is_empty());
        let none = SpanSinks::start(vec![], &ExportSettings::default()).unwrap();
        assert!(none.try_send(span(1, 1, &r)));
    }

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        let err = SpanSink::start(ExporterConfig::Terminal, ExportSettings::default()).unwrap_err();
        assert_eq!(err, ExportError::NoRuntime);
    }

    #[tokio::test]
    async fn bad_settings_are_errors_not_panics() {
        let bad_protocol = OtlpSettings {
            endpoint: Some("not a url".into()),
            protocol: Some(OtlpProtocol::HttpProtobuf),
            ..Default::default()
        };
        let result = SpanSink::start(
            ExporterConfig::Otlp(bad_protocol),
            ExportSettings::default(),
        );
        assert!(matches!(result, Err(ExportError::Config(_))), "{result:?}");
        let bad_header = OtlpSettings {
            protocol: Some(OtlpProtocol::Grpc),
            headers: vec![("bad header".into(), "x".into())],
            ..Default::default()
        };
        let result = SpanSink::start(ExporterConfig::Otlp(bad_header), ExportSettings::default());
        assert!(matches!(result, Err(ExportError::Config(_))), "{result:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_maximum_and_stops_at_the_deadline() {
        let settings = ExportSettings {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            ..Default::default()
        };
        let (tx, mut rx) = watch::channel(None);
        for (attempt, expected_ms) in [(1, 100), (2, 200), (3, 300), (40, 300)] {
            let start = Instant::now();
            assert!(backoff(attempt, &settings, &mut rx).await);
            assert_eq!(start.elapsed(), Duration::from_millis(expected_ms));
        }
        tx.send(Some(Instant::now() + Duration::from_millis(150)))
            .unwrap();
        let start = Instant::now();
        assert!(!backoff(2, &settings, &mut rx).await);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
