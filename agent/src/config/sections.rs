//! The YAML sections (`tracing:`, `capture:`, `http:`, ...): their keys,
//! their defaults (taken from the stages' settings), how each maps onto
//! its stage's settings, and which key a stage's objection is reported
//! under.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer, Unexpected, Visitor};

use super::ConfigError;
use crate::capture::{ProbeSettings, ProbeSettingsError};
use crate::correlate::{ProcessFilter, ProcessFilterError, SpanSettings, SpanSettingsError};
use crate::export::{ExporterConfig as Output, ExporterConfigError, OtlpProtocol, OtlpSettings};
use crate::proxy::rules::RedirectRules;
use crate::proxy::settings::{
    PortProblem, check_interface_pattern, check_ports, check_workers, workers_or_default,
};
use crate::proxy::{Cidr, ProxyMode};
use crate::sampling::Sampler;

/// `tracing:`: sampling and span outputs.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// Percent of new traces (no inbound parent) that are kept, 0 to 100.
    pub random_sampling: f64,
    /// When a request carries a traceparent, its sampled flag decides
    /// instead of `random_sampling`.
    pub parent_based: bool,
    /// OTLP export; `None` (key absent or empty) means no OTLP export.
    pub exporter: Option<ExporterConfig>,
    /// OTLP/JSON lines file that spans are appended to, if any.
    pub file: Option<PathBuf>,
    /// Whether spans are printed on the terminal; see
    /// [`super::Config::terminal_enabled`].
    pub terminal: TerminalMode,
}

// The sampling defaults are the sampler's.
impl Default for TracingConfig {
    fn default() -> Self {
        let sampler = Sampler::default();
        Self {
            random_sampling: sampler.percentage(),
            parent_based: sampler.is_parent_based(),
            exporter: None,
            file: None,
            terminal: TerminalMode::Auto,
        }
    }
}

impl TracingConfig {
    /// The sampler `random_sampling` and `parent_based` describe; its own
    /// check ([`Sampler::new`]) judges the percentage.
    pub fn sampler(&self) -> Result<Sampler, ConfigError> {
        Sampler::new(self.random_sampling, self.parent_based)
            .map_err(|e| ConfigError::invalid("tracing.random_sampling", e.reason()))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.sampler()?;
        if let Some(exporter) = &self.exporter {
            Output::Otlp(exporter.otlp_settings())
                .validate()
                .map_err(exporter_error)?;
        }
        if let Some(file) = &self.file {
            Output::File(file.clone())
                .validate()
                .map_err(exporter_error)?;
        }
        Ok(())
    }
}

/// The export stage's objection ([`Output::validate`]) under the key of
/// the setting at fault.
fn exporter_error(e: ExporterConfigError) -> ConfigError {
    let key = match &e {
        ExporterConfigError::Endpoint(_) => "tracing.exporter.endpoint".to_string(),
        ExporterConfigError::Header { name, .. } => format!("tracing.exporter.headers.{name}"),
        ExporterConfigError::Timeout(_) => "tracing.exporter.timeout_ms".to_string(),
        ExporterConfigError::File(_) => "tracing.file".to_string(),
    };
    ConfigError::invalid(&key, e.reason())
}

/// `tracing.exporter:`: the OTLP exporter.
///
/// Fields left `None` (or `headers` left empty) are the exporter's to fill
/// from `OTEL_EXPORTER_OTLP_*` variables, then from its defaults (grpc to
/// `http://localhost:4317`, 10 s; see [`crate::export::otlp`]).
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExporterConfig {
    /// Collector URL (`http://` or `https://`), as in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: with http/protobuf, `/v1/traces` is
    /// appended by the exporter.
    pub endpoint: Option<String>,
    /// Wire protocol.
    pub protocol: Option<OtlpProtocol>,
    /// Headers sent with every export request; names stored lower-case.
    #[serde(deserialize_with = "lower_case_keys")]
    pub headers: BTreeMap<String, String>,
    /// Time allowed for one export request, in milliseconds.
    pub timeout_ms: Option<u64>,
}

