//! OTLP over gRPC and HTTP/protobuf, through `opentelemetry-otlp`.
//!
//! Our spans become `opentelemetry_sdk` [`SpanData`] here; the exporter
//! library does the protobuf encoding and the transport. One exporter
//! instance carries one resource at a time, while a batch of ours mixes
//! spans of many processes, so each batch is sent as one request per
//! resource, setting the exporter's resource before each.
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
//! that builds [`Resource`]s) is already in its resource.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanKind as OtelSpanKind, Status, TraceFlags, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{Bytes, HttpClient, HttpError};
use opentelemetry_otlp::{
    Protocol, RetryPolicy, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tonic::metadata::{Ascii, MetadataKey, MetadataValue};

use super::{ExportError, SCOPE_NAME, SCOPE_VERSION, group_by_resource};
use crate::span::{AttributeValue, Resource, Span, SpanKind, SpanStatus};

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
    /// `key=value,key2=value2`, for all signals (read by the exporter library).
    pub const HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
    /// `key=value,...`, for traces (read by the exporter library).
    pub const TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
    /// Request time limit in milliseconds, for all signals.
    pub const TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
    /// Request time limit in milliseconds, for traces.
    pub const TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";
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

/// Sends batches of spans with `opentelemetry-otlp`, one request per
/// resource. Its own retries are off: the export task retries.
#[derive(Debug)]
pub struct OtlpExporter {
    exporter: opentelemetry_otlp::SpanExporter,
    target: ResolvedTarget,
    scope: InstrumentationScope,
}

impl OtlpExporter {
    /// Builds the exporter from settings and the process environment. Must
    /// run inside a tokio runtime (the gRPC channel is created there); it
    /// connects lazily, so a collector that is down is not an error here.
    pub fn new(settings: &OtlpSettings) -> Result<Self, ExportError> {
        let target = settings.resolve(|name| std::env::var(name).ok())?;
        let headers = header_pairs(&settings.headers)?;
        let config = |e: opentelemetry_otlp::ExporterBuildError| {
            ExportError::Config(format!("OTLP exporter for {}: {e}", target.endpoint))
        };
        let exporter = match target.protocol {
            OtlpProtocol::Grpc => {
                let metadata = grpc_metadata(&headers)?;
                // Runs after the library added the environment's headers, so
                // an explicit header replaces one of the same name.
                let explicit_headers = move |mut request: tonic::Request<()>| {
                    for (key, value) in &metadata {
                        request.metadata_mut().insert(key.clone(), value.clone());
                    }
                    Ok(request)
                };
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(target.endpoint.clone())
                    .with_timeout(target.timeout)
                    .with_interceptor(explicit_headers)
                    .with_retry_policy(RetryPolicy::disabled())
                    .build()
                    .map_err(config)?
            }
            OtlpProtocol::HttpProtobuf => {
                let client = ExplicitHeaders {
                    inner: HyperClient::with_default_connector(target.timeout, None),
                    headers,
                };
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(target.endpoint.clone())
                    .with_timeout(target.timeout)
                    .with_http_client(client)
                    .with_retry_policy(RetryPolicy::disabled())
                    .build()
                    .map_err(config)?
            }
        };
        Ok(Self {
            exporter,
            target,
            scope: scope(),
        })
    }

    /// Where spans go.
    pub fn target(&self) -> &ResolvedTarget {
        &self.target
    }

    /// Sends `spans`, one request per resource, and removes from `spans`
    /// those that were delivered. On error the undelivered spans stay, so a
    /// retry does not send the others twice.
    pub async fn export(&mut self, spans: &mut Vec<Span>) -> Result<(), ExportError> {
        let mut delivered = vec![false; spans.len()];
        let mut first_error = None;
        for group in group_by_resource(spans) {
            // Groups have distinct resources, so each is converted once.
            self.exporter
                .set_resource(&sdk_resource(&spans[group[0]].resource));
            let batch = group
                .iter()
                .map(|&i| span_data(&spans[i], &self.scope))
                .collect();
            match self.exporter.export(batch).await {
                Ok(()) => group.iter().for_each(|&i| delivered[i] = true),
                Err(e) => {
                    first_error.get_or_insert_with(|| {
                        ExportError::Export(format!("OTLP to {}: {e}", self.target.endpoint))
                    });
                }
            }
        }
        let mut index = 0;
        spans.retain(|_| {
            index += 1;
            !delivered[index - 1]
        });
        first_error.map_or(Ok(()), Err)
    }
}

/// Header pairs checked and parsed; names are lower-cased (gRPC metadata
/// keys must be, HTTP ones are case-insensitive). Bad ones are errors: the
/// library would skip them silently.
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

/// One gRPC metadata entry.
type MetadataEntry = (MetadataKey<Ascii>, MetadataValue<Ascii>);

/// The headers as gRPC metadata (ASCII values only).
fn grpc_metadata(headers: &[(HeaderName, HeaderValue)]) -> Result<Vec<MetadataEntry>, ExportError> {
    headers
        .iter()
        .map(|(name, value)| {
            let invalid = || ExportError::Config(format!("invalid gRPC metadata {name}"));
            let key = MetadataKey::from_bytes(name.as_str().as_bytes()).map_err(|_| invalid())?;
            let value = MetadataValue::try_from(value.as_bytes()).map_err(|_| invalid())?;
            Ok((key, value))
        })
        .collect()
}

/// An HTTP client that sets the explicitly configured headers on every
/// request, after the library added the environment's: so a header given
/// explicitly replaces one of the same name from the environment.
#[derive(Debug)]
struct ExplicitHeaders {
    inner: HyperClient,
    headers: Vec<(HeaderName, HeaderValue)>,
}

#[async_trait::async_trait]
impl HttpClient for ExplicitHeaders {
    async fn send_bytes(
        &self,
        mut request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        for (name, value) in &self.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        self.inner.send_bytes(request).await
    }
}

/// The instrumentation scope every exported span carries.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope::builder(SCOPE_NAME)
        .with_version(SCOPE_VERSION)
        .build()
}

