//! How a process serves requests, as far as the agent can tell from outside:
//! whether "the thread that read an inbound request and has not answered it
//! yet" is an exact parent for the calls that thread makes.
//!
//! It is exact for thread-per-request servers (python's ThreadingHTTPServer,
//! gunicorn sync workers, blocking Tomcat, Puma, PHP-FPM) and wrong for
//! runtimes that run many requests on one thread (event loops: Node.js,
//! Python asyncio, nginx) or move them between threads (Go's goroutines): a
//! call made there belongs to whichever task made it, which the thread does
//! not say, even at concurrency 1 (a background task would be taken for the
//! request in flight). See docs/architecture.md, "How a call finds its
//! parent".

use std::io::Read;
use std::path::Path;

/// What is known of a process's runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// Nothing says the process multiplexes requests on a thread: the
    /// thread signal holds as long as no thread is seen serving two
    /// requests at once (see [`crate::correlate`]).
    Threads,
    /// Many requests per thread, or requests moving between threads.
    Multiplexing(Multiplexer),
    /// /proc could not be read (the process is gone, or not visible).
    Unknown,
}

/// The multiplexing runtimes the agent recognizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Multiplexer {
    /// Node.js, Deno, Bun (libuv or their own loop).
    JavaScript,
    /// A Python interpreter with asyncio loaded (the plain event loop).
    PythonAsyncio,
    /// A Python interpreter with uvloop loaded (libuv's loop, which enters
    /// each callback's context through `PyContext_Enter`).
    PythonUvloop,
    /// nginx, haproxy, envoy: event-driven proxies.
    EventDrivenServer,
    /// A Go binary: goroutines on an M:N scheduler.
    Go,
}

impl Multiplexer {
    /// The name in the span attribute that says why a call got no parent.
    pub fn name(self) -> &'static str {
        match self {
            Multiplexer::JavaScript => "javascript",
            Multiplexer::PythonAsyncio => "python-asyncio",
            Multiplexer::PythonUvloop => "python-uvloop",
            Multiplexer::EventDrivenServer => "event-driven-server",
            Multiplexer::Go => "go",
        }
    }
}

/// Executables known to be event loops, by file name.
const EVENT_LOOP_EXECUTABLES: &[(&str, Multiplexer)] = &[
    ("node", Multiplexer::JavaScript),
    ("nodejs", Multiplexer::JavaScript),
    ("deno", Multiplexer::JavaScript),
    ("bun", Multiplexer::JavaScript),
    ("nginx", Multiplexer::EventDrivenServer),
    ("haproxy", Multiplexer::EventDrivenServer),
    ("envoy", Multiplexer::EventDrivenServer),
];

/// Shared objects whose presence in a process's mappings means an event
/// loop runs there: uvloop's loop (checked first: it loads asyncio too) and
/// CPython's asyncio accelerator.
const EVENT_LOOP_LIBRARIES: &[(&str, Multiplexer)] = &[
    ("/uvloop/", Multiplexer::PythonUvloop),
    ("/_asyncio.", Multiplexer::PythonAsyncio),
];

impl Multiplexer {
    /// Whether the runtime is a Python interpreter, whose contexts the
    /// capture may read.
    pub fn is_python(self) -> bool {
        matches!(self, Multiplexer::PythonAsyncio | Multiplexer::PythonUvloop)
    }
}

/// Classifies a process from what /proc shows: its executable's file name,
/// the text of its memory mappings, and whether the executable is a Go
/// binary. Plain data in, no I/O.
pub fn classify(executable_name: &str, maps: &str, is_go_binary: bool) -> Runtime {
    if is_go_binary {
        return Runtime::Multiplexing(Multiplexer::Go);
    }
    if let Some((_, kind)) = EVENT_LOOP_EXECUTABLES
        .iter()
        .find(|(name, _)| *name == executable_name)
    {
        return Runtime::Multiplexing(*kind);
    }
    if let Some((_, kind)) = EVENT_LOOP_LIBRARIES
        .iter()
        .find(|(library, _)| maps.contains(library))
    {
        return Runtime::Multiplexing(*kind);
    }
    Runtime::Threads
}

/// Reads and classifies process `pid` under `proc_root` (normally /proc).
pub fn read(proc_root: &Path, pid: u32) -> Runtime {
    let dir = proc_root.join(pid.to_string());
    let Ok(maps) = std::fs::read_to_string(dir.join("maps")) else {
        return Runtime::Unknown;
    };
    let executable = std::fs::read_link(dir.join("exe")).ok();
    let name = executable
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| {
            n.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string()
        })
        .unwrap_or_default();
    let is_go = std::fs::File::open(dir.join("exe"))
        .ok()
        .is_some_and(|mut file| is_go_elf(&mut file));
    classify(&name, &maps, is_go)
}

/// Section headers read at most when looking for Go's build information.
const MAX_SECTIONS: usize = 4096;

/// Whether an ELF file has the `.go.buildinfo` section every Go binary
/// since Go 1.13 carries (stripped ones too). Reads only the headers and
/// the section-name table.
pub fn is_go_elf(file: &mut (impl Read + std::io::Seek)) -> bool {
    go_section(file).unwrap_or(false)
}

