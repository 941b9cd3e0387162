//! Agent configuration: YAML file and command-line overrides.
//!
//! Precedence, lowest first: built-in defaults, the YAML file
//! (`--config agent.yaml`), then command-line flags ([`ConfigOverrides`]).
//! `OTEL_*` environment variables are deliberately not read here: the
//! exporter applies them to the exporter settings this configuration leaves
//! unset, so an explicit setting always wins over the environment.
//!
//! Every key is optional. Unknown keys, values of the wrong type and values
//! out of range are errors that name the full key path (for example
//! `tracing.exporter.endpoint`), so a typo never silently falls back to a
//! default. `docs/configuration.md` documents every key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, Unexpected, Visitor};

use crate::capture::{ProbeSettings, ProbeSettingsError};
use crate::correlate::{ProcessFilter, ProcessFilterError, SpanSettings, SpanSettingsError};
use crate::export::{ExporterConfig as Output, ExporterConfigError, OtlpProtocol, OtlpSettings};
use crate::proxy::rules::RedirectRules;
use crate::proxy::settings::{
    PortProblem, check_interface_pattern, check_ports, check_workers, workers_or_default,
};
use crate::proxy::{Cidr, ProxyMode};
use crate::sampling::Sampler;

/// The whole configuration of `agent run`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Sampling and where spans go (`tracing:`).
    pub tracing: TracingConfig,
    /// Kernel capture sizes (`capture:`).
    pub capture: CaptureConfig,
    /// What is recorded from HTTP messages (`http:`).
    pub http: HttpConfig,
    /// Which processes are traced (`processes:`).
    pub processes: ProcessFilterConfig,
    /// The transparent traceparent-injecting proxy (`proxy:`).
    pub proxy: ProxyConfig,
    /// The agent's own `/metrics`, `/healthz` and `/readyz` (`metrics:`).
    pub metrics: MetricsConfig,
    /// Pod names from the API server for the spans' resources (`kubernetes:`).
    pub kubernetes: KubernetesConfig,
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
    fn validate(&self) -> Result<(), ConfigError> {
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
    fn validate(&self) -> Result<(), ConfigError> {
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
    /// [`Config::terminal_enabled`].
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
    pub protocol: Option<ExporterProtocol>,
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

/// OTLP wire protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum ExporterProtocol {
    /// OTLP over gRPC (default port 4317).
    #[serde(rename = "grpc")]
    #[value(name = "grpc")]
    Grpc,
    /// OTLP protobuf over HTTP (default port 4318).
    #[serde(rename = "http/protobuf")]
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

impl fmt::Display for ExporterProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        })
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

/// Header names are case-insensitive: lower-casing them once here lets every
/// later stage compare with `==`. Duplicates (possibly created by the
/// lower-casing) are dropped, keeping the first.
fn lower_case_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let names = Vec::<String>::deserialize(deserializer)?;
    Ok(lower_case_dedup(names))
}

fn lower_case_dedup(names: impl IntoIterator<Item = String>) -> Vec<String> {
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

impl Config {
    /// Parses a YAML document and validates it. An empty document (or one
    /// holding only comments) is the default configuration.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let config = Self::parse(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates the file at `path`; errors name the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::parse_file(path)
            .and_then(|config| config.validate().map(|()| config))
            .map_err(|e| e.in_file(path))
    }

    /// Checks every value against its allowed range; the first problem found
    /// is returned, naming its key. Run again after overrides because flags
    /// bypass the file's checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.tracing.validate()?;
        self.capture.validate()?;
        self.http.validate()?;
        self.processes.validate()?;
        self.proxy.validate()?;
        self.metrics.validate()?;
        self.kubernetes.validate()
    }

    /// Whether spans are printed on the terminal: `auto` means only when
    /// they are neither exported nor written to a file.
    pub fn terminal_enabled(&self) -> bool {
        match self.tracing.terminal {
            TerminalMode::On => true,
            TerminalMode::Off => false,
            TerminalMode::Auto => self.tracing.exporter.is_none() && self.tracing.file.is_none(),
        }
    }

    fn parse_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            kind: ConfigErrorKind::Io,
            key: String::new(),
            reason: e.to_string(),
            file: Some(path.to_path_buf()),
            location: None,
            flag: None,
        })?;
        Self::parse(&text)
    }

    /// Parses without validating, so overrides can still fix a value before
    /// [`Config::validate`] judges it.
    fn parse(text: &str) -> Result<Config, ConfigError> {
        // A first pass into a generic value separates YAML syntax errors from
        // configuration errors, and recognises the empty document (`~`,
        // comments only) that a typed pass would reject.
        match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
            Err(e) => return Err(ConfigError::from_syntax(&e)),
            Ok(serde_yaml_ng::Value::Null) => return Ok(Config::default()),
            Ok(serde_yaml_ng::Value::Mapping(_)) => {}
            Ok(other) => {
                return Err(ConfigError::invalid(
                    "",
                    format!(
                        "the configuration must be a mapping of sections \
                         (tracing, capture, http, processes, proxy), got {}",
                        value_kind(&other)
                    ),
                ));
            }
        }
        // The typed pass reads the text again rather than the value so that
        // errors keep their line and column.
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(deserializer).map_err(ConfigError::from_serde)
    }
}

fn value_kind(value: &serde_yaml_ng::Value) -> &'static str {
    use serde_yaml_ng::Value;
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

impl TracingConfig {
    /// The sampler `random_sampling` and `parent_based` describe; its own
    /// check ([`Sampler::new`]) judges the percentage.
    pub fn sampler(&self) -> Result<Sampler, ConfigError> {
        Sampler::new(self.random_sampling, self.parent_based)
            .map_err(|e| ConfigError::invalid("tracing.random_sampling", e.reason()))
    }

