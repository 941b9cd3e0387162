//! OTLP over gRPC and HTTP/protobuf.
//!
//! Each request is an `ExportTraceServiceRequest` encoded straight from our
//! spans ([`super::otlp_proto`]), batch after batch as the export task
//! stages them, with a `ResourceSpans` per process in each batch, sent as
//! it is: over gRPC as the
//! `TraceService/Export` call (tonic, with a codec that sends the encoded
//! bytes and decodes the official response type), or over HTTP as a POST
//! of `application/x-protobuf` (hyper, through opentelemetry-http's
//! client). A response's partial success is logged, not retried.
//!
//! Configuration follows the OpenTelemetry exporter specification: an
//! explicit setting wins, else `OTEL_EXPORTER_OTLP_TRACES_*`, else
//! `OTEL_EXPORTER_OTLP_*`, else the default (gRPC to localhost:4317, the
//! project's documented default; the specification would prefer
//! http/protobuf). Headers merge: those of the environment are sent too,
//! and a header given explicitly replaces one of the same name from the
//! environment. TLS (`https://`) is not supported yet and is refused at
//! start rather than failing on every export. `OTEL_SERVICE_NAME` in the
//! agent's own environment is deliberately not used: it would name the
//! agent, while every span belongs to a traced process whose own
//! `OTEL_SERVICE_NAME` (read from that process's environment by the stage
//! that builds [`Resource`](crate::span::Resource)s) is already in its
//! resource.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::{BufMut as _, Bytes};
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use opentelemetry_http::HttpClient as _;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message as _;
use tonic::GrpcMethod;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{Ascii, MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::otlp_proto::ProtoEncoder;
use super::{ExportError, group_by_resource};
use crate::span::{Span, SpanKind};

/// Environment variables read when a setting is not given explicitly.
pub mod env {
    /// Collector base URL for all signals (`/v1/traces` is appended for HTTP).
    pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    /// Collector URL for traces, used as is.
    pub const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
    /// `grpc` or `http/protobuf`, for all signals.
    pub const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
    /// `grpc` or `http/protobuf`, for traces.
    pub const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
    /// `key=value,key2=value2`, for all signals (values percent-encoded).
    pub const HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
    /// `key=value,...`, for traces; when set, the one read.
    pub const TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
    /// Request time limit in milliseconds, for all signals.
    pub const TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
    /// Request time limit in milliseconds, for traces.
    pub const TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";
    /// `true`: a gRPC endpoint without a scheme is `http://`, not `https://`.
    pub const INSECURE: &str = "OTEL_EXPORTER_OTLP_INSECURE";
    /// As [`INSECURE`], for traces.
    pub const TRACES_INSECURE: &str = "OTEL_EXPORTER_OTLP_TRACES_INSECURE";
}

/// OTLP transport, named as `OTEL_EXPORTER_OTLP_PROTOCOL`, the
/// configuration file (`tracing.exporter.protocol`) and the
/// `--exporter-protocol` flag name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (default port 4317).
    #[serde(rename = "grpc")]
    #[value(name = "grpc")]
    Grpc,
    /// OTLP protobuf over HTTP (default port 4318, path `/v1/traces`).
    #[serde(rename = "http/protobuf")]
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

impl FromStr for OtlpProtocol {
    type Err = ExportError;

    /// Parses the values `OTEL_EXPORTER_OTLP_PROTOCOL` takes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            "http/json" => Err(ExportError::Config(
                "OTLP protocol http/json is not supported (use grpc or http/protobuf)".into(),
            )),
            other => Err(ExportError::Config(format!(
                "unknown OTLP protocol {other:?} (use grpc or http/protobuf)"
            ))),
        }
    }
}

impl fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        })
    }
}

/// Explicit OTLP settings (from the configuration file or command line).
/// `None` and empty fields fall back to the environment, then defaults.
#[derive(Clone, Default, PartialEq)]
pub struct OtlpSettings {
    /// Collector base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT`: e.g.
    /// `http://collector:4317` for gRPC, or `http://collector:4318` for
    /// HTTP, where `/v1/traces` is appended unless the URL ends with it.
    pub endpoint: Option<String>,
    /// Transport; default gRPC.
    pub protocol: Option<OtlpProtocol>,
    /// Request headers (gRPC metadata), e.g. an API key. The
    /// `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` ones are sent too; a name given
    /// here wins.
    pub headers: Vec<(String, String)>,
    /// Time limit of one export request; default
    /// `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` (milliseconds), else 10 s.
    pub timeout: Option<Duration>,
}