// Header values are usually credentials (API keys): they must not end up in
// logs through a `{:?}` of the configuration.
impl fmt::Debug for ExporterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: BTreeMap<&str, &str> = self
            .headers
            .keys()
            .map(|name| (name.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("ExporterConfig")
            .field("endpoint", &self.endpoint)
            .field("protocol", &self.protocol)
            .field("headers", &headers)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl ExporterConfig {
    /// The exporter's settings; what is left `None` (or empty) the exporter
    /// fills from the environment, then from its defaults.
    pub fn otlp_settings(&self) -> OtlpSettings {
        OtlpSettings {
            endpoint: self.endpoint.clone(),
            protocol: self.protocol,
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            timeout: self.timeout_ms.map(std::time::Duration::from_millis),
        }
    }
}

/// `tracing.terminal` (and `kubernetes.enabled`): `auto`, `true` or `false`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TerminalMode {
    /// Print spans only when they go nowhere else (no exporter, no file), so
    /// a bare `agent run` shows something and a production one stays quiet.
    #[default]
    Auto,
    /// Always print spans.
    On,
    /// Never print spans.
    Off,
}

impl<'de> Deserialize<'de> for TerminalMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TerminalVisitor;

        impl Visitor<'_> for TerminalVisitor {
            type Value = TerminalMode;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("auto, true or false")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<TerminalMode, E> {
                Ok(if v {
                    TerminalMode::On
                } else {
                    TerminalMode::Off
                })
            }

            // Quoted "true"/"false" are accepted too: a string is what
            // templating tools tend to produce.
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TerminalMode, E> {
                match v {
                    "auto" => Ok(TerminalMode::Auto),
                    "true" => Ok(TerminalMode::On),
                    "false" => Ok(TerminalMode::Off),
                    _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
                }
            }
        }

        deserializer.deserialize_any(TerminalVisitor)
    }
}

/// `capture:`: what the kernel side copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureConfig {
    /// Bytes of each message (one syscall) copied, 1 to 16384.
    pub max_message_bytes: u32,
    /// Kernel-to-agent ring buffer size: a power of two, at least 4096.
    pub ring_buffer_bytes: u32,
}

// One source of truth for the kernel-side defaults: the capture module's.
impl Default for CaptureConfig {
    fn default() -> Self {
        let probe = ProbeSettings::default();
        Self {
            max_message_bytes: probe.max_message_bytes,
            ring_buffer_bytes: probe.ring_buffer_bytes,
        }
    }
}

impl CaptureConfig {
    /// The settings handed to [`crate::capture::Capture::start`].
    pub fn probe_settings(&self) -> ProbeSettings {
        ProbeSettings {
            max_message_bytes: self.max_message_bytes,
            ring_buffer_bytes: self.ring_buffer_bytes,
            ..ProbeSettings::default()
        }
    }
}

impl CaptureConfig {
    /// The capture's own checks ([`ProbeSettings::validate`]), under the
    /// key of the field at fault.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.probe_settings().validate().map_err(|e| {
            let key = match e {
                ProbeSettingsError::MaxMessageBytes(_) => "capture.max_message_bytes",
                ProbeSettingsError::RingBufferBytes(_) => "capture.ring_buffer_bytes",
            };
            ConfigError::invalid(key, e.reason())
        })
    }
}

/// `http:`: what is recorded from each HTTP message.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Request headers recorded as `http.request.header.<name>`: an
    /// allow-list, lower-case, never one of
    /// [`crate::correlate::attributes::SENSITIVE_HEADERS`] (listing
    /// one is an error rather than silently ignored, so nobody believes
    /// credentials are being recorded).
    #[serde(deserialize_with = "lower_case_list")]
    pub request_headers: Vec<String>,
    /// Response headers recorded as `http.response.header.<name>`; same
    /// rules as `request_headers`.
    #[serde(deserialize_with = "lower_case_list")]
    pub response_headers: Vec<String>,
    /// Query parameters whose values are replaced by `REDACTED` in
    /// `url.query`; stored lower-case so they can be matched without regard
    /// to case (`Token=` leaks as much as `token=`).
    #[serde(deserialize_with = "lower_case_list")]
    pub redact_query_parameters: Vec<String>,
    /// Collapse numeric, UUID and long hex path segments to `{id}` in span
    /// names, so span names stay few (low cardinality).
    pub route_heuristic: bool,
}

// The defaults are the correlator's.
impl Default for HttpConfig {
    fn default() -> Self {
        let settings = SpanSettings::default();
        Self {
            request_headers: settings.request_headers,
            response_headers: settings.response_headers,
            redact_query_parameters: settings.redact_query_parameters,
            route_heuristic: settings.route_heuristic,
        }
    }
}

