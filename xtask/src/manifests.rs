//! The Kubernetes manifests in `deploy/`: each kustomization rendered with
//! `kubectl kustomize`, and every object validated strictly (unknown
//! fields are errors) against the oldest and the newest Kubernetes version
//! the project claims, with kubernetes-validate's bundled schemas. No API
//! server can run here; this is what can be checked without one.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::setup::KUBERNETES_VALIDATE;

/// The Kubernetes versions the manifests are claimed for, oldest and newest
/// (docs/deploy.md).
pub const KUBERNETES_VERSIONS: &[&str] = &["1.27.0", "1.37.0"];

/// The kustomizations users apply.
pub const KUSTOMIZATIONS: &[&str] = &["deploy/base", "deploy/capabilities"];

/// Renders and validates every kustomization; the error names the first
/// that fails and shows the validator's words.
pub fn validate() -> Result<()> {
    let root = crate::workspace_root();
    let out_dir = root.join("target/manifests");
    std::fs::create_dir_all(&out_dir)?;
    for kustomization in KUSTOMIZATIONS {
        let rendered = render(kustomization)?;
        let file = out_dir.join(format!("{}.yaml", kustomization.replace('/', "-")));
        std::fs::write(&file, &rendered)?;
        for version in KUBERNETES_VERSIONS {
            check(&file, version).with_context(|| format!("{kustomization} for {version}"))?;
        }
    }
    Ok(())
}

/// `kubectl kustomize DIR`.
fn render(kustomization: &str) -> Result<String> {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(crate::workspace_root().join(kustomization))
        .output()
        .context("running kubectl kustomize (cargo xtask setup installs kubectl)")?;
    if !output.status.success() {
        bail!(
            "kubectl kustomize {kustomization}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// `kubernetes-validate --strict` on one rendered file.
fn check(file: &PathBuf, version: &str) -> Result<()> {
    let output = Command::new(KUBERNETES_VALIDATE)
        .args(["--strict", "--kubernetes-version", version])
        .arg(file)
        .output()
        .with_context(|| {
            format!("running {KUBERNETES_VALIDATE} (cargo xtask setup installs it)")
        })?;
    let words = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // It exits 0 when every object is valid; warnings (unknown kinds) are
    // errors here too: every kind in deploy/ has a schema.
    if !output.status.success() || words.contains("WARN") || words.contains("ERROR") {
        bail!("kubernetes-validate: {words}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_manifests_are_valid_for_the_oldest_and_newest_kubernetes_claimed() {
        validate().unwrap();
    }

    #[test]
    fn the_validator_refuses_an_unknown_field() {
        // The check is strict: a typo in a DaemonSet is an error, not a
        // silently dropped field.
        let dir = crate::workspace_root().join("target/manifests");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("typo.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata: {}\nimmutible: true\n",
        )
        .unwrap();
        let e = check(&file, KUBERNETES_VERSIONS[0]).unwrap_err();
        assert!(format!("{e:#}").contains("immutible"), "{e:#}");
    }

    #[test]
    fn the_daemonset_matches_what_the_agent_needs() {
        let text = render("deploy/base").unwrap();
        for needed in [
            "hostPID: true",
            "hostNetwork: true",
            "privileged: true",
            "path: /healthz",
            "path: /readyz",
            "--metrics-address=$(NODE_IP):9470",
            "mountPath: /sys/fs/bpf",
            "mountPath: /sys/kernel/btf",
            "mountPath: /sys/kernel/tracing",
            "mountPath: /run/xtables.lock",
            "operator: Exists",
            "terminationGracePeriodSeconds: 30",
        ] {
            assert!(text.contains(needed), "deploy/base lacks {needed}");
        }
        let capabilities = render("deploy/capabilities").unwrap();
        assert!(capabilities.contains("privileged: false"));
        assert!(!capabilities.contains("Bidirectional"));
    }
}
