//! Every program the project's tests, benchmarks and VM image run, and the
//! Debian package each comes from: the one list that `setup` installs, the
//! VM initramfs copies from, and the test below checks the code against.
//!
//! A new machine has only the base image and what `cargo xtask setup`
//! installs. A program installed by hand keeps working on the machine it
//! was installed on (and so in CI, which runs there), which is how a
//! missing install step goes unnoticed: `spawned_programs_come_from_setup`
//! reads the code for every program it spawns and fails when one is in
//! neither list.
//!
//! A few programs setup installs without apt-get
//! ([`crate::setup::SETUP_PROGRAMS_OUTSIDE_APT`]: the interpreter of the
//! tests' Python venv). The check accepts them by their absolute path only;
//! dpkg owns none of them, so their own test runs them instead.

/// A Debian package and the programs of it that the project runs.
#[derive(Debug)]
pub struct Package {
    /// The package name, as `apt-get install` takes it.
    pub name: &'static str,
    /// Absolute paths of the programs the project runs from it. A test that
    /// spawns one by bare name is matched on the file name.
    pub programs: &'static [&'static str],
    /// Whether the VM guest gets these programs (copied with their libraries).
    pub in_guest: bool,
}

pub(crate) const fn package(name: &'static str, programs: &'static [&'static str]) -> Package {
    Package {
        name,
        programs,
        in_guest: false,
    }
}

pub(crate) const fn guest_package(
    name: &'static str,
    programs: &'static [&'static str],
) -> Package {
    Package {
        name,
        programs,
        in_guest: true,
    }
}

pub use crate::setup::SETUP_PACKAGES;

/// What the base image of this machine kind ships and the project relies
/// on without installing: kept short on purpose, essential packages only.
pub const BASE_PACKAGES: &[Package] = &[
    package(
        "coreutils",
        &[
            "/usr/bin/id",
            "/usr/bin/uname",
            "/usr/bin/realpath",
            "/usr/bin/sleep",
            "/usr/bin/seq",
            "/usr/bin/sort",
            "/usr/bin/paste",
            "/usr/bin/tr",
            "/usr/bin/timeout",
            "/usr/bin/nproc",
        ],
    ),
    package("util-linux", &["/usr/bin/taskset", "/usr/bin/setpriv"]),
    package("procps", &["/usr/bin/pgrep"]),
    package("mawk", &["/usr/bin/awk"]),
    package("grep", &["/usr/bin/grep"]),
    package("gzip", &["/usr/bin/gzip"]),
    package("findutils", &["/usr/bin/find"]),
    package("libc-bin", &["/usr/bin/ldd", "/sbin/ldconfig"]),
    package("binutils", &["/usr/bin/strip"]),
    package("dpkg", &["/usr/bin/dpkg-deb", "/usr/bin/dpkg-query"]),
    package("apt", &["/usr/bin/apt-get", "/usr/bin/apt-cache"]),
    // Node.js 20 from the image's nodesource apt source (Debian's own is
    // 18): the event-loop frontend of the link tests.
    package("nodejs", &["/usr/bin/node"]),
];

/// Names of the packages setup makes sure of: its own, and the base
/// image's (a no-op where the image has them, as it should).
pub fn setup_package_names() -> Vec<&'static str> {
    SETUP_PACKAGES
        .iter()
        .chain(BASE_PACKAGES)
        .map(|p| p.name)
        .collect()
}

/// Programs the VM guest gets, by absolute host path.
pub fn guest_programs() -> impl Iterator<Item = &'static str> {
    SETUP_PACKAGES
        .iter()
        .filter(|p| p.in_guest)
        .flat_map(|p| p.programs.iter().copied())
}

#[cfg(test)]
mod tests;
