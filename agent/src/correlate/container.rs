//! Which container and which Kubernetes pod a process runs in, from its
//! cgroup path (`/proc/PID/cgroup`): the container runtime names the
//! container's cgroup after its id, and the kubelet names the pod's after
//! its uid. Nothing is asked of the API server for these two.
//!
//! The shapes, by cgroup driver and runtime (cgroup v2's `0::` line, or on
//! v1 the first line whose path carries an id):
//!
//! | driver, runtime | path |
//! | --- | --- |
//! | systemd, containerd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, _ for ->.slice/cri-containerd-<id>.scope` |
//! | systemd, CRI-O | `/kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope` (`crio-conmon-<id>` is the monitor, not the container) |
//! | systemd, Docker | `/system.slice/docker-<id>.scope` |
//! | cgroupfs, any | `/kubepods/besteffort/pod<uid>/<id>`, `/kubepods/pod<uid>/<id>` |
//! | cgroupfs, Docker | `/docker/<id>` |
//! | podman | `/machine.slice/libpod-<id>.scope`, `/libpod_parent/libpod-<id>` |

/// What a cgroup path says about a process's container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerIds {
    /// The container's id (64 lower-case hex digits), as `container.id`.
    pub container_id: Option<String>,
    /// The pod's uid (`8-4-4-4-12` hex digits), as `k8s.pod.uid`.
    pub pod_uid: Option<String>,
}

/// Reads the ids out of the text of `/proc/PID/cgroup`.
pub fn from_proc_cgroup(text: &str) -> ContainerIds {
    // v2's unified line first; else each v1 line in turn.
    let paths = text
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2).map(|path| (line, path)));
    let mut best = ContainerIds::default();
    for (line, path) in paths {
        let ids = from_path(path);
        if line.starts_with("0::") && ids.container_id.is_some() {
            return ids;
        }
        if best.container_id.is_none() && ids.container_id.is_some() {
            best = ids;
        }
    }
    best
}

/// Reads the ids out of one cgroup path.
pub fn from_path(path: &str) -> ContainerIds {
    let mut ids = ContainerIds::default();
    for segment in path.split('/') {
        if let Some(uid) = pod_uid(segment) {
            ids.pod_uid = Some(uid);
        }
        if let Some(id) = container_id(segment) {
            ids.container_id = Some(id);
        }
    }
    ids
}

/// A pod's uid in `kubepods-burstable-pod<uid>.slice` (systemd, `_` for
/// `-`) or `pod<uid>` (cgroupfs).
fn pod_uid(segment: &str) -> Option<String> {
    let segment = segment.strip_suffix(".slice").unwrap_or(segment);
    let start = segment.rfind("pod")? + 3;
    let uid = segment[start..].replace('_', "-");
    is_uuid(&uid).then_some(uid)
}

/// A container's id: 64 hex digits, alone (cgroupfs) or after a runtime's
/// prefix in a systemd scope.
fn container_id(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let id = match name.rfind('-') {
        Some(dash) => &name[dash + 1..],
        None => name,
    };
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "7f3a9c1e2b4d5f60718293a4b5c6d7e8f9012345678a9b0c1d2e3f4a5b6c7d8e";
    const UID: &str = "0d3f0e5b-6c1a-4b8e-9f2d-7a6b5c4d3e2f";

    fn ids(container: bool, pod: bool) -> ContainerIds {
        ContainerIds {
            container_id: container.then(|| ID.to_string()),
            pod_uid: pod.then(|| UID.to_string()),
        }
    }

    #[test]
    fn kubernetes_paths_of_each_driver_and_runtime() {
        let uid_ = UID.replace('-', "_");
        let cases = [
            // systemd driver, containerd (cgroup v2).
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope\n"
            ),
            // systemd driver, CRI-O, guaranteed QoS (no QoS slice).
            format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope\n"),
            // cgroupfs driver, containerd or CRI-O.
            format!("0::/kubepods/besteffort/pod{UID}/{ID}\n"),
            format!("0::/kubepods/pod{UID}/{ID}\n"),
            // cgroup v1 (every controller a line; named hierarchies too).
            format!(
                "12:memory:/kubepods/burstable/pod{UID}/{ID}\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n"
            ),
        ];
        for case in cases {
            assert_eq!(from_proc_cgroup(&case), ids(true, true), "{case}");
        }
    }

    #[test]
    fn containers_outside_kubernetes_have_no_pod() {
        for case in [
            format!("0::/system.slice/docker-{ID}.scope\n"),
            format!("0::/docker/{ID}\n"),
            format!("0::/machine.slice/libpod-{ID}.scope/container\n"),
            format!("0::/libpod_parent/libpod-{ID}\n"),
        ] {
            assert_eq!(from_proc_cgroup(&case), ids(true, false), "{case}");
        }
    }

    #[test]
    fn host_processes_and_monitors_have_neither() {
        let uid_ = UID.replace('-', "_");
        for case in [
            "0::/user.slice/user-0.slice/session-3.scope\n".to_string(),
            "0::/init.scope\n".to_string(),
            "0::/\n".to_string(),
            "12:memory:/\n1:name=systemd:/init.scope\n".to_string(),
            String::new(),
            "garbage without colons\n".to_string(),
            // CRI-O's conmon runs in the pod's slice but is not the container.
            format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{ID}.scope\n"),
        ] {
            assert_eq!(from_proc_cgroup(&case).container_id, None, "{case}");
        }
    }

    #[test]
    fn near_misses_are_not_ids() {
        // 63 hex digits, a non-hex digit, a uid with a short group.
        assert_eq!(container_id(&ID[1..]), None);
        assert_eq!(container_id(&format!("{}g", &ID[1..])), None);
        assert_eq!(pod_uid("pod0d3f0e5b-6c1a-4b8e-9f2d-7a6b5c4d3e2"), None);
        assert_eq!(pod_uid("kubepods-besteffort.slice"), None);
    }
}
