//! A real OTLP trace receiver for tests: the official protobuf definitions
//! (`opentelemetry-proto`), served over gRPC (tonic's `TraceServiceServer`)
//! and over HTTP/protobuf (`POST /v1/traces`, hyper), both on 127.0.0.1.
//!
//! It runs on its own thread and tokio runtime, so synchronous tests and
//! async tests (whatever their runtime flavour) can use it alike, and it
//! keeps every request it received, with its headers, for inspection.
//! Dropping it stops both servers.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::sync::{oneshot, watch};

/// Largest HTTP request body accepted (the OTLP exporters send far less).
const MAX_BODY_BYTES: usize = 64 << 20;

/// How a request reached the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with a protobuf body.
    Http,
}

/// One export request as received.
#[derive(Clone, Debug)]
pub struct ReceivedRequest {
    /// gRPC or HTTP.
    pub transport: Transport,
    /// HTTP headers or gRPC metadata (ASCII values only), names lower-case.
    pub headers: Vec<(String, String)>,
    /// The decoded request.
    pub request: ExportTraceServiceRequest,
}

impl ReceivedRequest {
    /// The value of header `name` (lower-case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One span as received, with the resource and scope it came under.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// gRPC or HTTP.
    pub transport: Transport,
    /// The `ResourceSpans` resource.
    pub resource: Option<Resource>,
    /// The `ScopeSpans` scope.
    pub scope: Option<InstrumentationScope>,
    /// The span.
    pub span: Span,
}

impl ReceivedSpan {
    /// The resource's `service.name`, if it has a string one.
    pub fn service_name(&self) -> Option<&str> {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let attributes = &self.resource.as_ref()?.attributes;
        let kv = attributes.iter().find(|kv| kv.key == "service.name")?;
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s),
            _ => None,
        }
    }
}

/// Requests received so far, and ways to wait for more.
#[derive(Default)]
struct Store {
    /// Counts spans without keeping what arrived (a long benchmark's
    /// receiver would otherwise grow with every span).
    count_only: bool,
    requests: Mutex<Vec<ReceivedRequest>>,
    changed: Condvar,
    /// Spans received so far, for async waiters.
    span_count: watch::Sender<usize>,
}

impl Store {
    fn push(
        &self,
        transport: Transport,
        headers: Vec<(String, String)>,
        request: ExportTraceServiceRequest,
    ) {
        let spans = span_count(&request);
        if self.count_only {
            self.span_count.send_modify(|n| *n += spans);
            return;
        }
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        requests.push(ReceivedRequest {
            transport,
            headers,
            request,
        });
        drop(requests);
        self.changed.notify_all();
        self.span_count.send_modify(|n| *n += spans);
    }
}

fn span_count(request: &ExportTraceServiceRequest) -> usize {
    request
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum()
}