// Header values are usually credentials: keep them out of `{:?}` output.
impl fmt::Debug for OtlpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(name, _)| (name.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("OtlpSettings")
            .field("endpoint", &self.endpoint)
            .field("protocol", &self.protocol)
            .field("headers", &headers)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Where and how spans are sent, after applying the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedTarget {
    /// Transport.
    pub protocol: OtlpProtocol,
    /// Full URL requests go to (for HTTP including `/v1/traces`).
    pub endpoint: String,
    /// Time limit of one request.
    pub timeout: Duration,
}

const DEFAULT_GRPC_ENDPOINT: &str = "http://localhost:4317";
const DEFAULT_HTTP_ENDPOINT: &str = "http://localhost:4318";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP_TRACES_PATH: &str = "/v1/traces";

impl OtlpSettings {
    /// Applies the environment (`env` looks a variable up; empty values
    /// count as unset) to the settings not given explicitly.
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ResolvedTarget, ExportError> {
        let env = |name: &str| {
            env(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let protocol = match self.protocol {
            Some(protocol) => protocol,
            None => match env(env::TRACES_PROTOCOL).or_else(|| env(env::PROTOCOL)) {
                Some(value) => value.parse()?,
                None => OtlpProtocol::Grpc,
            },
        };
        let explicit = self
            .endpoint
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty());
        let endpoint = match (protocol, explicit) {
            (OtlpProtocol::Grpc, Some(base)) => base.to_string(),
            (OtlpProtocol::HttpProtobuf, Some(base)) => traces_url(base),
            // The signal-specific variable is a complete URL.
            (_, None) => match env(env::TRACES_ENDPOINT) {
                Some(url) => url,
                None => match (protocol, env(env::ENDPOINT)) {
                    (OtlpProtocol::Grpc, Some(base)) => base,
                    (OtlpProtocol::HttpProtobuf, Some(base)) => traces_url(&base),
                    (OtlpProtocol::Grpc, None) => DEFAULT_GRPC_ENDPOINT.to_string(),
                    (OtlpProtocol::HttpProtobuf, None) => traces_url(DEFAULT_HTTP_ENDPOINT),
                },
            },
        };
        if endpoint
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
        {
            return Err(ExportError::Config(format!(
                "OTLP endpoint {endpoint}: TLS (https://) is not supported yet; use http://"
            )));
        }
        let timeout = match self.timeout {
            Some(timeout) => timeout,
            None => match env(env::TRACES_TIMEOUT).or_else(|| env(env::TIMEOUT)) {
                Some(ms) => ms.parse().map(Duration::from_millis).map_err(|_| {
                    ExportError::Config(format!("OTLP timeout {ms:?} is not milliseconds"))
                })?,
                None => DEFAULT_TIMEOUT,
            },
        };
        if timeout.is_zero() {
            return Err(ExportError::Config("OTLP timeout must not be zero".into()));
        }
        Ok(ResolvedTarget {
            protocol,
            endpoint,
            timeout,
        })
    }
}

/// `base` with `/v1/traces` appended, unless it already ends with it.
fn traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with(HTTP_TRACES_PATH) {
        base.to_string()
    } else {
        format!("{base}{HTTP_TRACES_PATH}")
    }
}

/// The gRPC method requests go to (opentelemetry-proto's `TraceService`).
const GRPC_SERVICE: &str = "opentelemetry.proto.collector.trace.v1.TraceService";
const GRPC_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// The media type of an HTTP/protobuf request.
const PROTOBUF: &str = "application/x-protobuf";

/// Sends spans over OTLP, encoded straight from the spans
/// ([`ProtoEncoder`]). Batches are staged ([`stage`](Self::stage): encoded
/// at once, the spans dropped) and the staged ones go in one request
/// ([`send_staged`](Self::send_staged)). No retries here: the export task
/// retries.
#[derive(Debug)]
pub struct OtlpExporter {
    transport: Transport,
    target: ResolvedTarget,
    encoder: ProtoEncoder,
    /// The next request, as its batches are staged. A `Vec`, not a
    /// `BytesMut`: the encoder writes varints a byte at a time, which a
    /// `Vec` pushes while a `BytesMut` copies each byte with `memmove`. It
    /// becomes the request's `Bytes` without a copy.
    buffer: Vec<u8>,
    /// The request being sent, kept until it is delivered or dropped, so
    /// that a retry (or a call cut short by the task's time limit) sends
    /// it again.
    unsent: Option<Bytes>,
    /// Spans in `buffer` and `unsent`.
    staged: usize,
}

/// How requests travel.
#[derive(Debug)]
enum Transport {
    /// A lazily connecting tonic channel, and the metadata of every request.
    Grpc {
        channel: Channel,
        metadata: MetadataMap,
    },
    /// A hyper client (boxed: far larger than a channel), the traces URL
    /// and the headers of every request.
    Http {
        client: Box<HyperClient>,
        url: Uri,
        headers: HeaderMap,
    },
}

impl OtlpExporter {
    /// Builds the exporter from settings and the process environment. Must
    /// run inside a tokio runtime (the gRPC channel is created there); it
    /// connects lazily, so a collector that is down is not an error here.
    pub fn new(settings: &OtlpSettings) -> Result<Self, ExportError> {
        let env = |name: &str| std::env::var(name).ok();
        let mut target = settings.resolve(env)?;
        if target.protocol == OtlpProtocol::Grpc {
            target.endpoint = grpc_scheme(&target.endpoint, env)?;
        }
        // Environment headers first, so that an explicit header replaces
        // one of the same name.
        let mut headers = HeaderMap::new();
        for (name, value) in env_headers(env)
            .into_iter()
            .chain(header_pairs(&settings.headers)?)
        {
            headers.insert(name, value);
        }
        let config = |e: &dyn std::error::Error| {
            ExportError::Config(format!(
                "OTLP exporter for {}: {}",
                target.endpoint,
                chain(e)
            ))
        };
        let transport = match target.protocol {
            OtlpProtocol::Grpc => {
                let metadata = grpc_metadata(&headers)?;
                let channel = Endpoint::from_shared(target.endpoint.clone())
                    .and_then(|endpoint| endpoint.user_agent(user_agent()))
                    .map_err(|e| config(&e))?
                    .timeout(target.timeout)
                    .connect_lazy();
                Transport::Grpc { channel, metadata }
            }
            OtlpProtocol::HttpProtobuf => {
                let url = target.endpoint.parse::<Uri>().map_err(|e| config(&e))?;
                if !headers.contains_key(USER_AGENT) {
                    headers.insert(USER_AGENT, user_agent());
                }
                Transport::Http {
                    client: Box::new(HyperClient::with_default_connector(target.timeout, None)),
                    url,
                    headers,
                }
            }
        };
        Ok(Self {
            transport,
            target,
            encoder: ProtoEncoder::new(),
            buffer: Vec::new(),
            unsent: None,
            staged: 0,
        })
    }

    /// Where spans go.
    pub fn target(&self) -> &ResolvedTarget {
        &self.target
    }

    /// Encodes `spans` into the next request and empties `spans`. A
    /// request is a repeated `ResourceSpans` field, so batches encoded one
    /// after the other make one request; each batch groups its spans by
    /// resource (a `ResourceSpans` per process in it).
    ///
    /// Not while a staged request waits for its retry: the task sends or
    /// drops what is staged before it stages more.
    pub fn stage(&mut self, spans: &mut Vec<Span>) {
        if spans.is_empty() {
            return;
        }
        debug_assert!(self.unsent.is_none(), "staged while a request waits");
        self.encoder
            .encode_groups(spans, &group_by_resource(spans), &mut self.buffer);
        self.staged += spans.len();
        spans.clear();
    }

    /// Spans staged and not yet delivered.
    pub fn staged(&self) -> usize {
        self.staged
    }

    /// Sends every staged span in one request. Returns how many were
    /// delivered; on error they stay staged, for the export task's retry.
    /// Cancel-safe: a call cut short leaves them staged too.
    pub async fn send_staged(&mut self) -> Result<usize, ExportError> {
        if self.staged == 0 {
            return Ok(0);
        }
        let body = match &self.unsent {
            Some(body) => body.clone(),
            None => {
                let body = Bytes::from(std::mem::take(&mut self.buffer));
                self.unsent = Some(body.clone());
                body
            }
        };
        match self.transport.send(body).await {
            Ok(()) => {
                self.unsent = None;
                Ok(std::mem::take(&mut self.staged))
            }
            Err(e) => Err(ExportError::Export(format!(
                "OTLP to {}: {e}",
                self.target.endpoint
            ))),
        }
    }

    /// Drops every staged span (after the last attempt); returns how many.
    pub fn drop_staged(&mut self) -> usize {
        self.unsent = None;
        self.buffer.clear();
        std::mem::take(&mut self.staged)
    }
}

impl Transport {
    /// Sends one encoded `ExportTraceServiceRequest`. A partial success (the
    /// collector rejected some spans) is logged, not retried: the
    /// specification says so, and a retry would be rejected again.
    async fn send(&self, body: Bytes) -> Result<(), String> {
        let response = match self {
            Self::Grpc { channel, metadata } => {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready()
                    .await
                    .map_err(|e| format!("gRPC channel: {}", chain(&e)))?;
                let mut request = tonic::Request::new(body);
                *request.metadata_mut() = metadata.clone();
                request
                    .extensions_mut()
                    .insert(GrpcMethod::new(GRPC_SERVICE, "Export"));
                grpc.unary(
                    request,
                    PathAndQuery::from_static(GRPC_EXPORT_PATH),
                    RequestCodec,
                )
                .await
                .map_err(|status| grpc_error(&status))?
                .into_inner()
            }
            Self::Http {
                client,
                url,
                headers,
            } => {
                let mut request = http::Request::post(url.clone())
                    .header(CONTENT_TYPE, PROTOBUF)
                    .body(body)
                    .map_err(|e| format!("HTTP request: {e}"))?;
                for (name, value) in headers {
                    request.headers_mut().insert(name, value.clone());
                }
                let response = client
                    .send_bytes(request)
                    .await
                    .map_err(|e| format!("HTTP: {}", chain(&*e)))?;
                if !response.status().is_success() {
                    return Err(format!("HTTP status {}", response.status()));
                }
                // A body that is not a response counts as a full success, as
                // for opentelemetry-otlp (some collectors answer with none).
                ExportTraceServiceResponse::decode(response.into_body()).unwrap_or_default()
            }
        };
        if let Some(partial) = response.partial_success
            && (partial.rejected_spans > 0 || !partial.error_message.is_empty())
        {
            log::warn!(
                "OTLP collector rejected {} spans: {}",
                partial.rejected_spans,
                partial.error_message
            );
        }
        Ok(())
    }
}

/// The `User-Agent` of every request (gRPC adds tonic's after it).
fn user_agent() -> HeaderValue {
    HeaderValue::from_static(concat!(
        "transparent-tracing-agent/",
        env!("CARGO_PKG_VERSION")
    ))
}

/// A gRPC endpoint without a scheme gets one as opentelemetry-otlp gives
/// it: `http://` when `OTEL_EXPORTER_OTLP_[TRACES_]INSECURE` is `true`,
/// else `https://`, which is refused (no TLS yet).
fn grpc_scheme(
    endpoint: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, ExportError> {
    let has_scheme = endpoint
        .split_once("://")
        .is_some_and(|(scheme, _)| !scheme.contains(['/', '?', '#']));
    if has_scheme {
        return Ok(endpoint.to_string());
    }
    let insecure = env(env::TRACES_INSECURE)
        .or_else(|| env(env::INSECURE))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if insecure {
        Ok(format!("http://{endpoint}"))
    } else {
        Err(ExportError::Config(format!(
            "OTLP endpoint {endpoint}: without a scheme it means https://, and TLS is not \
             supported yet; use http:// (or set {}=true)",
            env::INSECURE
        )))
    }
}

/// The error and its sources, `: `-separated (tonic and hyper put the cause,
/// "connection refused" and the like, in the sources).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    append_sources(&mut text, error.source());
    text
}

/// Appends `source` and its own sources to `text`, but those `text` already
/// says.
fn append_sources(text: &mut String, mut source: Option<&(dyn std::error::Error + 'static)>) {
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
}

fn grpc_error(status: &tonic::Status) -> String {
    let mut text = format!("gRPC status {:?}", status.code());
    if !status.message().is_empty() {
        text.push_str(": ");
        text.push_str(status.message());
    }
    append_sources(&mut text, std::error::Error::source(status));
    text
}

/// The gRPC codec of the `Export` call: the request goes as the bytes
/// [`ProtoEncoder`] wrote, the response is decoded with the official type.
#[derive(Clone, Copy, Debug, Default)]
struct RequestCodec;

impl Codec for RequestCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RequestCodec;
    type Decoder = RequestCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for RequestCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RequestCodec {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        ExportTraceServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("export response: {e}")))
    }
}

