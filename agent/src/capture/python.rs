//! Watching Python interpreters: where, in a Python process, the kernel
//! finds the context (`contextvars`) current on a thread, and the uprobes
//! that report context copies and enters.
//!
//! Every asyncio task runs in a context of its own, copied from the one
//! current when the task was created; so is every callback, and every call
//! a thread pool makes for a task. Knowing the context current on the
//! thread at each syscall, and which context each new one was copied from,
//! lets correlation follow a request from the callback that read it to the
//! task that makes its outbound calls (see `correlate::python_contexts`).
//!
//! The interpreter is read the way out-of-process profilers read it: the
//! exported `_PyRuntime` holds the interpreters, the main interpreter its
//! thread states, each thread state its kernel thread id and its current
//! context. Their offsets depend on the version (read from the exported
//! `Py_Version`); each is checked against the live process before it is
//! trusted. Interpreters this module has no layout for are not watched:
//! their calls get no parent from the interpreter.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use agent_common::PythonProcess;

/// Offsets of one Python version's runtime structures (x86_64), as
/// `offsetof` gives them with that version's headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interpreters_head: u64,
    /// `PyInterpreterState.threads.head`.
    pub interpreter_threads_head: u32,
    /// `PyThreadState.next`.
    pub thread_next: u32,
    /// `PyThreadState.native_thread_id`.
    pub thread_native_id: u32,
    /// `PyThreadState.context`.
    pub thread_context: u32,
}

/// The versions whose layout is known, by (major, minor). Thread states
/// carry the kernel's thread id from 3.11 on; earlier versions are not
/// watched.
pub const LAYOUTS: &[((u8, u8), Layout)] = &[
    (
        (3, 11),
        Layout {
            runtime_interpreters_head: 40,
            interpreter_threads_head: 16,
            thread_next: 8,
            thread_native_id: 160,
            thread_context: 224,
        },
    ),
    (
        (3, 12),
        Layout {
            runtime_interpreters_head: 40,
            interpreter_threads_head: 72,
            thread_next: 8,
            thread_native_id: 144,
            thread_context: 208,
        },
    ),
    (
        (3, 13),
        Layout {
            runtime_interpreters_head: 632,
            interpreter_threads_head: 7344,
            thread_next: 8,
            thread_native_id: 160,
            thread_context: 208,
        },
    ),
];

/// The function whose return reports a context copy.
pub const COPY_FUNCTION: &str = "PyContext_CopyCurrent";
/// The function whose entry reports a context enter.
pub const ENTER_FUNCTION: &str = "PyContext_Enter";

/// A Python interpreter found in a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interpreter {
    /// The executable or shared library holding the interpreter, as a path
    /// the agent can open (through the process's root).
    pub object: PathBuf,
    /// (major, minor, micro).
    pub version: (u8, u8, u8),
    /// What the kernel needs to read a thread's context.
    pub kernel: PythonProcess,
    /// File offsets of [`COPY_FUNCTION`] and [`ENTER_FUNCTION`] in
    /// `object`, where their uprobes go.
    pub copy_offset: u64,
    /// See `copy_offset`.
    pub enter_offset: u64,
}

/// When process `pid` started (clock ticks after boot, from its stat), to
/// tell it from a later process given the same pid.
pub fn start_time(proc_root: &Path, pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from
    // the last ')'. starttime is field 22, the 20th after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// How long ago process `pid` started, from its start time and the
/// system's uptime; None if either cannot be read.
pub fn age(proc_root: &Path, pid: u32) -> Option<std::time::Duration> {
    let started_ticks = start_time(proc_root, pid)?;
    let uptime = std::fs::read_to_string(proc_root.join("uptime")).ok()?;
    let uptime_secs: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let age = uptime_secs - started_ticks as f64 / ticks_per_sec;
    Some(std::time::Duration::from_secs_f64(age.max(0.0)))
}

/// Why a process's interpreter is not watched.
#[derive(Debug, PartialEq, Eq)]
pub enum NotWatched {
    /// The process has no Python interpreter mapped.
    NotPython,
    /// The process exited, or its memory map is not visible to the agent.
    Gone,
    /// The interpreter's version has no known layout.
    UnsupportedVersion(u8, u8),
    /// A free-threaded build (no GIL), whose structures differ.
    FreeThreaded,
    /// The interpreter lacks an exported symbol the watch needs.
    MissingSymbol(&'static str),
    /// Reading the process or its interpreter failed.
    Unreadable(String),
    /// The layout did not match the live process (its thread list did not
    /// lead to its threads).
    LayoutMismatch,
}

impl std::fmt::Display for NotWatched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotPython => write!(f, "not a Python process"),
            Self::Gone => write!(f, "the process exited or is not visible"),
            Self::UnsupportedVersion(major, minor) => {
                write!(f, "Python {major}.{minor} has no known layout")
            }
            Self::FreeThreaded => write!(f, "free-threaded Python builds are not supported"),
            Self::MissingSymbol(name) => write!(f, "the interpreter does not export {name}"),
            Self::Unreadable(why) => write!(f, "unreadable: {why}"),
            Self::LayoutMismatch => write!(f, "the interpreter's thread list did not check out"),
        }
    }
}