impl HttpConfig {
    /// What spans record.
    pub fn span_settings(&self) -> SpanSettings {
        SpanSettings {
            request_headers: self.request_headers.clone(),
            response_headers: self.response_headers.clone(),
            redact_query_parameters: self.redact_query_parameters.clone(),
            route_heuristic: self.route_heuristic,
        }
    }

    /// The correlator's own checks ([`SpanSettings::validate`]), under the
    /// key of the list at fault.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.span_settings().validate().map_err(|e| {
            let key = match e {
                SpanSettingsError::RequestHeaders(_) => "http.request_headers",
                SpanSettingsError::ResponseHeaders(_) => "http.response_headers",
                SpanSettingsError::RedactQueryParameters(_) => "http.redact_query_parameters",
            };
            ConfigError::invalid(key, e.reason())
        })
    }
}

/// `processes:`: which processes are traced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessFilterConfig {
    /// Executable names traced; empty means every process.
    pub include: Vec<String>,
    /// Executable names never traced; wins over `include`.
    pub exclude: Vec<String>,
    /// Put `process.command_line` on spans, secrets redacted (off by
    /// default: arguments can hold secrets no rule recognizes).
    pub command_line: bool,
}

impl ProcessFilterConfig {
    /// Which processes are traced; URLs on their command lines have the
    /// values of `secret_query_parameters` redacted.
    pub fn process_filter(&self, secret_query_parameters: Vec<String>) -> ProcessFilter {
        ProcessFilter {
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            command_line: self.command_line,
            secret_query_parameters,
        }
    }

    /// The correlator's own check ([`ProcessFilter::validate`]), under the
    /// key of the list at fault.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.process_filter(Vec::new()).validate().map_err(|e| {
            let key = match e {
                ProcessFilterError::Include(_) => "processes.include",
                ProcessFilterError::Exclude(_) => "processes.exclude",
            };
            ConfigError::invalid(key, e.reason())
        })
    }
}

/// `proxy:`: the transparent proxy that injects `traceparent`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Whether the proxy runs.
    pub enabled: bool,
    /// Local port the redirected connections arrive on.
    pub listen_port: u16,
    /// Where traffic is intercepted.
    pub mode: ProxyMode,
    /// Destination ports whose connections are redirected.
    pub ports: Vec<u16>,
    /// Pod-side interfaces in node mode; a trailing `+` matches any suffix
    /// (iptables syntax).
    pub pod_interfaces: Vec<String>,
    /// Only destinations in these blocks are redirected; empty means all.
    pub include_cidrs: Vec<Cidr>,
    /// Destinations in these blocks are never redirected.
    pub exclude_cidrs: Vec<Cidr>,
    /// Destination ports never redirected.
    pub exclude_ports: Vec<u16>,
    /// Threads relaying connections; 0 means one per CPU.
    pub workers: usize,
}

/// The proxy's own defaults ([`RedirectRules::default`]), disabled.
impl Default for ProxyConfig {
    fn default() -> Self {
        let rules = RedirectRules::default();
        Self {
            enabled: false,
            listen_port: rules.listen_port,
            mode: rules.mode,
            ports: rules.ports,
            pod_interfaces: rules.pod_interfaces,
            include_cidrs: rules.include_cidrs,
            exclude_cidrs: rules.exclude_cidrs,
            exclude_ports: rules.exclude_ports,
            workers: 0,
        }
    }
}

impl ProxyConfig {
    /// Validated by the proxy's own checks; this names the key and says it
    /// in the file's terms.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid_ports = "ports must be between 1 and 65535, got 0";
        match check_ports(self.listen_port, &self.ports, &self.exclude_ports) {
            Ok(()) => {}
            // No port to redirect matters only to a proxy that runs.
            Err(PortProblem::NoPorts) if !self.enabled => {}
            Err(problem) => {
                return Err(match problem {
                    PortProblem::ListenPortZero => ConfigError::invalid(
                        "proxy.listen_port",
                        "must be between 1 and 65535, got 0",
                    ),
                    PortProblem::ZeroInPorts => ConfigError::invalid("proxy.ports", invalid_ports),
                    PortProblem::ZeroInExcludePorts => {
                        ConfigError::invalid("proxy.exclude_ports", invalid_ports)
                    }
                    PortProblem::ListenPortRedirected(port) => ConfigError::invalid(
                        "proxy.ports",
                        format!("must not contain proxy.listen_port ({port})"),
                    ),
                    PortProblem::NoPorts => ConfigError::invalid(
                        "proxy.ports",
                        "must list at least one port when proxy.enabled is true",
                    ),
                });
            }
        }
        for name in &self.pod_interfaces {
            check_interface_pattern(name)
                .map_err(|reason| ConfigError::invalid("proxy.pod_interfaces", reason))?;
        }
        check_workers(self.workers).map_err(|reason| ConfigError::invalid("proxy.workers", reason))
    }
}

