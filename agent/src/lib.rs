//! The user-space agent: it loads the kernel programs, reads what they
//! capture, and turns it into traces.
//!
//! One module per pipeline stage, each taking plain data in and giving plain
//! data out:
//! - [`capture`]: kernel records -> per-connection messages;
//! - [`http`]: message bytes -> HTTP/1.x start lines;
//! - [`span`]: the span model the later stages share.
pub mod capture;
pub mod http;
pub mod span;
