//! The OpenTelemetry resource of a traced process, read from /proc once per
//! process and cached.

use foldhash::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::container::{self, ContainerIds};
use super::runtime::{self, Runtime};
use super::secrets;
use crate::kubernetes::{PodDirectory, PodMetadata};
use crate::span::{Attribute, Resource};

/// Which processes produce spans, and what their resource may reveal.
#[derive(Clone, Debug, Default)]
pub struct ProcessFilter {
    /// Executable names to trace; empty means all.
    pub include: Vec<String>,
    /// Executable names never traced.
    pub exclude: Vec<String>,
    /// Export `process.command_line`, its secrets redacted
    /// ([`super::secrets`]); off by default: arguments can hold secrets
    /// no rule recognizes.
    pub command_line: bool,
    /// Query parameters redacted in URLs on the command line (those of
    /// `url.query`).
    pub secret_query_parameters: Vec<String>,
}

/// A [`ProcessFilter`] value refused by [`ProcessFilter::validate`]: which
/// list, and why (the reason names the value given).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProcessFilterError {
    /// A name in `include`.
    #[error("include: {0}")]
    Include(String),
    /// A name in `exclude`.
    #[error("exclude: {0}")]
    Exclude(String),
}

impl ProcessFilterError {
    /// Why the list was refused, without the list's name.
    pub fn reason(&self) -> &str {
        match self {
            Self::Include(reason) | Self::Exclude(reason) => reason,
        }
    }
}

