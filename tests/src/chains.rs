//! Chain prefixes for tests that install the proxy's iptables rules.
//!
//! Every test that installs rules gives them a chain prefix of its own, so
//! tests (and test binaries) running at once never share or remove each
//! other's chains. Prefixes name the test process, so chains a killed run
//! left in the root namespace can be told apart and removed by a later run.

use std::sync::atomic::{AtomicU32, Ordering};

use agent::proxy::rules::RedirectRules;

/// A chain prefix no other test or test process uses:
/// `T<tag><pid in hex>x<n>`. `tag` is a few letters naming the kind of test
/// (see [`remove_stale_chains`]); it must not contain `x`.
pub fn unique_chain_prefix(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "T{tag}{:x}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the chains (and the jumps to them) that a killed test process
/// left in the calling thread's namespace under prefixes made by
/// [`unique_chain_prefix`] with `tag`: those whose pid no longer exists.
pub fn remove_stale_chains(tag: &str) {
    let Ok(output) = std::process::Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let mut stale: Vec<String> = Vec::new();
    for line in text.lines() {
        let Some(chain) = line.strip_prefix(&format!(":T{tag}")) else {
            continue;
        };
        let Some((prefix_rest, _hook)) = chain.split_once('_') else {
            continue;
        };
        let Some((pid, _n)) = prefix_rest.split_once('x') else {
            continue;
        };
        let dead = u32::from_str_radix(pid, 16)
            .is_ok_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
        let prefix = format!("T{tag}{prefix_rest}");
        if dead && !stale.contains(&prefix) {
            stale.push(prefix);
        }
    }
    for prefix in stale {
        // Removal deletes every chain of the prefix, whatever the mode,
        // family or ports it was installed with.
        let rules = RedirectRules {
            chain_prefix: prefix.clone(),
            ..RedirectRules::default()
        };
        if let Err(e) = rules.remove_leftovers() {
            eprintln!("stale chains {prefix}: {e}");
        }
    }
}
