//! The code against the package lists: every program the tests,
//! benchmarks and scripts spawn must come from setup or the base image.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::setup::SETUP_PROGRAMS_OUTSIDE_APT;

/// Where the code that spawns programs lives, relative to the workspace.
const SCANNED: &[&str] = &["tests", "agent/tests", "xtask/src", "xtask/scripts"];

/// `Command::new(x)` calls whose argument is not a string literal, and the
/// programs each can receive (read at the call site's callers).
const INDIRECT: &[(&str, &str, &[&str])] = &[
    // `saved("iptables-save", ..)` and `sh("iptables", ..)`.
    (
        "tests/tests/proxy_rules.rs",
        "program",
        &["iptables", "ip6tables", "iptables-save", "ip6tables-save"],
    ),
    // The tests' OTLP receiver, built by `cargo xtask bench`.
    ("xtask/src/bench/overhead.rs", "RECEIVER", &[]),
    // The agent binary cargo built for the test.
    ("agent/tests/cli.rs", "AGENT", &[]),
    ("agent/tests/common/mod.rs", "AGENT", &[]),
    // The agent binary cargo built next to the test (`agent_binary()`).
    ("tests/src/agent_process.rs", "agent_binary()", &[]),
    ("tests/tests/faults.rs", "agent_binary()", &[]),
    // `decompress_module`: one of xz, zstd, gzip by the module's suffix.
    ("xtask/src/vm/kernel.rs", "tool", &["xz", "zstd", "gzip"]),
    // The busybox of the tools list, listing its applets.
    ("xtask/src/vm/initramfs.rs", "busybox", &["busybox"]),
    // The test binary itself, re-run as a child.
    (
        "tests/tests/export.rs",
        "std::env::current_exe().unwrap()",
        &[],
    ),
    // The test binary itself, as the proxy process that gets killed.
    ("tests/tests/fail_open.rs", "exe", &[]),
    // The Go frontend the test builds with go (itself listed).
    ("tests/tests/links_go.rs", "&binary", &[]),
    // `services_under`: Debian's python3; the image's pyenv interpreters
    // only in an ignored test run by hand (setup does not install them).
    ("tests/src/links.rs", "python", &["/usr/bin/python3"]),
    // The tests' venv's interpreter (the tests crate's copy of the path).
    (
        "tests/src/lib.rs",
        "TEST_VENV_PYTHON",
        &[crate::setup::TEST_VENV_PYTHON],
    ),
    // Setup's import check and pip, in the tests' venv.
    (
        "xtask/src/setup.rs",
        "TEST_VENV_PYTHON",
        &[crate::setup::TEST_VENV_PYTHON],
    ),
    // The manifest validator, from the tests' venv.
    (
        "xtask/src/manifests.rs",
        "KUBERNETES_VALIDATE",
        &[crate::setup::KUBERNETES_VALIDATE],
    ),
];

/// Programs that come from neither list: the Rust toolchain (rustup),
/// bpf-linker (setup builds it with `cargo install`) and what the workspace
/// builds.
const NOT_PACKAGED: &[&str] = &["cargo", "rustup", "bpf-linker"];

/// The package (setup's or the base image's) that provides `program`, a
/// bare name or an absolute path.
pub fn provider(program: &str) -> Option<&'static Package> {
    let file_name = |path: &str| path.rsplit('/').next().unwrap_or(path).to_string();
    SETUP_PACKAGES.iter().chain(BASE_PACKAGES).find(|p| {
        p.programs.iter().any(|path| {
            if program.starts_with('/') {
                *path == program
            } else {
                file_name(path) == program
            }
        })
    })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// One place the code starts a program.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Spawn {
    file: String,
    /// The program (a literal), or the expression naming it.
    program: String,
    literal: bool,
}

/// Calls that start a program named by their first argument:
/// `Command::new(…)` (std's and tokio's), and the namespace helpers of
/// `tests/src/netns.rs` (`ns.exec("curl")`, `pod.spawn("python3", …)`).
/// Only `Command::new` must have a literal; the helpers pass a variable on
/// to it, and their callers' literals are what is checked.
const SPAWNING_CALLS: &[(&str, bool)] = &[
    ("Command::new(", true),
    (".exec(", false),
    (".spawn(", false),
];