fn go_section(file: &mut (impl Read + std::io::Seek)) -> Option<bool> {
    use std::io::SeekFrom;
    let mut header = [0u8; 64];
    file.read_exact(&mut header).ok()?;
    // 64-bit little-endian ELF only (the agent's targets).
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Some(false);
    }
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    let u64_at = |b: &[u8], at: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(v)
    };
    let section_headers = u64_at(&header, 0x28);
    let entry_size = u16_at(&header, 0x3a);
    let count = u16_at(&header, 0x3c);
    let names_index = u16_at(&header, 0x3e);
    if entry_size < 64 || count == 0 || count > MAX_SECTIONS || names_index >= count {
        return Some(false);
    }
    let mut table = vec![0u8; entry_size * count];
    file.seek(SeekFrom::Start(section_headers)).ok()?;
    file.read_exact(&mut table).ok()?;
    let names_header = &table[names_index * entry_size..];
    let names_offset = u64_at(names_header, 0x18);
    let names_size = u64_at(names_header, 0x20).min(1 << 16) as usize;
    let mut names = vec![0u8; names_size];
    file.seek(SeekFrom::Start(names_offset)).ok()?;
    file.read_exact(&mut names).ok()?;
    Some((0..count).any(|i| {
        let name_at = u32::from_le_bytes(
            table[i * entry_size..i * entry_size + 4]
                .try_into()
                .unwrap_or_default(),
        ) as usize;
        names
            .get(name_at..)
            .is_some_and(|rest| rest.starts_with(b".go.buildinfo\0"))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_loops_are_known_by_executable_or_loaded_library() {
        assert_eq!(classify("python3.11", "", false), Runtime::Threads);
        assert_eq!(
            classify(
                "python3.11",
                "7f00-7f10 r-xp 0 08:01 1 /usr/lib/python3.11/lib-dynload/_asyncio.cpython-311-x86_64-linux-gnu.so\n",
                false
            ),
            Runtime::Multiplexing(Multiplexer::PythonAsyncio)
        );
        assert_eq!(
            classify(
                "python3",
                "7f00-7f10 r-xp 0 08:01 1 /venv/lib/python3.11/site-packages/uvloop/loop.cpython-311-x86_64-linux-gnu.so\n",
                false
            ),
            Runtime::Multiplexing(Multiplexer::PythonUvloop)
        );
        assert_eq!(
            classify("node", "", false),
            Runtime::Multiplexing(Multiplexer::JavaScript)
        );
        assert_eq!(
            classify("nginx", "", false),
            Runtime::Multiplexing(Multiplexer::EventDrivenServer)
        );
        assert_eq!(
            classify("server", "", true),
            Runtime::Multiplexing(Multiplexer::Go)
        );
        assert_eq!(classify("java", "", false), Runtime::Threads);
    }

    #[test]
    fn non_go_and_broken_files_are_not_go() {
        // This test binary is Rust, not Go.
        let mut me = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_go_elf(&mut me));
        assert!(!is_go_elf(&mut std::io::Cursor::new(
            b"#!/bin/sh\n".to_vec()
        )));
        assert!(!is_go_elf(&mut std::io::Cursor::new(Vec::new())));
        // A header claiming sections past the end of the file.
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        header[0x28..0x30].copy_from_slice(&1_000_000u64.to_le_bytes());
        header[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        header[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        assert!(!is_go_elf(&mut std::io::Cursor::new(header)));
    }

    #[test]
    fn a_minimal_elf_with_a_go_buildinfo_section_is_go() {
        assert!(is_go_elf(&mut std::io::Cursor::new(elf_with_sections(&[
            ".text",
            ".go.buildinfo"
        ]))));
        assert!(!is_go_elf(&mut std::io::Cursor::new(elf_with_sections(&[
            ".text", ".data"
        ]))));
    }

    /// An ELF64 file holding only a section-name table and one section
    /// header per name (plus the names table's own).
    fn elf_with_sections(names: &[&str]) -> Vec<u8> {
        let mut strtab = vec![0u8];
        let mut offsets = Vec::new();
        for name in names.iter().chain([&".shstrtab"]) {
            offsets.push(strtab.len() as u32);
            strtab.extend_from_slice(name.as_bytes());
            strtab.push(0);
        }
        let strtab_at = 64u64;
        let headers_at = strtab_at + strtab.len() as u64;
        let count = offsets.len();
        let mut file = vec![0u8; 64];
        file[..6].copy_from_slice(b"\x7fELF\x02\x01");
        file[0x28..0x30].copy_from_slice(&headers_at.to_le_bytes());
        file[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        file[0x3c..0x3e].copy_from_slice(&(count as u16).to_le_bytes());
        file[0x3e..0x40].copy_from_slice(&((count - 1) as u16).to_le_bytes());
        file.extend_from_slice(&strtab);
        for (i, name_at) in offsets.iter().enumerate() {
            let mut header = [0u8; 64];
            header[..4].copy_from_slice(&name_at.to_le_bytes());
            if i == count - 1 {
                header[0x18..0x20].copy_from_slice(&strtab_at.to_le_bytes());
                header[0x20..0x28].copy_from_slice(&(strtab.len() as u64).to_le_bytes());
            }
            file.extend_from_slice(&header);
        }
        file
    }
}
