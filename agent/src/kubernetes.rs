//! Kubernetes names of this node's pods, for the spans' resources.
//!
//! The cgroup path gives a process's pod uid and container id
//! (`correlate::container`); everything else (pod and namespace names, the
//! container's name, the owning workload, the `app.kubernetes.io/name`
//! label) comes from the API server. One watcher lists and then watches
//! the pods scheduled on this node (field selector `spec.nodeName`), keeps
//! the few fields the resources need in a [`PodDirectory`], and the
//! correlation thread reads it when it builds a process's resource: never
//! an API call per span or per process.
//!
//! Outside Kubernetes (no `KUBERNETES_SERVICE_HOST`, no configured API
//! server) nothing runs and resources are as before.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::metrics::Reading;
use crate::span::Attribute;

/// Environment variable the DaemonSet sets to the node's name (downward
/// API `spec.nodeName`).
pub const NODE_NAME_VARIABLE: &str = "NODE_NAME";

/// Set by the kubelet in every container: the agent runs in a cluster.
pub const IN_CLUSTER_VARIABLE: &str = "KUBERNETES_SERVICE_HOST";

/// Whether the pod watcher runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Enablement {
    /// When the agent runs in a cluster or an API server is configured.
    #[default]
    Auto,
    /// Always: failing to start it is an error.
    On,
    /// Never.
    Off,
}

/// The watcher's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// Whether it runs.
    pub enabled: Enablement,
    /// This node's name; None: from [`NODE_NAME_VARIABLE`].
    pub node_name: Option<String>,
    /// An API server URL used as is, without credentials (for example
    /// `kubectl proxy`'s `http://127.0.0.1:8001`); None: the in-cluster
    /// service account.
    pub api_server: Option<String>,
}

/// Why the watcher cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// No node name: without it every pod of the cluster would be watched.
    #[error(
        "the node's name is unknown: set {NODE_NAME_VARIABLE} (the DaemonSet sets it from spec.nodeName) or kubernetes.node_name"
    )]
    NoNodeName,
    /// The API server URL does not parse.
    #[error("kubernetes.api_server {url:?} is not a URL: {reason}")]
    BadUrl {
        /// What was given.
        url: String,
        /// Why it is not a URL.
        reason: String,
    },
    /// The client could not be configured (in-cluster credentials missing).
    #[error("cannot reach the Kubernetes API: {0}")]
    Client(String),
}

/// What the watcher will watch, once settings and environment agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchTarget {
    /// This node's name.
    pub node_name: String,
    /// A URL to use without credentials; None: in-cluster.
    pub api_server: Option<String>,
}

impl KubernetesSettings {
    /// Validates what a file can get wrong (the URL), before anything runs.
    pub fn validate(&self) -> Result<(), KubernetesError> {
        if let Some(url) = &self.api_server {
            parse_url(url)?;
        }
        Ok(())
    }

    /// Decides whether to watch and what, given the process's environment
    /// (`env`). `Ok(None)`: not in Kubernetes, or `Auto` without a node
    /// name (warned by the caller).
    pub fn target(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<WatchTarget>, KubernetesError> {
        let wanted = match self.enabled {
            Enablement::Off => false,
            Enablement::On => true,
            Enablement::Auto => self.api_server.is_some() || env(IN_CLUSTER_VARIABLE).is_some(),
        };
        if !wanted {
            return Ok(None);
        }
        let node_name = self
            .node_name
            .clone()
            .or_else(|| env(NODE_NAME_VARIABLE))
            .filter(|n| !n.is_empty());
        match node_name {
            Some(node_name) => Ok(Some(WatchTarget {
                node_name,
                api_server: self.api_server.clone(),
            })),
            None => Err(KubernetesError::NoNodeName),
        }
    }
}

fn parse_url(url: &str) -> Result<http::Uri, KubernetesError> {
    let parsed: http::Uri =
        url.parse()
            .map_err(|e: http::uri::InvalidUri| KubernetesError::BadUrl {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
        return Err(KubernetesError::BadUrl {
            url: url.to_string(),
            reason: "it needs http:// or https:// and a host".into(),
        });
    }
    Ok(parsed)
}

/// The workload that owns a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Its resource attribute, e.g. `k8s.deployment.name`.
    pub attribute: &'static str,
    /// Its name.
    pub name: String,
}

/// What the resources need of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodMetadata {
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// The `app.kubernetes.io/name` label.
    pub app_name: Option<String>,
    /// The workload it belongs to: for a ReplicaSet made by a Deployment,
    /// the Deployment.
    pub owners: Vec<Owner>,
    /// Container ids (without the `containerd://` scheme) and names, from
    /// the container statuses (init and ephemeral ones included).
    pub containers: Vec<(String, String)>,
}

