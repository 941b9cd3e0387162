//! The proxy as the agent runs it: listening first, then its REDIRECT rules
//! installed; at stop, the rules first turn new connections away (so none
//! is sent to a proxy that is going away), then the proxy drains the
//! connections it has, and only then are the rules removed, since that
//! ends the translation of those connections' replies.

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

    /// Stops redirecting new connections, stops the proxy after its grace
    /// period, then removes the rules.
    pub async fn stop(mut self) -> Result<Arc<ProxyStats>, RulesError> {
        // New connections go straight to their destination from here on,
        // while those already redirected keep their translation until the
        // proxy has drained them. If new ones cannot be turned away, the
        // rules go at once, as they did before.
        let mut removed_early = Ok(());
        let mut rules = None;
        if let Some(installed) = self.rules.take() {
            let stopped = tokio::task::spawn_blocking(move || {
                let stopped = installed.stop_redirecting();
                (installed, stopped)
            })
            .await;
            match stopped {
                Ok((installed, Ok(()))) => rules = Some(installed),
                Ok((installed, Err(e))) => {
                    log::warn!("proxy: cannot stop redirecting before the drain: {e}");
                    removed_early = remove_rules(installed).await;
                }
                // The guard was dropped in the panic, which removed the rules.
                Err(_) => {}
            }
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let stats = match (&mut self.task).await {
            Ok(Ok(stats)) => stats,
            _ => Arc::clone(&self.stats),
        };
        let removed = match rules {
            Some(rules) => remove_rules(rules).await,
            None => Ok(()),
        };
        removed_early.and(removed).map(|()| stats)
    }
}

/// Removes `rules` on a blocking thread (iptables runs as a child process).
async fn remove_rules(rules: InstalledRules) -> Result<(), RulesError> {
    tokio::task::spawn_blocking(move || rules.remove())
        .await
        .unwrap_or_else(|e| Err(RulesError::Invalid(format!("removing rules panicked: {e}"))))
}