/// Header pairs checked and parsed; names are lower-cased (gRPC metadata
/// keys must be, HTTP ones are case-insensitive). Bad ones are errors,
/// not skipped silently.
fn header_pairs(
    headers: &[(String, String)],
) -> Result<Vec<(HeaderName, HeaderValue)>, ExportError> {
    headers
        .iter()
        .map(|(name, value)| {
            let header = HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
                .map_err(|_| ExportError::Config(format!("invalid OTLP header name {name:?}")))?;
            // Not echoing the value: headers usually carry credentials.
            let value = HeaderValue::from_str(value.trim()).map_err(|_| {
                ExportError::Config(format!("invalid value of OTLP header {name:?}"))
            })?;
            Ok((header, value))
        })
        .collect()
}

/// The headers of `OTEL_EXPORTER_OTLP_TRACES_HEADERS` if set, else of
/// `OTEL_EXPORTER_OTLP_HEADERS`, read as opentelemetry-otlp reads them:
/// `name=value` pairs separated by commas, values percent-decoded (kept
/// as given when that fails), pairs with an empty name or value and those
/// that are not valid headers skipped.
fn env_headers(env: impl Fn(&str) -> Option<String>) -> Vec<(HeaderName, HeaderValue)> {
    let Some(text) = env(env::TRACES_HEADERS).or_else(|| env(env::HEADERS)) else {
        return Vec::new();
    };
    text.split_terminator(',')
        .filter_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            let (name, value) = (name.trim(), value.trim());
            let value = percent_decode(value).unwrap_or_else(|| value.to_string());
            if name.is_empty() || value.is_empty() {
                return None;
            }
            Some((
                HeaderName::from_bytes(name.as_bytes()).ok()?,
                HeaderValue::from_str(&value).ok()?,
            ))
        })
        .collect()
}