    fn validate(&self) -> Result<(), ConfigError> {
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

impl ExporterConfig {
    /// The exporter's settings; what is left `None` (or empty) the exporter
    /// fills from the environment, then from its defaults.
    pub fn otlp_settings(&self) -> OtlpSettings {
        OtlpSettings {
            endpoint: self.endpoint.clone(),
            protocol: self.protocol.map(|p| match p {
                ExporterProtocol::Grpc => OtlpProtocol::Grpc,
                ExporterProtocol::HttpProtobuf => OtlpProtocol::HttpProtobuf,
            }),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            timeout: self.timeout_ms.map(std::time::Duration::from_millis),
        }
    }
}

impl CaptureConfig {
    /// The capture's own checks ([`ProbeSettings::validate`]), under the
    /// key of the field at fault.
    fn validate(&self) -> Result<(), ConfigError> {
        self.probe_settings().validate().map_err(|e| {
            let key = match e {
                ProbeSettingsError::MaxMessageBytes(_) => "capture.max_message_bytes",
                ProbeSettingsError::RingBufferBytes(_) => "capture.ring_buffer_bytes",
            };
            ConfigError::invalid(key, e.reason())
        })
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
    fn validate(&self) -> Result<(), ConfigError> {
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
    fn validate(&self) -> Result<(), ConfigError> {
        self.process_filter(Vec::new()).validate().map_err(|e| {
            let key = match e {
                ProcessFilterError::Include(_) => "processes.include",
                ProcessFilterError::Exclude(_) => "processes.exclude",
            };
            ConfigError::invalid(key, e.reason())
        })
    }
}

impl ProxyConfig {
    /// Validated by the proxy's own checks; this names the key and says it
    /// in the file's terms.
    fn validate(&self) -> Result<(), ConfigError> {
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

/// Command-line overrides of the configuration file, meant to be
/// `#[command(flatten)]`ed into `agent run`.
///
/// Every flag is optional and, when given, replaces the file's value (list
/// flags replace the whole list). `--max-message-bytes` and
/// `--ring-buffer-bytes` live here, so a command that flattens this must
/// not declare them itself.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ConfigOverrides {
    /// YAML configuration file (see docs/configuration.md); flags override it
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Percent of new traces kept, 0 to 100 [tracing.random_sampling; default 100]
    #[arg(long, value_name = "PERCENT")]
    pub random_sampling: Option<f64>,

    /// Export spans over OTLP to this collector URL [tracing.exporter.endpoint]
    #[arg(long, value_name = "URL")]
    pub exporter_endpoint: Option<String>,

    /// OTLP protocol; enables export [tracing.exporter.protocol; default grpc]
    #[arg(long, value_name = "PROTOCOL")]
    pub exporter_protocol: Option<ExporterProtocol>,

    /// Append spans as OTLP/JSON lines to this file [tracing.file]
    #[arg(long, value_name = "PATH")]
    pub output_file: Option<PathBuf>,

    /// Print spans on the terminal even when they are exported [tracing.terminal: true]
    #[arg(long, overrides_with = "no_terminal")]
    pub terminal: bool,

    /// Never print spans on the terminal [tracing.terminal: false]
    #[arg(long, overrides_with = "terminal")]
    pub no_terminal: bool,

    /// Bytes of each message the kernel copies, 1 to 16384 [capture.max_message_bytes; default 16384]
    #[arg(long, value_name = "N")]
    pub max_message_bytes: Option<u32>,

    /// Size of the kernel-to-agent ring buffer in bytes, a power of two >= 4096 [capture.ring_buffer_bytes; default 8388608]
    #[arg(long, value_name = "N")]
    pub ring_buffer_bytes: Option<u32>,

    /// Record this request header (repeatable, or comma-separated) [http.request_headers]
    #[arg(long = "request-header", value_name = "NAME", value_delimiter = ',')]
    pub request_headers: Vec<String>,

    /// Record this response header (repeatable, or comma-separated) [http.response_headers]
    #[arg(long = "response-header", value_name = "NAME", value_delimiter = ',')]
    pub response_headers: Vec<String>,

    /// Trace only processes with this executable name (repeatable, or comma-separated) [processes.include]
    #[arg(long = "include-process", value_name = "NAME", value_delimiter = ',')]
    pub include_processes: Vec<String>,

    /// Never trace processes with this executable name (repeatable, or comma-separated) [processes.exclude]
    #[arg(long = "exclude-process", value_name = "NAME", value_delimiter = ',')]
    pub exclude_processes: Vec<String>,

    /// Put process.command_line on spans, secrets redacted [processes.command_line: true]
    #[arg(long)]
    pub command_line: bool,
    /// Serve /metrics, /healthz and /readyz on IP:PORT [metrics.address]
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_address: Option<String>,
}

impl ConfigOverrides {
    /// The configuration to run with: the file named by `--config` (or the
    /// defaults), then these flags, then [`Config::validate`]. An invalid
    /// value that came from a flag is reported under the flag's name.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::parse_file(path).map_err(|e| e.in_file(path))?,
            None => Config::default(),
        };
        let applied = self.apply(&mut config);
        config.validate().map_err(|e| {
            let flag = applied
                .iter()
                .find(|(key, _)| e.key == *key || e.key.starts_with(&format!("{key}.")))
                .map(|&(_, flag)| flag);
            match (flag, &self.config) {
                (Some(flag), _) => e.with_flag(flag),
                (None, Some(path)) => e.in_file(path),
                (None, None) => e,
            }
        })?;
        Ok(config)
    }

    /// Writes the given flags into `config`; returns which key each came
    /// from, so a validation error can name the flag rather than the file.
    fn apply(&self, config: &mut Config) -> Vec<(&'static str, &'static str)> {
        let mut applied = Vec::new();
        let tracing = &mut config.tracing;
        if let Some(p) = self.random_sampling {
            tracing.random_sampling = p;
            applied.push(("tracing.random_sampling", "--random-sampling"));
        }
        if let Some(endpoint) = &self.exporter_endpoint {
            let exporter = tracing.exporter.get_or_insert_with(Default::default);
            exporter.endpoint = Some(endpoint.clone());
            applied.push(("tracing.exporter.endpoint", "--exporter-endpoint"));
        }
        if let Some(protocol) = self.exporter_protocol {
            let exporter = tracing.exporter.get_or_insert_with(Default::default);
            exporter.protocol = Some(protocol);
        }
        if let Some(file) = &self.output_file {
            tracing.file = Some(file.clone());
            applied.push(("tracing.file", "--output-file"));
        }
        // clap's overrides_with leaves at most one of the two set: the last.
        if self.terminal {
            tracing.terminal = TerminalMode::On;
        } else if self.no_terminal {
            tracing.terminal = TerminalMode::Off;
        }
        if let Some(n) = self.max_message_bytes {
            config.capture.max_message_bytes = n;
            applied.push(("capture.max_message_bytes", "--max-message-bytes"));
        }
        if let Some(n) = self.ring_buffer_bytes {
            config.capture.ring_buffer_bytes = n;
            applied.push(("capture.ring_buffer_bytes", "--ring-buffer-bytes"));
        }
        if !self.request_headers.is_empty() {
            config.http.request_headers = lower_case_dedup(self.request_headers.iter().cloned());
            applied.push(("http.request_headers", "--request-header"));
        }
        if !self.response_headers.is_empty() {
            config.http.response_headers = lower_case_dedup(self.response_headers.iter().cloned());
            applied.push(("http.response_headers", "--response-header"));
        }
        if !self.include_processes.is_empty() {
            config.processes.include = self.include_processes.clone();
            applied.push(("processes.include", "--include-process"));
        }
        if !self.exclude_processes.is_empty() {
            config.processes.exclude = self.exclude_processes.clone();
            applied.push(("processes.exclude", "--exclude-process"));
        }
        if self.command_line {
            config.processes.command_line = true;
        }
        if let Some(address) = &self.metrics_address {
            config.metrics.enabled = true;
            config.metrics.address = address.clone();
            applied.push(("metrics.address", "--metrics-address"));
        }
        applied
    }
}

/// What kind of problem a [`ConfigError`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// The file could not be read (missing, unreadable, not UTF-8).
    Io,
    /// The text is not valid YAML.
    Syntax,
    /// A key the configuration does not have (usually a typo).
    UnknownKey,
    /// A value of the wrong type or out of its allowed range.
    InvalidValue,
}

/// A configuration problem. Its `Display` names the key (full path, such as
/// `tracing.exporter.endpoint`) and the reason, plus the file, line and
/// column or the command-line flag when known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    kind: ConfigErrorKind,
    /// Full key path; empty when the problem is with the file as a whole.
    key: String,
    reason: String,
    file: Option<PathBuf>,
    /// 1-based line and column in the YAML text.
    location: Option<(usize, usize)>,
    flag: Option<&'static str>,
}

impl ConfigError {
    /// What kind of problem this is.
    pub fn kind(&self) -> ConfigErrorKind {
        self.kind
    }

