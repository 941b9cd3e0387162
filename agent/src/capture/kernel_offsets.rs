//! Field offsets of the kernel structs the probes walk (task -> fd table ->
//! file -> socket -> sock), read from the running kernel's BTF.
//!
//! rustc emits no CO-RE relocations, so the programs cannot ask the loader to
//! patch field accesses; instead they read these offsets from a map.

use agent_common::KernelOffsets;
use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, Type};

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Reads the offsets from the running kernel.
pub fn from_running_kernel() -> Result<KernelOffsets> {
    if !std::path::Path::new(VMLINUX_BTF).exists() {
        bail!(
            "{VMLINUX_BTF} is missing: the kernel was built without BTF \
             (CONFIG_DEBUG_INFO_BTF=y is required, as on any kernel >= 5.8 from a major distribution)"
        );
    }
    let btf = Btf::from_file(VMLINUX_BTF).with_context(|| format!("cannot parse {VMLINUX_BTF}"))?;
    from_btf(&btf)
}

/// Reads the offsets from a parsed BTF blob.
pub fn from_btf(btf: &Btf) -> Result<KernelOffsets> {
    let field = |path: &str| field_offset(btf, path).with_context(|| format!("kernel BTF: {path}"));
    Ok(KernelOffsets {
        task_struct_files: field("task_struct.files")?,
        files_struct_fdt: field("files_struct.fdt")?,
        fdtable_max_fds: field("fdtable.max_fds")?,
        fdtable_fd: field("fdtable.fd")?,
        file_f_inode: field("file.f_inode")?,
        file_private_data: field("file.private_data")?,
        inode_i_mode: field("inode.i_mode")?,
        socket_sk: field("socket.sk")?,
        sock_family: field("sock.__sk_common.skc_family")?,
        sock_num: field("sock.__sk_common.skc_num")?,
        sock_dport: field("sock.__sk_common.skc_dport")?,
        sock_rcv_saddr: field("sock.__sk_common.skc_rcv_saddr")?,
        sock_daddr: field("sock.__sk_common.skc_daddr")?,
        sock_v6_rcv_saddr: field("sock.__sk_common.skc_v6_rcv_saddr")?,
        sock_v6_daddr: field("sock.__sk_common.skc_v6_daddr")?,
        sock_protocol: field("sock.sk_protocol")?,
        sock_type: field("sock.sk_type")?,
    })
}

/// Byte offset of `struct.member[.member...]`, looking through anonymous
/// unions and structs the way C does. Bitfields are refused: the probes
/// read whole bytes.
pub fn field_offset(btf: &Btf, path: &str) -> Result<u32> {
    let mut parts = path.split('.');
    let struct_name = parts.next().ok_or_else(|| anyhow!("empty path"))?;
    let mut current = named_struct(btf, struct_name)?;
    let mut bits = 0u32;
    let mut members = parts.peekable();
    while let Some(name) = members.next() {
        let (offset, member_type) =
            find_member(btf, &current, name)?.ok_or_else(|| anyhow!("no member {name}"))?;
        bits += offset;
        if members.peek().is_some() {
            current = resolve_struct(btf, member_type)?
                .ok_or_else(|| anyhow!("{name} is not a struct or union"))?;
        }
    }
    if !bits.is_multiple_of(8) {
        bail!("{path} is not byte aligned");
    }
    Ok(bits / 8)
}

fn named_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct> {
    btf.resolve_types_by_name(name)
        .with_context(|| format!("no type {name}"))?
        .into_iter()
        .find_map(|t| match t {
            // Forward declarations share the name; the definition has members.
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| anyhow!("no struct {name}"))
}

/// Strips typedefs and qualifiers down to a struct or union.
fn resolve_struct(btf: &Btf, mut t: Type) -> Result<Option<btf_rs::Struct>> {
    for _ in 0..16 {
        t = match t {
            Type::Struct(s) | Type::Union(s) => return Ok(Some(s)),
            Type::Typedef(ref x) => btf.resolve_chained_type(x)?,
            Type::Volatile(ref x) | Type::Const(ref x) | Type::Restrict(ref x) => {
                btf.resolve_chained_type(x)?
            }
            Type::TypeTag(ref x) => btf.resolve_chained_type(x)?,
            _ => return Ok(None),
        };
    }
    Ok(None)
}

/// Finds `name` among the members of `s`, descending into anonymous members.
/// Returns its bit offset within `s` and its type.
fn find_member(btf: &Btf, s: &btf_rs::Struct, name: &str) -> Result<Option<(u32, Type)>> {
    for member in &s.members {
        let member_name = btf.resolve_name(member).unwrap_or_default();
        if member_name == name {
            if member.bitfield_size().is_some_and(|size| size != 0) {
                bail!("{name} is a bitfield");
            }
            return Ok(Some((
                member.bit_offset(),
                btf.resolve_chained_type(member)?,
            )));
        }
        if member_name.is_empty()
            && let Some(inner) = resolve_struct(btf, btf.resolve_chained_type(member)?)?
            && let Some((offset, t)) = find_member(btf, &inner, name)?
        {
            return Ok(Some((member.bit_offset() + offset, t)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reads the build machine's own BTF: every Linux this project supports
    // has it, and the offsets must be plausible and distinct.
    #[test]
    fn offsets_resolve_on_this_kernel() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI machines must have {VMLINUX_BTF}"
            );
            eprintln!("skipped: no {VMLINUX_BTF}");
            return;
        }
        let offsets = from_running_kernel().unwrap();
        // skc_daddr is the first field of struct sock_common on every kernel.
        assert_eq!(offsets.sock_daddr, 0);
        assert_eq!(offsets.sock_rcv_saddr, 4);
        assert!(offsets.sock_family > offsets.sock_rcv_saddr);
        assert_ne!(offsets.sock_v6_daddr, offsets.sock_v6_rcv_saddr);
        assert!(offsets.task_struct_files > 0);
    }

    #[test]
    fn unknown_member_is_an_error_naming_it() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI machines must have {VMLINUX_BTF}"
            );
            eprintln!("skipped: no {VMLINUX_BTF}");
            return;
        }
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        let err = field_offset(&btf, "sock.no_such_field").unwrap_err();
        assert!(err.to_string().contains("no_such_field"), "{err}");
    }
}
