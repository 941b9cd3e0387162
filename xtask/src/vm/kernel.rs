//! Fetching Debian kernels: the newest image package of a series, extracted
//! once into a cache directory together with the modules the tests may load.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{cpio, output, run};

/// Bump when the cached layout or the module selection changes, so that
/// existing caches are rebuilt.
const CACHE_VERSION: &str = "vm-kernel-cache 3";

/// Name of the file that marks a cache directory as complete.
const STAMP: &str = "complete";

/// A kernel ready to boot.
#[derive(Debug)]
pub struct Kernel {
    /// `uname -r`, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// The bzImage qemu boots.
    pub vmlinuz: PathBuf,
    /// cpio archive with `/lib/modules/<release>`, to append to the initramfs.
    pub modules_archive: PathBuf,
}

/// A kernel image package found in the apt cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    /// Debian package name, e.g. `linux-image-6.12.117+deb12-amd64`.
    pub name: String,
    /// `uname -r` of the kernel it contains, e.g. `6.12.117+deb12-amd64`.
    pub release: String,
}

/// Returns the newest Debian kernel of `series` (e.g. "6.1"), downloading
/// and extracting it into `cache_dir` unless an earlier run did.
pub fn fetch(series: &str, cache_dir: &Path) -> Result<Kernel> {
    let package = match find_package(series)? {
        Some(package) => package,
        None => {
            if let Some(kernel) = newest_cached(series, cache_dir)? {
                return Ok(kernel);
            }
            println!("vm-test: apt knows no {series} kernel package; running apt-get update");
            update_package_lists()?;
            find_package_or_fail(series)?
        }
    };
    match ensure_cached(&package, cache_dir) {
        Ok(kernel) => Ok(kernel),
        Err(err) => {
            // The mirror drops superseded kernels before old package lists
            // forget them: a failed download usually means stale lists.
            println!("vm-test: {err:#}; running apt-get update and retrying");
            update_package_lists()?;
            ensure_cached(&find_package_or_fail(series)?, cache_dir)
        }
    }
}

fn ensure_cached(package: &KernelPackage, cache_dir: &Path) -> Result<Kernel> {
    let dir = cache_dir.join(&package.release);
    if !is_complete(&dir) {
        println!("vm-test: fetching {} into {}", package.name, dir.display());
        build_cache(package, &dir)
            .with_context(|| format!("preparing kernel package {}", package.name))?;
    }
    Ok(cached_kernel(&dir, &package.release))
}

fn update_package_lists() -> Result<()> {
    run(Command::new("apt-get").arg("update"))
}

fn find_package_or_fail(series: &str) -> Result<KernelPackage> {
    find_package(series)?
        .with_context(|| format!("apt knows no amd64 kernel image package of series {series}"))
}

fn find_package(series: &str) -> Result<Option<KernelPackage>> {
    let pattern = format!("^linux-image-{}", series.replace('.', r"\."));
    let listing = output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
    let names = listing
        .lines()
        .filter_map(|line| line.split_whitespace().next());
    Ok(pick_package(series, names))
}

/// Picks the package to use among Debian kernel image package `names`: the
/// newest generic (`-amd64`) build of `series`, else the newest cloud build.
/// Debug-symbol, real-time and meta packages never qualify. Between the
/// signed and `-unsigned` packages of one kernel (the same kernel for qemu)
/// the signed one wins, as the one Debian installs.
pub fn pick_package<'a>(
    series: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Option<KernelPackage> {
    let mut best: Option<(Flavour, bool, &str, &str)> = None;
    for name in names {
        let Some(rest) = name.strip_prefix("linux-image-") else {
            continue;
        };
        let Some(after_series) = rest.strip_prefix(series) else {
            continue;
        };
        // "6.1" must not match "6.12.x", nor the ABI-less "6.12-amd64"
        // meta-package: the series must be followed by "." or "-" and a digit.
        let mut chars = after_series.chars();
        let (Some('.' | '-'), Some(digit)) = (chars.next(), chars.next()) else {
            continue;
        };
        if !digit.is_ascii_digit() {
            continue;
        }
        let (release, unsigned) = match rest.strip_suffix("-unsigned") {
            Some(release) => (release, true),
            None => (rest, false),
        };
        let flavour = if release.ends_with("-cloud-amd64") {
            Flavour::Cloud
        } else if release.ends_with("-amd64") && !release.ends_with("-rt-amd64") {
            Flavour::Generic
        } else {
            continue;
        };
        let better = match best {
            None => true,
            Some((best_flavour, best_unsigned, _, best_release)) => flavour
                .cmp(&best_flavour)
                .then_with(|| natural_cmp(best_release, release))
                .then_with(|| unsigned.cmp(&best_unsigned))
                .is_lt(),
        };
        if better {
            best = Some((flavour, unsigned, name, release));
        }
    }
    best.map(|(_, _, name, release)| KernelPackage {
        name: name.to_owned(),
        release: release.to_owned(),
    })
}