    /// Full path of the key at fault (`capture.max_message_bytes`,
    /// `proxy.ports[2]`); empty for problems with the file as a whole.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Why the key or file was refused, without the key or location.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Line and column (1-based) in the YAML text, when known.
    pub fn location(&self) -> Option<(usize, usize)> {
        self.location
    }

    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        Self {
            kind: ConfigErrorKind::InvalidValue,
            key: key.to_string(),
            reason: reason.into(),
            file: None,
            location: None,
            flag: None,
        }
    }

    fn in_file(mut self, path: &Path) -> Self {
        self.file = Some(path.to_path_buf());
        self
    }

    fn with_flag(mut self, flag: &'static str) -> Self {
        self.flag = Some(flag);
        self
    }

    /// A YAML error from the untyped pass. Duplicate keys are reported
    /// there (serde_yaml_ng: `<map path>: duplicate entry with key "k"`),
    /// and are turned into an error on the full key path; anything else is
    /// a syntax error.
    fn from_syntax(error: &serde_yaml_ng::Error) -> Self {
        let location = error.location().map(|l| (l.line(), l.column()));
        let full = error.to_string();
        let message = bare_message(&full, "", location);
        let marker = "duplicate entry with key \"";
        if let Some(at) = message.find(marker) {
            let parent = message[..at].strip_suffix(": ").unwrap_or_default();
            let rest = &message[at + marker.len()..];
            let field = rest.strip_suffix('"').unwrap_or(rest);
            let mut out = Self::invalid(&child_key(parent, field), "given more than once");
            out.location = location;
            return out;
        }
        Self {
            kind: ConfigErrorKind::Syntax,
            key: String::new(),
            reason: full,
            file: None,
            location,
            flag: None,
        }
    }

    /// Turns serde's error into one naming the full key path. This relies
    /// on serde_path_to_error's path (which, for an unknown field, ends
    /// with that field) and on serde's standard message shapes (`unknown
    /// field`, `invalid type`, ...); a message of another shape is kept as
    /// it is, still under the right key.
    fn from_serde(error: serde_path_to_error::Error<serde_yaml_ng::Error>) -> Self {
        let key = key_path(error.path());
        let location = error.inner().location().map(|l| (l.line(), l.column()));
        let full = error.inner().to_string();
        let message = bare_message(&full, &key, location);
        let mut out = Self::invalid(&key, message);
        out.location = location;

        if let Some(rest) = message.strip_prefix("unknown field `") {
            let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
            out.kind = ConfigErrorKind::UnknownKey;
            out.key = child_key(&key, field);
            let expected = expected.trim_start_matches(", ").replace('`', "");
            out.reason = if expected == "there are no fields" {
                "this section has no keys".to_string()
            } else {
                expected
            };
        } else if let Some(rest) = message.strip_prefix("duplicate field `") {
            let field = rest.split('`').next().unwrap_or(rest);
            out.key = child_key(&key, field);
            out.reason = "given more than once".to_string();
        } else if let Some((got, expected)) = split_type_error(message) {
            let expected = allowed_values(&key).unwrap_or(expected);
            out.reason = format!("expected {expected}, got {}", describe_unexpected(got));
        }
        out
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(flag) = self.flag {
            return write!(f, "{flag} ({}): {}", self.key, self.reason);
        }
        // Syntax messages from the YAML parser carry their own position.
        let location = self
            .location
            .filter(|_| self.kind != ConfigErrorKind::Syntax);
        match (&self.file, location) {
            (Some(file), Some((line, column))) => {
                write!(f, "{}:{line}:{column}: ", file.display())?
            }
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, Some((line, column))) => write!(f, "line {line} column {column}: ")?,
            (None, None) => {}
        }
        match self.kind {
            ConfigErrorKind::Io => write!(f, "cannot read the configuration file: {}", self.reason),
            ConfigErrorKind::Syntax => write!(f, "invalid YAML: {}", self.reason),
            ConfigErrorKind::UnknownKey if self.reason.is_empty() => {
                write!(f, "unknown key {}", self.key)
            }
            ConfigErrorKind::UnknownKey => write!(f, "unknown key {} ({})", self.key, self.reason),
            ConfigErrorKind::InvalidValue if self.key.is_empty() => f.write_str(&self.reason),
            ConfigErrorKind::InvalidValue => write!(f, "{}: {}", self.key, self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

/// `tracing.exporter.headers.x-api-key`, `proxy.ports[1]`; empty for the
/// document root.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

fn child_key(parent: &str, field: &str) -> String {
    // serde_path_to_error already appends the offending field for unknown
    // fields; append it only where it did not.
    if parent == field || parent.ends_with(&format!(".{field}")) {
        parent.to_string()
    } else if parent.is_empty() {
        field.to_string()
    } else {
        format!("{parent}.{field}")
    }
}

/// serde_yaml_ng formats its errors as `<its own path>: <message> at line L
/// column C`, its path being the key or one of its parents; the key path and
/// location are reported separately, so strip both.
fn bare_message<'a>(full: &'a str, key: &str, location: Option<(usize, usize)>) -> &'a str {
    let mut message = full;
    if let Some((line, column)) = location {
        message = message
            .strip_suffix(&format!(" at line {line} column {column}"))
            .unwrap_or(message);
    }
    let mut prefix = key;
    while !prefix.is_empty() {
        if let Some(rest) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix(": "))
        {
            return rest;
        }
        prefix = match prefix.rfind(['.', '[']) {
            Some(i) => &prefix[..i],
            None => "",
        };
    }
    message
}

/// Splits serde's `invalid type: X, expected Y` (and `invalid value`,
/// `unknown variant`) into X and Y.
fn split_type_error(message: &str) -> Option<(&str, &str)> {
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .or_else(|| message.strip_prefix("unknown variant "))?;
    rest.rsplit_once(", expected ")
}

fn describe_unexpected(got: &str) -> String {
    match got {
        "unit value" => "an empty value".to_string(),
        "sequence" => "a list".to_string(),
        "map" => "a mapping".to_string(),
        other => other.replace('`', ""),
    }
}