impl ProcessFilter {
    /// Checks that `include` and `exclude` hold executable names (the
    /// file name alone, as they are compared with): not empty, no `/`, no
    /// NUL. The first problem found, `include` first.
    pub fn validate(&self) -> Result<(), ProcessFilterError> {
        type Field = fn(String) -> ProcessFilterError;
        for (field, names) in [
            (ProcessFilterError::Include as Field, &self.include),
            (ProcessFilterError::Exclude, &self.exclude),
        ] {
            for name in names {
                if name.is_empty() || name.contains(['/', '\0']) {
                    return Err(field(format!(
                        "expected executable names without a directory, got {name:?}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// What /proc says about one process.
///
/// What is read, and how it may leave the node (every exported text the
/// process controls goes through [`super::secrets`]):
/// - `exe` (its file name), else `comm`, else the kernel's `comm` from a
///   probe: `process.executable.name`, and `service.name` when nothing
///   else names the service. A process chooses these (a file's name, or
///   `prctl(PR_SET_NAME)`), so they are exported through
///   [`secrets::redact_name`]: a plain name as it is, `TOKEN=x` not. The
///   filters compare the name as read.
/// - `cmdline`: `process.command_line`, only when opted in, through
///   [`secrets::redact_command_line`].
/// - `environ`: `OTEL_SERVICE_NAME` alone, as `service.name` verbatim: the
///   name the process's owner gave its service, which an OpenTelemetry SDK
///   in the process would export as it is. Nothing else of the
///   environment is kept.
/// - `cgroup`: only a container id (64 hex digits) and a pod uid (a
///   UUID), as `container.id` and `k8s.pod.uid`; nothing else of the path.
/// - `/proc/sys/kernel/hostname` ([`ProcessTable::new`]): `host.name`, the
///   node's, not the process's.
///
/// ([`super::runtime`] and the Python probes also read `maps`, `exe`,
/// `stat` and `root/`, to choose probes; none of it is exported.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Executable file name (`/proc/PID/exe`, else `comm`).
    pub executable_name: String,
    /// Its arguments (`/proc/PID/cmdline`), the program first.
    pub arguments: Vec<String>,
    /// `OTEL_SERVICE_NAME` from the process's own environment.
    pub otel_service_name: Option<String>,
    /// Its container and pod, from its cgroup.
    pub container: ContainerIds,
}

impl ProcessInfo {
    /// Reads a process from a proc filesystem root (normally `/proc`).
    /// Fields that cannot be read (the process exited, permissions) are
    /// left empty rather than failing: a span is still worth exporting.
    /// `known_name` (the kernel's name for it, from a probe) names a
    /// process whose executable and comm can no longer be read.
    pub fn read(proc_root: &Path, pid: u32, known_name: Option<&str>) -> ProcessInfo {
        let dir = proc_root.join(pid.to_string());
        let executable_name = std::fs::read_link(dir.join("exe"))
            .ok()
            .and_then(|p| {
                p.file_name().map(|n| {
                    n.to_string_lossy()
                        .trim_end_matches(" (deleted)")
                        .to_string()
                })
            })
            .or_else(|| {
                std::fs::read_to_string(dir.join("comm"))
                    .ok()
                    .map(|s| s.trim_end().to_string())
            })
            .or_else(|| known_name.map(str::to_string))
            .unwrap_or_else(|| format!("pid-{pid}"));
        let arguments = std::fs::read(dir.join("cmdline"))
            .map(|raw| {
                raw.split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let otel_service_name = std::fs::read(dir.join("environ")).ok().and_then(|raw| {
            raw.split(|b| *b == 0).find_map(|entry| {
                entry
                    .strip_prefix(b"OTEL_SERVICE_NAME=")
                    .filter(|v| !v.is_empty())
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        });
        let container = std::fs::read_to_string(dir.join("cgroup"))
            .map(|text| container::from_proc_cgroup(&text))
            .unwrap_or_default();
        ProcessInfo {
            executable_name,
            arguments,
            otel_service_name,
            container,
        }
    }
}

/// Resources by pid. Bounded: when full, it starts over (entries are cheap
/// to rebuild, and a pid may have been reused anyway).
pub struct ProcessTable {
    proc_root: PathBuf,
    host_name: String,
    filter: ProcessFilter,
    /// This node's pods, when the agent runs in Kubernetes.
    pods: Option<Arc<PodDirectory>>,
    resources: HashMap<u32, CachedResource>,
    runtimes: HashMap<u32, Runtime>,
    /// Processes that could not be read, and when (monotonic ns): tried
    /// again only after [`RETRY_UNREADABLE_NS`].
    unreadable: HashMap<u32, u64>,
}

/// A process's resource, as built.
struct CachedResource {
    /// None: the filter excludes the process.
    resource: Option<Arc<Resource>>,
    /// The process runs in a pod the directory did not know, at this
    /// generation of it: built again (from `info`) once it changes.
    pod_missing: Option<(u64, Box<ProcessInfo>)>,
}

/// How long a process that could not be read (exited, or still starting)
/// is taken as [`Runtime::Unknown`] before /proc is read again. Without it,
/// every exchange of a process that is gone read /proc three times.
const RETRY_UNREADABLE_NS: u64 = 250_000_000;

/// Processes remembered at most; when full, a table starts over.
pub(crate) const MAX_PROCESSES: usize = 65_536;

impl ProcessTable {
    /// A table reading `proc_root`.
    pub fn new(proc_root: impl Into<PathBuf>, filter: ProcessFilter) -> Self {
        let proc_root = proc_root.into();
        let host_name = std::fs::read_to_string(proc_root.join("sys/kernel/hostname"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Self {
            proc_root,
            host_name,
            filter,
            pods: None,
            resources: HashMap::default(),
            runtimes: HashMap::default(),
            unreadable: HashMap::default(),
        }
    }

    /// Names pods from `pods` (Kubernetes metadata and `service.name`).
    pub fn with_pods(mut self, pods: Arc<PodDirectory>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// How `pid` serves requests ([`runtime::read`]), read once and cached.
    pub fn runtime(&mut self, pid: u32) -> Runtime {
        if let Some(known) = self.runtimes.get(&pid) {
            return *known;
        }
        if self.runtimes.len() >= MAX_PROCESSES {
            self.runtimes.clear();
        }
        let now = crate::clock::monotonic_ns();
        if self
            .unreadable
            .get(&pid)
            .is_some_and(|&at| now.saturating_sub(at) < RETRY_UNREADABLE_NS)
        {
            return Runtime::Unknown;
        }
        let runtime = runtime::read(&self.proc_root, pid);
        // An unreadable process may be readable later (it may still be
        // starting): it is read again after a while.
        if runtime == Runtime::Unknown {
            if self.unreadable.len() >= MAX_PROCESSES {
                self.unreadable.clear();
            }
            self.unreadable.insert(pid, now);
        } else {
            self.unreadable.remove(&pid);
            self.runtimes.insert(pid, runtime);
        }
        runtime
    }

    /// The resource of `pid`, or None when the filter excludes it.
    pub fn resource(&mut self, pid: u32) -> Option<Arc<Resource>> {
        self.resource_named(pid, None)
    }

    /// [`Self::resource`], with the kernel's name for the process to fall
    /// back on when it exited before it could be read.
    pub fn resource_named(&mut self, pid: u32, known_name: Option<&str>) -> Option<Arc<Resource>> {
        let info = match self.resources.get_mut(&pid) {
            Some(known) => match &known.pod_missing {
                Some((generation, _))
                    if self
                        .pods
                        .as_ref()
                        .is_some_and(|p| p.generation() != *generation) =>
                {
                    // The pods changed since: perhaps its pod is known now.
                    *known.pod_missing.take().expect("matched").1
                }
                _ => return known.resource.clone(),
            },
            None => {
                if self.resources.len() >= MAX_PROCESSES {
                    self.resources.clear();
                }
                ProcessInfo::read(&self.proc_root, pid, known_name)
            }
        };
        let cached = self.build_cached(pid, info);
        let resource = cached.resource.clone();
        self.resources.insert(pid, cached);
        resource
    }

    fn build_cached(&self, pid: u32, info: ProcessInfo) -> CachedResource {
        if !self.traced(&info) {
            return CachedResource {
                resource: None,
                pod_missing: None,
            };
        }
        // The generation before the lookup: a pod added in between costs
        // one more build, never a missed one.
        let generation = self.pods.as_ref().map(|p| p.generation());
        let pod = info
            .container
            .pod_uid
            .as_deref()
            .and_then(|uid| self.pods.as_ref()?.get(uid));
        let pod_missing = match (generation, &info.container.pod_uid, &pod) {
            (Some(generation), Some(_), None) => Some((generation, Box::new(info.clone()))),
            _ => None,
        };
        CachedResource {
            resource: Some(Arc::new(self.build(pid, info, pod.as_deref()))),
            pod_missing,
        }
    }

    /// Forgets a process (its pid may be reused).
    pub fn forget(&mut self, pid: u32) {
        self.resources.remove(&pid);
        self.runtimes.remove(&pid);
        self.unreadable.remove(&pid);
    }

    fn traced(&self, info: &ProcessInfo) -> bool {
        let name = info.executable_name.as_str();
        (self.filter.include.is_empty() || self.filter.include.iter().any(|n| n == name))
            && !self.filter.exclude.iter().any(|n| n == name)
    }

    fn build(&self, pid: u32, info: ProcessInfo, pod: Option<&PodMetadata>) -> Resource {
        // The name as the process chose it, redacted (see ProcessInfo).
        let executable_name =
            secrets::redact_name(&info.executable_name, &self.filter.secret_query_parameters);
        let mut attributes = vec![
            Attribute::int("process.pid", pid as i64),
            Attribute::string("process.executable.name", executable_name.clone()),
        ];
        if self.filter.command_line && !info.arguments.is_empty() {
            attributes.push(Attribute::string(
                "process.command_line",
                secrets::redact_command_line(&info.arguments, &self.filter.secret_query_parameters),
            ));
        }
        if !self.host_name.is_empty() {
            attributes.push(Attribute::string("host.name", self.host_name.clone()));
        }
        if let Some(id) = &info.container.container_id {
            attributes.push(Attribute::string("container.id", id.clone()));
        }
        let container_id = info.container.container_id.as_deref();
        // In the usual order: the process's own OTEL_SERVICE_NAME, then
        // what Kubernetes says (label, workload, container), then the
        // executable.
        let service_name = info
            .otel_service_name
            .or_else(|| {
                pod.and_then(|p| p.service_name(container_id))
                    .map(str::to_string)
            })
            .unwrap_or(executable_name);
        if let Some(pod) = pod {
            attributes.extend(pod.attributes(container_id));
        }
        if let Some(uid) = &info.container.pod_uid {
            attributes.push(Attribute::string("k8s.pod.uid", uid.clone()));
        }
        Resource {
            service_name,
            attributes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_hold_executable_names() {
        let filter = |include: &[&str], exclude: &[&str]| ProcessFilter {
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            ..ProcessFilter::default()
        };
        assert_eq!(filter(&["nginx", "python3"], &["sshd"]).validate(), Ok(()));
        assert_eq!(
            filter(&["/usr/bin/nginx"], &[]).validate(),
            Err(ProcessFilterError::Include(
                "expected executable names without a directory, got \"/usr/bin/nginx\"".into()
            ))
        );
        for bad in ["", "a\0b", "bin/sh"] {
            let e = filter(&[], &[bad]).validate().unwrap_err();
            assert!(matches!(e, ProcessFilterError::Exclude(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_pods_names_join_its_resource_once_the_watch_knows_the_pod() {
        use crate::kubernetes::{Owner, PodDirectory, PodMetadata};
        let uid = "0d3f0e5b-6c1a-4b8e-9f2d-7a6b5c4d3e2f";
        let id = "7f3a9c1e2b4d5f60718293a4b5c6d7e8f9012345678a9b0c1d2e3f4a5b6c7d8e";
        let root = fake_proc(13, "java", b"java\0", b"");
        std::fs::write(
            root.path().join("13/cgroup"),
            format!("0::/kubepods/besteffort/pod{uid}/{id}\n"),
        )
        .unwrap();
        let pods = Arc::new(PodDirectory::default());
        let mut table =
            ProcessTable::new(root.path(), ProcessFilter::default()).with_pods(pods.clone());
        // Not listed yet: the executable names it.
        let before = table.resource(13).unwrap();
        assert_eq!(before.service_name, "java");
        assert!(!before.attributes.iter().any(|a| a.key == "k8s.pod.name"));
        assert!(Arc::ptr_eq(&before, &table.resource(13).unwrap()), "cached");
        let pod = PodMetadata {
            uid: uid.into(),
            name: "orders-5c7d9-abcde".into(),
            namespace: "shop".into(),
            node_name: Some("node-1".into()),
            app_name: None,
            owners: vec![Owner {
                attribute: "k8s.deployment.name",
                name: "orders".into(),
            }],
            containers: vec![(id.into(), "server".into())],
        };
        pods.apply(pod.clone());
        let after = table.resource(13).unwrap();
        assert_eq!(after.service_name, "orders", "the owner's name");
        for (key, value) in [
            ("k8s.pod.name", "orders-5c7d9-abcde"),
            ("k8s.namespace.name", "shop"),
            ("k8s.container.name", "server"),
            ("k8s.deployment.name", "orders"),
            ("k8s.pod.uid", uid),
            ("container.id", id),
        ] {
            assert!(
                after.attributes.contains(&Attribute::string(key, value)),
                "{key}"
            );
        }
        // Known now: later changes of the directory do not rebuild it.
        pods.apply(PodMetadata {
            uid: "another".into(),
            ..pod
        });
        assert!(Arc::ptr_eq(&after, &table.resource(13).unwrap()));
        // OTEL_SERVICE_NAME in the process's environment still comes first.
        let own = fake_proc(15, "java", b"java\0", b"OTEL_SERVICE_NAME=billing\0");
        std::fs::write(
            own.path().join("15/cgroup"),
            format!("0::/kubepods/besteffort/pod{uid}/{id}\n"),
        )
        .unwrap();
        let r = ProcessTable::new(own.path(), ProcessFilter::default())
            .with_pods(pods)
            .resource(15)
            .unwrap();
        assert_eq!(r.service_name, "billing");
        assert!(
            r.attributes
                .contains(&Attribute::string("k8s.container.name", "server"))
        );
    }

    fn fake_proc(pid: u32, exe: &str, cmdline: &[u8], environ: &[u8]) -> tempdir::Dir {
        let root = tempdir::Dir::new();
        let dir = root.path().join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(format!("/usr/bin/{exe}"), dir.join("exe")).unwrap();
        std::fs::write(dir.join("cmdline"), cmdline).unwrap();
        std::fs::write(dir.join("environ"), environ).unwrap();
        std::fs::create_dir_all(root.path().join("sys/kernel")).unwrap();
        std::fs::write(root.path().join("sys/kernel/hostname"), "node-1\n").unwrap();
        root
    }

    /// A scratch directory removed on drop (std only).
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("agent-proc-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn service_name_comes_from_the_process_environment_when_set() {
        let root = fake_proc(
            10,
            "python3.11",
            b"python3\0app.py\0",
            b"HOME=/\0OTEL_SERVICE_NAME=orders\0",
        );
        let filter = ProcessFilter {
            command_line: true,
            ..Default::default()
        };
        let mut table = ProcessTable::new(root.path(), filter);
        let r = table.resource(10).unwrap();
        assert_eq!(r.service_name, "orders");
        assert!(
            r.attributes
                .contains(&Attribute::string("process.command_line", "python3 app.py"))
        );
        assert!(
            r.attributes
                .contains(&Attribute::string("process.executable.name", "python3.11"))
        );
        assert!(
            r.attributes
                .contains(&Attribute::string("host.name", "node-1"))
        );
        assert!(r.attributes.contains(&Attribute::int("process.pid", 10)));
    }

    #[test]
    fn a_pods_process_carries_its_container_and_pod_ids() {
        let root = fake_proc(13, "java", b"java\0", b"");
        let id = "7f3a9c1e2b4d5f60718293a4b5c6d7e8f9012345678a9b0c1d2e3f4a5b6c7d8e";
        std::fs::write(
            root.path().join("13/cgroup"),
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0d3f0e5b_6c1a_4b8e_9f2d_7a6b5c4d3e2f.slice/cri-containerd-{id}.scope\n"
            ),
        )
        .unwrap();
        let r = ProcessTable::new(root.path(), ProcessFilter::default())
            .resource(13)
            .unwrap();
        assert!(
            r.attributes
                .contains(&Attribute::string("container.id", id))
        );
        assert!(r.attributes.contains(&Attribute::string(
            "k8s.pod.uid",
            "0d3f0e5b-6c1a-4b8e-9f2d-7a6b5c4d3e2f"
        )));
        // A host process (no cgroup file here) has neither.
        let host = fake_proc(14, "sshd", b"sshd\0", b"");
        let r = ProcessTable::new(host.path(), ProcessFilter::default())
            .resource(14)
            .unwrap();
        assert!(
            !r.attributes
                .iter()
                .any(|a| a.key == "container.id" || a.key == "k8s.pod.uid")
        );
    }

    #[test]
    fn service_name_falls_back_to_the_executable_and_no_command_line_by_default() {
        let root = fake_proc(11, "nginx", b"nginx: worker process\0", b"PATH=/bin\0");
        let r = ProcessTable::new(root.path(), ProcessFilter::default())
            .resource(11)
            .unwrap();
        assert_eq!(r.service_name, "nginx");
        assert!(!r.attributes.iter().any(|a| a.key == "process.command_line"));
    }

    #[test]
    fn an_exported_command_line_has_its_secrets_redacted() {
        let root = fake_proc(
            12,
            "curl",
            b"curl\0-H\0Authorization: Bearer abc\0http://x/?token=t&a=1\0--password\0pw\0",
            b"",
        );
        let filter = ProcessFilter {
            command_line: true,
            secret_query_parameters: vec!["token".into()],
            ..Default::default()
        };
        let r = ProcessTable::new(root.path(), filter).resource(12).unwrap();
        assert!(
            r.attributes.contains(&Attribute::string(
                "process.command_line",
                "curl -H Authorization: REDACTED http://x/?token=REDACTED&a=1 --password REDACTED"
            )),
            "{:?}",
            r.attributes
        );
    }

    #[test]
    fn a_name_the_process_chose_is_exported_redacted_and_filtered_as_read() {
        // A file named like a secret variable, and a kernel name (comm)
        // set to a header line, on a process that exited.
        let root = fake_proc(16, "API_TOKEN=t0k", b"x\0", b"");
        let filter = |exclude: &[&str]| ProcessFilter {
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            secret_query_parameters: vec!["token".into()],
            ..Default::default()
        };
        let r = ProcessTable::new(root.path(), filter(&[]))
            .resource(16)
            .unwrap();
        assert_eq!(r.service_name, "API_TOKEN=REDACTED");
        assert!(r.attributes.contains(&Attribute::string(
            "process.executable.name",
            "API_TOKEN=REDACTED"
        )));
        assert!(!format!("{r:?}").contains("t0k"), "{r:?}");
        assert!(
            ProcessTable::new(root.path(), filter(&["API_TOKEN=t0k"]))
                .resource(16)
                .is_none(),
            "the filters see the name as read"
        );
        let gone = tempdir::Dir::new();
        let r = ProcessTable::new(gone.path(), filter(&[]))
            .resource_named(17, Some("Cookie:c00k"))
            .unwrap();
        assert_eq!(r.service_name, "Cookie: REDACTED");
        // OTEL_SERVICE_NAME is the owner's name for the service: as it is.
        let own = fake_proc(18, "java", b"java\0", b"OTEL_SERVICE_NAME=auth-token-svc\0");
        let r = ProcessTable::new(own.path(), filter(&[]))
            .resource(18)
            .unwrap();
        assert_eq!(r.service_name, "auth-token-svc");
    }

    #[test]
    fn include_and_exclude_filter_by_executable_name() {
        let root = fake_proc(12, "curl", b"curl\0", b"");
        let only_nginx = ProcessFilter {
            include: vec!["nginx".into()],
            ..Default::default()
        };
        assert!(
            ProcessTable::new(root.path(), only_nginx)
                .resource(12)
                .is_none()
        );
        let not_curl = ProcessFilter {
            exclude: vec!["curl".into()],
            ..Default::default()
        };
        assert!(
            ProcessTable::new(root.path(), not_curl)
                .resource(12)
                .is_none()
        );
        assert!(
            ProcessTable::new(root.path(), ProcessFilter::default())
                .resource(12)
                .is_some()
        );
    }

    #[test]
    fn a_vanished_process_still_gets_a_resource() {
        let root = tempdir::Dir::new();
        let r = ProcessTable::new(root.path(), ProcessFilter::default())
            .resource(999)
            .unwrap();
        assert_eq!(r.service_name, "pid-999");
    }

    #[test]
    fn a_vanished_process_is_named_by_the_kernels_name_for_it() {
        let root = tempdir::Dir::new();
        let r = ProcessTable::new(root.path(), ProcessFilter::default())
            .resource_named(998, Some("curl"))
            .unwrap();
        assert_eq!(r.service_name, "curl");
    }
}
