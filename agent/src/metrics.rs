//! The agent's own health and counters over HTTP: `/metrics` (Prometheus
//! text format), `/healthz` (the capture loop is turning) and `/readyz`
//! (the probes are attached, and the proxy serves when it is enabled).
//!
//! The capture loop publishes its counters about once a second as plain
//! [`Reading`]s and beats a [`Health`] clock; a scrape encodes the last
//! readings. The listener is meant to run on another thread than the
//! capture loop (the span outputs'), so a scrape never waits on that loop
//! and a stuck loop shows as a failing `/healthz`.
//!
//! The server is deliberately small: one request per connection, heads up
//! to [`MAX_REQUEST_HEAD`] bytes, a few connections at a time, a deadline
//! per connection. It serves counters, nothing a caller sends is echoed.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Where the endpoint listens unless configured: this machine only. The
/// DaemonSet sets the node's address, where the kubelet's probes and
/// Prometheus reach it.
pub const DEFAULT_ADDRESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9470);

/// The longest the capture loop may go without a beat before `/healthz`
/// fails (it beats at least every `capture::DRAIN_EVERY` when healthy).
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(10);

/// Bytes of a request head read at most; a longer one gets 431.
pub const MAX_REQUEST_HEAD: usize = 4096;

/// Connections served at once; more wait for a slot.
const MAX_CONNECTIONS: usize = 8;

/// How long one connection may take, from accept to the last byte sent.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);

/// The `metrics:` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Address of `/metrics`, `/healthz` and `/readyz`; None: no endpoint.
    pub address: Option<SocketAddr>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            address: Some(DEFAULT_ADDRESS),
        }
    }
}

impl MetricsSettings {
    /// Reads an address given as `IP:PORT` (`[IPv6]:PORT` for IPv6).
    pub fn parse_address(text: &str) -> Result<SocketAddr, String> {
        text.trim().parse().map_err(|_| {
            format!("must be IP:PORT, such as {DEFAULT_ADDRESS} or 0.0.0.0:9470, got {text:?}")
        })
    }
}

/// Whether a reading only goes up, or goes up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic; exposed with the `_total` suffix.
    Counter,
    /// A current value.
    Gauge,
}

/// One value the agent counts, as the capture loop publishes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reading {
    /// Metric family, e.g. `agent_spans` (counters get `_total`).
    pub family: &'static str,
    /// One line saying what it counts.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Label names and values (empty for a family without labels).
    pub labels: Vec<(&'static str, Cow<'static, str>)>,
    /// The value.
    pub value: u64,
}

impl Reading {
    /// A counter without labels.
    pub fn counter(family: &'static str, help: &'static str, value: u64) -> Self {
        Self {
            family,
            help,
            kind: Kind::Counter,
            labels: Vec::new(),
            value,
        }
    }

    /// A gauge without labels.
    pub fn gauge(family: &'static str, help: &'static str, value: u64) -> Self {
        Self {
            kind: Kind::Gauge,
            ..Self::counter(family, help, value)
        }
    }

    /// The same reading with one more label.
    pub fn with(mut self, name: &'static str, value: impl Into<Cow<'static, str>>) -> Self {
        self.labels.push((name, value.into()));
        self
    }
}

/// The sample as the exposition names it, with its value:
/// `agent_spans_total=2`, `agent_capture_dropped_total{reason="ringbuf_full"}=0`
/// (the agent's `counters` lines on stderr).
impl std::fmt::Display for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.family)?;
        if self.kind == Kind::Counter {
            f.write_str("_total")?;
        }
        if !self.labels.is_empty() {
            f.write_str("{")?;
            for (i, (name, value)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{name}={value:?}")?;
            }
            f.write_str("}")?;
        }
        write!(f, "={}", self.value)
    }
}

/// What the endpoint serves, shared between the capture loop (which
/// writes) and the listener (which reads).
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds after `started` of the capture loop's last beat.
    last_beat_ms: AtomicU64,
    ready: AtomicBool,
    readings: Mutex<Vec<Reading>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            readings: Mutex::new(Vec::new()),
        }
    }
}