/// The spawns in Rust source.
fn rust_spawns(file: &str, text: &str) -> Vec<Spawn> {
    let mut out = Vec::new();
    for (call, strict) in SPAWNING_CALLS {
        let mut rest = text;
        while let Some(at) = rest.find(call) {
            rest = &rest[at + call.len()..];
            // The first argument, up to a comma or the matching parenthesis.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        ',' if depth == 1 => return true,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(rest.len(), |(i, _)| i);
            let argument = rest[..end].trim();
            let literal =
                argument.len() >= 2 && argument.starts_with('"') && argument.ends_with('"');
            if !literal && !strict {
                continue;
            }
            out.push(Spawn {
                file: file.to_string(),
                program: if literal {
                    argument[1..argument.len() - 1].to_string()
                } else {
                    argument.to_string()
                },
                literal,
            });
        }
    }
    out
}

/// Shell words that are not programs to install.
const SHELL_WORDS: &[&str] = &[
    "if", "then", "elif", "else", "fi", "for", "while", "until", "do", "done", "case", "esac",
    "in", "function", "local", "export", "declare", "set", "shift", "trap", "wait", "kill", "echo",
    "printf", "cd", "read", "return", "exit", "true", "false", "test", "[", "[[", "command",
    "exec", "eval", "unset", "!", "let", "source", ".", ":", "]", "]]",
];

/// A shell line with what cannot hold a command taken out: single-quoted
/// text (awk programs), `${…}` expansions, `$((…))` arithmetic and
/// double-quoted text, except the `$(…)` substitutions inside it, which
/// stay as commands of their own.
fn strip_shell_noise(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    // The index after the group opened at `open` (by `(` or `{`).
    let close = |open: usize| {
        let (up, down) = if chars[open] == '{' {
            ('{', '}')
        } else {
            ('(', ')')
        };
        let mut depth = 0;
        let mut j = open;
        while j < chars.len() {
            if chars[j] == up {
                depth += 1;
            } else if chars[j] == down {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            j += 1;
        }
        chars.len()
    };
    let mut quoted = false;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '\'' && !quoted {
            i = chars[i + 1..]
                .iter()
                .position(|&c| c == '\'')
                .map_or(chars.len(), |p| i + p + 2);
            out.push_str(" _ ");
        } else if c == '"' {
            // The quoted word as one placeholder.
            if !quoted {
                out.push_str(" _ ");
            }
            quoted = !quoted;
            i += 1;
        } else if c == '$'
            && (next == Some('{') || next == Some('(') && chars.get(i + 2) == Some(&'('))
        {
            // A value, not a command: a placeholder word keeps the count.
            i = close(i + 1);
            if !quoted {
                out.push_str(" _ ");
            }
        } else if c == '$' && next == Some('(') {
            let end = close(i + 1);
            let inner: String = chars[i + 2..end.saturating_sub(1).max(i + 2)]
                .iter()
                .collect();
            out.push_str(" ; ");
            out.push_str(&strip_shell_noise(&inner));
            out.push_str(" ; ");
            i = end;
        } else {
            if !quoted {
                out.push(c);
            }
            i += 1;
        }
    }
    out
}