/// `%XX` sequences decoded; `None` if one is malformed or the result is
/// not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The headers as gRPC metadata (ASCII values only).
fn grpc_metadata(headers: &HeaderMap) -> Result<MetadataMap, ExportError> {
    let mut metadata = MetadataMap::new();
    for (name, value) in headers {
        let invalid = || ExportError::Config(format!("invalid gRPC metadata {name}"));
        let key =
            MetadataKey::<Ascii>::from_bytes(name.as_str().as_bytes()).map_err(|_| invalid())?;
        let value = MetadataValue::try_from(value.as_bytes()).map_err(|_| invalid())?;
        metadata.insert(key, value);
    }
    Ok(metadata)
}

/// Whether the span's parent is in another process. A server span's parent
/// came in with the request (traceparent); a client span's parent is the
/// server span of the same process.
pub fn parent_is_remote(span: &Span) -> bool {
    span.parent_span_id.is_some() && span.kind == SpanKind::Server
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn resolve(
        settings: &OtlpSettings,
        vars: &'static [(&'static str, &'static str)],
    ) -> ResolvedTarget {
        settings.resolve(env_of(vars)).unwrap()
    }

    #[test]
    fn defaults_are_grpc_to_localhost() {
        let target = resolve(&OtlpSettings::default(), &[]);
        assert_eq!(target.protocol, OtlpProtocol::Grpc);
        assert_eq!(target.endpoint, "http://localhost:4317");
        let http = OtlpSettings {
            protocol: Some(OtlpProtocol::HttpProtobuf),
            ..Default::default()
        };
        assert_eq!(
            resolve(&http, &[]).endpoint,
            "http://localhost:4318/v1/traces"
        );
    }

    #[test]
    fn environment_applies_when_not_set_explicitly() {
        let vars = &[
            (env::PROTOCOL, "grpc"),
            (env::ENDPOINT, "http://collector:4317"),
        ];
        let target = resolve(&OtlpSettings::default(), vars);
        assert_eq!(target.protocol, OtlpProtocol::Grpc);
        assert_eq!(target.endpoint, "http://collector:4317");

        let vars = &[
            (env::PROTOCOL, "grpc"),
            (env::TRACES_PROTOCOL, "http/protobuf"),
            (env::ENDPOINT, "http://collector:4318/"),
        ];
        let target = resolve(&OtlpSettings::default(), vars);
        assert_eq!(target.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(target.endpoint, "http://collector:4318/v1/traces");

        // The signal-specific URL is used as is and wins over the base one.
        let vars = &[
            (env::ENDPOINT, "http://ignored:4318"),
            (env::TRACES_ENDPOINT, "http://collector:9999/custom"),
        ];
        assert_eq!(
            resolve(&OtlpSettings::default(), vars).endpoint,
            "http://collector:9999/custom"
        );
        // Empty variables count as unset.
        let vars = &[(env::PROTOCOL, ""), (env::TRACES_ENDPOINT, " ")];
        assert_eq!(
            resolve(&OtlpSettings::default(), vars).endpoint,
            "http://localhost:4317"
        );
    }

    #[test]
    fn explicit_settings_win_over_the_environment() {
        let vars = &[
            (env::TRACES_PROTOCOL, "grpc"),
            (env::TRACES_ENDPOINT, "http://env:4317"),
        ];
        let settings = OtlpSettings {
            endpoint: Some("http://explicit:4318/v1/traces".into()),
            protocol: Some(OtlpProtocol::HttpProtobuf),
            ..Default::default()
        };
        let target = resolve(&settings, vars);
        assert_eq!(target.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(target.endpoint, "http://explicit:4318/v1/traces");
    }

    #[test]
    fn unsupported_protocols_are_errors() {
        let settings = OtlpSettings::default();
        let err = settings
            .resolve(env_of(&[(env::PROTOCOL, "http/json")]))
            .unwrap_err();
        assert!(err.to_string().contains("http/json"), "{err}");
        assert!(settings.resolve(env_of(&[(env::PROTOCOL, "udp")])).is_err());
        assert_eq!("grpc".parse::<OtlpProtocol>().unwrap(), OtlpProtocol::Grpc);
    }

    #[test]
    fn bad_headers_are_config_errors() {
        let ok = header_pairs(&[("X-Api-Key".into(), "v".into())]).unwrap();
        assert_eq!(ok[0].0.as_str(), "x-api-key");
        assert!(header_pairs(&[("bad name".into(), "v".into())]).is_err());
        let err = header_pairs(&[("x-ok".into(), "secret\nbreak".into())]).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn debug_output_hides_header_values() {
        let settings = OtlpSettings {
            headers: vec![("x-api-key".into(), "secret".into())],
            ..Default::default()
        };
        let text = format!("{settings:?}");
        assert!(
            text.contains("x-api-key") && !text.contains("secret"),
            "{text}"
        );
    }

    #[test]
    fn timeouts_and_tls_are_checked() {
        let settings = OtlpSettings::default();
        assert_eq!(
            resolve(&settings, &[(env::TIMEOUT, "2500")]).timeout,
            Duration::from_millis(2500)
        );
        assert_eq!(
            resolve(
                &settings,
                &[(env::TIMEOUT, "2500"), (env::TRACES_TIMEOUT, "700")]
            )
            .timeout,
            Duration::from_millis(700)
        );
        assert_eq!(resolve(&settings, &[]).timeout, Duration::from_secs(10));
        assert!(settings.resolve(env_of(&[(env::TIMEOUT, "soon")])).is_err());
        assert!(settings.resolve(env_of(&[(env::TIMEOUT, "0")])).is_err());
        let tls = OtlpSettings {
            endpoint: Some("HTTPS://collector:4317".into()),
            ..Default::default()
        };
        assert!(tls.resolve(env_of(&[])).is_err());
    }

    #[test]
    fn environment_headers_are_read_as_opentelemetry_otlp_reads_them() {
        let headers = env_headers(env_of(&[(
            env::HEADERS,
            " X-Api-Key = a%20b , empty=, =nameless,bad name=x,raw=100%,ok=1,",
        )]));
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(pairs, [("x-api-key", "a b"), ("raw", "100%"), ("ok", "1")]);
        // The traces variable, when set, is the one read.
        let vars = &[(env::HEADERS, "a=1"), (env::TRACES_HEADERS, "b=2")];
        let headers = env_headers(env_of(vars));
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[0].0.as_str(), "b");
        assert!(env_headers(env_of(&[])).is_empty());
        assert_eq!(percent_decode("%e2%82%ac").as_deref(), Some("\u{20ac}"));
        assert_eq!(percent_decode("%zz"), None);
    }

    #[test]
    fn a_grpc_endpoint_without_a_scheme_needs_insecure() {
        let vars: &[(&str, &str)] = &[];
        assert_eq!(
            grpc_scheme("http://c:4317", env_of(vars)).unwrap(),
            "http://c:4317"
        );
        assert!(grpc_scheme("c:4317", env_of(vars)).is_err());
        assert_eq!(
            grpc_scheme("c:4317", env_of(&[(env::INSECURE, "TRUE")])).unwrap(),
            "http://c:4317"
        );
        let vars = &[(env::INSECURE, "true"), (env::TRACES_INSECURE, "false")];
        assert!(grpc_scheme("c:4317", env_of(vars)).is_err());
    }

    /// Metadata and headers: explicit ones replace environment ones of
    /// the same name (as `new` merges them), names lower-case.
    #[test]
    fn grpc_metadata_keeps_every_header() {
        let mut headers = HeaderMap::new();
        for (name, value) in env_headers(env_of(&[(env::HEADERS, "x-token=env,x-env=1")]))
            .into_iter()
            .chain(header_pairs(&[("X-Token".into(), "explicit".into())]).unwrap())
        {
            headers.insert(name, value);
        }
        let metadata = grpc_metadata(&headers).unwrap();
        assert_eq!(metadata.get("x-token").unwrap(), "explicit");
        assert_eq!(metadata.get("x-env").unwrap(), "1");
        assert_eq!(metadata.len(), 2);
    }

    /// A collector that is not there: an export error naming the endpoint
    /// and the cause, the spans kept for the retry; for both transports.
    #[tokio::test]
    async fn an_absent_collector_is_an_export_error_and_keeps_the_spans() {
        use std::sync::Arc;

        use crate::span::{Resource, SpanId, SpanStatus, TraceId};

        // A port nothing listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let resource = Arc::new(Resource {
            service_name: "s".into(),
            attributes: vec![],
        });
        let span = Span {
            trace_id: TraceId([1; 16]),
            span_id: SpanId([2; 8]),
            parent_span_id: None,
            trace_state: String::new(),
            flags: 1,
            name: "GET".into(),
            kind: SpanKind::Server,
            start_unix_nano: 1,
            end_unix_nano: 2,
            attributes: vec![],
            status: SpanStatus::Unset,
            resource,
        };
        for protocol in [OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf] {
            let mut exporter = OtlpExporter::new(&OtlpSettings {
                endpoint: Some(format!("http://127.0.0.1:{port}")),
                protocol: Some(protocol),
                timeout: Some(Duration::from_secs(5)),
                ..Default::default()
            })
            .unwrap();
            let mut spans = vec![span.clone(), span.clone()];
            exporter.stage(&mut spans);
            exporter.stage(&mut vec![span.clone()]);
            assert_eq!((spans.len(), exporter.staged()), (0, 3));
            for _ in 0..2 {
                let err = exporter.send_staged().await.unwrap_err();
                let text = err.to_string();
                assert!(matches!(err, ExportError::Export(_)), "{text}");
                assert!(text.contains(&port.to_string()), "{text}");
                assert!(
                    text.to_lowercase().contains("refused"),
                    "{protocol}: {text}"
                );
                // Still staged, for the next attempt.
                assert_eq!(exporter.staged(), 3);
            }
            assert_eq!(exporter.drop_staged(), 3);
            assert_eq!(exporter.send_staged().await.unwrap(), 0);
        }
    }
}