/// Kernel flavours in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Flavour {
    Generic,
    Cloud,
}

/// Compares version-like strings with digit runs taken as numbers, so that
/// `6.12.117` sorts after `6.12.99`.
fn natural_cmp(mut a: &str, mut b: &str) -> Ordering {
    fn split_number(s: &str) -> (&str, &str) {
        s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()))
    }
    loop {
        let order = match (a.chars().next(), b.chars().next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let (x, rest_a) = split_number(a);
                let (y, rest_b) = split_number(b);
                (a, b) = (rest_a, rest_b);
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            (Some(x), Some(y)) => {
                (a, b) = (&a[x.len_utf8()..], &b[y.len_utf8()..]);
                x.cmp(&y)
            }
        };
        if order.is_ne() {
            return order;
        }
    }
}

/// When apt knows no package (no lists, offline), any complete cache of the
/// series will do.
fn newest_cached(series: &str, cache_dir: &Path) -> Result<Option<Kernel>> {
    let Ok(entries) = fs::read_dir(cache_dir) else {
        return Ok(None);
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", cache_dir.display()))?;
        if is_complete(&entry.path())
            && let Some(release) = entry.file_name().to_str()
        {
            names.push(format!("linux-image-{release}"));
        }
    }
    Ok(pick_package(series, names.iter().map(String::as_str))
        .map(|package| cached_kernel(&cache_dir.join(&package.release), &package.release)))
}

fn is_complete(dir: &Path) -> bool {
    fs::read_to_string(dir.join(STAMP)).is_ok_and(|stamp| stamp == CACHE_VERSION)
}

fn cached_kernel(dir: &Path, release: &str) -> Kernel {
    Kernel {
        release: release.to_owned(),
        vmlinuz: dir.join("vmlinuz"),
        modules_archive: dir.join("modules.cpio"),
    }
}

/// Downloads and extracts `package` into `dir`, keeping only the kernel image
/// and the selected modules (the full modules tree is ~400 MB).
fn build_cache(package: &KernelPackage, dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let download = dir.join("download");
    fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    run(Command::new("apt-get")
        .args(["download", &package.name])
        .current_dir(&download))?;
    let deb = find_deb(&download)?;
    let extracted = dir.join("extracted");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted))?;

    let vmlinuz = extracted.join(format!("boot/vmlinuz-{}", package.release));
    fs::copy(&vmlinuz, dir.join("vmlinuz"))
        .with_context(|| format!("copying {}", vmlinuz.display()))?;

    let modules_root = dir.join("modules-root");
    stage_modules(&extracted, &package.release, &modules_root)?;
    cpio::write_archive(&modules_root, &dir.join("modules.cpio"))?;

    for scratch in [&download, &extracted, &modules_root] {
        fs::remove_dir_all(scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    fs::write(dir.join(STAMP), CACHE_VERSION)
        .with_context(|| format!("writing {}", dir.join(STAMP).display()))
}

fn find_deb(dir: &Path) -> Result<PathBuf> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "deb") {
            return Ok(path);
        }
    }
    bail!("apt-get download left no .deb in {}", dir.display())
}

/// Whether a module (path relative to `/lib/modules/<release>`, without
/// compression suffix) is shipped in the guest. Netfilter, traffic control
/// and virtual links are what network-facing tests set up.
fn wanted_module(path: &str) -> bool {
    const DIRS: &[&str] = &[
        "kernel/net/netfilter/",
        "kernel/net/ipv4/netfilter/",
        "kernel/net/ipv6/netfilter/",
        "kernel/net/sched/",
    ];
    const FILES: &[&str] = &["kernel/drivers/net/veth.ko", "kernel/drivers/net/dummy.ko"];
    DIRS.iter().any(|dir| path.starts_with(dir)) || FILES.contains(&path)
}