/// Programs a shell script runs: the first word of every simple command,
/// through `$VAR` wrappers assigned in the script (`PIN="taskset -c 1"`)
/// and the wrappers' own command (`taskset -c 1 nginx`, `perf … -- sleep`).
fn shell_spawns(file: &str, text: &str) -> Vec<Spawn> {
    let mut functions = BTreeSet::new();
    let mut variables = Vec::new();
    let mut segments = Vec::new();
    for line in text.lines() {
        let line = match line.trim_start().starts_with('#') {
            true => "",
            false => line.split(" #").next().unwrap_or(""),
        };
        let raw = line.trim();
        let line = &strip_shell_noise(raw);
        if let Some((name, _)) = raw.split_once("()")
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.is_empty()
        {
            functions.insert(name.to_string());
        }
        if let Some((name, value)) = raw.split_once("=\"")
            && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        {
            let value = strip_shell_noise(value.trim_end_matches('"'));
            variables.push((name.to_string(), value));
        }
        let mut current = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            let split = match c {
                ';' | '|' | '`' | '(' | ')' | '{' | '}' => true,
                '&' => chars.peek() != Some(&'>'),
                '$' if chars.peek() == Some(&'(') => {
                    chars.next();
                    true
                }
                _ => false,
            };
            if split {
                segments.push(std::mem::take(&mut current));
            } else {
                current.push(c);
            }
        }
        segments.push(current);
    }
    let mut out = BTreeSet::new();
    for segment in &segments {
        let mut words: Vec<String> = segment
            .split_whitespace()
            .map(|w| w.trim_matches('"').to_string())
            .collect();
        // A `$VAR` in command position stands for its value's words.
        if let Some(first) = words.first().and_then(|w| w.strip_prefix('$'))
            && let Some((_, value)) = variables.iter().find(|(name, _)| name == first)
        {
            let value: Vec<String> = value.split_whitespace().map(String::from).collect();
            words.splice(0..1, value);
        }
        let mut words = words.into_iter().peekable();
        // Leading assignments and keywords.
        while let Some(word) = words.peek() {
            let keyword = matches!(word.as_str(), "then" | "do" | "else" | "!" | "exec");
            if word.contains('=') || keyword {
                words.next();
            } else {
                break;
            }
        }
        let Some(first) = words.next() else { continue };
        if first.starts_with(['$', '-', '<', '>', '*', '_']) || first.contains('/') {
            continue;
        }
        if matches!(
            first.as_str(),
            "for" | "case" | "if" | "while" | "local" | "declare" | "export"
        ) {
            continue;
        }
        if SHELL_WORDS.contains(&first.as_str()) || functions.contains(&first) {
            continue;
        }
        out.insert(first.clone());
        // Wrappers run a command of their own.
        let rest: Vec<String> = words.collect();
        let wrapped = match first.as_str() {
            "taskset" => rest.iter().skip_while(|w| w.starts_with('-')).nth(1),
            "perf" => rest
                .iter()
                .position(|w| w == "--")
                .and_then(|i| rest.get(i + 1)),
            _ => None,
        };
        if let Some(program) = wrapped.filter(|p| !p.starts_with(['$', '_'])) {
            out.insert(program.clone());
        }
    }
    out.into_iter()
        .map(|program| Spawn {
            file: file.to_string(),
            program,
            literal: true,
        })
        .collect()
}

fn all_spawns() -> Vec<Spawn> {
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in SCANNED {
        files_under(&root.join(dir), &mut files);
    }
    let mut spawns = Vec::new();
    for path in files {
        let file = path
            .strip_prefix(&root)
            .expect("under the root")
            .display()
            .to_string();
        // This file names programs in its own test data.
        if file.starts_with("xtask/src/tools") {
            continue;
        }
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("rs") => spawns.extend(rust_spawns(&file, &text)),
            Some("sh") => spawns.extend(shell_spawns(&file, &text)),
            _ => {}
        }
    }
    spawns.sort();
    spawns.dedup();
    spawns
}

/// What each spawn runs: its literal, or the programs listed for it in
/// [`INDIRECT`]; an error for a non-literal call that is not listed.
fn programs_of(spawn: &Spawn) -> Result<Vec<String>, String> {
    if spawn.literal {
        return Ok(vec![spawn.program.clone()]);
    }
    INDIRECT
        .iter()
        .find(|(file, expression, _)| *file == spawn.file && *expression == spawn.program)
        .map(|(_, _, programs)| programs.iter().map(|p| p.to_string()).collect())
        .ok_or_else(|| {
            format!(
                "{}: Command::new({}) is not a literal: list the programs it can run in INDIRECT",
                spawn.file, spawn.program
            )
        })
}

/// Whether `program` is accounted for when setup installs everything of
/// its lists but `dropped`: a package name, or a program of
/// [`SETUP_PROGRAMS_OUTSIDE_APT`], which counts by its absolute path only
/// (a bare `python` is whatever comes first on PATH).
fn accounted(program: &str, dropped: Option<&str>) -> bool {
    let built_here = program.starts_with("target/");
    built_here
        || NOT_PACKAGED.contains(&program)
        || SETUP_PROGRAMS_OUTSIDE_APT.contains(&program) && Some(program) != dropped
        || provider(program).is_some_and(|p| Some(p.name) != dropped)
}