impl ProxyConfig {
    /// The REDIRECT rules these settings ask for; what the file cannot say
    /// (mark, chain names, back end) keeps the proxy's defaults.
    pub fn redirect_rules(&self) -> RedirectRules {
        RedirectRules {
            mode: self.mode,
            listen_port: self.listen_port,
            ports: self.ports.clone(),
            pod_interfaces: self.pod_interfaces.clone(),
            include_cidrs: self.include_cidrs.clone(),
            exclude_cidrs: self.exclude_cidrs.clone(),
            exclude_ports: self.exclude_ports.clone(),
            ..RedirectRules::default()
        }
    }

    /// The proxy's own settings: listening on every address (IPv4 and IPv6,
    /// since both families' rules redirect to it) on `listen_port`.
    pub fn proxy_settings(&self) -> crate::proxy::ProxySettings {
        use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
        crate::proxy::ProxySettings {
            listen: vec![
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, self.listen_port)),
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, self.listen_port)),
            ],
            workers: workers_or_default(self.workers),
            ..crate::proxy::ProxySettings::default()
        }
    }
}

/// `metrics:`: where the agent serves its counters and health.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Whether the endpoint runs.
    pub enabled: bool,
    /// `IP:PORT` it listens on.
    pub address: String,
}

// The defaults are the metrics module's.
impl Default for MetricsConfig {
    fn default() -> Self {
        let settings = crate::metrics::MetricsSettings::default();
        Self {
            enabled: settings.address.is_some(),
            address: settings
                .address
                .unwrap_or(crate::metrics::DEFAULT_ADDRESS)
                .to_string(),
        }
    }
}

impl MetricsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        crate::metrics::MetricsSettings::parse_address(&self.address)
            .map(|_| ())
            .map_err(|reason| ConfigError::invalid("metrics.address", reason))
    }

    /// The settings handed to the metrics endpoint.
    pub fn metrics_settings(&self) -> crate::metrics::MetricsSettings {
        crate::metrics::MetricsSettings {
            address: if self.enabled {
                crate::metrics::MetricsSettings::parse_address(&self.address).ok()
            } else {
                None
            },
        }
    }
}

/// `kubernetes:`: where the names of this node's pods come from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// `auto` (in a cluster, or with `api_server`), `true` or `false`.
    pub enabled: TerminalMode,
    /// This node's name; empty: the `NODE_NAME` environment variable.
    pub node_name: String,
    /// An API server URL used without credentials; empty: in-cluster.
    pub api_server: String,
}

impl KubernetesConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.kubernetes_settings()
            .validate()
            .map_err(|e| ConfigError::invalid("kubernetes.api_server", e.to_string()))
    }

    /// The settings handed to the pod watcher.
    pub fn kubernetes_settings(&self) -> crate::kubernetes::KubernetesSettings {
        use crate::kubernetes::Enablement;
        let non_empty = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
        crate::kubernetes::KubernetesSettings {
            enabled: match self.enabled {
                TerminalMode::Auto => Enablement::Auto,
                TerminalMode::On => Enablement::On,
                TerminalMode::Off => Enablement::Off,
            },
            node_name: non_empty(&self.node_name),
            api_server: non_empty(&self.api_server),
        }
    }
}

/// Header names are case-insensitive: lower-casing them once here lets every
/// later stage compare with `==`. Duplicates (possibly created by the
/// lower-casing) are dropped, keeping the first.
fn lower_case_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let names = Vec::<String>::deserialize(deserializer)?;
    Ok(lower_case_dedup(names))
}

pub(super) fn lower_case_dedup(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in names {
        let name = name.to_ascii_lowercase();
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// Lower-cases exporter header names: gRPC metadata keys must be lower-case,
/// and HTTP ones are case-insensitive.
fn lower_case_keys<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let map = BTreeMap::<String, String>::deserialize(deserializer)?;
    Ok(map
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect())
}
