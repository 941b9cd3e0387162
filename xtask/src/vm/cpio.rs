//! Packing a directory into a gzip'd newc cpio archive, the format the
//! kernel unpacks as initramfs. Such archives can be concatenated: the
//! kernel unpacks them in order, later files overwriting earlier ones.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// Archives everything under `root` (not `root` itself) into `out`, owned by
/// root whoever runs this.
pub fn write_archive(root: &Path, out: &Path) -> Result<()> {
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    // find lists directories before their contents, as the unpacker needs.
    let mut find = spawn(
        Command::new("find")
            .args([".", "-mindepth", "1"])
            .current_dir(root)
            .stdout(Stdio::piped()),
    )?;
    let find_out = find.stdout.take().context("find has no stdout")?;
    let mut cpio = spawn(
        Command::new("cpio")
            .args(["--create", "--format=newc", "--owner=0:0", "--quiet"])
            .current_dir(root)
            .stdin(find_out)
            .stdout(Stdio::piped()),
    )?;
    let cpio_out = cpio.stdout.take().context("cpio has no stdout")?;
    // Fast compression: the archive is rebuilt on every run, and level 1
    // costs little in size over the default here.
    let mut gzip = spawn(
        Command::new("gzip")
            .args(["-1", "-n"])
            .stdin(cpio_out)
            .stdout(file),
    )?;
    for (name, child) in [
        ("find", &mut find),
        ("cpio", &mut cpio),
        ("gzip", &mut gzip),
    ] {
        let status = child
            .wait()
            .with_context(|| format!("waiting for {name}"))?;
        if !status.success() {
            bail!(
                "{name} failed ({status}) while archiving {} into {}",
                root.display(),
                out.display()
            );
        }
    }
    Ok(())
}

fn spawn(command: &mut Command) -> Result<Child> {
    command
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))
}
