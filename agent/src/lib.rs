//! The user-space agent: it loads the kernel programs, reads what they
//! capture, and turns it into traces.
//!
//! One module per pipeline stage, each taking plain data in and giving plain
//! data out:
//! - [`capture`]: kernel records -> per-connection messages;
//! - [`http`]: message bytes -> HTTP/1.x requests and responses;
//! - [`tracecontext`]: W3C traceparent / tracestate;
//! - [`correlate`]: messages -> SERVER and CLIENT spans with trace context;
//! - [`kubernetes`]: this node's pods from the API server, for the resources;
//! - [`sampling`]: which traces are kept;
//! - [`span`]: the span model the later stages share;
//! - [`export`]: spans -> OTLP, OTLP/JSON file, terminal;
//! - [`config`]: the YAML file and command-line overrides;
//! - [`proxy`]: the traceparent-injecting transparent proxy and its iptables rules;
//! - [`metrics`]: the agent's own counters and health over HTTP;
//! - [`clock`]: the kernel's clock, which the probes' timestamps are on.
//!
//! Each stage owns its settings types, defaults and validation; [`config`]
//! only maps the YAML file and the flags onto them and reports errors. No
//! module but `config` names `config`, so no stage depends back on it (a
//! test below reads the sources to keep it so).
pub mod capture;
pub mod clock;
pub mod config;
pub mod correlate;
pub mod export;
pub mod http;
pub mod kubernetes;
pub mod metrics;
pub mod proxy;
pub mod sampling;
pub mod span;
pub mod tracecontext;

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// Every `.rs` file under `dir`, sorted.
    fn sources(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).expect("read the source directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                files.extend(sources(&path));
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
        files.sort();
        files
    }

    /// Whether `text` names the `config` module through the crate root or a
    /// parent: a path `crate::` or `super::` followed by it, or a
    /// `use crate::{...}` group holding it (spellings in
    /// `the_check_sees_every_spelling`). Whitespace is ignored.
    fn names_config(text: &str) -> bool {
        let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        // Spelled in two pieces, so that this file does not name it itself.
        let module = concat!("con", "fig");
        let is_ident = |c: char| c.is_alphanumeric() || c == '_';
        for root in ["crate::", "super::"] {
            let path = format!("{root}{module}");
            let named = text
                .match_indices(&path)
                .any(|(at, _)| !text[at + path.len()..].starts_with(is_ident));
            if named {
                return true;
            }
            let group = format!("{root}{{");
            let mut rest = text.as_str();
            while let Some(start) = rest.find(&group) {
                rest = &rest[start + group.len()..];
                let end = rest.find(';').unwrap_or(rest.len());
                // Any item of the group, at any depth, starting with the
                // module's name.
                let names_it = rest[..end]
                    .split(['{', ',', '}'])
                    .any(|item| item == module || item.starts_with(&format!("{module}::")));
                if names_it {
                    return true;
                }
            }
        }
        false
    }

    #[test]
    fn no_stage_depends_back_on_config() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        // The config module's own files (`src/config/`), and main.rs.
        let allowed =
            |path: &Path| path.starts_with(src.join("config")) || path == src.join("main.rs");
        let files = sources(&src);
        assert!(files.len() > 20, "found only {files:?}");
        assert!(
            files
                .iter()
                .any(|path| path.starts_with(src.join("config"))),
            "the config module is a folder: {files:?}"
        );
        let offenders: Vec<_> = files
            .iter()
            .filter(|path| !allowed(path))
            .filter(|path| names_config(&std::fs::read_to_string(path).expect("read a source")))
            .collect();
        assert!(
            offenders.is_empty(),
            "these modules name the config module; the stage should own the item \
             and config import it instead: {offenders:?}"
        );
    }

    /// Limits and defaults are the stages': the config module only maps
    /// keys onto them, so it declares no constant of its own (its tests
    /// aside). A limit written into config again would be a second copy.
    #[test]
    fn config_declares_no_limits_of_its_own() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join("config");
        let files = sources(&dir);
        assert!(files.len() >= 4, "found only {files:?}");
        for path in files.iter().filter(|p| !p.ends_with("tests.rs")) {
            let text = std::fs::read_to_string(path).expect("read a source");
            for line in text.lines().map(str::trim_start) {
                let item = line
                    .strip_prefix("pub(crate) ")
                    .or_else(|| line.strip_prefix("pub(super) "))
                    .or_else(|| line.strip_prefix("pub "))
                    .unwrap_or(line);
                assert!(
                    !item.starts_with("const ") && !item.starts_with("static "),
                    "{}: {line}: limits and defaults belong to the stage that owns \
                     the setting; config maps the key onto it",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn the_check_sees_every_spelling() {
        let module = concat!("con", "fig");
        for text in [
            format!("use crate::{module}::Config;"),
            format!("let x = crate :: {module} :: X;"),
            format!("use super::{module};"),
            format!("use crate::{{capture, {module}}};"),
            format!("use crate::{{capture::X, {module}::{{A, B}}}};"),
        ] {
            assert!(names_config(&text), "{text}");
        }
        for text in [
            "use crate::capture::ProbeSettings;",
            "use crate::{capture, export};",
            "let configured = crate::capture::X; // the configuration",
            "use crate::configuration::X;",
        ] {
            assert!(!names_config(text), "{text}");
        }
    }
}
