//! Building the guest's root filesystem (an initramfs) from host files.
//!
//! It comes in three concatenated archives so that only the small part
//! changes between runs:
//! 1. the base: busybox, the programs `xtask/src/tools.rs` marks for the
//!    guest (python, curl, wrk, nginx, iproute2, iptables) and their
//!    libraries; cached, rebuilt when host packages or this file change;
//! 2. the kernel's modules (see `kernel.rs`), cached per kernel;
//! 3. the tests: `/init`, the test binaries and their extra libraries.
//!
//! The guest mirrors Debian's merged /usr (/bin, /sbin, /lib, /lib64 link to
//! their /usr counterparts), so every path `ldd` prints resolves as on the
//! host whichever spelling it uses.

use std::collections::HashSet;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{cpio, output};

/// The guest's PID 1; see the script for what it does.
const INIT_SCRIPT: &str = include_str!("../../assets/vm/init.sh");

/// This file's source: part of the base archive's cache key, so that any
/// change to how the base is staged rebuilds it.
const THIS_SOURCE: &str = include_str!("initramfs.rs");

/// The guest's shell and basic tools (package busybox-static in
/// `xtask/src/tools.rs`; not Debian's dynamically linked busybox).
const BUSYBOX: &str = "/usr/bin/busybox";

/// Top-level directories that are links into /usr, as on Debian 12.
const MERGED_USR: &[&str] = &["bin", "sbin", "lib", "lib64"];

/// Returns the base archive, rebuilding it under `dir` if it is missing or
/// stale. The staged tree is kept in `dir/root` so that the tests archive can
/// skip libraries the base already has.
pub fn base_archive(dir: &Path) -> Result<Base> {
    let base = Base {
        archive: dir.join("base.cpio"),
        root: dir.join("root"),
    };
    let key = base_cache_key()?;
    let stamp = dir.join("stamp");
    if base.archive.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == key) {
        return Ok(base);
    }
    println!("vm-test: building the base initramfs in {}", dir.display());
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let mut stage = Stage::new(&base.root, None)?;
    stage_base(&mut stage).context("staging the base initramfs")?;
    cpio::write_archive(&base.root, &base.archive)?;
    fs::write(&stamp, key).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(base)
}

/// The cached base part of the initramfs.
pub struct Base {
    /// The cpio archive.
    pub archive: PathBuf,
    /// The tree it was made from.
    pub root: PathBuf,
}

/// Debian records every package installation in /var/lib/dpkg/status, so its
/// size and mtime change whenever a program or library copied into the base
/// may have changed.
fn base_cache_key() -> Result<String> {
    let status = Path::new("/var/lib/dpkg/status");
    let meta = fs::metadata(status).with_context(|| format!("reading {}", status.display()))?;
    let mut hasher = DefaultHasher::new();
    THIS_SOURCE.hash(&mut hasher);
    meta.len().hash(&mut hasher);
    meta.modified().ok().hash(&mut hasher);
    Ok(format!("{:016x}", hasher.finish()))
}