/// A running receiver.
pub struct OtlpReceiver {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    store: Arc<Store>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Starts both servers on ephemeral ports of 127.0.0.1.
    pub fn start() -> io::Result<Self> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_at(any, any)
    }

    /// Starts the gRPC server at `grpc` and the HTTP server at `http` (e.g.
    /// ports an exporter already sends to, to test its retries).
    pub fn start_at(grpc: SocketAddr, http: SocketAddr) -> io::Result<Self> {
        Self::start_with(grpc, http, Store::default())
    }

    /// Starts both servers like [`OtlpReceiver::start_at`], keeping only
    /// the number of spans received ([`OtlpReceiver::span_count`]): for
    /// benchmarks, whose exports would otherwise fill memory.
    pub fn start_counting(grpc: SocketAddr, http: SocketAddr) -> io::Result<Self> {
        Self::start_with(
            grpc,
            http,
            Store {
                count_only: true,
                ..Store::default()
            },
        )
    }

    fn start_with(grpc: SocketAddr, http: SocketAddr, store: Store) -> io::Result<Self> {
        // Bound here, not on the server thread, so the addresses are known
        // (and errors reported) before this returns.
        let grpc_listener = TcpListener::bind(grpc)?;
        let http_listener = TcpListener::bind(http)?;
        grpc_listener.set_nonblocking(true)?;
        http_listener.set_nonblocking(true)?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let store = Arc::new(store);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread_store = store.clone();
        let thread = std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let grpc = tokio::net::TcpListener::from_std(grpc_listener);
                    let http = tokio::net::TcpListener::from_std(http_listener);
                    match (grpc, http) {
                        (Ok(grpc), Ok(http)) => {
                            tokio::spawn(serve_grpc(grpc, thread_store.clone()));
                            tokio::spawn(serve_http(http, thread_store));
                        }
                        (Err(e), _) | (_, Err(e)) => eprintln!("otlp receiver: {e}"),
                    }
                    let _ = stopped.await;
                });
                // Open client connections would keep a graceful shutdown
                // waiting; tests want the servers gone now.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Self {
            grpc_addr,
            http_addr,
            store,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The gRPC server's address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The HTTP server's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://127.0.0.1:PORT` of the gRPC server.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// `http://127.0.0.1:PORT` of the HTTP server (base URL, without
    /// `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.store
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        flatten(&self.requests())
    }

    /// Spans received so far.
    pub fn span_count(&self) -> usize {
        *self.store.span_count.borrow()
    }

    /// Blocks until at least `n` spans arrived or `timeout` passed, and
    /// returns the spans received by then. Do not call it on the runtime
    /// the exporter runs on (it would stall it); use
    /// [`OtlpReceiver::wait_for_spans_async`] there.
    pub fn wait_for_spans(&self, n: usize, timeout: Duration) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        let mut requests = self
            .store
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            let count: usize = requests.iter().map(|r| span_count(&r.request)).sum();
            let now = Instant::now();
            if count >= n || now >= deadline {
                return flatten(&requests);
            }
            requests = self
                .store
                .changed
                .wait_timeout(requests, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until at least `n` spans arrived or `timeout` passed, and
    /// returns the spans received by then.
    pub async fn wait_for_spans_async(&self, n: usize, timeout: Duration) -> Vec<ReceivedSpan> {
        let mut count = self.store.span_count.subscribe();
        let _ = tokio::time::timeout(timeout, count.wait_for(|c| *c >= n)).await;
        self.spans()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn flatten(requests: &[ReceivedRequest]) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    for received in requests {
        for resource_spans in &received.request.resource_spans {
            for scope_spans in &resource_spans.scope_spans {
                for span in &scope_spans.spans {
                    spans.push(ReceivedSpan {
                        transport: received.transport,
                        resource: resource_spans.resource.clone(),
                        scope: scope_spans.scope.clone(),
                        span: span.clone(),
                    });
                }
            }
        }
    }
    spans
}

/// The gRPC `TraceService`.
struct TraceCollector {
    store: Arc<Store>,
}

#[tonic::async_trait]
impl TraceService for TraceCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
            .collect();
        self.store
            .push(Transport::Grpc, headers, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn serve_grpc(listener: tokio::net::TcpListener, store: Arc<Store>) {
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let service = TraceServiceServer::new(TraceCollector { store });
    if let Err(e) = tonic::transport::Server::builder()
        .serve_with_incoming(service, incoming)
        .await
    {
        eprintln!("otlp receiver (gRPC): {e}");
    }
}

async fn serve_http(listener: tokio::net::TcpListener, store: Arc<Store>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let store = store.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let store = store.clone();
                async move { Ok::<_, hyper::Error>(handle_http(request, &store).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`.
async fn handle_http(request: Request<Incoming>, store: &Store) -> Response<Full<Bytes>> {
    if request.uri().path() != "/v1/traces" {
        return plain(StatusCode::NOT_FOUND, "only /v1/traces");
    }
    if request.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "POST only");
    }
    let content_type = request
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type != "application/x-protobuf" {
        return plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/x-protobuf only",
        );
    }
    let headers = request
        .headers()
        .iter()
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect();
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    };
    let decoded = match ExportTraceServiceRequest::decode(body) {
        Ok(decoded) => decoded,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("protobuf: {e}")),
    };
    store.push(Transport::Http, headers, decoded);
    let reply = ExportTraceServiceResponse {
        partial_success: None,
    };
    let mut response = Response::new(Full::new(Bytes::from(reply.encode_to_vec())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-protobuf"),
    );
    response
}

fn plain(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(message.to_string())));
    *response.status_mut() = status;
    response
}
