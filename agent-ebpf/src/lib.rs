//! Empty on purpose: the kernel programs are the `agent-ebpf` binary
//! (src/main.rs). This library target only lets `agent` name the package as
//! a build dependency, so cargo rebuilds the agent when they change.
#![no_std]