impl Health {
    /// The capture loop is turning.
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether the loop beat within [`LIVENESS_WINDOW`].
    pub fn is_live(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_beat_ms.load(Ordering::Relaxed))
            <= LIVENESS_WINDOW.as_millis() as u64
    }

    /// Everything is started (or, false, being stopped).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether the agent said it is ready, and is live.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.is_live()
    }

    /// Replaces the published readings (grouped by family here: a family's
    /// readings must follow each other in the exposition).
    pub fn publish(&self, mut readings: Vec<Reading>) {
        readings.sort_by_key(|r| r.family);
        if let Ok(mut published) = self.readings.lock() {
            *published = readings;
        }
    }

    /// The readings in the Prometheus text format (version 0.0.4).
    pub fn encode(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Published(self.clone())));
        let mut text = String::new();
        // Writing to a String cannot fail; a malformed reading cannot
        // either (names are static and checked by the tests).
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
        text
    }
}

/// The published readings as a prometheus-client collector.
#[derive(Debug)]
struct Published(Arc<Health>);

impl Collector for Published {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let readings = match self.0.readings.lock() {
            Ok(readings) => readings.clone(),
            Err(_) => return Ok(()),
        };
        // One descriptor per family, its readings (one per label set) after it.
        let mut at = 0;
        while at < readings.len() {
            let first = &readings[at];
            let end = at
                + readings[at..]
                    .iter()
                    .take_while(|r| r.family == first.family)
                    .count();
            let metric_type = match first.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut family =
                encoder.encode_descriptor(first.family, first.help, None, metric_type)?;
            for reading in &readings[at..end] {
                let labels: Vec<(&str, &str)> = reading
                    .labels
                    .iter()
                    .map(|(name, value)| (*name, value.as_ref()))
                    .collect();
                if labels.is_empty() {
                    encode_value(reading, family.encode_family(&NO_LABELS)?)?;
                } else {
                    encode_value(reading, family.encode_family(&labels)?)?;
                }
            }
            at = end;
        }
        Ok(())
    }
}

const NO_LABELS: [(&str, &str); 0] = [];

fn encode_value(
    reading: &Reading,
    encoder: prometheus_client::encoding::MetricEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    match reading.kind {
        Kind::Counter => ConstCounter::new(reading.value).encode(encoder),
        Kind::Gauge => ConstGauge::new(reading.value as i64).encode(encoder),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the
/// task is dropped. Errors of single connections are ignored (a scraper
/// retries); the agent's work never depends on this endpoint.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::debug!("metrics endpoint: accept failed: {e}");
                // Out of fds, say: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, answer(stream, &health)).await;
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, health: &Arc<Health>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let response = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        match route(&head, health) {
            Some(response) => break response,
            None if head.len() >= MAX_REQUEST_HEAD => {
                break Response::text(431, "Request Header Fields Too Large", "head too large\n");
            }
            None => {}
        }
    };
    stream.write_all(&response.to_bytes()).await?;
    stream.shutdown().await?;
    // Read what the client still sends (the rest of a refused head) until
    // it closes: closing with unread bytes would reset the connection and
    // could destroy the answer before the client reads it.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while stream.read(&mut chunk).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    Ok(())
}