impl PodMetadata {
    /// The fields of `pod`; None without a uid or name (never from a real
    /// API server).
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone()?;
        let name = meta.name.clone()?;
        let labels = meta.labels.as_ref();
        let label = |key: &str| labels.and_then(|l| l.get(key)).cloned();
        let mut owners = Vec::new();
        if let Some(controller) = meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
        {
            match controller.kind.as_str() {
                "ReplicaSet" => {
                    owners.push(Owner {
                        attribute: "k8s.replicaset.name",
                        name: controller.name.clone(),
                    });
                    // The Deployment controller names its ReplicaSets
                    // `<deployment>-<pod-template-hash>` and labels their
                    // pods with the hash: exact, without watching
                    // ReplicaSets.
                    if let Some(deployment) = label("pod-template-hash").and_then(|hash| {
                        controller
                            .name
                            .strip_suffix(&hash)
                            .and_then(|rest| rest.strip_suffix('-'))
                            .map(str::to_string)
                    }) {
                        owners.insert(
                            0,
                            Owner {
                                attribute: "k8s.deployment.name",
                                name: deployment,
                            },
                        );
                    }
                }
                kind => {
                    let attribute = match kind {
                        "StatefulSet" => Some("k8s.statefulset.name"),
                        "DaemonSet" => Some("k8s.daemonset.name"),
                        "Job" => Some("k8s.job.name"),
                        _ => None,
                    };
                    if let Some(attribute) = attribute {
                        owners.push(Owner {
                            attribute,
                            name: controller.name.clone(),
                        });
                    }
                }
            }
        }
        let mut containers = Vec::new();
        if let Some(status) = &pod.status {
            let all = [
                &status.container_statuses,
                &status.init_container_statuses,
                &status.ephemeral_container_statuses,
            ];
            for statuses in all.into_iter().flatten() {
                for s in statuses {
                    if let Some(id) = &s.container_id {
                        // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
                        let id = id.rsplit_once("://").map_or(id.as_str(), |(_, id)| id);
                        containers.push((id.to_string(), s.name.clone()));
                    }
                }
            }
        }
        Some(Self {
            uid,
            name,
            namespace: meta.namespace.clone().unwrap_or_default(),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            app_name: label("app.kubernetes.io/name"),
            owners,
            containers,
        })
    }

    /// The name of the container with this id, if the pod has it.
    pub fn container_name(&self, container_id: Option<&str>) -> Option<&str> {
        let id = container_id?;
        self.containers
            .iter()
            .find(|(known, _)| known == id)
            .map(|(_, name)| name.as_str())
    }

    /// Resource attributes of a process in this pod (and container).
    pub fn attributes(&self, container_id: Option<&str>) -> Vec<Attribute> {
        let mut attributes = vec![
            Attribute::string("k8s.pod.name", self.name.clone()),
            Attribute::string("k8s.namespace.name", self.namespace.clone()),
        ];
        if let Some(node) = &self.node_name {
            attributes.push(Attribute::string("k8s.node.name", node.clone()));
        }
        if let Some(name) = self.container_name(container_id) {
            attributes.push(Attribute::string("k8s.container.name", name.to_string()));
        }
        for owner in &self.owners {
            attributes.push(Attribute::string(owner.attribute, owner.name.clone()));
        }
        attributes
    }

    /// `service.name` from Kubernetes, in the usual order: the
    /// `app.kubernetes.io/name` label, the owning workload's name, the
    /// container's name. (The process's `OTEL_SERVICE_NAME` comes before,
    /// its executable after: the caller's.)
    pub fn service_name(&self, container_id: Option<&str>) -> Option<&str> {
        self.app_name
            .as_deref()
            .or_else(|| self.owners.first().map(|o| o.name.as_str()))
            .or_else(|| self.container_name(container_id))
    }
}

