//! Transparent proxy that injects `traceparent` into outbound HTTP/1.x
//! requests reached through iptables REDIRECT.
//!
//! Applications' outbound connections are redirected to the proxy; it finds
//! where each was going (`SO_ORIGINAL_DST`), connects there itself from a
//! socket carrying [`ProxySettings::upstream_mark`] (which the REDIRECT
//! rules skip, so it never comes back), and relays. A connection whose
//! client opens with an HTTP/1.x request line is relayed as HTTP: each
//! request head without a valid traceparent gets one (from a
//! [`TraceContextSource`]), everything else passes byte for byte. Anything
//! else, and anything the proxy cannot follow, is copied unchanged: the
//! proxy fails open, it never breaks traffic to add tracing.
//!
//! The layers, kept apart as in linkerd2-proxy:
//! - `transport`: sockets, bounded buffers, the opaque copy;
//! - `server`: accepting, the original destination, detection, timeouts;
//! - `detect`: HTTP/1.x or not, from the first bytes;
//! - `http`: the relay of one HTTP/1.x connection (both directions);
//! - [`head`]: pure parsing and rewriting of heads;
//! - `body`: body framing, shared with the tracer (`crate::http::body`),
//!   as is the decision where a body ends (`crate::http::framing`, strict);
//! - [`context`] (where injected contexts come from) and [`stats`];
//! - [`rules`] (the REDIRECT rules) and [`guard`] (their lease: the rules
//!   stop redirecting within a second of the proxy's death);
//! - [`settings`]: what is intercepted as the configuration states it
//!   ([`ProxyMode`], [`Cidr`]) and its checks.

pub mod conntrack;
pub mod context;
mod detect;
pub mod guard;
pub mod head;
mod http;
pub mod rules;
mod running;
mod server;
pub mod settings;
pub mod stats;
mod transport;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

// The tracer's body walker, under the name the relay uses (`super::body`):
// one walker, so that the proxy and the tracer agree on where a body ends.
use crate::http::body;

pub use context::{ProxiedRequest, StandaloneContexts, TraceContextSource};
pub use head::{RewriteOutcome, rewrite_request_head};
pub use running::{ProxyStartError, RunningProxy};
pub use server::{Proxy, serve};
pub use settings::{Cidr, ProxyMode, RedirectScope};
pub use stats::{ProxyCounters, ProxyStats};

/// Port the proxy listens on unless configured otherwise.
pub const DEFAULT_PORT: u16 = 15001;

/// `SO_MARK` of the proxy's upstream connections unless configured
/// otherwise; the REDIRECT rules must exclude it.
pub const DEFAULT_UPSTREAM_MARK: u32 = 0x1e7;

/// Smallest head limit honoured: below it ordinary requests would not fit.
const MIN_HEAD_BYTES: usize = 1024;

/// How the proxy listens, connects and times out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxySettings {
    /// Addresses to listen on, e.g. `0.0.0.0:15001` and `[::]:15001`.
    pub listen: Vec<SocketAddr>,
    /// `SO_MARK` set on upstream sockets before connecting, so that the
    /// REDIRECT rules never catch the proxy's own connections. 0 sets no
    /// mark (then something else must keep them from looping).
    pub upstream_mark: u32,
    /// Once a client has sent bytes that could still become an HTTP/1.x
    /// request line, how long it may take to finish the line before the
    /// connection is treated as opaque. Counted from its first bytes: a
    /// connection on which nobody has said anything yet is waited for.
    pub detect_timeout: Duration,
    /// How long connecting upstream may take.
    pub connect_timeout: Duration,
    /// A connection on which nothing moved in either direction for this
    /// long is reset on both sides.
    pub idle_timeout: Duration,
    /// Largest request or response head followed; a larger one makes the
    /// connection opaque from there on. At least 1 KiB is used.
    pub max_head_bytes: usize,
    /// On shutdown, how long open connections may take to finish before
    /// they are reset.
    pub shutdown_grace: Duration,
    /// Threads that relay connections, each running its share of them
    /// from start to end (at least 1).
    pub workers: usize,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            listen: vec![
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)),
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, DEFAULT_PORT)),
            ],
            upstream_mark: DEFAULT_UPSTREAM_MARK,
            detect_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_secs(5),
            // Long, as for Envoy's TCP proxy: connections that are idle by
            // design (pooled keep-alive) must not be cut by the proxy
            // sooner than by their own ends.
            idle_timeout: Duration::from_secs(3600),
            max_head_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(5),
            workers: default_workers(),
        }
    }
}

/// One worker per CPU the agent may run on, as nginx's `worker_processes
/// auto`.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

impl ProxySettings {
    /// The head limit actually used.
    fn head_limit(&self) -> usize {
        self.max_head_bytes.max(MIN_HEAD_BYTES)
    }
}