/// The mapped files that may hold a Python interpreter in `maps`, with the
/// start of their mapping at file offset 0: `libpython3.x` first (an
/// executable that links it is only a launcher), then `python3.x`.
fn interpreter_mappings(maps: &str) -> Vec<(&str, u64)> {
    let mut found: Vec<(&str, u64)> = maps
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let _perms = fields.next()?;
            let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
            let _dev = fields.next()?;
            let _inode = fields.next()?;
            let path = fields.next()?;
            let name = path.rsplit('/').next()?;
            let python = name.starts_with("libpython3.") || name.starts_with("python3.");
            if !python || offset != 0 {
                return None;
            }
            let start = u64::from_str_radix(range.split('-').next()?, 16).ok()?;
            Some((path, start))
        })
        .collect();
    found.dedup_by_key(|(path, _)| *path);
    found.sort_by_key(|(path, _)| {
        !path
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with("lib"))
    });
    found
}

/// Whether an interpreter's file name is a free-threaded build's
/// (`python3.13t`, `libpython3.13t.so`).
fn is_free_threaded(name: &str) -> bool {
    let after = name
        .trim_start_matches("lib")
        .trim_start_matches("python3.");
    let rest = after.trim_start_matches(|c: char| c.is_ascii_digit());
    rest.starts_with('t')
}

/// What was read of interpreter files, by (device, inode, size, mtime): a
/// node runs many processes of the same interpreter, whose file (7 MB and
/// more) is then read once.
#[derive(Default)]
pub struct InterpreterFiles {
    read: HashMap<FileKey, Result<ElfFacts, String>>,
}

/// A file's device, inode, size and modification time.
type FileKey = (u64, u64, u64, i64);

/// Files remembered at most; then the cache starts over.
const MAX_INTERPRETER_FILES: usize = 256;

impl InterpreterFiles {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn facts(&mut self, object: &Path) -> Result<&ElfFacts, NotWatched> {
        use std::os::unix::fs::MetadataExt;
        let unreadable =
            |e: std::io::Error| NotWatched::Unreadable(format!("{}: {e}", object.display()));
        let meta = std::fs::metadata(object).map_err(unreadable)?;
        let key = (meta.dev(), meta.ino(), meta.size(), meta.mtime());
        if !self.read.contains_key(&key) {
            let mut data = Vec::new();
            std::fs::File::open(object)
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(unreadable)?;
            if self.read.len() >= MAX_INTERPRETER_FILES {
                self.read.clear();
            }
            self.read.insert(key, elf_facts(&data));
        }
        match self.read.get(&key) {
            Some(Ok(facts)) => Ok(facts),
            Some(Err(e)) => Err(NotWatched::Unreadable(e.clone())),
            None => Err(NotWatched::Unreadable("interpreter file cache".into())),
        }
    }
}

/// Symbols of an ELF file and where its first loadable segment starts.
struct ElfFacts {
    symbols: HashMap<&'static str, u64>,
    /// (virtual address, file offset, size in the file) of each loadable
    /// segment.
    segments: Vec<(u64, u64, u64)>,
    /// `Py_Version`'s value, read from the file.
    version_hex: Option<u32>,
    first_load_vaddr: u64,
}

const WANTED_SYMBOLS: [&str; 4] = ["_PyRuntime", "Py_Version", COPY_FUNCTION, ENTER_FUNCTION];