/// The pods of this node by uid, shared between the watcher (writer) and
/// the correlation thread (reader).
#[derive(Debug, Default)]
pub struct PodDirectory {
    pods: RwLock<HashMap<String, Arc<PodMetadata>>>,
    /// Bumped on every change: a resource built while its pod was unknown
    /// is rebuilt once this moves.
    generation: AtomicU64,
    /// Watch errors (the watcher retries with back-off).
    errors: AtomicU64,
}

impl PodDirectory {
    /// The pod with this uid, if listed.
    pub fn get(&self, uid: &str) -> Option<Arc<PodMetadata>> {
        self.pods.read().ok()?.get(uid).cloned()
    }

    /// Changes so far; see the field.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Pods known.
    pub fn len(&self) -> usize {
        self.pods.read().map(|p| p.len()).unwrap_or_default()
    }

    /// Whether no pod is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds or updates a pod.
    pub fn apply(&self, pod: PodMetadata) {
        if let Ok(mut pods) = self.pods.write() {
            pods.insert(pod.uid.clone(), Arc::new(pod));
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Removes a pod.
    pub fn delete(&self, uid: &str) {
        if let Ok(mut pods) = self.pods.write() {
            pods.remove(uid);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Replaces every pod (after a full list).
    pub fn replace(&self, all: Vec<PodMetadata>) {
        let all = all
            .into_iter()
            .map(|p| (p.uid.clone(), Arc::new(p)))
            .collect();
        if let Ok(mut pods) = self.pods.write() {
            *pods = all;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// What `/metrics` shows of the watcher.
    pub fn readings(&self) -> Vec<Reading> {
        vec![
            Reading::gauge(
                "agent_kubernetes_pods",
                "Pods of this node known from the API server.",
                self.len() as u64,
            ),
            Reading::counter(
                "agent_kubernetes_watch_errors",
                "Errors listing or watching this node's pods (retried with back-off).",
                self.errors.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// Builds the API client for `target`. Must run inside a tokio runtime.
pub fn client(target: &WatchTarget) -> Result<kube::Client, KubernetesError> {
    let config = match &target.api_server {
        Some(url) => kube::Config::new(parse_url(url)?),
        None => kube::Config::incluster().map_err(|e| KubernetesError::Client(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| KubernetesError::Client(e.to_string()))
}

/// Lists and watches the pods of `node_name` into `directory` until the
/// task is dropped; errors are counted and retried with back-off.
pub async fn watch(client: kube::Client, node_name: String, directory: Arc<PodDirectory>) {
    let pods: kube::Api<Pod> = kube::Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let mut events = watcher::watcher(pods, config).default_backoff().boxed();
    // A relist fills this, then replaces the directory at once: pods
    // deleted while the watch was down go away.
    let mut listing: Vec<PodMetadata> = Vec::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(pod)) => listing.extend(PodMetadata::from_pod(&pod)),
            Ok(Event::InitDone) => {
                directory.replace(std::mem::take(&mut listing));
                log::info!("kubernetes: {} pods on node {node_name}", directory.len());
            }
            Ok(Event::Apply(pod)) => {
                if let Some(pod) = PodMetadata::from_pod(&pod) {
                    directory.apply(pod);
                }
            }
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = &pod.metadata.uid {
                    directory.delete(uid);
                }
            }
            Err(e) => {
                directory.errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("kubernetes: watching the pods of {node_name}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
