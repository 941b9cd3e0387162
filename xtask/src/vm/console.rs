//! Reading the guest's console: libtest's summary lines and the exit markers
//! that the guest's `/init` prints. Kept free of I/O so it can be unit-tested.

/// Start of the line `/init` prints after each test binary:
/// `@@VMTEST-EXIT <binary-name> <exit-code>`.
pub const EXIT_MARKER: &str = "@@VMTEST-EXIT";

/// What `/init` prints before each test binary.
pub const TESTS_STARTED: &str = "vm-init: running ";

/// What one boot's console output says about the tests that ran in it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConsoleReport {
    /// Sum of `N passed` over every `test result:` line.
    pub passed: u64,
    /// Sum of `N failed` over every `test result:` line.
    pub failed: u64,
    /// Sum of `N ignored` over every `test result:` line.
    pub ignored: u64,
    /// `(binary name, exit code)` for each exit marker, in console order.
    pub exits: Vec<(String, i32)>,
    /// `/init` started a test binary: anything that goes wrong after this
    /// is the tests' doing, not the boot's.
    pub tests_started: bool,
}

impl ConsoleReport {
    /// Accounts for one console line (without its line terminator).
    ///
    /// Both kinds of line are searched anywhere in the line, not only at its
    /// start: the serial console is shared with the kernel's printk, so a
    /// kernel message or a test's unterminated output can precede them.
    pub fn feed(&mut self, line: &str) {
        if let Some(counts) = crate::libtest::parse_result_line(line) {
            self.passed += counts.passed;
            self.failed += counts.failed;
            self.ignored += counts.ignored;
        } else if let Some(exit) = parse_exit_marker(line) {
            self.exits.push(exit);
        } else if line.contains(TESTS_STARTED) {
            self.tests_started = true;
        }
    }

    /// Accounts for every line of `text`.
    #[cfg(test)]
    pub fn parse(text: &str) -> Self {
        let mut report = Self::default();
        text.lines().for_each(|line| report.feed(line));
        report
    }
}

/// Parses `@@VMTEST-EXIT <binary-name> <exit-code>`.
fn parse_exit_marker(line: &str) -> Option<(String, i32)> {
    let rest = &line[line.find(EXIT_MARKER)? + EXIT_MARKER.len()..];
    let mut words = rest.split_whitespace();
    let name = words.next()?;
    let code = words.next()?.parse().ok()?;
    Some((name.to_owned(), code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_that_died_while_booting_started_no_test() {
        let console = "[    4.4] Kernel panic - not syncing: Fatal exception in interrupt\n";
        assert!(!ConsoleReport::parse(console).tests_started);
    }

    #[test]
    fn sums_results_and_collects_exit_markers() {
        let console = "\
[    1.234567] Run /init as init process
vm-init: running integration-0123abcd
running 3 tests
test probes::attach ... ok
test probes::detach ... FAILED
test probes::slow ... ignored
test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.52s
@@VMTEST-EXIT integration-0123abcd 101
running 2 tests
[   9.876543] random kernel line
test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s
partial output without newline@@VMTEST-EXIT other-feedbeef 0
";
        let report = ConsoleReport::parse(console);
        assert_eq!(
            report,
            ConsoleReport {
                passed: 3,
                failed: 1,
                ignored: 1,
                exits: vec![
                    ("integration-0123abcd".to_owned(), 101),
                    ("other-feedbeef".to_owned(), 0),
                ],
                tests_started: true,
            }
        );
    }

    #[test]
    fn ignores_malformed_lines() {
        let console = "\
test result: garbage
test result: ok. lots passed
@@VMTEST-EXIT
@@VMTEST-EXIT name-only
@@VMTEST-EXIT name not-a-number
";
        assert_eq!(ConsoleReport::parse(console), ConsoleReport::default());
    }
}
