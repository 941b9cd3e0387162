//! `cargo xtask image`: the agent's OCI image, built FROM scratch with
//! podman (no registry can be reached here, and none is needed): the
//! release binary, the iptables programs the proxy runs (both back ends,
//! nft and legacy: a node may use either), their xtables extensions, and
//! the shared libraries all of them load, copied from this Debian machine.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{command_output, run};

/// The image's name; the tag is the workspace version.
pub const IMAGE_NAME: &str = "localhost/tracing-agent";

/// podman's options on this machine kind (../shared/notes/environment.md):
/// vfs storage, runc (crun fails where cgroup v1 and v2 are mixed),
/// cgroupfs, events to a file. Passed on every call rather than written to
/// /etc/containers, so the machine's own configuration is left alone.
pub const PODMAN_OPTIONS: &[&str] = &[
    "--storage-driver=vfs",
    "--runtime=runc",
    "--cgroup-manager=cgroupfs",
    "--events-backend=file",
];

/// Where the image's root file system is assembled.
const ROOTFS: &str = "target/image/rootfs";

/// The xtables multi-call programs and the names the agent runs them by.
const IPTABLES: &[(&str, &[&str])] = &[
    (
        "/usr/sbin/xtables-nft-multi",
        &[
            // Debian's default alternative: `iptables` is the nft back end.
            "iptables",
            "iptables-save",
            "iptables-restore",
            "ip6tables",
            "ip6tables-save",
            "ip6tables-restore",
            "iptables-nft",
            "iptables-nft-save",
            "iptables-nft-restore",
            "ip6tables-nft",
            "ip6tables-nft-save",
            "ip6tables-nft-restore",
        ],
    ),
    (
        "/usr/sbin/xtables-legacy-multi",
        &[
            "iptables-legacy",
            "iptables-legacy-save",
            "iptables-legacy-restore",
            "ip6tables-legacy",
            "ip6tables-legacy-save",
            "ip6tables-legacy-restore",
        ],
    ),
];

/// iptables' extensions (dlopened by name at run time).
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// The image's reference, `localhost/tracing-agent:<version>`.
pub fn reference() -> String {
    format!("{IMAGE_NAME}:{}", env!("CARGO_PKG_VERSION"))
}

/// Builds the agent and the image; returns its reference.
pub fn build() -> Result<String> {
    crate::build_agent()?;
    let root = crate::workspace_root();
    let rootfs = root.join(ROOTFS);
    let _ = fs::remove_dir_all(&rootfs);
    for dir in [
        "usr/bin", "usr/sbin", "etc", "run", "tmp", "proc", "sys", "dev",
    ] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    let mut elves: Vec<PathBuf> = vec![root.join("target/release/agent")];
    copy_file(
        &root.join("target/release/agent"),
        &rootfs.join("usr/bin/agent"),
    )?;
    for (program, names) in IPTABLES {
        copy_file(
            Path::new(program),
            &rootfs.join(program.trim_start_matches('/')),
        )?;
        elves.push(PathBuf::from(program));
        let file_name = Path::new(program)
            .file_name()
            .context("program without a name")?;
        for name in *names {
            symlink(file_name, rootfs.join("usr/sbin").join(name))?;
        }
    }
    for entry in fs::read_dir(XTABLES_DIR).with_context(|| format!("reading {XTABLES_DIR}"))? {
        let path = entry?.path();
        copy_file(&path, &rootfs.join(path.strip_prefix("/")?))?;
        elves.push(path);
    }
    for library in shared_libraries(&elves)? {
        copy_file(&library, &rootfs.join(library.strip_prefix("/")?))?;
    }
    // The loader's cache for the copied libraries.
    run(Command::new("ldconfig").arg("-r").arg(&rootfs))?;
    fs::write(
        root.join("target/image/Containerfile"),
        format!(
            "FROM scratch\nCOPY rootfs/ /\nENV PATH=/usr/sbin:/usr/bin\n\
             LABEL org.opencontainers.image.title=tracing-agent \
             org.opencontainers.image.version={}\n\
             ENTRYPOINT [\"/usr/bin/agent\"]\nCMD [\"run\"]\n",
            env!("CARGO_PKG_VERSION")
        ),
    )?;
    let reference = reference();
    run(Command::new("podman")
        .args(PODMAN_OPTIONS)
        .args(["build", "--quiet", "--tag", &reference, "--file"])
        .arg(root.join("target/image/Containerfile"))
        .arg(root.join("target/image")))?;
    println!("image: {reference}");
    Ok(reference)
}

/// Copies a file, its permissions included (following symlinks: the image
/// holds the file itself).
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

/// The shared libraries `elves` load, by absolute path, with the dynamic
/// loader itself: what `ldd` resolves on this machine.
fn shared_libraries(elves: &[PathBuf]) -> Result<BTreeSet<PathBuf>> {
    let mut libraries = BTreeSet::new();
    for elf in elves {
        let output = command_output(Command::new("ldd").arg(elf))
            .with_context(|| format!("ldd {}", elf.display()))?;
        for line in output.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)".
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(path) = path.filter(|p| p.starts_with('/')) {
                libraries.insert(PathBuf::from(path));
            } else if line.contains("not found") {
                bail!("{}: {line}", elf.display());
            }
        }
    }
    Ok(libraries)
}
