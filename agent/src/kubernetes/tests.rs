use super::*;

const DEPLOYMENT_POD: &str = include_str!("../../tests/fixtures/kubernetes/pod-deployment.json");
const STATEFULSET_POD: &str = include_str!("../../tests/fixtures/kubernetes/pod-statefulset.json");

fn pod(json: &str) -> Pod {
    serde_json::from_str(json).unwrap()
}

fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

const APP: &str = "4c8e1f2a9b3d5e7f60718293a4b5c6d7e8f90123456789abcdef0123456789ab";
const SIDECAR: &str = "9a8b7c6d5e4f30211203948576abcdef9a8b7c6d5e4f30211203948576abcdef";

#[test]
fn a_deployments_pod_names_its_deployment_containers_and_label() {
    let m = PodMetadata::from_pod(&pod(DEPLOYMENT_POD)).unwrap();
    assert_eq!(m.uid, "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9");
    assert_eq!(m.name, "checkout-7d9c6b5f4-x2k8q");
    assert_eq!(m.namespace, "shop");
    assert_eq!(m.node_name.as_deref(), Some("node-1"));
    assert_eq!(
        m.owners,
        vec![
            Owner {
                attribute: "k8s.deployment.name",
                name: "checkout".into()
            },
            Owner {
                attribute: "k8s.replicaset.name",
                name: "checkout-7d9c6b5f4".into()
            },
        ]
    );
    assert_eq!(m.container_name(Some(APP)), Some("app"));
    assert_eq!(m.container_name(Some(SIDECAR)), Some("log-shipper"));
    assert_eq!(
        m.container_name(Some(
            "11223344556677889900aabbccddeeff11223344556677889900aabbccddeeff"
        )),
        Some("wait-for-db"),
        "init containers too"
    );
    assert_eq!(m.container_name(Some("ffff")), None);
    assert_eq!(m.container_name(None), None);
    let attributes = m.attributes(Some(SIDECAR));
    for (key, value) in [
        ("k8s.pod.name", "checkout-7d9c6b5f4-x2k8q"),
        ("k8s.namespace.name", "shop"),
        ("k8s.node.name", "node-1"),
        ("k8s.container.name", "log-shipper"),
        ("k8s.deployment.name", "checkout"),
        ("k8s.replicaset.name", "checkout-7d9c6b5f4"),
    ] {
        assert!(
            attributes.contains(&Attribute::string(key, value)),
            "{key}={value} in {attributes:?}"
        );
    }
    // The label comes first.
    assert_eq!(m.service_name(Some(APP)), Some("checkout"));
}

#[test]
fn service_name_falls_back_from_the_label_to_the_owner_to_the_container() {
    let mut m = PodMetadata::from_pod(&pod(DEPLOYMENT_POD)).unwrap();
    m.app_name = Some("storefront".into());
    assert_eq!(m.service_name(Some(APP)), Some("storefront"));
    m.app_name = None;
    m.owners[0].name = "checkout-deployment".into();
    assert_eq!(m.service_name(Some(APP)), Some("checkout-deployment"));
    m.owners.clear();
    assert_eq!(m.service_name(Some(SIDECAR)), Some("log-shipper"));
    assert_eq!(m.service_name(Some("unknown")), None);
}

#[test]
fn a_statefulsets_pod_on_cri_o() {
    let m = PodMetadata::from_pod(&pod(STATEFULSET_POD)).unwrap();
    assert_eq!(
        m.owners,
        vec![Owner {
            attribute: "k8s.statefulset.name",
            name: "ledger-db".into()
        }]
    );
    let id = "0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4";
    assert_eq!(m.container_name(Some(id)), Some("postgres"));
    assert_eq!(m.app_name, None);
    assert_eq!(m.service_name(Some(id)), Some("ledger-db"));
}

#[test]
fn other_owners_and_a_replicaset_without_a_deployment() {
    for (kind, attribute) in [
        ("DaemonSet", Some("k8s.daemonset.name")),
        ("Job", Some("k8s.job.name")),
        ("Node", None),
    ] {
        let json = STATEFULSET_POD.replace("\"StatefulSet\"", &format!("\"{kind}\""));
        let m = PodMetadata::from_pod(&pod(&json)).unwrap();
        assert_eq!(m.owners.first().map(|o| o.attribute), attribute, "{kind}");
    }
    // A bare ReplicaSet (no pod-template-hash label): no Deployment guessed.
    let json = DEPLOYMENT_POD.replace("\"pod-template-hash\": \"7d9c6b5f4\"", "\"x\": \"y\"");
    let m = PodMetadata::from_pod(&pod(&json)).unwrap();
    assert_eq!(
        m.owners,
        vec![Owner {
            attribute: "k8s.replicaset.name",
            name: "checkout-7d9c6b5f4".into()
        }]
    );
}

#[test]
fn the_directory_applies_replaces_and_deletes() {
    let directory = PodDirectory::default();
    let a = PodMetadata::from_pod(&pod(DEPLOYMENT_POD)).unwrap();
    let b = PodMetadata::from_pod(&pod(STATEFULSET_POD)).unwrap();
    let g0 = directory.generation();
    directory.apply(a.clone());
    assert!(directory.generation() > g0);
    assert_eq!(directory.get(&a.uid).as_deref(), Some(&a));
    directory.replace(vec![b.clone()]);
    assert_eq!(directory.get(&a.uid), None, "a relist drops what is gone");
    assert_eq!(directory.len(), 1);
    directory.delete(&b.uid);
    assert!(directory.is_empty());
    let readings = directory.readings();
    assert_eq!(readings[0].family, "agent_kubernetes_pods");
}

#[test]
fn the_watcher_runs_in_a_cluster_or_with_an_api_server_and_needs_the_node() {
    let auto = KubernetesSettings::default();
    assert_eq!(auto.target(env(&[])).unwrap(), None, "outside Kubernetes");
    assert_eq!(
        auto.target(env(&[
            (IN_CLUSTER_VARIABLE, "10.96.0.1"),
            (NODE_NAME_VARIABLE, "node-1")
        ]))
        .unwrap(),
        Some(WatchTarget {
            node_name: "node-1".into(),
            api_server: None
        })
    );
    let e = auto
        .target(env(&[(IN_CLUSTER_VARIABLE, "10.96.0.1")]))
        .unwrap_err();
    assert!(e.to_string().contains("NODE_NAME"), "{e}");
    let off = KubernetesSettings {
        enabled: Enablement::Off,
        ..auto.clone()
    };
    assert_eq!(
        off.target(env(&[
            (IN_CLUSTER_VARIABLE, "10.96.0.1"),
            (NODE_NAME_VARIABLE, "node-1")
        ]))
        .unwrap(),
        None
    );
    let local = KubernetesSettings {
        api_server: Some("http://127.0.0.1:8001".into()),
        node_name: Some("n2".into()),
        ..auto.clone()
    };
    assert_eq!(
        local.target(env(&[])).unwrap().unwrap().node_name,
        "n2",
        "the setting before the environment"
    );
    for bad in ["127.0.0.1:8001", "ftp://x", "http://", "not a url"] {
        let s = KubernetesSettings {
            api_server: Some(bad.into()),
            ..auto.clone()
        };
        assert!(
            matches!(s.validate(), Err(KubernetesError::BadUrl { .. })),
            "{bad}"
        );
    }
}