/// What a key accepts, in the words of docs/configuration.md, for type
/// errors (serde would say `u32` or `struct TracingConfig`). List elements
/// are looked up as `key[]`, map entries as `key.*`.
fn allowed_values(key: &str) -> Option<&'static str> {
    let mut normalized = String::with_capacity(key.len());
    let mut in_index = false;
    for c in key.chars() {
        match c {
            '[' => {
                in_index = true;
                normalized.push_str("[]");
            }
            ']' => in_index = false,
            c if !in_index => normalized.push(c),
            _ => {}
        }
    }
    let normalized = match normalized.strip_prefix("tracing.exporter.headers.") {
        Some(_) => "tracing.exporter.headers.*",
        None => normalized.as_str(),
    };
    Some(match normalized {
        "" => {
            "a mapping of sections (tracing, capture, http, processes, proxy, metrics, kubernetes)"
        }
        "tracing" | "tracing.exporter" | "capture" | "http" | "processes" | "proxy" | "metrics"
        | "kubernetes" => "a mapping of keys",
        "tracing.random_sampling" => "a number between 0 and 100",
        "tracing.parent_based"
        | "http.route_heuristic"
        | "processes.command_line"
        | "proxy.enabled"
        | "metrics.enabled" => "true or false",
        "tracing.exporter.endpoint" => "a URL such as http://127.0.0.1:4317",
        "tracing.exporter.protocol" => "grpc or http/protobuf",
        "tracing.exporter.headers" => "a mapping of header names to values",
        "tracing.exporter.headers.*" => "a string",
        "tracing.exporter.timeout_ms" => "an integer between 1 and 600000",
        "tracing.file" => "a file path",
        "tracing.terminal" | "kubernetes.enabled" => "auto, true or false",
        "kubernetes.node_name" => "a node name",
        "kubernetes.api_server" => "a URL such as http://127.0.0.1:8001",
        "capture.max_message_bytes" => "an integer between 1 and 16384",
        "capture.ring_buffer_bytes" => "a power of two of at least 4096",
        "http.request_headers" | "http.response_headers" => "a list of header names",
        "http.request_headers[]" | "http.response_headers[]" => "a header name",
        "http.redact_query_parameters" => "a list of query parameter names",
        "http.redact_query_parameters[]" => "a query parameter name",
        "processes.include" | "processes.exclude" => "a list of executable names",
        "processes.include[]" | "processes.exclude[]" => "an executable name",
        "proxy.listen_port" => "a port number between 1 and 65535",
        "proxy.mode" => "node or host",
        "proxy.ports" | "proxy.exclude_ports" => "a list of port numbers between 1 and 65535",
        "proxy.ports[]" | "proxy.exclude_ports[]" => "a port number between 1 and 65535",
        "proxy.pod_interfaces" => "a list of interface names",
        "proxy.pod_interfaces[]" => "an interface name, optionally ending in +",
        "proxy.include_cidrs" | "proxy.exclude_cidrs" => "a list of CIDR blocks",
        "proxy.include_cidrs[]" | "proxy.exclude_cidrs[]" => "a CIDR block such as 10.0.0.0/8",
        "proxy.workers" => "a number of threads (0: one per CPU)",
        "metrics.address" => "IP:PORT, such as 127.0.0.1:9470",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Every key a file can hold, so the docs test below can check none is
    /// left undocumented.
    const ALL_KEYS: &[&str] = &[
        "tracing.random_sampling",
        "tracing.parent_based",
        "tracing.exporter.endpoint",
        "tracing.exporter.protocol",
        "tracing.exporter.headers",
        "tracing.exporter.timeout_ms",
        "tracing.file",
        "tracing.terminal",
        "capture.max_message_bytes",
        "capture.ring_buffer_bytes",
        "http.request_headers",
        "http.response_headers",
        "http.redact_query_parameters",
        "http.route_heuristic",
        "processes.include",
        "processes.exclude",
        "processes.command_line",
        "proxy.enabled",
        "proxy.listen_port",
        "proxy.mode",
        "proxy.ports",
        "proxy.pod_interfaces",
        "proxy.include_cidrs",
        "proxy.exclude_cidrs",
        "proxy.exclude_ports",
        "proxy.workers",
        "metrics.enabled",
        "metrics.address",
        "kubernetes.enabled",
        "kubernetes.node_name",
        "kubernetes.api_server",
    ];

    const FULL_EXAMPLE: &str = r#"
# Every key, none at its default.
tracing:
  random_sampling: 12.5
  parent_based: false
  exporter:
    endpoint: https://collector.example:4318
    protocol: http/protobuf
    headers: { X-API-Key: abc, tenant: "7" }
    timeout_ms: 2500
  file: /var/log/agent/spans.jsonl
  terminal: true
capture:
  max_message_bytes: 4096
  ring_buffer_bytes: 1048576
http:
  request_headers: [X-Request-ID, user-agent]
  response_headers: [content-type]
  redact_query_parameters: [token, Session]
  route_heuristic: false
processes:
  include: [nginx, python3]
  exclude: [sshd]
  command_line: true
proxy:
  enabled: true
  listen_port: 15006
  mode: host
  ports: [8000]
  pod_interfaces: ["cali+", eth0]
  include_cidrs: [10.0.0.0/8, "fd00::/8"]
  exclude_cidrs: [10.96.0.1]
  exclude_ports: [22]
  workers: 3
metrics:
  enabled: false
  address: 0.0.0.0:9471
kubernetes:
  enabled: true
  node_name: node-7
  api_server: http://127.0.0.1:8001
"#;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        overrides: ConfigOverrides,
    }

    fn err(yaml: &str) -> ConfigError {
        match Config::from_yaml(yaml) {
            Ok(c) => panic!("expected an error for {yaml:?}, got {c:?}"),
            Err(e) => e,
        }
    }

    /// A file in the temporary directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("agent-config-{}-{name}", std::process::id()));
            std::fs::write(&path, text).expect("write temp file");
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn overrides(args: &[&str]) -> ConfigOverrides {
        let argv = std::iter::once("agent").chain(args.iter().copied());
        Cli::try_parse_from(argv).expect("flags parse").overrides
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.tracing.random_sampling, 100.0);
        assert!(c.tracing.parent_based);
        assert_eq!(c.tracing.exporter, None);
        assert_eq!(c.tracing.file, None);
        assert_eq!(c.tracing.terminal, TerminalMode::Auto);
        assert!(c.terminal_enabled());
        assert_eq!(c.capture.max_message_bytes, 16384);
        assert_eq!(c.capture.ring_buffer_bytes, 8388608);
        assert!(c.http.request_headers.is_empty());
        assert!(c.http.response_headers.is_empty());
        assert_eq!(
            c.http.redact_query_parameters,
            [
                "token",
                "access_token",
                "password",
                "secret",
                "api_key",
                "key",
                "sig",
                "signature",
                "auth"
            ]
        );
        assert!(c.http.route_heuristic);
        assert_eq!(c.processes, ProcessFilterConfig::default());
        assert!(!c.processes.command_line);
        let p = &c.proxy;
        assert!(!p.enabled);
        assert_eq!(p.listen_port, 15001);
        assert_eq!(p.mode, ProxyMode::Node);
        assert_eq!(p.ports, [80, 8080]);
        assert_eq!(p.pod_interfaces, ["veth+"]);
        assert!(
            p.include_cidrs.is_empty() && p.exclude_cidrs.is_empty() && p.exclude_ports.is_empty()
        );
        c.validate().expect("defaults are valid");
    }

    #[test]
    fn empty_file_is_default() {
        for text in [
            "",
            "\n  \n",
            "# only a comment\n",
            "---\n",
            "~\n",
            "tracing:\ncapture:\n",
        ] {
            assert_eq!(Config::from_yaml(text), Ok(Config::default()), "{text:?}");
        }
        let file = TempFile::new("empty.yaml", "");
        assert_eq!(Config::load(&file.0), Ok(Config::default()));
    }

    #[test]
    fn full_example_parses() {
        let c = Config::from_yaml(FULL_EXAMPLE).expect("full example is valid");
        let t = &c.tracing;
        assert_eq!(t.random_sampling, 12.5);
        assert!(!t.parent_based);
        let e = t.exporter.as_ref().expect("exporter");
        assert_eq!(
            e.endpoint.as_deref(),
            Some("https://collector.example:4318")
        );
        assert_eq!(e.protocol, Some(ExporterProtocol::HttpProtobuf));
        assert_eq!(e.headers.get("x-api-key").map(String::as_str), Some("abc"));
        assert_eq!(e.headers.get("tenant").map(String::as_str), Some("7"));
        assert_eq!(e.timeout_ms, Some(2500));
        assert_eq!(
            t.file.as_deref(),
            Some(Path::new("/var/log/agent/spans.jsonl"))
        );
        assert_eq!(t.terminal, TerminalMode::On);
        assert_eq!(
            c.capture,
            CaptureConfig {
                max_message_bytes: 4096,
                ring_buffer_bytes: 1 << 20
            }
        );
        assert_eq!(c.http.request_headers, ["x-request-id", "user-agent"]);
        assert_eq!(c.http.response_headers, ["content-type"]);
        assert_eq!(c.http.redact_query_parameters, ["token", "session"]);
        assert!(!c.http.route_heuristic);
        assert_eq!(c.processes.include, ["nginx", "python3"]);
        assert_eq!(c.processes.exclude, ["sshd"]);
        assert!(c.processes.command_line);
        let p = &c.proxy;
        assert!(p.enabled);
        assert_eq!((p.listen_port, p.mode), (15006, ProxyMode::Host));
        assert_eq!(p.ports, [8000]);
        assert_eq!(p.pod_interfaces, ["cali+", "eth0"]);
        assert_eq!(
            p.include_cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.0.0.0/8", "fd00::/8"]
        );
        assert_eq!(p.exclude_cidrs[0].to_string(), "10.96.0.1/32");
        assert_eq!(p.exclude_ports, [22]);
        assert_eq!((p.workers, p.proxy_settings().workers), (3, 3));
        assert!(c.terminal_enabled());
        assert_eq!(
            c.kubernetes.kubernetes_settings(),
            crate::kubernetes::KubernetesSettings {
                enabled: crate::kubernetes::Enablement::On,
                node_name: Some("node-7".into()),
                api_server: Some("http://127.0.0.1:8001".into()),
            }
        );
        assert!(!c.metrics.enabled);
        assert_eq!(c.metrics.address, "0.0.0.0:9471");
        assert_eq!(c.metrics.metrics_settings().address, None);
    }

    /// The configuration the DaemonSet mounts (deploy/base/configmap.yaml)
    /// is one this agent accepts.
    #[test]
    fn the_deployed_configuration_is_valid() {
        let map: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(include_str!("../../deploy/base/configmap.yaml")).unwrap();
        let text = map["data"]["agent.yaml"].as_str().expect("data.agent.yaml");
        let c = Config::from_yaml(text).unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.processes.command_line, "command lines stay on the node");
        assert!(!c.terminal_enabled());
    }

    #[test]
    fn kubernetes_defaults_to_auto_and_a_bad_api_server_is_named() {
        let c = Config::from_yaml("").unwrap();
        assert_eq!(
            c.kubernetes.kubernetes_settings(),
            crate::kubernetes::KubernetesSettings::default()
        );
        let e = err("kubernetes:\n  api_server: 127.0.0.1:8001\n");
        assert_eq!(e.key(), "kubernetes.api_server");
        let e = err("kubernetes:\n  enabled: sometimes\n");
        assert!(e.to_string().contains("auto, true or false"), "{e}");
    }

    #[test]
    fn metrics_default_on_localhost_and_a_bad_address_is_named() {
        let c = Config::default();
        assert_eq!(
            c.metrics.metrics_settings().address,
            Some(crate::metrics::DEFAULT_ADDRESS)
        );
        let e = err("metrics:\n  address: localhost:9470\n");
        assert_eq!(e.key(), "metrics.address");
        assert!(e.reason().contains("IP:PORT"), "{e}");
        let cli = Cli::parse_from(["x", "--metrics-address", "10.1.2.3:9100"]);
        let c = cli.overrides.load().unwrap();
        assert_eq!(
            c.metrics.metrics_settings().address,
            Some("10.1.2.3:9100".parse().unwrap())
        );
        let cli = Cli::parse_from(["x", "--metrics-address", "nope"]);
        let e = cli.overrides.load().unwrap_err();
        assert!(e.to_string().contains("--metrics-address"), "{e}");
    }

    #[test]
    fn brief_example_parses() {
        // The sample from the design discussion, verbatim apart from `file`.
        let yaml = "tracing:\n  random_sampling: 100\n  parent_based: true\n  exporter:\n    \
                    endpoint: http://127.0.0.1:4317\n    protocol: grpc\n    headers: { x-api-key: abc }\n    \
                    timeout_ms: 10000\n  terminal: auto\n";
        let c = Config::from_yaml(yaml).expect("valid");
        assert_eq!(
            c.tracing.exporter.as_ref().and_then(|e| e.protocol),
            Some(ExporterProtocol::Grpc)
        );
        assert!(
            !c.terminal_enabled(),
            "auto is off once an exporter is configured"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let e = err("trcing:\n  random_sampling: 5\n");
        assert_eq!(e.kind(), ConfigErrorKind::UnknownKey);
        assert_eq!(e.key(), "trcing");
        assert!(e.to_string().contains("unknown key trcing"), "{e}");
        assert!(
            e.to_string().contains("tracing"),
            "lists the known keys: {e}"
        );

        let e = err("tracing:\n  exporter:\n    endpont: http://x:4317\n");
        assert_eq!(e.kind(), ConfigErrorKind::UnknownKey);
        assert_eq!(e.key(), "tracing.exporter.endpont");
        let text = e.to_string();
        assert!(
            text.contains("unknown key tracing.exporter.endpont"),
            "{text}"
        );
        assert!(text.contains("endpoint"), "{text}");
        assert!(text.starts_with("line 3 column 5: "), "{text}");

        let e = err("capture:\n  max_message_byte: 10\n");
        assert_eq!(e.key(), "capture.max_message_byte");
        let e = err("proxy:\n  mode: node\n  port: [1]\n");
        assert_eq!(e.key(), "proxy.port");
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = err("capture:\n  max_message_bytes: 10\n  max_message_bytes: 20\n");
        assert_eq!(e.key(), "capture.max_message_bytes");
        assert_eq!(
            e.to_string(),
            "line 2 column 3: capture.max_message_bytes: given more than once"
        );
        let e = err("tracing:\n  exporter:\n    headers: {a: x, a: y}\n");
        assert_eq!(e.key(), "tracing.exporter.headers.a");
        let e = err("proxy: {}\nproxy: {}\n");
        assert_eq!(e.key(), "proxy");
    }

    #[test]
    fn sampling_out_of_range() {
        for (value, shown) in [
            ("150", "150"),
            ("-1", "-1"),
            (".nan", "NaN"),
            ("100.5", "100.5"),
            (".inf", "inf"),
        ] {
            let e = err(&format!("tracing:\n  random_sampling: {value}\n"));
            assert_eq!(e.kind(), ConfigErrorKind::InvalidValue);
            assert_eq!(
                e.to_string(),
                format!("tracing.random_sampling: must be between 0 and 100, got {shown}")
            );
        }
        for ok in ["0", "100", "0.5", "33.3"] {
            Config::from_yaml(&format!("tracing:\n  random_sampling: {ok}\n")).expect(ok);
        }
    }

    #[test]
    fn type_errors_name_key_and_allowed_values() {
        let e = err("tracing:\n  random_sampling: lots\n");
        assert_eq!(e.key(), "tracing.random_sampling");
        assert_eq!(
            e.to_string(),
            "line 2 column 20: tracing.random_sampling: expected a number between 0 and 100, got string \"lots\""
        );
        let e = err("capture:\n  max_message_bytes: -5\n");
        assert!(
            e.to_string().ends_with(
                "capture.max_message_bytes: expected an integer between 1 and 16384, got integer -5"
            ),
            "{e}"
        );
        let e = err("capture:\n  ring_buffer_bytes: 1.5\n");
        assert!(
            e.to_string().contains("a power of two of at least 4096"),
            "{e}"
        );
        let e = err("proxy:\n  ports: [80, http]\n");
        assert_eq!(e.key(), "proxy.ports[1]");
        assert!(
            e.to_string()
                .contains("expected a port number between 1 and 65535"),
            "{e}"
        );
        let e = err("proxy:\n  listen_port: 70000\n");
        assert!(
            e.to_string().contains(
                "proxy.listen_port: expected a port number between 1 and 65535, got integer 70000"
            ),
            "{e}"
        );
        let e = err("tracing: [1, 2]\n");
        assert_eq!(
            e.to_string(),
            "line 1 column 10: tracing: expected a mapping of keys, got a list"
        );
        let e = err("[1, 2]\n");
        assert!(
            e.to_string().contains("must be a mapping of sections"),
            "{e}"
        );
        let e = err("tracing:\n  terminal: sometimes\n");
        assert!(
            e.to_string().contains(
                "tracing.terminal: expected auto, true or false, got string \"sometimes\""
            ),
            "{e}"
        );
        let e = err("proxy:\n  mode: cluster\n");
        assert!(
            e.to_string()
                .contains("proxy.mode: expected node or host, got cluster"),
            "{e}"
        );
    }

    #[test]
    fn bad_protocol() {
        let e = err("tracing:\n  exporter:\n    protocol: http/json\n");
        assert_eq!(e.key(), "tracing.exporter.protocol");
        assert!(
            e.to_string().contains(
                "tracing.exporter.protocol: expected grpc or http/protobuf, got http/json"
            ),
            "{e}"
        );
    }

    #[test]
    fn forbidden_headers() {
        for name in [
            "authorization",
            "Cookie",
            "SET-COOKIE",
            "proxy-authorization",
        ] {
            for section in ["request_headers", "response_headers"] {
                let e = err(&format!("http:\n  {section}: [x-request-id, {name}]\n"));
                assert_eq!(e.key(), format!("http.{section}"));
                let text = e.to_string();
                assert!(text.contains(&name.to_ascii_lowercase()), "{text}");
                assert!(text.contains("never leave the agent"), "{text}");
            }
        }
        let e = err("http:\n  request_headers: [\"x request\"]\n");
        assert!(e.to_string().contains("not a valid header name"), "{e}");
    }

    #[test]
    fn header_names_are_lower_cased_and_deduplicated() {
        let c = Config::from_yaml(
            "http:\n  request_headers: [X-Request-Id, x-request-id, Traceparent]\n",
        )
        .unwrap();
        assert_eq!(c.http.request_headers, ["x-request-id", "traceparent"]);
    }

    #[test]
    fn capture_ranges() {
        for (yaml, expected) in [
            (
                "max_message_bytes: 0",
                "capture.max_message_bytes: must be between 1 and 16384, got 0",
            ),
            (
                "max_message_bytes: 99999",
                "capture.max_message_bytes: must be between 1 and 16384, got 99999",
            ),
            (
                "ring_buffer_bytes: 5000",
                "capture.ring_buffer_bytes: must be a power of two of at least 4096, got 5000",
            ),
            (
                "ring_buffer_bytes: 2048",
                "capture.ring_buffer_bytes: must be a power of two of at least 4096, got 2048",
            ),
            (
                "ring_buffer_bytes: 0",
                "capture.ring_buffer_bytes: must be a power of two of at least 4096, got 0",
            ),
        ] {
            assert_eq!(err(&format!("capture:\n  {yaml}\n")).to_string(), expected);
        }
        for ok in [
            "max_message_bytes: 1",
            "max_message_bytes: 16384",
            "ring_buffer_bytes: 4096",
            "ring_buffer_bytes: 2147483648",
        ] {
            Config::from_yaml(&format!("capture:\n  {ok}\n")).expect(ok);
        }
    }

    #[test]
    fn exporter_checks() {
        let e = err("tracing:\n  exporter:\n    endpoint: collector:4317\n");
        assert!(
            e.to_string()
                .starts_with("tracing.exporter.endpoint: must be an http:// or https:// URL"),
            "{e}"
        );
        let e = err("tracing:\n  exporter:\n    endpoint: \"http://\"\n");
        assert!(e.to_string().contains("must name a host"), "{e}");
        let e = err("tracing:\n  exporter:\n    timeout_ms: 0\n");
        assert_eq!(
            e.to_string(),
            "tracing.exporter.timeout_ms: must be between 1 and 600000, got 0"
        );
        let e = err("tracing:\n  exporter:\n    headers: {x-api-key: \"abc\\r\\nx-evil: 1\"}\n");
        assert_eq!(e.key(), "tracing.exporter.headers.x-api-key");
        assert!(
            !e.to_string().contains("abc"),
            "the value is not echoed: {e}"
        );

        // Present but empty enables export with every setting left to the
        // exporter; a null section is the same as an absent one.
        let c = Config::from_yaml("tracing:\n  exporter: {}\n").unwrap();
        assert_eq!(c.tracing.exporter, Some(ExporterConfig::default()));
        let c = Config::from_yaml("tracing:\n  exporter:\n").unwrap();
        assert_eq!(c.tracing.exporter, None);
    }

    #[test]
    fn exporter_debug_hides_header_values() {
        let c =
            Config::from_yaml("tracing:\n  exporter:\n    headers: {x-api-key: s3cr3t}\n").unwrap();
        let debug = format!("{c:?}");
        assert!(
            debug.contains("x-api-key") && !debug.contains("s3cr3t"),
            "{debug}"
        );
    }

    #[test]
    fn terminal_resolution() {
        let mode = |yaml: &str| Config::from_yaml(yaml).unwrap().terminal_enabled();
        assert!(mode(""));
        assert!(!mode("tracing:\n  file: /tmp/spans.jsonl\n"));
        assert!(!mode(
            "tracing:\n  exporter: {endpoint: \"http://c:4317\"}\n"
        ));
        assert!(mode(
            "tracing:\n  file: /tmp/spans.jsonl\n  terminal: true\n"
        ));
        assert!(!mode("tracing:\n  terminal: false\n"));
        assert!(mode("tracing:\n  terminal: \"auto\"\n"));
    }

    #[test]
    fn process_and_proxy_checks() {
        let e = err("processes:\n  include: [/usr/bin/nginx]\n");
        assert_eq!(e.key(), "processes.include");
        let e = err("proxy:\n  ports: [15001]\n");
        assert!(
            e.to_string()
                .contains("must not contain proxy.listen_port (15001)"),
            "{e}"
        );
        let e = err("proxy:\n  exclude_ports: [0]\n");
        assert_eq!(e.key(), "proxy.exclude_ports");
        let e = err("proxy:\n  workers: 5000\n");
        assert_eq!(e.key(), "proxy.workers");
        assert!(e.to_string().contains("at most 1024"), "{e}");
        let e = err("proxy:\n  workers: -1\n");
        assert_eq!(e.key(), "proxy.workers");
        let e = err("proxy:\n  enabled: true\n  ports: []\n");
        assert_eq!(e.key(), "proxy.ports");
        let e = err("proxy:\n  pod_interfaces: [averyveryverylongname+]\n");
        assert_eq!(e.key(), "proxy.pod_interfaces");
        let e = err("proxy:\n  include_cidrs: [10.0.0.1/8]\n");
        assert_eq!(e.key(), "proxy.include_cidrs[0]");
        assert!(e.to_string().contains("did you mean 10.0.0.0/8?"), "{e}");
        let e = err("proxy:\n  exclude_cidrs: [10.0.0.0/33]\n");
        assert!(e.to_string().contains("between 0 and 32"), "{e}");
        let e = err("proxy:\n  exclude_cidrs: [somewhere]\n");
        assert!(e.to_string().contains("expected a CIDR block"), "{e}");
    }

    #[test]
    fn redirect_rules_follow_the_file() {
        assert_eq!(
            ProxyConfig::default().redirect_rules(),
            RedirectRules::default()
        );
        let config = Config::from_yaml(FULL_EXAMPLE).unwrap();
        let rules = config.proxy.redirect_rules();
        assert_eq!(
            (rules.mode, rules.listen_port, &rules.ports[..]),
            (ProxyMode::Host, 15006, &[8000][..])
        );
        assert_eq!(rules.pod_interfaces, ["cali+", "eth0"]);
        assert_eq!(rules.include_cidrs, config.proxy.include_cidrs);
        assert_eq!(rules.exclude_cidrs, config.proxy.exclude_cidrs);
        assert_eq!(rules.exclude_ports, [22]);
        assert!(rules.validate().is_ok());
    }

    #[test]
    fn syntax_errors() {
        let e = err("tracing: [\n");
        assert_eq!(e.kind(), ConfigErrorKind::Syntax);
        assert!(e.to_string().starts_with("invalid YAML: "), "{e}");
        assert!(e.location().is_some());
    }

    #[test]
    fn missing_file_names_the_path() {
        let path = Path::new("/nonexistent/agent-config-test/agent.yaml");
        let e = Config::load(path).unwrap_err();
        assert_eq!(e.kind(), ConfigErrorKind::Io);
        assert!(
            e.to_string()
                .contains("/nonexistent/agent-config-test/agent.yaml"),
            "{e}"
        );
        let e = overrides(&["--config", "/nonexistent/agent-config-test/agent.yaml"])
            .load()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("/nonexistent/agent-config-test/agent.yaml"),
            "{e}"
        );
    }

    #[test]
    fn file_errors_name_the_file() {
        let file = TempFile::new("bad.yaml", "capture:\n  ring_buffer_bytes: 5000\n");
        let e = Config::load(&file.0).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: capture.ring_buffer_bytes: must be a power of two of at least 4096, got 5000",
                file.0.display()
            )
        );
        let file = TempFile::new("typo.yaml", "http:\n  route_heuristics: false\n");
        let e = Config::load(&file.0).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "{}:2:3: unknown key http.route_heuristics",
                file.0.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn overrides_win_over_the_file() {
        let file = TempFile::new("override.yaml", FULL_EXAMPLE);
        let path = file.0.to_str().expect("utf-8 temp path");
        let c = overrides(&[
            "--config",
            path,
            "--random-sampling",
            "1",
            "--exporter-endpoint",
            "http://other:4317",
            "--exporter-protocol",
            "grpc",
            "--output-file",
            "/tmp/other.jsonl",
            "--no-terminal",
            "--max-message-bytes",
            "512",
            "--ring-buffer-bytes",
            "65536",
            "--request-header",
            "X-B3-TraceId,x-correlation-id",
            "--include-process",
            "curl",
            "--exclude-process",
            "a",
            "--exclude-process",
            "b",
        ])
        .load()
        .expect("valid");
        assert_eq!(c.tracing.random_sampling, 1.0);
        let e = c.tracing.exporter.as_ref().expect("exporter");
        assert_eq!(e.endpoint.as_deref(), Some("http://other:4317"));
        assert_eq!(e.protocol, Some(ExporterProtocol::Grpc));
        assert_eq!(
            e.timeout_ms,
            Some(2500),
            "keys without a flag keep the file's value"
        );
        assert_eq!(
            c.tracing.file.as_deref(),
            Some(Path::new("/tmp/other.jsonl"))
        );
        assert_eq!(c.tracing.terminal, TerminalMode::Off);
        assert_eq!(
            c.capture,
            CaptureConfig {
                max_message_bytes: 512,
                ring_buffer_bytes: 65536
            }
        );
        assert_eq!(c.http.request_headers, ["x-b3-traceid", "x-correlation-id"]);
        assert_eq!(c.http.response_headers, ["content-type"]);
        assert_eq!(c.processes.include, ["curl"]);
        assert_eq!(c.processes.exclude, ["a", "b"]);

        // An override can repair a file value; validation runs afterwards.
        let bad = TempFile::new("fixable.yaml", "capture:\n  max_message_bytes: 0\n");
        let bad_path = bad.0.to_str().expect("utf-8 temp path");
        let c = overrides(&["--config", bad_path, "--max-message-bytes", "100"])
            .load()
            .unwrap();
        assert_eq!(c.capture.max_message_bytes, 100);
        let e = overrides(&["--config", bad_path]).load().unwrap_err();
        assert!(e.to_string().starts_with(bad_path), "{e}");
    }

    #[test]
    fn overrides_without_file_and_flag_errors() {
        assert_eq!(overrides(&[]).load(), Ok(Config::default()));
        let c = overrides(&["--exporter-protocol", "http/protobuf"])
            .load()
            .unwrap();
        assert_eq!(
            c.tracing.exporter.and_then(|e| e.protocol),
            Some(ExporterProtocol::HttpProtobuf)
        );
        // The last of --terminal / --no-terminal wins.
        let o = overrides(&["--no-terminal", "--terminal"]);
        assert_eq!(o.load().unwrap().tracing.terminal, TerminalMode::On);

        let e = overrides(&["--random-sampling", "150"]).load().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--random-sampling (tracing.random_sampling): must be between 0 and 100, got 150"
        );
        let e = overrides(&["--max-message-bytes", "0"]).load().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--max-message-bytes (capture.max_message_bytes)"),
            "{e}"
        );
        let e = overrides(&["--request-header", "Authorization"])
            .load()
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--request-header (http.request_headers)"),
            "{e}"
        );
        assert!(Cli::try_parse_from(["agent", "--exporter-protocol", "http"]).is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn every_key_and_flag_is_documented() {
        let docs = include_str!("../../docs/configuration.md");
        for key in ALL_KEYS {
            let leaf = key.rsplit('.').next().unwrap_or(key);
            assert!(
                docs.contains(&format!("`{leaf}`")),
                "docs/configuration.md lacks {key}"
            );
            assert!(
                allowed_values(key).is_some(),
                "no allowed-values text for {key}"
            );
        }
        use clap::CommandFactory;
        for arg in Cli::command().get_arguments() {
            if let Some(long) = arg.get_long() {
                assert!(
                    docs.contains(&format!("`--{long}")),
                    "docs/configuration.md lacks --{long}"
                );
            }
        }
        assert!(docs.contains("`--stats-interval"));
    }

    #[test]
    fn every_documented_key_exists() {
        // Each key set to its default must parse: a key in ALL_KEYS that the
        // structs lack would be reported as unknown.
        for key in ALL_KEYS {
            let (section, rest) = key.split_once('.').unwrap_or((key, ""));
            let yaml = match rest.split_once('.') {
                Some((sub, leaf)) => format!("{section}:\n  {sub}:\n    {leaf}: null\n"),
                None => format!("{section}:\n  {rest}: null\n"),
            };
            match Config::from_yaml(&yaml) {
                Err(e) if e.kind() == ConfigErrorKind::UnknownKey => panic!("{key}: {e}"),
                _ => {}
            }
        }
    }
}