/// Copies the wanted modules and everything they depend on from the package
/// tree under `extracted` to `<out>/usr/lib/modules/<release>`, decompressed
/// (busybox modprobe cannot read `.ko.xz`), and indexes them with depmod.
fn stage_modules(extracted: &Path, release: &str, out: &Path) -> Result<()> {
    // Debian 12 ships /lib/modules; later releases ship /usr/lib/modules.
    let base = [extracted.to_path_buf(), extracted.join("usr")]
        .into_iter()
        .find(|base| base.join("lib/modules").join(release).is_dir())
        .with_context(|| format!("the package has no lib/modules/{release}"))?;
    let tree = base.join("lib/modules").join(release);
    // Packages leave modules.dep to their postinst; generate it to learn the
    // dependencies of the wanted modules.
    run(Command::new("depmod").arg("-b").arg(&base).arg(release))?;
    let modules = ModuleIndex::read(&tree)?.closure(|path| wanted_module(strip_compression(path)));

    let out_base = out.join("usr");
    let out_tree = out_base.join("lib/modules").join(release);
    for module in &modules {
        let dest = out_tree.join(strip_compression(module));
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        decompress_module(&tree.join(module), &dest)?;
    }
    // modprobe consults modules.builtin so that built-in "modules" load as
    // no-ops instead of failing.
    for index in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        let src = tree.join(index);
        if src.exists() {
            fs::copy(&src, out_tree.join(index))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    run(Command::new("depmod").arg("-b").arg(&out_base).arg(release))
}

fn strip_compression(path: &str) -> &str {
    [".xz", ".zst", ".gz"]
        .iter()
        .find_map(|ext| path.strip_suffix(ext))
        .unwrap_or(path)
}

fn decompress_module(src: &Path, dest: &Path) -> Result<()> {
    let tool = match src.extension().and_then(|ext| ext.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => {
            fs::copy(src, dest).with_context(|| format!("copying {}", src.display()))?;
            return Ok(());
        }
    };
    let file = fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    run(Command::new(tool).arg("-dc").arg(src).stdout(file))
}

/// depmod's index files, as text.
struct ModuleIndex {
    /// modules.dep: `path: dependency-path ...`.
    dep: String,
    /// modules.softdep: `softdep name pre: name-or-alias ... post: ...`.
    softdep: String,
    /// modules.alias: `alias alias-name module-name`.
    alias: String,
}

impl ModuleIndex {
    fn read(tree: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = tree.join(name);
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        Ok(Self {
            dep: read("modules.dep")?,
            softdep: read("modules.softdep")?,
            alias: read("modules.alias")?,
        })
    }

    /// The modules (paths as written in modules.dep) that `wanted` selects,
    /// plus everything they depend on. Soft dependencies count too: e.g.
    /// libcrc32c (needed by nf_tables) fails to load without a crc32c
    /// implementation, which it only names as a softdep.
    fn closure(&self, wanted: impl Fn(&str) -> bool) -> BTreeSet<String> {
        let deps: HashMap<&str, Vec<&str>> = self
            .dep
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(module, deps)| (module.trim(), deps.split_whitespace().collect()))
            .collect();
        let by_name: HashMap<String, &str> =
            deps.keys().map(|path| (module_name(path), *path)).collect();
        let mut aliases: HashMap<&str, Vec<&str>> = HashMap::new();
        for line in self.alias.lines() {
            if let ["alias", alias, module] = line.split_whitespace().collect::<Vec<_>>()[..] {
                aliases.entry(alias).or_default().push(module);
            }
        }
        let mut softdeps: HashMap<String, Vec<&str>> = HashMap::new();
        for line in self.softdep.lines() {
            let mut words = line.split_whitespace();
            if let (Some("softdep"), Some(module)) = (words.next(), words.next()) {
                let targets = words.filter(|word| !word.ends_with(':'));
                softdeps
                    .entry(normalise(module))
                    .or_default()
                    .extend(targets);
            }
        }
        let resolve = |name: &str| -> Vec<&str> {
            match by_name.get(&normalise(name)) {
                Some(path) => vec![*path],
                None => aliases
                    .get(name)
                    .into_iter()
                    .flatten()
                    .filter_map(|module| by_name.get(&normalise(module)).copied())
                    .collect(),
            }
        };

        let mut todo: Vec<&str> = deps.keys().copied().filter(|m| wanted(m)).collect();
        let mut out = BTreeSet::new();
        while let Some(module) = todo.pop() {
            if !out.insert(module.to_owned()) {
                continue;
            }
            todo.extend(deps.get(module).into_iter().flatten().copied());
            for soft in softdeps.get(&module_name(module)).into_iter().flatten() {
                todo.extend(resolve(soft));
            }
        }
        out
    }
}