fn elf_facts(data: &[u8]) -> Result<ElfFacts, String> {
    use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
    use object::{Object, ObjectSection, ObjectSymbol};
    let file = ElfFile64::<object::Endianness>::parse(data).map_err(|e| e.to_string())?;
    let mut symbols = HashMap::new();
    for symbol in file.dynamic_symbols() {
        if let Ok(name) = symbol.name()
            && let Some(wanted) = WANTED_SYMBOLS.iter().find(|w| **w == name)
        {
            symbols.insert(*wanted, symbol.address());
        }
    }
    let version_hex = symbols.get("Py_Version").and_then(|&address| {
        file.sections().find_map(|section| {
            let start = section.address();
            if address < start || address + 4 > start + section.size() {
                return None;
            }
            let bytes = section.data().ok()?;
            let at = (address - start) as usize;
            Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
        })
    });
    let endian = file.endian();
    let segments: Vec<(u64, u64, u64)> = file
        .elf_header()
        .program_headers(endian, data)
        .map_err(|e| e.to_string())?
        .iter()
        .filter(|p| p.p_type(endian) == object::elf::PT_LOAD)
        .map(|p| (p.p_vaddr(endian), p.p_offset(endian), p.p_filesz(endian)))
        .collect();
    let first_load_vaddr = segments
        .iter()
        .map(|(vaddr, _, _)| *vaddr)
        .min()
        .ok_or("no loadable segment")?;
    Ok(ElfFacts {
        symbols,
        segments,
        version_hex,
        first_load_vaddr: first_load_vaddr & !0xfff,
    })
}

impl ElfFacts {
    /// The file offset of the code at virtual address `address`.
    fn file_offset(&self, address: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|(vaddr, _, size)| address >= *vaddr && address < vaddr + size)
            .map(|(vaddr, offset, _)| address - vaddr + offset)
    }
}

/// Finds the interpreter of process `pid` and what the kernel needs to read
/// its threads' contexts, and checks it against the live process.
pub fn locate(
    proc_root: &Path,
    pid: u32,
    files: &mut InterpreterFiles,
) -> Result<Interpreter, NotWatched> {
    let dir = proc_root.join(pid.to_string());
    let maps = std::fs::read_to_string(dir.join("maps")).map_err(|e| {
        // Gone, or not ours to read (the init of another user namespace):
        // nothing to watch either way.
        if matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
        ) {
            NotWatched::Gone
        } else {
            NotWatched::Unreadable(format!("maps: {e}"))
        }
    })?;
    let candidates = interpreter_mappings(&maps);
    if candidates.is_empty() {
        return Err(NotWatched::NotPython);
    }
    let mut last_error = NotWatched::MissingSymbol("_PyRuntime");
    for (path, start) in candidates {
        match locate_in(&dir, pid, path, start, files) {
            Ok(found) => return Ok(found),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

/// [`locate`] in one mapped file (`path` as the process sees it, mapped
/// from offset 0 at `start`).
fn locate_in(
    dir: &Path,
    pid: u32,
    path: &str,
    start: u64,
    files: &mut InterpreterFiles,
) -> Result<Interpreter, NotWatched> {
    let name = path.rsplit('/').next().unwrap_or(path);
    if is_free_threaded(name) {
        return Err(NotWatched::FreeThreaded);
    }
    // Through the process's root: a container's files are not the host's.
    let object = dir.join("root").join(path.trim_start_matches('/'));
    let facts = files.facts(&object)?;
    let symbol = |name: &'static str| {
        facts
            .symbols
            .get(name)
            .copied()
            .ok_or(NotWatched::MissingSymbol(name))
    };
    let runtime = symbol("_PyRuntime")?;
    let code_offset = |name: &'static str| {
        symbol(name).and_then(|address| {
            facts
                .file_offset(address)
                .ok_or(NotWatched::MissingSymbol(name))
        })
    };
    let copy_offset = code_offset(COPY_FUNCTION)?;
    let enter_offset = code_offset(ENTER_FUNCTION)?;
    let hex = facts
        .version_hex
        .ok_or(NotWatched::MissingSymbol("Py_Version"))?;
    let version = ((hex >> 24) as u8, (hex >> 16) as u8, (hex >> 8) as u8);
    let layout = LAYOUTS
        .iter()
        .find(|(v, _)| *v == (version.0, version.1))
        .map(|(_, layout)| *layout)
        .ok_or(NotWatched::UnsupportedVersion(version.0, version.1))?;
    let bias = start.wrapping_sub(facts.first_load_vaddr);
    let kernel = PythonProcess {
        interpreters_head: bias + runtime + layout.runtime_interpreters_head,
        interpreter_threads_head: layout.interpreter_threads_head,
        thread_next: layout.thread_next,
        thread_native_id: layout.thread_native_id,
        thread_context: layout.thread_context,
    };
    check_layout(dir, pid, &kernel)?;
    Ok(Interpreter {
        object,
        version,
        kernel,
        copy_offset,
        enter_offset,
    })
}