/// What is wrong with the spawns if setup installed everything but
/// `dropped`.
fn problems(spawns: &[Spawn], dropped: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    for spawn in spawns {
        match programs_of(spawn) {
            Ok(programs) => problems.extend(
                programs
                    .iter()
                    .filter(|p| !accounted(p, dropped))
                    .map(|p| format!("{}: runs `{p}`, which setup does not install", spawn.file)),
            ),
            Err(problem) => problems.push(problem),
        }
    }
    problems
}

#[test]
fn spawned_programs_come_from_setup() {
    let spawns = all_spawns();
    assert!(
        spawns.len() > 20,
        "the scan found only {} spawns: is SCANNED right?",
        spawns.len()
    );
    let mut problems = problems(&spawns, None);
    // A listed indirect call that no longer exists is stale.
    for (file, expression, _) in INDIRECT {
        if !spawns
            .iter()
            .any(|s| !s.literal && s.file == *file && s.program == *expression)
        {
            problems.push(format!(
                "INDIRECT lists {file}: {expression}, which is gone"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "add each program's Debian package to SETUP_PACKAGES in xtask/src/setup.rs \
         (or to BASE_PACKAGES in xtask/src/tools.rs if every machine of this kind ships it; \
         a program setup installs without apt goes to SETUP_PROGRAMS_OUTSIDE_APT, by its \
         absolute path):\n{}",
        problems.join("\n")
    );
}

/// The check is not vacuous: dropping from setup any package whose
/// programs the code runs makes it fail, naming the program.
#[test]
fn dropping_a_package_the_code_needs_fails_the_check() {
    let spawns = all_spawns();
    let spawned: BTreeSet<String> = spawns
        .iter()
        .filter_map(|s| programs_of(s).ok())
        .flatten()
        .collect();
    let mut checked = 0;
    for package in SETUP_PACKAGES {
        let needed = package.programs.iter().any(|path| {
            spawned.contains(*path) || spawned.contains(path.rsplit('/').next().unwrap_or(path))
        });
        if !needed {
            continue;
        }
        let found = problems(&spawns, Some(package.name));
        assert!(
            !found.is_empty(),
            "dropping {} from setup went unnoticed",
            package.name
        );
        checked += 1;
    }
    // wrk, nginx, haproxy, curl, iproute2, iptables, perf, qemu, cpio,
    // busybox, xz, zstd, kmod at least.
    assert!(checked >= 10, "only {checked} packages are checked");
    // The same for what setup installs without apt: setup's own import
    // check spawns the venv's python at least.
    let mut checked = 0;
    for program in SETUP_PROGRAMS_OUTSIDE_APT {
        if !spawned.contains(*program) {
            continue;
        }
        assert!(
            !problems(&spawns, Some(program)).is_empty(),
            "dropping {program} from setup went unnoticed"
        );
        checked += 1;
    }
    assert!(checked >= 1, "no program installed outside apt is checked");
}

/// The scan sees what these files really spawn: wrk, nginx and the others
/// of the A/B script, `Command::new` with literals and with variables.
#[test]
fn the_scan_finds_known_spawns() {
    let spawns = all_spawns();
    let has = |file: &str, program: &str| {
        spawns
            .iter()
            .any(|s| s.file == file && s.program == program)
    };
    assert!(has("xtask/src/bench/mod.rs", "wrk"));
    assert!(has("xtask/src/bench/mod.rs", "haproxy"));
    assert!(has("xtask/scripts/proxy-ab.sh", "nginx"));
    assert!(has("xtask/scripts/proxy-ab.sh", "wrk"));
    assert!(has("xtask/scripts/proxy-ab.sh", "perf"));
    assert!(has("xtask/scripts/proxy-ab.sh", "pgrep"));
    assert!(has("xtask/scripts/proxy-ab.sh", "taskset"));
    assert!(has("tests/src/netns.rs", "ip"));
    assert!(has("xtask/src/vm/kernel.rs", "tool"));
    assert!(has("tests/tests/proxy.rs", "curl"));
}

#[test]
fn a_program_setup_does_not_install_is_reported() {
    let script =
        "#!/bin/bash\nPIN=\"taskset -c 1\"\n$PIN hey -n 10 http://x/ | tee out\nf() { :; }\nf\n";
    let programs: Vec<String> = shell_spawns("s.sh", script)
        .into_iter()
        .map(|s| s.program)
        .collect();
    assert_eq!(programs, ["hey", "taskset", "tee"]);
    let programs: Vec<String> = shell_spawns(
        "s.sh",
        "x=$(awk '/a/{print $1}' f | sort -g); echo \"$(nproc) ${X:-$(($(seq 1) - 1))}\"\nlocal r\n",
    )
    .into_iter()
    .map(|s| s.program)
    .collect();
    assert_eq!(programs, ["awk", "nproc", "sort"]);
    assert!(!accounted("hey", None));
    assert!(accounted("taskset", None));
    assert!(!accounted("wrk", Some("wrk")));
    // The venv's python by its path, not by a bare name, not its pip.
    let venv_python = crate::setup::TEST_VENV_PYTHON;
    assert!(accounted(venv_python, None));
    assert!(!accounted(venv_python, Some(venv_python)));
    assert!(!accounted("python", None));
    assert!(!accounted("/opt/agent-tests/venv/bin/pip", None));
    let rust = rust_spawns(
        "t.rs",
        "Command::new(\"hey\").arg(x); tokio::process::Command::new(path_of(\"a\"))",
    );
    assert_eq!(rust[0].program, "hey");
    assert!(rust[0].literal);
    assert_eq!(rust[1].program, "path_of(\"a\")");
    assert!(programs_of(&rust[1]).is_err());
}

/// Every listed program is where the list says, from the package it names
/// (or one that package depends on): the list is true to this machine after
/// `cargo xtask setup`.
#[test]
fn listed_programs_are_installed_by_their_packages() {
    if Command::new("dpkg-query")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("dpkg-query is missing: this check needs a Debian machine");
    }
    let mut problems = Vec::new();
    for package in SETUP_PACKAGES.iter().chain(BASE_PACKAGES) {
        for program in package.programs {
            if !Path::new(program).exists() {
                problems.push(format!(
                    "{program} (package {}) is missing: run `cargo xtask setup`",
                    package.name
                ));
                continue;
            }
            let Some(owner) = owner_of(program) else {
                problems.push(format!("{program}: dpkg knows no package owning it"));
                continue;
            };
            if owner != package.name && !depends_on(package.name).contains(&owner) {
                problems.push(format!(
                    "{program} comes from {owner}, not from {} or its dependencies",
                    package.name
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// What setup installs without apt-get is there and works: each program
/// exists, and the tests' venv holds exactly the pins of
/// `tests/fixtures/python-requirements.txt` with its modules importing
/// (`venv/bin/python -c 'import fastapi, …'`). dpkg is not asked: no
/// package owns these.
#[test]
fn programs_setup_installs_outside_apt_are_installed() {
    let mut problems = Vec::new();
    for program in SETUP_PROGRAMS_OUTSIDE_APT {
        if !Path::new(program).exists() {
            problems.push(format!("{program} is missing"));
        }
    }
    if problems.is_empty() {
        problems.extend(crate::setup::test_venv_problem());
    }
    assert!(
        problems.is_empty(),
        "{}\nrun `cargo xtask setup` (as root) to install the tests' Python venv",
        problems.join("\n")
    );
}

/// The package owning `path`, trying the spellings dpkg may have recorded
/// on a merged-/usr system and the file a link (alternatives) resolves to.
fn owner_of(path: &str) -> Option<String> {
    let real = fs::canonicalize(path).ok().map(|p| p.display().to_string());
    let mut candidates = vec![path.to_string()];
    candidates.extend(real);
    for candidate in candidates.clone() {
        if let Some(short) = candidate.strip_prefix("/usr") {
            candidates.push(short.to_string());
        }
    }
    candidates.iter().find_map(|candidate| {
        let output = Command::new("dpkg-query")
            .args(["-S", candidate])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout);
        // `package[:arch]: path`; diversion lines have no path after a colon.
        text.lines()
            .filter(|line| !line.starts_with("diversion"))
            .find_map(|line| line.split_once(": "))
            .map(|(package, _)| package.split(':').next().unwrap_or(package).to_string())
    })
}

/// The packages `package` depends on directly.
fn depends_on(package: &str) -> Vec<String> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Depends},${Pre-Depends}", package])
        .output();
    let text = output
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.split([',', '|'])
        .filter_map(|dep| dep.split_whitespace().next())
        .map(|dep| dep.split(':').next().unwrap_or(dep).to_string())
        .collect()
}