/// What each pipeline stage takes from the configuration.
impl Config {
    /// The sampler `tracing.random_sampling` and `tracing.parent_based` describe.
    pub fn sampler(&self) -> Result<Sampler, ConfigError> {
        self.tracing.sampler()
    }

    /// What spans record (`http:`).
    pub fn span_settings(&self) -> SpanSettings {
        self.http.span_settings()
    }

    /// Which processes are traced (`processes:`); command lines have the
    /// query parameters of `http.redact_query_parameters` redacted.
    pub fn process_filter(&self) -> ProcessFilter {
        self.processes
            .process_filter(self.http.redact_query_parameters.clone())
    }

    /// The span outputs. `env` reads the agent's environment: as with any
    /// OpenTelemetry SDK, `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces
    /// variant) turns OTLP export on when the file configures none.
    pub fn exporters(&self, env: impl Fn(&str) -> Option<String>) -> Vec<Output> {
        let mut outputs = Vec::new();
        let from_env = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|name| env(name).is_some_and(|v| !v.is_empty()));
        let otlp = match &self.tracing.exporter {
            Some(e) => Some(e.otlp_settings()),
            None if from_env => Some(OtlpSettings::default()),
            None => None,
        };
        let terminal = match self.tracing.terminal {
            TerminalMode::On => true,
            TerminalMode::Off => false,
            TerminalMode::Auto => otlp.is_none() && self.tracing.file.is_none(),
        };
        if let Some(settings) = otlp {
            outputs.push(Output::Otlp(settings));
        }
        if let Some(file) = &self.tracing.file {
            outputs.push(Output::File(file.clone()));
        }
        if terminal {
            outputs.push(Output::Terminal);
        }
        outputs
    }
}

