//! The user-space agent: it loads the kernel programs, reads what they
//! capture, and turns it into traces.
//!
//! One module per pipeline stage, each taking plain data in and giving plain
//! data out:
//! - [`capture`]: kernel records -> per-connection messages;
//! - [`http`]: message bytes -> HTTP/1.x requests and responses;
//! - [`tracecontext`]: W3C traceparent / tracestate;
//! - [`correlate`]: messages -> SERVER and CLIENT spans with trace context;
//! - [`kubernetes`]: this node's pods from the API server, for the resources;
//! - [`sampling`]: which traces are kept;
//! - [`span`]: the span model the later stages share;
//! - [`export`]: spans -> OTLP, OTLP/JSON file, terminal;
//! - [`config`]: the YAML file and command-line overrides;
//! - [`proxy`]: the traceparent-injecting transparent proxy and its iptables rules;
//! - [`metrics`]: the agent's own counters and health over HTTP;
//! - [`clock`]: the kernel's clock, which the probes' timestamps are on.
pub mod capture;
pub mod clock;
pub mod config;
pub mod correlate;
pub mod export;
pub mod http;
pub mod kubernetes;
pub mod metrics;
pub mod proxy;
pub mod sampling;
pub mod span;
pub mod tracecontext;
