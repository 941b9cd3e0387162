//! The proxy as the agent runs it: listening first, then its REDIRECT rules
//! installed; at stop, the rules removed first (so no new connection is sent
//! to a proxy that is going away), then the proxy drained.

use std::io;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::rules::{Backend, InstalledRules, RedirectRules, RulesError};
use super::{Proxy, ProxySettings, ProxyStats, TraceContextSource};

/// Why the proxy could not start.
#[derive(Debug)]
pub enum ProxyStartError {
    /// Binding the listening sockets failed.
    Listen(io::Error),
    /// Installing the iptables rules failed.
    Rules(RulesError),
}

impl std::fmt::Display for ProxyStartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Listen(e) => write!(f, "the proxy cannot listen: {e}"),
            Self::Rules(e) => write!(f, "the proxy's iptables rules cannot be installed: {e}"),
        }
    }
}

impl std::error::Error for ProxyStartError {}

/// A proxy serving redirected connections, with its rules in place.
pub struct RunningProxy {
    rules: Option<InstalledRules>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<Arc<ProxyStats>>>,
    stats: Arc<ProxyStats>,
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
        let task = tokio::spawn(proxy.run(contexts, async move {
            let _ = stopped.await;
        }));
        let installed = match rules {
            Some(mut rules) => {
                rules.backend = Backend::detect();
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
        Ok(Self {
            rules: installed,
            stop: Some(stop),
            task,
            stats,
        })
    }

    /// The proxy's counters.
    pub fn stats(&self) -> Arc<ProxyStats> {
        Arc::clone(&self.stats)
    }

    /// Removes the rules, then stops the proxy after its grace period.
    pub async fn stop(mut self) -> Result<Arc<ProxyStats>, RulesError> {
        let removed = match self.rules.take() {
            Some(rules) => tokio::task::spawn_blocking(move || rules.remove())
                .await
                .unwrap_or_else(|e| {
                    Err(RulesError::Invalid(format!("removing rules panicked: {e}")))
                }),
            None => Ok(()),
        };
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let stats = match (&mut self.task).await {
            Ok(Ok(stats)) => stats,
            _ => Arc::clone(&self.stats),
        };
        removed.map(|()| stats)
    }
}
