//! The checks of the outputs' settings: the OTLP exporter's
//! ([`OtlpSettings`]) and the file's ([`ExporterConfig::File`]). The export
//! stage owns them; the configuration maps its keys onto these settings
//! and names the key when a check fails.

use std::path::Path;
use std::time::Duration;

use super::{ExporterConfig, OtlpSettings};
use crate::http::check_header_name;

/// Longest export timeout accepted, in milliseconds: beyond ten minutes a
/// stuck collector would hold spans in memory long after they are useful.
pub const MAX_EXPORT_TIMEOUT_MS: u64 = 600_000;

/// An output setting refused by [`ExporterConfig::validate`] or
/// [`OtlpSettings::validate`]: which one, and why (the reason names the
/// value given, except a header's value, which is usually a credential).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExporterConfigError {
    /// [`OtlpSettings::endpoint`] is not an `http://` or `https://` URL
    /// naming a host.
    #[error("endpoint: {0}")]
    Endpoint(String),
    /// A header of [`OtlpSettings::headers`]: its name, or its value.
    #[error("header {name}: {reason}")]
    Header {
        /// The header's name, as given.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// [`OtlpSettings::timeout`] is not between 1 ms and
    /// [`MAX_EXPORT_TIMEOUT_MS`].
    #[error("timeout: {0}")]
    Timeout(String),
    /// The path of [`ExporterConfig::File`] is empty.
    #[error("file: {0}")]
    File(String),
}

impl ExporterConfigError {
    /// Why the setting was refused, without naming it.
    pub fn reason(&self) -> &str {
        match self {
            Self::Endpoint(reason)
            | Self::Header { reason, .. }
            | Self::Timeout(reason)
            | Self::File(reason) => reason,
        }
    }
}

impl ExporterConfig {
    /// Checks the output's settings; the first problem found.
    pub fn validate(&self) -> Result<(), ExporterConfigError> {
        match self {
            Self::Terminal => Ok(()),
            Self::Otlp(settings) => settings.validate(),
            Self::File(path) => check_file_path(path),
        }
    }
}

impl OtlpSettings {
    /// Checks the explicit settings (what the environment gives is checked
    /// when the exporter starts): the endpoint, each header in order (name,
    /// then value), then the timeout; the first problem found.
    pub fn validate(&self) -> Result<(), ExporterConfigError> {
        if let Some(endpoint) = &self.endpoint {
            check_endpoint(endpoint).map_err(ExporterConfigError::Endpoint)?;
        }
        for (name, value) in &self.headers {
            let header = |reason: String| ExporterConfigError::Header {
                name: name.clone(),
                reason,
            };
            check_header_name(name).map_err(|e| header(e.to_string()))?;
            // CR/LF would let a value inject further headers; the value itself
            // is not echoed because it is usually a credential.
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return Err(header(
                    "must not contain control characters (line breaks included)".into(),
                ));
            }
        }
        if let Some(timeout) = self.timeout {
            check_timeout(timeout).map_err(ExporterConfigError::Timeout)?;
        }
        Ok(())
    }
}

/// A collector URL: `http://` or `https://`, no spaces or control
/// characters, and a host.
fn check_endpoint(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("must be an http:// or https:// URL, got {url:?}"))?;
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "must not contain spaces or control characters, got {url:?}"
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("must name a host, got {url:?}"));
    }
    Ok(())
}

/// Between 1 ms and [`MAX_EXPORT_TIMEOUT_MS`].
fn check_timeout(timeout: Duration) -> Result<(), String> {
    let range = Duration::from_millis(1)..=Duration::from_millis(MAX_EXPORT_TIMEOUT_MS);
    if !range.contains(&timeout) {
        return Err(format!(
            "must be between 1 and {MAX_EXPORT_TIMEOUT_MS}, got {}",
            timeout.as_millis()
        ));
    }
    Ok(())
}

fn check_file_path(path: &Path) -> Result<(), ExporterConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ExporterConfigError::File(
            "must be a file path, got an empty string".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn otlp(f: impl FnOnce(&mut OtlpSettings)) -> Result<(), ExporterConfigError> {
        let mut settings = OtlpSettings::default();
        f(&mut settings);
        ExporterConfig::Otlp(settings).validate()
    }

    #[test]
    fn endpoints() {
        for good in ["http://c:4317", "https://collector.example:4318/x"] {
            assert_eq!(otlp(|s| s.endpoint = Some(good.into())), Ok(()), "{good}");
        }
        let e = otlp(|s| s.endpoint = Some("collector:4317".into())).unwrap_err();
        assert_eq!(
            e.reason(),
            "must be an http:// or https:// URL, got \"collector:4317\""
        );
        let e = otlp(|s| s.endpoint = Some("http://".into())).unwrap_err();
        assert_eq!(
            e,
            ExporterConfigError::Endpoint("must name a host, got \"http://\"".into())
        );
        let e = otlp(|s| s.endpoint = Some("http://a b".into())).unwrap_err();
        assert!(e.reason().contains("spaces"), "{e}");
    }

    #[test]
    fn headers_are_named_and_their_values_not_echoed() {
        assert_eq!(
            otlp(|s| s.headers = vec![("x-api-key".into(), "a\tb".into())]),
            Ok(())
        );
        let e = otlp(|s| s.headers = vec![("x-api-key".into(), "abc\r\nx-evil: 1".into())])
            .unwrap_err();
        assert!(
            matches!(&e, ExporterConfigError::Header { name, .. } if name == "x-api-key"),
            "{e:?}"
        );
        assert!(!e.to_string().contains("abc"), "{e}");
        let e = otlp(|s| s.headers = vec![("X-Api-Key".into(), "v".into())]).unwrap_err();
        assert_eq!(e.reason(), "header name \"X-Api-Key\" must be lower-case");
    }

    #[test]
    fn timeouts() {
        for ms in [1, MAX_EXPORT_TIMEOUT_MS] {
            assert_eq!(
                otlp(|s| s.timeout = Some(Duration::from_millis(ms))),
                Ok(())
            );
        }
        for ms in [0, MAX_EXPORT_TIMEOUT_MS + 1] {
            let e = otlp(|s| s.timeout = Some(Duration::from_millis(ms))).unwrap_err();
            assert_eq!(
                e,
                ExporterConfigError::Timeout(format!("must be between 1 and 600000, got {ms}"))
            );
        }
    }

    #[test]
    fn files_and_the_terminal() {
        assert_eq!(ExporterConfig::Terminal.validate(), Ok(()));
        assert_eq!(
            ExporterConfig::File("/tmp/x.jsonl".into()).validate(),
            Ok(())
        );
        assert_eq!(
            ExporterConfig::File("".into())
                .validate()
                .unwrap_err()
                .to_string(),
            "file: must be a file path, got an empty string"
        );
    }
}
