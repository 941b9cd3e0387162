#!/bin/sh
# PID 1 of the `cargo xtask vm-test` guest (see xtask/src/vm.rs): sets up
# the filesystems the eBPF tests need, runs every binary listed in
# /tests/order, and reports each exit code on the console for the host to
# parse. Busybox ash.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

# Report but survive failures: the tests then say what is missing.
try() {
    "$@" || echo "vm-init: '$*' failed" >&2
}

try mount -t proc proc /proc
try mount -t sysfs sysfs /sys
try mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
try mount -t devpts devpts /dev/pts
try mount -t tmpfs tmpfs /dev/shm
try mount -t tmpfs tmpfs /tmp
try mount -t tmpfs tmpfs /run
# tracefs (and debugfs, which would automount it) are left unmounted on purpose: the agent mounts it itself, as it
# must on hosts that do not mount it at boot, and the tests exercise that.
try mount -t bpf bpf /sys/fs/bpf
try mount -t cgroup2 cgroup2 /sys/fs/cgroup
# The first memory cgroup turns a static key on, which patches the kernel's
# text while it runs; under qemu's emulation a CPU inside the patched code
# then oopses (seen once: an int3 in kmem_cache_alloc_lru while a test made
# its memory cgroup). Turned on here, before anything runs.
try sh -c 'echo +memory > /sys/fs/cgroup/cgroup.subtree_control'
try mkdir -p /sys/fs/cgroup/boot
try ip link set lo up
hostname vm-test
# Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
ulimit -l unlimited

echo "vm-init: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"

# Names are plain file names (checked by the host), so word splitting is safe;
# reading the list on stdin would hand it to the tests instead.
# Binaries another kernel runs instead: `vmtest.skip=a,b` on the command line.
skip=
for word in $(cat /proc/cmdline); do
    case "$word" in
    vmtest.skip=*) skip="${word#vmtest.skip=}" ;;
    esac
done
for name in $(cat /tests/order); do
    case ",$skip," in
    *",$name,"*)
        echo "vm-init: skipping $name (another kernel runs it)"
        continue
        ;;
    esac
    mkdir -p "/tmp/run/$name"
    cd "/tmp/run/$name" || exit 1
    echo "vm-init: running $name"
    CI=true AGENT_IN_VM=1 RUST_BACKTRACE=1 "/tests/$name" --test-threads=1 </dev/null
    code=$?
    # Start a fresh line in case the test's output did not end with one.
    echo
    echo "@@VMTEST-EXIT $name $code"
    cd /
done

sync
poweroff -f
