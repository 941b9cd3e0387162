//! Configuration errors: the key path at fault, the file, line and column
//! or the flag, and the wording of serde's and the stages' objections.

use std::fmt;
use std::path::{Path, PathBuf};

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
    pub(super) kind: ConfigErrorKind,
    /// Full key path; empty when the problem is with the file as a whole.
    pub(super) key: String,
    pub(super) reason: String,
    pub(super) file: Option<PathBuf>,
    /// 1-based line and column in the YAML text.
    pub(super) location: Option<(usize, usize)>,
    pub(super) flag: Option<&'static str>,
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

    pub(super) fn invalid(key: &str, reason: impl Into<String>) -> Self {
        Self {
            kind: ConfigErrorKind::InvalidValue,
            key: key.to_string(),
            reason: reason.into(),
            file: None,
            location: None,
            flag: None,
        }
    }

    /// The file at `path` could not be read.
    pub(super) fn io(path: &Path, error: &std::io::Error) -> Self {
        Self {
            kind: ConfigErrorKind::Io,
            key: String::new(),
            reason: error.to_string(),
            file: Some(path.to_path_buf()),
            location: None,
            flag: None,
        }
    }

    pub(super) fn in_file(mut self, path: &Path) -> Self {
        self.file = Some(path.to_path_buf());
        self
    }

    pub(super) fn with_flag(mut self, flag: &'static str) -> Self {
        self.flag = Some(flag);
        self
    }

    /// A YAML error from the untyped pass. Duplicate keys are reported
    /// there (serde_yaml_ng: `<map path>: duplicate entry with key "k"`),
    /// and are turned into an error on the full key path; anything else is
    /// a syntax error.
    pub(super) fn from_syntax(error: &serde_yaml_ng::Error) -> Self {
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
    pub(super) fn from_serde(error: serde_path_to_error::Error<serde_yaml_ng::Error>) -> Self {
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
pub(super) fn allowed_values(key: &str) -> Option<&'static str> {
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
