//! `cargo xtask fuzz`: the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer)
//! over what the agent reads from outside: the HTTP/1.x parser, the
//! proxy's head rewrite, traceparent/tracestate, the kernel record decoder
//! and the YAML configuration.
//!
//! Each target runs for a time or a number of executions, from a corpus in
//! `fuzz/corpus/<target>` seeded with a few valid inputs (kept between
//! runs, not in git). A crash stops the run with the input saved under
//! `fuzz/artifacts/<target>/`; every crash found becomes a unit test.
//! Built with the pinned toolchain (`RUSTC_BOOTSTRAP=1` for libFuzzer's
//! instrumentation flags) and without a sanitizer: the targets are safe
//! Rust, and the instrumentation alone finds panics and overflows
//! (debug assertions are on). The agent's kernel programs are not built
//! for them (`AYA_BUILD_SKIP=1`).

use std::fs;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, bail};

/// The targets, each with seeds for its corpus.
pub const TARGETS: &[(&str, &[&[u8]])] = &[
    (
        "http_parser",
        &[
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\xff\xffHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\xff\xffHTTP/1.1 204 No Content\r\n\r\n",
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n\xff\xffHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.0 200 OK\r\n\r\nbody",
        ],
    ),
    (
        "proxy_head_rewrite",
        &[
            b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\ntracestate: a=b\r\nContent-Length: 3\r\n\r\nabc",
            b"PUT /y HTTP/1.0\r\ntraceparent: bad\r\ntraceparent: worse\r\nTransfer-Encoding: chunked\r\n\r\n",
        ],
    ),
    (
        "tracecontext",
        &[
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE\nvendor@tenant=x",
        ],
    ),
    ("event_decoder", &[&[0u8; 64]]),
    (
        "config_yaml",
        &[
            b"tracing:\n  random_sampling: 10\n  exporter:\n    endpoint: http://127.0.0.1:4317\n",
            b"proxy:\n  enabled: true\n  ports: [80]\n  include_cidrs: [10.0.0.0/8]\nkubernetes:\n  enabled: auto\n",
        ],
    ),
];

/// How long or how far each target runs.
#[derive(Clone, Debug)]
pub struct FuzzOptions {
    /// Only these targets (empty: all).
    pub targets: Vec<String>,
    /// Seconds per target (libFuzzer's `-max_total_time`).
    pub seconds: u64,
    /// Executions per target (`-runs`); 0: no limit but the time.
    pub runs: u64,
}

/// Builds and runs the targets; fails on the first crash.
pub fn fuzz(options: &FuzzOptions) -> Result<()> {
    let chosen: Vec<&(&str, &[&[u8]])> = TARGETS
        .iter()
        .filter(|(name, _)| options.targets.is_empty() || options.targets.iter().any(|t| t == name))
        .collect();
    if chosen.is_empty() {
        bail!(
            "no fuzz target named {:?}; the targets: {}",
            options.targets,
            TARGETS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (name, seeds) in chosen {
        let corpus = Path::new("fuzz/corpus").join(name);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        for (i, seed) in seeds.iter().enumerate() {
            fs::write(corpus.join(format!("seed-{i}")), seed)?;
        }
        let mut libfuzzer = vec![
            format!("-max_total_time={}", options.seconds),
            "-print_final_stats=1".to_string(),
            // One line of progress every 10 s, not one per new input.
            "-verbosity=0".to_string(),
            "-print_pcs=0".to_string(),
            "-reload=0".to_string(),
        ];
        if options.runs > 0 {
            libfuzzer.push(format!("-runs={}", options.runs));
        }
        let started = std::time::Instant::now();
        let output = crate::toolchain::cargo()
            .current_dir("fuzz")
            .env("RUSTC_BOOTSTRAP", "1")
            // The targets need no kernel program (agent/build.rs).
            .env("AYA_BUILD_SKIP", "1")
            .args([
                "fuzz",
                "run",
                "--sanitizer",
                "none",
                "--debug-assertions",
                name,
            ])
            .arg("corpus/".to_string() + name)
            .arg("--")
            .args(&libfuzzer)
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .output()
            .context("running cargo fuzz (installed by cargo xtask setup)")?;
        let log = String::from_utf8_lossy(&output.stderr);
        let executions = final_stat(&log, "stat::number_of_executed_units");
        println!(
            "fuzz {name}: {} executions in {} s, exit {}",
            executions.map_or("?".to_string(), |n| n.to_string()),
            started.elapsed().as_secs(),
            output.status
        );
        if !output.status.success() {
            // What libFuzzer said about the crash, and where it saved it.
            eprintln!("{log}");
            bail!("fuzz target {name} failed (its input is under fuzz/artifacts/{name}/)");
        }
    }
    Ok(())
}

/// A `stat::name: value` line of libFuzzer's final statistics.
fn final_stat(log: &str, name: &str) -> Option<u64> {
    log.lines().find_map(|line| {
        line.strip_prefix(name)?
            .trim_start_matches(':')
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_are_read_from_libfuzzers_log() {
        let log =
            "#1024 DONE cov: 1\nstat::number_of_executed_units: 123456\nstat::peak_rss_mb: 40\n";
        assert_eq!(
            final_stat(log, "stat::number_of_executed_units"),
            Some(123456)
        );
        assert_eq!(final_stat(log, "stat::missing"), None);
    }

    #[test]
    fn every_target_has_a_source_file_and_seeds() {
        let manifest = include_str!("../../fuzz/Cargo.toml");
        for (name, seeds) in TARGETS {
            assert!(
                manifest.contains(&format!("path = \"fuzz_targets/{name}.rs\"")),
                "{name} is not a bin of fuzz/Cargo.toml"
            );
            assert!(!seeds.is_empty(), "{name} has no seed");
        }
        assert_eq!(
            manifest.matches("[[bin]]").count(),
            TARGETS.len(),
            "fuzz/Cargo.toml has a target xtask does not run"
        );
    }
}
