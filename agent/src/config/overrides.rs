//! The command-line flags that override the file.

use std::path::PathBuf;

use super::sections::lower_case_dedup;
use super::{Config, ConfigError, TerminalMode};
use crate::export::OtlpProtocol;

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
    pub exporter_protocol: Option<OtlpProtocol>,

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