/// Builds the archive holding `/init` and the test binaries, named by their
/// file names under /tests and run in the order given (listed in
/// /tests/order). Returns the archive path.
pub fn tests_archive(dir: &Path, binaries: &[(String, PathBuf)], base: &Base) -> Result<PathBuf> {
    let root = dir.join("tests-root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    let mut stage = Stage::new(&root, Some(&base.root))?;
    stage.add_text("/init", INIT_SCRIPT, 0o755)?;
    let mut order = String::new();
    for (name, binary) in binaries {
        let guest = Path::new("/tests").join(name);
        stage
            .add_program_as(binary, &guest)
            .with_context(|| format!("adding test binary {}", binary.display()))?;
        // Debug builds carry ~100 MB of DWARF each, and the guest unpacks
        // the initramfs into its RAM. Panic locations and symbols remain.
        let copied = root.join(guest.strip_prefix("/").unwrap_or(&guest));
        super::run(Command::new("strip").arg("--strip-debug").arg(&copied))
            .with_context(|| format!("stripping {}", copied.display()))?;
        order.push_str(name);
        order.push('\n');
    }
    stage.add_text("/tests/order", &order, 0o644)?;
    let archive = dir.join("tests.cpio");
    cpio::write_archive(&root, &archive)?;
    Ok(archive)
}

fn stage_base(stage: &mut Stage) -> Result<()> {
    for dir in MERGED_USR {
        stage.add_dir(&Path::new("/usr").join(dir))?;
        stage.add_symlink(Path::new(dir), &format!("usr/{dir}"))?;
    }
    for dir in [
        "/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/etc", "/mnt",
    ] {
        stage.add_dir(Path::new(dir))?;
    }
    // The programs the tests run, from the one list setup installs.
    for program in crate::tools::guest_programs() {
        stage
            .add_program(Path::new(program))
            .with_context(|| format!("adding {program} (run `cargo xtask setup`)"))?;
    }
    stage_python_stdlib(stage)?;
    stage_test_venv(stage)?;
    stage_nginx_files(stage)?;
    stage_iptables_plugins(stage)?;
    stage_etc(stage)?;
    // Last, so that the real programs above win over same-named applets.
    stage_busybox(stage)
}

fn stage_busybox(stage: &mut Stage) -> Result<()> {
    let busybox = Path::new(BUSYBOX);
    stage.add_file(busybox, Path::new("/usr/bin/busybox"))?;
    let applets = output(Command::new(busybox).arg("--list-full"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let guest = Path::new("/").join(applet);
        if !stage.exists(&guest) {
            stage.add_symlink(&guest, "/usr/bin/busybox")?;
        }
    }
    Ok(())
}

/// The standard library of Debian's python3 (whose interpreter is a guest
/// program; not whatever `python3` is first on PATH, e.g. pyenv's), pruned
/// of what tests never import.
fn stage_python_stdlib(stage: &mut Stage) -> Result<()> {
    let link = Path::new("/usr/bin/python3");
    let target = fs::read_link(link).with_context(|| format!("reading link {}", link.display()))?;
    let version = target
        .file_name()
        .and_then(|name| name.to_str())
        .filter(|name| name.starts_with("python3."))
        .with_context(|| {
            format!(
                "{} points at unexpected {}",
                link.display(),
                target.display()
            )
        })?
        .to_owned();

    let stdlib = Path::new("/usr/lib").join(&version);
    stage.add_tree(&stdlib, &|name, is_dir| {
        if is_dir {
            !matches!(
                name,
                "test"
                    | "tests"
                    | "idle_test"
                    | "idlelib"
                    | "tkinter"
                    | "turtledemo"
                    | "ensurepip"
                    | "lib2to3"
                    | "pydoc_data"
                    | "__pycache__"
                    | "site-packages"
                    | "dist-packages"
                    | "lib-dynload"
            ) && !name.starts_with("config-")
        } else {
            !name.ends_with(".pyc") && !name.ends_with(".exe")
        }
    })?;

    // Extension modules need their shared libraries too. The test-only
    // modules are left out, and a module whose libraries are missing on the
    // host is skipped rather than failing the build.
    let dynload = stdlib.join("lib-dynload");
    for entry in fs::read_dir(&dynload).with_context(|| format!("reading {}", dynload.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let test_only = ["_test", "_ctypes_test", "xx", "_xx"]
            .iter()
            .any(|prefix| name.starts_with(prefix));
        if test_only || !name.ends_with(".so") {
            continue;
        }
        if let Err(err) = stage.add_program(&path) {
            println!("vm-test: warning: leaving out python module {name}: {err:#}");
        }
    }
    Ok(())
}

/// The tests' Python venv (FastAPI, uvicorn, uvloop, aiohttp, httpx),
/// without the installer and caches; its interpreter stays a link to
/// Debian's, as on the host.
fn stage_test_venv(stage: &mut Stage) -> Result<()> {
    if let Some(problem) = crate::setup::test_venv_problem() {
        bail!("the tests' Python venv is not usable ({problem}): run `cargo xtask setup`");
    }
    let venv = Path::new(crate::setup::TEST_VENV);
    stage.add_tree(venv, &|name, is_dir| {
        if is_dir {
            !matches!(
                name,
                "bin" | "pip" | "setuptools" | "pkg_resources" | "_distutils_hack" | "__pycache__"
            )
        } else {
            // The .pth that imports setuptools' _distutils_hack, left out.
            !name.ends_with(".pyc") && name != "distutils-precedence.pth"
        }
    })?;
    // Extension modules need their shared libraries too.
    for module in files_under(&venv.join("lib"), ".so")? {
        stage.add_libraries_of(&module)?;
    }
    let python = Path::new(crate::setup::TEST_VENV_PYTHON);
    // The interpreter it links to (through bin/python3.11), Debian's.
    let interpreter =
        fs::canonicalize(python).with_context(|| format!("resolving {}", python.display()))?;
    stage.add_dir(&venv.join("bin"))?;
    stage.add_symlink(python, &interpreter.to_string_lossy())?;
    stage.add_program(&interpreter)
}

/// The files under `dir` (recursively) whose names end with `suffix`.
fn files_under(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let meta = fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() && path.to_string_lossy().ends_with(suffix) {
                found.push(path);
            }
        }
    }
    Ok(found)
}

/// nginx's configuration, default site and dynamic modules.
fn stage_nginx_files(stage: &mut Stage) -> Result<()> {
    let everything = |_: &str, _: bool| true;
    for dir in ["/etc/nginx", "/usr/share/nginx", "/var/www/html"] {
        if Path::new(dir).is_dir() {
            stage.add_tree(Path::new(dir), &everything)?;
        }
    }
    // Dynamic modules that /etc/nginx/modules-enabled may load.
    let modules = Path::new("/usr/lib/nginx/modules");
    if modules.is_dir() {
        for entry in
            fs::read_dir(modules).with_context(|| format!("reading {}", modules.display()))?
        {
            stage.add_program(&entry?.path())?;
        }
    }
    // Compiled-in temp and log paths (`nginx -V`).
    for dir in ["/var/lib/nginx", "/var/log/nginx"] {
        stage.add_dir(Path::new(dir))?;
    }
    Ok(())
}

/// The extensions iptables loads (its programs are links, through
/// /etc/alternatives, to one multi-call binary that dispatches on its name,
/// and are guest programs).
fn stage_iptables_plugins(stage: &mut Stage) -> Result<()> {
    let plugins = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    if plugins.is_dir() {
        for entry in
            fs::read_dir(plugins).with_context(|| format!("reading {}", plugins.display()))?
        {
            stage.add_program(&entry?.path())?;
        }
    }
    Ok(())
}

fn stage_etc(stage: &mut Stage) -> Result<()> {
    stage.add_text(
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\n\
         www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        0o644,
    )?;
    stage.add_text(
        "/etc/group",
        "root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n",
        0o644,
    )?;
    stage.add_text(
        "/etc/hosts",
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    // No DNS in the guest: resolve from /etc/hosts only.
    stage.add_text(
        "/etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files\n",
        0o644,
    )?;
    // Port, protocol and ethertype names for python, curl and iptables.
    for file in ["/etc/services", "/etc/protocols", "/etc/ethertypes"] {
        if Path::new(file).is_file() {
            stage.add_file(Path::new(file), Path::new(file))?;
        }
    }
    Ok(())
}

/// A directory being filled with the guest's files. Guest paths are
/// absolute; see [`Stage::local`] for where they land.
struct Stage {
    root: PathBuf,
    /// Libraries already present in an earlier archive need not be repeated.
    earlier: Option<PathBuf>,
    libraries: HashSet<PathBuf>,
}

impl Stage {
    fn new(root: &Path, earlier: Option<&Path>) -> Result<Self> {
        fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
            earlier: earlier.map(Path::to_path_buf),
            libraries: HashSet::new(),
        })
    }

    /// Where guest path `guest` lives under a staging root: /bin/x goes to
    /// usr/bin/x because /bin is a link to usr/bin in the guest. Only the
    /// first component is mapped; deeper links are not expected.
    fn relative(guest: &Path) -> PathBuf {
        let mut parts = guest
            .components()
            .filter(|c| matches!(c, Component::Normal(_)));
        let mut out = PathBuf::new();
        if let Some(first) = parts.next() {
            let first = first.as_os_str();
            if MERGED_USR.iter().any(|dir| first == *dir) {
                out.push("usr");
            }
            out.push(first);
        }
        out.extend(parts);
        out
    }

    fn local(&self, guest: &Path) -> PathBuf {
        self.root.join(Self::relative(guest))
    }

    fn exists(&self, guest: &Path) -> bool {
        self.local(guest).symlink_metadata().is_ok()
    }

    fn add_dir(&self, guest: &Path) -> Result<()> {
        let local = self.local(guest);
        fs::create_dir_all(&local).with_context(|| format!("creating {}", local.display()))
    }

    fn parent_of(&self, guest: &Path) -> Result<PathBuf> {
        let local = self.local(guest);
        if let Some(parent) = local.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        Ok(local)
    }

    /// Creates the link `guest` pointing at `target`. Relative links are
    /// staged verbatim (e.g. the top-level `bin -> usr/bin`).
    fn add_symlink(&self, guest: &Path, target: &str) -> Result<()> {
        let local = if guest.is_absolute() {
            self.parent_of(guest)?
        } else {
            self.root.join(guest)
        };
        if local.symlink_metadata().is_ok() {
            fs::remove_file(&local).with_context(|| format!("replacing {}", local.display()))?;
        }
        symlink(target, &local).with_context(|| format!("linking {}", local.display()))
    }

    fn add_text(&self, guest: &str, text: &str, mode: u32) -> Result<()> {
        let local = self.parent_of(Path::new(guest))?;
        fs::write(&local, text).with_context(|| format!("writing {}", local.display()))?;
        fs::set_permissions(&local, fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", local.display()))
    }

    /// Copies host file `host` (following links) to `guest`, keeping its mode.
    fn add_file(&self, host: &Path, guest: &Path) -> Result<()> {
        let local = self.parent_of(guest)?;
        fs::copy(host, &local)
            .map(drop)
            .with_context(|| format!("copying {} to {}", host.display(), local.display()))
    }

    /// Copies an executable or shared object and the libraries it loads to
    /// the same path in the guest. A link (e.g. iptables ->
    /// /etc/alternatives/iptables -> xtables-nft-multi) is reproduced as a
    /// link to the real file, so that multi-call binaries see their name.
    fn add_program(&mut self, host: &Path) -> Result<()> {
        let real =
            fs::canonicalize(host).with_context(|| format!("resolving {}", host.display()))?;
        // On a merged-/usr host /sbin/ip resolves to /usr/sbin/ip, which is
        // the same file in the guest too: no link then.
        if Self::relative(&real) != Self::relative(host) {
            let target = real
                .to_str()
                .with_context(|| format!("non-UTF-8 path {}", real.display()))?;
            self.add_symlink(host, target)?;
        }
        if !self.exists(&real) {
            self.add_program_as(&real, &real)?;
        }
        Ok(())
    }

    /// Copies `host` to `guest` and the libraries `host` loads.
    fn add_program_as(&mut self, host: &Path, guest: &Path) -> Result<()> {
        self.add_file(host, guest)?;
        self.add_libraries_of(host)
    }

    fn add_libraries_of(&mut self, host: &Path) -> Result<()> {
        for library in shared_libraries(host)? {
            if !self.libraries.insert(library.clone()) {
                continue;
            }
            let in_earlier = self
                .earlier
                .as_ref()
                .is_some_and(|earlier| earlier.join(Self::relative(&library)).exists());
            if !in_earlier {
                self.add_file(&library, &library)?;
            }
        }
        Ok(())
    }

    /// Copies the tree `host` to the same place in the guest, following links
    /// to files and leaving out links to directories, broken links and
    /// whatever `keep(name, is_dir)` rejects.
    fn add_tree(&self, host: &Path, keep: &dyn Fn(&str, bool) -> bool) -> Result<()> {
        self.add_dir(host)?;
        let entries = fs::read_dir(host).with_context(|| format!("reading {}", host.display()))?;
        for entry in entries {
            let path = entry
                .with_context(|| format!("reading {}", host.display()))?
                .path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let own = fs::symlink_metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            if own.is_dir() {
                if keep(name, true) {
                    self.add_tree(&path, keep)?;
                }
            } else if fs::metadata(&path).is_ok_and(|m| m.is_file()) && keep(name, false) {
                self.add_file(&path, &path)?;
            }
        }
        Ok(())
    }
}

/// The shared libraries (including the dynamic loader) `binary` loads, as
/// `ldd` reports them. Static binaries have none.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}{}",
            binary.display(),
            stdout.trim(),
            stderr.trim()
        );
    }
    parse_ldd(&stdout).with_context(|| format!("in the libraries of {}", binary.display()))
}

/// Parses `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x..)`
/// and `/lib64/ld-linux-x86-64.so.2 (0x..)`; the vDSO has no file.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    bail!("library {} not found", name.trim());
                }
                target.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            out.push(PathBuf::from(path));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_lists_library_files() {
        let text = "\
\tlinux-vdso.so.1 (0x00007ffd0b5f0000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c1c9a0000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c1c7bf000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1ca1f000)
";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn merged_usr_paths() {
        assert_eq!(
            Stage::relative(Path::new("/lib64/ld.so")),
            Path::new("usr/lib64/ld.so")
        );
        assert_eq!(
            Stage::relative(Path::new("/bin/sh")),
            Path::new("usr/bin/sh")
        );
        assert_eq!(
            Stage::relative(Path::new("/usr/bin/sh")),
            Path::new("usr/bin/sh")
        );
        assert_eq!(
            Stage::relative(Path::new("/etc/hosts")),
            Path::new("etc/hosts")
        );
    }
}