/// `kernel/net/netfilter/nf_conntrack-foo.ko.xz` -> `nf_conntrack_foo`: the
/// kernel treats '-' and '_' in module names alike.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    normalise(file.split(".ko").next().unwrap_or(file))
}

fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const APT_NAMES: &[&str] = &[
        "linux-image-6.1.0-9-amd64",
        "linux-image-6.1.0-56-amd64",
        "linux-image-6.1.0-56-amd64-dbg",
        "linux-image-6.1.0-56-amd64-unsigned",
        "linux-image-6.1.0-57-cloud-amd64",
        "linux-image-6.1.0-57-rt-amd64",
        "linux-image-6.12-amd64",
        "linux-image-6.12.99+deb12-amd64",
        "linux-image-6.12.117+deb12-amd64",
        "linux-image-6.12.117+deb12-cloud-amd64",
        "linux-image-6.12.118+deb12-amd64-unsigned",
    ];

    fn pick(series: &str, names: &[&str]) -> Option<(String, String)> {
        pick_package(series, names.iter().copied()).map(|p| (p.name, p.release))
    }

    #[test]
    fn picks_newest_generic_image_of_the_series() {
        assert_eq!(
            pick("6.1", APT_NAMES),
            Some(("linux-image-6.1.0-56-amd64".into(), "6.1.0-56-amd64".into()))
        );
        assert_eq!(
            pick("6.12", APT_NAMES),
            Some((
                "linux-image-6.12.118+deb12-amd64-unsigned".into(),
                "6.12.118+deb12-amd64".into()
            ))
        );
    }

    #[test]
    fn falls_back_to_cloud_and_rejects_other_series() {
        assert_eq!(
            pick("6.1", &["linux-image-6.1.0-57-cloud-amd64"]),
            Some((
                "linux-image-6.1.0-57-cloud-amd64".into(),
                "6.1.0-57-cloud-amd64".into()
            ))
        );
        assert_eq!(pick("6.1", &["linux-image-6.12.117+deb12-amd64"]), None);
        assert_eq!(pick("6.12", &["linux-image-6.12-amd64"]), None);
        assert_eq!(pick("5.10", APT_NAMES), None);
    }

    #[test]
    fn natural_order_compares_numbers() {
        assert!(natural_cmp("6.12.117+deb12", "6.12.99+deb12").is_gt());
        assert!(natural_cmp("6.1.0-9", "6.1.0-56").is_lt());
        assert!(natural_cmp("6.1.0-56", "6.1.0-56").is_eq());
    }

    #[test]
    fn closure_follows_dependencies_and_softdeps() {
        let index = ModuleIndex {
            dep: "\
kernel/net/netfilter/nf_tables.ko.xz: kernel/net/netfilter/nfnetlink.ko.xz kernel/lib/libcrc32c.ko.xz
kernel/net/netfilter/nfnetlink.ko.xz:
kernel/lib/libcrc32c.ko.xz:
kernel/crypto/crc32c_generic.ko.xz:
kernel/arch/x86/crypto/crc32c-intel.ko.xz:
kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz
kernel/fs/jbd2/jbd2.ko.xz:
"
            .into(),
            softdep: "softdep libcrc32c pre: crc32c\nsoftdep ext4 pre: crypto-crc32c\n".into(),
            alias: "alias crc32c crc32c_intel\nalias crc32c crc32c_generic\n".into(),
        };
        let got = index.closure(|m| wanted_module(strip_compression(m)));
        let want: BTreeSet<String> = [
            "kernel/arch/x86/crypto/crc32c-intel.ko.xz",
            "kernel/crypto/crc32c_generic.ko.xz",
            "kernel/lib/libcrc32c.ko.xz",
            "kernel/net/netfilter/nf_tables.ko.xz",
            "kernel/net/netfilter/nfnetlink.ko.xz",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(got, want);
    }
}
