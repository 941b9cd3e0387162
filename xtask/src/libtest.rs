//! Counting what libtest (the standard test harness) reports, so `xtask`
//! can print how many tests ran where.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

/// Test counts summed over one or more libtest runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestCounts {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests the harness reported as ignored.
    pub ignored: u64,
}

impl TestCounts {
    /// Adds another run's counts.
    pub fn add(&mut self, other: &TestCounts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }

    /// `N passed, M failed, K ignored`.
    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} ignored",
            self.passed, self.failed, self.ignored
        )
    }
}

/// Parses `test result: ok. 3 passed; 0 failed; 1 ignored; ...` anywhere in
/// a line: the VM console prefixes lines, and kernel messages may precede.
pub fn parse_result_line(line: &str) -> Option<TestCounts> {
    const PREFIX: &str = "test result: ";
    let rest = &line[line.find(PREFIX)? + PREFIX.len()..];
    // The status word (`ok`, `FAILED`) ends with the first ". ".
    let (_status, counts) = rest.split_once(". ")?;
    let mut out = TestCounts::default();
    let mut recognised = false;
    for part in counts.split(';') {
        let mut words = part.split_whitespace();
        let (Some(number), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(number) = number.parse::<u64>() else {
            continue;
        };
        let slot = match kind {
            "passed" => &mut out.passed,
            "failed" => &mut out.failed,
            "ignored" => &mut out.ignored,
            _ => continue,
        };
        *slot = number;
        recognised = true;
    }
    recognised.then_some(out)
}

/// Runs `cmd`, echoing its stdout, and sums the libtest result lines.
/// Returns the counts and whether the command succeeded.
pub fn run_and_count(cmd: &mut Command) -> Result<(TestCounts, bool)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut counts = TestCounts::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(c) = parse_result_line(&line) {
            counts.add(&c);
        }
    }
    let status = child.wait()?;
    Ok((counts, status.success()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line_is_parsed() {
        let line = "test result: FAILED. 12 passed; 2 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.5s";
        assert_eq!(
            parse_result_line(line),
            Some(TestCounts {
                passed: 12,
                failed: 2,
                ignored: 3
            })
        );
    }

    #[test]
    fn prefixed_result_line_is_parsed() {
        let line =
            "[vm 6.1] test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(parse_result_line(line).unwrap().passed, 5);
    }

    #[test]
    fn other_lines_are_not_results() {
        assert_eq!(parse_result_line("test capture::works ... ok"), None);
    }
}
