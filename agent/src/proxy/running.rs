//! The proxy as the agent runs it: listening first, then its REDIRECT rules
//! installed, and their lease renewed while the proxy serves (see
//! [`super::guard`]: if the proxy dies, the rules stop redirecting by
//! themselves); at stop, the lease ends first (so no new connection is sent
//! to a proxy that is going away), then the proxy drains the connections it
//! has, and only then are the rules removed, since that ends the
//! translation of those connections' replies.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::guard::{Lease, RENEW_EVERY};
use super::rules::{Backend, InstalledRules, RedirectRules, RulesError};
use super::stats::ProxyCounters;
use super::{Proxy, ProxySettings, ProxyStats, TraceContextSource};

/// Why the proxy could not start. The message includes the cause's, so
/// the cause is not also given as `source` (it would print twice).
#[derive(Debug, thiserror::Error)]
pub enum ProxyStartError {
    /// Binding the listening sockets failed.
    #[error("the proxy cannot listen: {0}")]
    Listen(io::Error),
    /// Installing the iptables rules failed.
    #[error("the proxy's iptables rules cannot be installed: {0}")]
    Rules(RulesError),
}

/// A proxy serving redirected connections, with its rules in place.
pub struct RunningProxy {
    rules: Option<InstalledRules>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<Arc<ProxyStats>>>,
    /// Renews the rules' lease while the proxy serves.
    renewal: Option<JoinHandle<()>>,
    stats: Arc<ProxyStats>,
}

/// Whether the proxy's accept loop still runs: false once it returns or
/// unwinds (the flag is dropped with it), which stops the lease's renewal.
struct Serving(Arc<AtomicBool>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Renews `lease` every [`RENEW_EVERY`] while `serving` holds.
async fn renew_while_serving(lease: Lease, serving: Arc<AtomicBool>) {
    let mut every = tokio::time::interval(RENEW_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while serving.load(Ordering::Acquire) {
        lease.renew();
        every.tick().await;
    }
}

impl RunningProxy {
    /// Binds the proxy, starts serving, then installs `rules` (None: leave
    /// the rules to someone else, e.g. a test or an operator).
    pub async fn start(
        settings: ProxySettings,
        rules: Option<RedirectRules>,
        contexts: Arc<dyn TraceContextSource>,
    ) -> Result<Self, ProxyStartError> {
        let proxy = Proxy::bind(settings).map_err(ProxyStartError::Listen)?;
        let stats = proxy.stats();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = Arc::new(AtomicBool::new(true));
        let flag = Serving(Arc::clone(&serving));
        let task = tokio::spawn(async move {
            let _flag = flag;
            proxy
                .run(contexts, async move {
                    let _ = stopped.await;
                })
                .await
        });
        let installed = match rules {
            Some(mut rules) => {
                rules.backend = Backend::detect();
                rules.guarded = !rules.backend.is_legacy();
                // iptables is a blocking process spawn.
                let installed = tokio::task::spawn_blocking(move || {
                    // A crashed predecessor may have left its rules behind.
                    let _ = rules.remove_leftovers();
                    rules.install()
                })
                .await
                .map_err(|e| ProxyStartError::Listen(io::Error::other(e)))?;
                match installed {
                    Ok(installed) => Some(installed),
                    Err(e) => {
                        let _ = stop.send(());
                        let _ = task.await;
                        return Err(ProxyStartError::Rules(e));
                    }
                }
            }
            None => None,
        };
        let lease = installed.as_ref().and_then(InstalledRules::lease);
        if let Some(lease) = &lease {
            // Installing may have taken longer than a lease (iptables in a
            // slow VM): renewed before `start` returns, so that the rules
            // redirect from then on, before the renewal task first runs.
            lease.renew();
        }
        let renewal = lease.map(|lease| tokio::spawn(renew_while_serving(lease, serving)));
        Ok(Self {
            rules: installed,
            stop: Some(stop),
            task,
            renewal,
            stats,
        })
    }

    /// The proxy's counters.
    pub fn stats(&self) -> Arc<ProxyStats> {
        Arc::clone(&self.stats)
    }

    /// New connections the rules let through to their destination because
    /// the lease had run out (the guard's count, in the kernel): while the
    /// proxy was stalled or starved of CPU, these went untraced.
    pub fn bypassed_connections(&self) -> u64 {
        self.rules
            .as_ref()
            .and_then(InstalledRules::lease)
            .map_or(0, |lease| lease.passed_expired())
    }

    /// The proxy's counters now, with the guard's
    /// ([`ProxyCounters::connections_bypassed`]).
    pub fn counters(&self) -> ProxyCounters {
        ProxyCounters {
            connections_bypassed: self.bypassed_connections(),
            ..self.stats.snapshot()
        }
    }

    /// Stops redirecting new connections, stops the proxy after its grace
    /// period, then removes the rules. Returns its final counters; the bypassed count is read before the
    /// lease is ended (what passes after is the shutdown, not a stall).
    pub async fn stop(mut self) -> Result<ProxyCounters, RulesError> {
        // New connections go straight to their destination from here on,
        // while those already redirected keep their translation until the
        // proxy has drained them.
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
            let _ = renewal.await;
        }
        let connections_bypassed = self.bypassed_connections();
        let rules = self.rules.take();
        if let Some(installed) = &rules {
            installed.stop_redirecting();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let stats = match (&mut self.task).await {
            Ok(Ok(stats)) => stats,
            _ => Arc::clone(&self.stats),
        };
        let counters = ProxyCounters {
            connections_bypassed,
            ..stats.snapshot()
        };
        match rules {
            Some(rules) => remove_rules(rules).await.map(|()| counters),
            None => Ok(counters),
        }
    }
}

/// Removes `rules` on a blocking thread (iptables runs as a child process).
async fn remove_rules(rules: InstalledRules) -> Result<(), RulesError> {
    tokio::task::spawn_blocking(move || rules.remove())
        .await
        .unwrap_or_else(|e| Err(RulesError::Invalid(format!("removing rules panicked: {e}"))))
}