#[cfg(test)]
mod stage_settings_tests {
    use super::*;
    use crate::export::ExporterConfig as Output;

    #[test]
    fn terminal_is_the_default_output() {
        assert_eq!(
            Config::default().exporters(|_| None),
            vec![Output::Terminal]
        );
    }

    #[test]
    fn otlp_endpoint_in_the_environment_turns_export_on_and_the_terminal_off() {
        let outputs = Config::default()
            .exporters(|k| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c:4317".into()));
        assert_eq!(outputs.len(), 1);
        assert!(matches!(outputs[0], Output::Otlp(_)));
    }

    #[test]
    fn file_and_exporter_from_the_file_are_both_used() {
        let config = Config::from_yaml(
            "tracing:\n  exporter:\n    endpoint: http://127.0.0.1:4318\n    protocol: http/protobuf\n  file: /tmp/x.jsonl\n  terminal: true\n",
        )
        .unwrap();
        let kinds: Vec<&str> = config
            .exporters(|_| None)
            .iter()
            .map(|o| o.kind())
            .collect();
        assert_eq!(kinds, ["otlp", "file", "terminal"]);
    }

    #[test]
    fn sampler_and_span_settings_follow_the_file() {
        let config = Config::from_yaml(
            "tracing:\n  random_sampling: 25\nhttp:\n  request_headers: [X-Request-Id]\n",
        )
        .unwrap();
        assert_eq!(config.sampler().unwrap().percentage(), 25.0);
        assert_eq!(
            config.span_settings().request_headers,
            vec!["x-request-id".to_string()]
        );
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