/// The largest thread id Linux gives (`PID_MAX_LIMIT` on 64-bit).
const MAX_THREAD_ID: u64 = 4 * 1024 * 1024;

/// Follows the thread list the way the kernel will, in the live process:
/// every thread id on it must look like one, and the main thread must be on
/// it (a wrong offset reads other data and fails this).
pub fn check_layout(dir: &Path, pid: u32, kernel: &PythonProcess) -> Result<(), NotWatched> {
    let mem = std::fs::File::open(dir.join("mem"))
        .map_err(|e| NotWatched::Unreadable(format!("mem: {e}")))?;
    let read = |address: u64| -> Result<u64, NotWatched> {
        let mut bytes = [0u8; 8];
        mem.read_exact_at(&mut bytes, address)
            .map_err(|_| NotWatched::LayoutMismatch)?;
        Ok(u64::from_ne_bytes(bytes))
    };
    let interpreter = read(kernel.interpreters_head)?;
    let mut state = read(interpreter + kernel.interpreter_threads_head as u64)?;
    let mut main_found = false;
    for _ in 0..agent_common::MAX_PYTHON_THREADS {
        if state == 0 {
            return if main_found {
                Ok(())
            } else {
                Err(NotWatched::LayoutMismatch)
            };
        }
        let tid = read(state + kernel.thread_native_id as u64)?;
        // A thread state not yet bound to a thread reads 0. A thread may
        // have ended meanwhile (its state is removed just after), so only
        // the shape of a thread id is required of the others; the main
        // thread, always there, is what a wrong offset would not find.
        if tid > MAX_THREAD_ID {
            return Err(NotWatched::LayoutMismatch);
        }
        main_found |= tid == pid as u64;
        state = read(state + kernel.thread_next as u64)?;
    }
    // Longer than the kernel walks: its later threads read as unknown, and
    // the rest is still right.
    if main_found {
        Ok(())
    } else {
        Err(NotWatched::LayoutMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interpreter_mapping_is_the_python_file_at_offset_zero() {
        let maps = "\
00400000-00420000 r--p 00000000 08:01 1234 /usr/bin/python3.11
00420000-00700000 r-xp 00020000 08:01 1234 /usr/bin/python3.11
7f0000000000-7f0000001000 r--p 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
";
        assert_eq!(
            interpreter_mappings(maps),
            vec![("/usr/bin/python3.11", 0x400000)]
        );
        let shared = "\
55d000000000-55d000001000 r--p 00000000 08:01 5 /root/.pyenv/versions/3.11.7/bin/python3.11
7f1000000000-7f1000100000 r--p 00000000 08:01 6 /root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0
";
        // The launcher linking libpython has no _PyRuntime of its own: the
        // library is tried first.
        assert_eq!(
            interpreter_mappings(shared),
            vec![
                (
                    "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0",
                    0x7f1000000000
                ),
                (
                    "/root/.pyenv/versions/3.11.7/bin/python3.11",
                    0x55d000000000
                )
            ]
        );
        assert!(interpreter_mappings("7f00-7f01 r--p 00000000 08:01 5 /usr/bin/node\n").is_empty());
    }

    #[test]
    fn start_time_is_read_after_the_command_name() {
        let me = std::process::id();
        let first = start_time(Path::new("/proc"), me).expect("own stat");
        assert!(first > 0);
        assert_eq!(start_time(Path::new("/proc"), me), Some(first));
        assert_eq!(start_time(Path::new("/nonexistent"), me), None);
    }

    #[test]
    fn free_threaded_builds_are_recognised_by_name() {
        assert!(is_free_threaded("python3.13t"));
        assert!(is_free_threaded("libpython3.13t.so.1.0"));
        assert!(!is_free_threaded("python3.13"));
        assert!(!is_free_threaded("libpython3.11.so.1.0"));
    }

    #[test]
    fn a_process_that_is_not_python_is_not_watched() {
        let me = std::process::id();
        assert_eq!(
            locate(Path::new("/proc"), me, &mut InterpreterFiles::new()),
            Err(NotWatched::NotPython),
            "the test binary is not a Python interpreter"
        );
    }
}