/// An answer of this endpoint.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    /// No body on the wire (a HEAD request), Content-Length still says it.
    head_only: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        Self {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.to_owned(),
            head_only: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// The answer to the request head in `bytes`, or None while it is
/// incomplete.
fn route(bytes: &[u8], health: &Arc<Health>) -> Option<Response> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let method = match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => request.method.unwrap_or_default(),
        Ok(httparse::Status::Partial) => return None,
        Err(_) => return Some(Response::text(400, "Bad Request", "bad request\n")),
    };
    if method != "GET" && method != "HEAD" {
        return Some(Response::text(405, "Method Not Allowed", "GET only\n"));
    }
    let path = request.path.unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();
    let mut response = match path {
        "/metrics" => Response {
            status: 200,
            reason: "OK",
            content_type: prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            body: health.encode(),
            head_only: false,
        },
        "/healthz" if health.is_live() => Response::text(200, "OK", "ok\n"),
        "/healthz" => Response::text(
            503,
            "Service Unavailable",
            "the capture loop has not turned lately\n",
        ),
        "/readyz" if health.is_ready() => Response::text(200, "OK", "ready\n"),
        "/readyz" => Response::text(503, "Service Unavailable", "not ready\n"),
        _ => Response::text(
            404,
            "Not Found",
            "not found: try /metrics, /healthz, /readyz\n",
        ),
    };
    response.head_only = method == "HEAD";
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health_with(readings: Vec<Reading>) -> Arc<Health> {
        let health = Arc::new(Health::default());
        health.publish(readings);
        health
    }

    #[test]
    fn readings_become_families_with_help_type_and_labels() {
        let health = health_with(vec![
            Reading::counter("agent_spans", "Spans built", 7),
            Reading::counter("agent_capture_dropped", "Records dropped, by reason", 1)
                .with("reason", "ringbuf_full"),
            Reading::counter("agent_capture_dropped", "Records dropped, by reason", 0)
                .with("reason", "truncated_messages"),
            Reading::gauge("agent_proxy_connections_active", "Open connections", 3),
        ]);
        let text = health.encode();
        // Families in name order, each family's readings in the order given.
        assert_eq!(
            text,
            "# HELP agent_capture_dropped_total Records dropped, by reason\n\
             # TYPE agent_capture_dropped_total counter\n\
             agent_capture_dropped_total{reason=\"ringbuf_full\"} 1\n\
             agent_capture_dropped_total{reason=\"truncated_messages\"} 0\n\
             # HELP agent_proxy_connections_active Open connections\n\
             # TYPE agent_proxy_connections_active gauge\n\
             agent_proxy_connections_active 3\n\
             # HELP agent_spans_total Spans built\n\
             # TYPE agent_spans_total counter\n\
             agent_spans_total 7\n"
        );
    }

    #[test]
    fn a_reading_prints_as_its_sample() {
        let dropped =
            Reading::counter("agent_capture_dropped", "h", 0).with("reason", "ringbuf_full");
        assert_eq!(
            dropped.to_string(),
            "agent_capture_dropped_total{reason=\"ringbuf_full\"}=0"
        );
        assert_eq!(
            Reading::gauge("agent_open", "h", 3).to_string(),
            "agent_open=3"
        );
    }

    #[test]
    fn health_follows_the_beat_and_readiness() {
        let health = Arc::new(Health::default());
        health.beat();
        assert!(health.is_live());
        assert!(!health.is_ready());
        health.set_ready(true);
        assert!(health.is_ready());
        // A beat older than the window: neither live nor ready.
        health.last_beat_ms.store(0, Ordering::Relaxed);
        let stale = Health {
            started: Instant::now() - LIVENESS_WINDOW - Duration::from_secs(1),
            ..Health::default()
        };
        stale.set_ready(true);
        assert!(!stale.is_live());
        assert!(!stale.is_ready());
    }

    #[test]
    fn routes_answer_as_documented() {
        let health = health_with(vec![Reading::counter("agent_spans", "Spans built", 1)]);
        health.beat();
        let get = |raw: &[u8]| route(raw, &health).expect("complete head");
        let metrics = get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(metrics.status, 200);
        assert!(
            metrics
                .content_type
                .starts_with("text/plain; version=0.0.4")
        );
        assert!(metrics.body.contains("agent_spans_total 1\n"));
        assert_eq!(get(b"GET /healthz HTTP/1.1\r\n\r\n").status, 200);
        assert_eq!(get(b"GET /readyz HTTP/1.1\r\n\r\n").status, 503);
        health.set_ready(true);
        assert_eq!(get(b"GET /readyz?verbose HTTP/1.1\r\n\r\n").status, 200);
        assert_eq!(get(b"POST /metrics HTTP/1.1\r\n\r\n").status, 405);
        assert_eq!(get(b"GET /other HTTP/1.1\r\n\r\n").status, 404);
        assert_eq!(get(b"\x16\x03\x01 not http\r\n\r\n").status, 400);
        let head = get(b"HEAD /healthz HTTP/1.1\r\n\r\n");
        assert!(head.head_only);
        assert!(
            head.to_bytes()
                .ends_with(b"Content-Length: 3\r\nConnection: close\r\n\r\n")
        );
        assert!(route(b"GET /metrics HTTP/1.1\r\nHo", &health).is_none());
    }

    #[test]
    fn addresses_parse_or_say_what_is_expected() {
        assert_eq!(
            MetricsSettings::parse_address("0.0.0.0:9470"),
            Ok("0.0.0.0:9470".parse().unwrap())
        );
        assert!(MetricsSettings::parse_address("[::1]:1").is_ok());
        let e = MetricsSettings::parse_address("localhost").unwrap_err();
        assert!(e.contains("IP:PORT"), "{e}");
    }

    #[tokio::test]
    async fn a_real_client_gets_answers_and_a_huge_head_gets_431() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let health = health_with(vec![Reading::counter("agent_spans", "Spans built", 5)]);
        health.beat();
        let server = tokio::spawn(serve(listener, health));
        let ask = |request: Vec<u8>| async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream.write_all(&request).await.unwrap();
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await.unwrap();
            String::from_utf8(answer).unwrap()
        };
        let metrics = ask(b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.ends_with("agent_spans_total 5\n"), "{metrics}");
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD));
        let answer = ask(huge).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        server.abort();
    }
}
