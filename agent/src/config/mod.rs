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
//!
//! This module only maps the file and the flags onto the stages' settings:
//! every default, limit and check belongs to the stage that owns the
//! setting (`capture::ProbeSettings::validate`, `sampling::Sampler::new`,
//! `correlate::SpanSettings::validate`, `export::OtlpSettings::validate`,
//! `proxy::settings`, ...), and a failed check is reported here under its
//! key. The parts:
//! - this file: [`Config`], reading and validating it, and the settings
//!   handed to each stage;
//! - `sections`: the YAML sections (`tracing:`, `capture:`, ...), their
//!   defaults (the stages') and the mapping of each onto its stage;
//! - `overrides`: [`ConfigOverrides`], the command-line flags;
//! - `error`: [`ConfigError`], key paths and the wording of errors.

use std::path::Path;

use serde::Deserialize;

use crate::correlate::{ProcessFilter, SpanSettings};
use crate::export::otlp::env as otlp_env;
use crate::export::{ExporterConfig as Output, OtlpSettings};
use crate::sampling::Sampler;

mod error;
mod overrides;
mod sections;
#[cfg(test)]
mod tests;

pub use error::{ConfigError, ConfigErrorKind};
pub use overrides::ConfigOverrides;
pub use sections::{
    CaptureConfig, ExporterConfig, HttpConfig, KubernetesConfig, MetricsConfig,
    ProcessFilterConfig, ProxyConfig, TerminalMode, TracingConfig,
};

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

    /// Whether spans are printed on the terminal, the environment aside:
    /// `auto` means only when they are neither exported nor written to a
    /// file (the decision of [`Config::exporters`]).
    pub fn terminal_enabled(&self) -> bool {
        self.exporters(|_| None).contains(&Output::Terminal)
    }

    fn parse_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, &e))?;
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
        let from_env = [otlp_env::ENDPOINT, otlp_env::TRACES_ENDPOINT]
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