/// Our resource as an SDK resource: `service.name` plus its attributes.
pub fn sdk_resource(resource: &Resource) -> opentelemetry_sdk::Resource {
    let attributes = resource
        .attributes
        .iter()
        .filter(|a| a.key != super::SERVICE_NAME)
        .map(|a| KeyValue::new(a.key.to_string(), value(&a.value)))
        .chain(std::iter::once(KeyValue::new(
            super::SERVICE_NAME,
            resource.service_name.clone(),
        )));
    opentelemetry_sdk::Resource::builder_empty()
        .with_attributes(attributes)
        .build()
}

fn value(value: &AttributeValue) -> Value {
    match value {
        AttributeValue::String(s) => Value::from(s.to_string()),
        AttributeValue::Int(i) => Value::I64(*i),
    }
}

/// Whether the span's parent is in another process. A server span's parent
/// came in with the request (traceparent); a client span's parent is the
/// server span of the same process.
pub(super) fn parent_is_remote(span: &Span) -> bool {
    span.parent_span_id.is_some() && span.kind == SpanKind::Server
}

/// Our span as SDK span data.
pub fn span_data(span: &Span, scope: &InstrumentationScope) -> SpanData {
    let trace_state = if span.trace_state.is_empty() {
        TraceState::default()
    } else {
        // Already validated upstream; the SDK's own parser decides here, and
        // a value it rejects is dropped rather than the whole span.
        TraceState::from_str(&span.trace_state).unwrap_or_else(|e| {
            log::debug!("tracestate {:?} not exported: {e}", span.trace_state);
            TraceState::default()
        })
    };
    let span_context = SpanContext::new(
        opentelemetry::TraceId::from_bytes(span.trace_id.0),
        opentelemetry::SpanId::from_bytes(span.span_id.0),
        TraceFlags::new(span.flags),
        false,
        trace_state,
    );
    SpanData {
        span_context,
        parent_span_id: span
            .parent_span_id
            .map_or(opentelemetry::SpanId::INVALID, |p| {
                opentelemetry::SpanId::from_bytes(p.0)
            }),
        parent_span_is_remote: parent_is_remote(span),
        span_kind: match span.kind {
            SpanKind::Server => OtelSpanKind::Server,
            SpanKind::Client => OtelSpanKind::Client,
        },
        name: Cow::Owned(span.name.clone()),
        start_time: unix_time(span.start_unix_nano),
        end_time: unix_time(span.end_unix_nano),
        attributes: span
            .attributes
            .iter()
            .map(|a| KeyValue::new(a.key.to_string(), value(&a.value)))
            .collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match &span.status {
            SpanStatus::Unset => Status::Unset,
            SpanStatus::Error(message) => Status::error(message.clone()),
        },
        instrumentation_scope: scope.clone(),
    }
}

fn unix_time(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::span::{Attribute, SpanId, TraceId};

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
    fn span_data_keeps_every_field() {
        let resource = Arc::new(Resource {
            service_name: "svc".into(),
            attributes: vec![Attribute::int("process.pid", 42)],
        });
        let span = Span {
            trace_id: TraceId([1; 16]),
            span_id: SpanId([2; 8]),
            parent_span_id: Some(SpanId([3; 8])),
            trace_state: "k=v,a=b".into(),
            flags: 3,
            name: "GET /x".into(),
            kind: SpanKind::Server,
            start_unix_nano: 1_700_000_000_123_456_789,
            end_unix_nano: 1_700_000_000_223_456_789,
            attributes: vec![
                Attribute::string("http.request.method", "GET"),
                Attribute::int("http.response.status_code", 500),
            ],
            status: SpanStatus::Error("boom".into()),
            resource,
        };
        let data = span_data(&span, &scope());
        assert_eq!(data.span_context.trace_id().to_bytes(), [1; 16]);
        assert_eq!(data.span_context.span_id().to_bytes(), [2; 8]);
        assert_eq!(data.span_context.trace_flags().to_u8(), 3);
        assert_eq!(data.span_context.trace_state().header(), "k=v,a=b");
        assert_eq!(data.parent_span_id.to_bytes(), [3; 8]);
        assert!(data.parent_span_is_remote);
        assert_eq!(data.span_kind, OtelSpanKind::Server);
        assert_eq!(
            data.start_time
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos(),
            1_700_000_000_123_456_789
        );
        assert_eq!(data.attributes.len(), 2);
        assert_eq!(data.attributes[1].value, Value::I64(500));
        assert_eq!(data.status, Status::error("boom"));
        assert_eq!(data.instrumentation_scope.name(), SCOPE_NAME);

        let sdk = sdk_resource(&span.resource);
        assert_eq!(
            sdk.get(&opentelemetry::Key::from_static_str("service.name")),
            Some(Value::from("svc"))
        );
        assert_eq!(sdk.len(), 2);
    }
}
