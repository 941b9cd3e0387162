//! The address a redirected client really connected from, from conntrack.
//!
//! REDIRECT rewrites a connection's destination to the proxy. When the
//! rewritten connection's reply tuple (proxy address and port, client
//! address and port) is already taken by another connection of the same
//! client and source port (to another redirected destination, or a closed
//! one conntrack still keeps for 120 s), NAT also changes the client's
//! source port, and the proxy's peer is no longer the address the
//! application's socket has, which is the one the probes report. The
//! proxy and the correlator then name the request differently (see
//! `correlate::ProxyContexts`). Conntrack still knows the original tuple:
//! one ctnetlink GET by the reply tuple (the accepted socket's local
//! address and peer) returns it.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `NETLINK_NETFILTER`.
const NETLINK_NETFILTER: i32 = 12;
/// `(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET`.
const CT_GET: u16 = (1 << 8) | 1;
/// `NLMSG_ERROR`.
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;
/// Attribute types (`linux/netfilter/nfnetlink_conntrack.h`).
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_TCP: u8 = 6;

/// The source address of the original direction of the TCP connection
/// whose reply direction goes from `local` to `peer` (an accepted
/// socket's addresses): the client's own address, even when NAT changed
/// its port. None when conntrack cannot say (no such entry, no
/// ctnetlink); the caller keeps `peer` then.
pub fn original_source(local: SocketAddr, peer: SocketAddr) -> Option<SocketAddr> {
    thread_local! {
        // One socket per proxy thread, kept: a connection costs a send and
        // a receive, not a socket's life.
        static SOCKET: std::cell::RefCell<Option<(OwnedFd, u32)>> =
            const { std::cell::RefCell::new(None) };
    }
    SOCKET.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = netlink_socket().map(|socket| (socket, 0));
        }
        let (socket, sequence) = cell.as_mut()?;
        *sequence = sequence.wrapping_add(1);
        let found = ask(socket, *sequence, local, peer);
        if found.is_err() {
            // A socket in an unknown state is not reused.
            *cell = None;
        }
        found.ok().flatten()
    })
}

/// Sends the GET numbered `sequence` and reads its answer: Ok(None) when
/// conntrack has no such entry, Err when the socket failed.
fn ask(
    socket: &OwnedFd,
    sequence: u32,
    local: SocketAddr,
    peer: SocketAddr,
) -> Result<Option<SocketAddr>, ()> {
    let Some(request) = get_request(local, peer, sequence) else {
        return Ok(None);
    };
    // SAFETY: a valid fd and a buffer of the stated length.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent != request.len() as isize {
        return Err(());
    }
    let mut reply = [0u8; 4096];
    // The kernel answers a GET before `send` returns; an answer to an
    // earlier request (none is expected) is skipped by its number.
    for _ in 0..4 {
        // SAFETY: a valid fd and a writable buffer of the stated length.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                reply.as_mut_ptr().cast(),
                reply.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if received < 20 {
            return Err(());
        }
        let reply = &reply[..received as usize];
        if u32::from_ne_bytes(reply[8..12].try_into().map_err(|_| ())?) == sequence {
            return Ok(parse_reply(reply));
        }
    }
    Err(())
}

/// A netlink socket to ctnetlink, connected to the kernel.
fn netlink_socket() -> Option<OwnedFd> {
    // SAFETY: plain socket call.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh fd we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_nl is the kernel's address (pid 0, groups 0).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: a valid fd and address of the stated length.
    let connected = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    (connected == 0).then_some(socket)
}

/// The ctnetlink GET message for the entry whose reply tuple is
/// `local` -> `peer` (TCP). None for mixed families.
fn get_request(local: SocketAddr, peer: SocketAddr, sequence: u32) -> Option<Vec<u8>> {
    let (family, src_type, dst_type) = match (local.ip(), peer.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (libc::AF_INET as u8, CTA_IP_V4_SRC, CTA_IP_V4_DST),
        (IpAddr::V6(_), IpAddr::V6(_)) => (libc::AF_INET6 as u8, CTA_IP_V6_SRC, CTA_IP_V6_DST),
        _ => return None,
    };
    let ip_bytes = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let mut ip = Vec::new();
    attribute(&mut ip, src_type, &ip_bytes(local.ip()));
    attribute(&mut ip, dst_type, &ip_bytes(peer.ip()));
    let mut proto = Vec::new();
    attribute(&mut proto, CTA_PROTO_NUM, &[IPPROTO_TCP]);
    attribute(&mut proto, CTA_PROTO_SRC_PORT, &local.port().to_be_bytes());
    attribute(&mut proto, CTA_PROTO_DST_PORT, &peer.port().to_be_bytes());
    let mut tuple = Vec::new();
    attribute(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    attribute(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
    let mut payload = vec![family, 0, 0, 0]; // nfgenmsg: family, version 0, res_id 0
    attribute(&mut payload, CTA_TUPLE_REPLY | NLA_F_NESTED, &tuple);
    let mut message = Vec::with_capacity(16 + payload.len());
    message.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
    message.extend_from_slice(&CT_GET.to_ne_bytes());
    message.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    message.extend_from_slice(&sequence.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns
    message.extend_from_slice(&payload);
    Some(message)
}

/// Appends a netlink attribute (length, type, value, padding to 4).
fn attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// The attributes in `bytes`, as (type without flags, value).
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & !NLA_F_NESTED;
        if len < 4 || len > bytes.len() {
            return None;
        }
        let value = &bytes[4..len];
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
        Some((kind, value))
    })
}

/// The original tuple's source from a ctnetlink reply; None for an error
/// message or anything malformed.
fn parse_reply(reply: &[u8]) -> Option<SocketAddr> {
    if reply.len() < 20 {
        return None;
    }
    let len = u32::from_ne_bytes(reply[0..4].try_into().ok()?) as usize;
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind == NLMSG_ERROR || len > reply.len() || len < 20 {
        return None;
    }
    let (_, orig) = attributes(&reply[20..len]).find(|(k, _)| *k == CTA_TUPLE_ORIG)?;
    let mut ip = None;
    let mut port = None;
    for (kind, value) in attributes(orig) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, v) in attributes(value) {
                    ip = match (k, v.len()) {
                        (CTA_IP_V4_SRC, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
                        (CTA_IP_V6_SRC, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
                        _ => ip,
                    };
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v) in attributes(value) {
                    if k == CTA_PROTO_SRC_PORT && v.len() == 2 {
                        port = Some(u16::from_be_bytes([v[0], v[1]]));
                    }
                }
            }
            _ => {}
        }
    }
    Some(SocketAddr::new(ip?, port?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_names_the_reply_tuple() {
        let local: SocketAddr = "10.0.0.1:15001".parse().unwrap();
        let peer: SocketAddr = "10.0.0.9:40001".parse().unwrap();
        let message = get_request(local, peer, 7).unwrap();
        assert_eq!(u32::from_ne_bytes(message[8..12].try_into().unwrap()), 7);
        assert_eq!(
            u32::from_ne_bytes(message[0..4].try_into().unwrap()) as usize,
            message.len()
        );
        assert_eq!(u16::from_ne_bytes([message[4], message[5]]), CT_GET);
        assert_eq!(message[16], libc::AF_INET as u8);
        let (kind, tuple) = attributes(&message[20..]).next().unwrap();
        assert_eq!(kind, CTA_TUPLE_REPLY);
        let parts: Vec<(u16, &[u8])> = attributes(tuple).collect();
        assert_eq!(parts[0].0, CTA_TUPLE_IP);
        let ips: Vec<(u16, &[u8])> = attributes(parts[0].1).collect();
        assert_eq!(
            ips,
            [
                (CTA_IP_V4_SRC, &[10, 0, 0, 1][..]),
                (CTA_IP_V4_DST, &[10, 0, 0, 9][..])
            ]
        );
        let proto: Vec<(u16, &[u8])> = attributes(parts[1].1).collect();
        assert_eq!(
            proto,
            [
                (CTA_PROTO_NUM, &[6][..]),
                (CTA_PROTO_SRC_PORT, &15001u16.to_be_bytes()[..]),
                (CTA_PROTO_DST_PORT, &40001u16.to_be_bytes()[..]),
            ]
        );
        assert!(get_request(local, "[::1]:1".parse().unwrap(), 1).is_none());
    }

    #[test]
    fn the_reply_gives_the_original_source() {
        // A reply shaped as the kernel's: the original tuple of a client
        // 10.0.0.9:40000 -> 10.0.0.2:80, then other attributes.
        let mut ip = Vec::new();
        attribute(&mut ip, CTA_IP_V4_SRC, &[10, 0, 0, 9]);
        attribute(&mut ip, CTA_IP_V4_DST, &[10, 0, 0, 2]);
        let mut proto = Vec::new();
        attribute(&mut proto, CTA_PROTO_NUM, &[6]);
        attribute(&mut proto, CTA_PROTO_SRC_PORT, &40000u16.to_be_bytes());
        attribute(&mut proto, CTA_PROTO_DST_PORT, &80u16.to_be_bytes());
        let mut tuple = Vec::new();
        attribute(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
        attribute(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
        let mut payload = vec![libc::AF_INET as u8, 0, 0, 0];
        attribute(&mut payload, CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple);
        attribute(&mut payload, 3, &[0, 0, 0, 8]); // CTA_STATUS
        let mut reply = Vec::new();
        reply.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        // (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
        reply.extend_from_slice(&(1u16 << 8).to_ne_bytes());
        reply.extend_from_slice(&[0; 10]);
        reply.extend_from_slice(&payload);
        assert_eq!(parse_reply(&reply), Some("10.0.0.9:40000".parse().unwrap()));
        // An error message, and garbage, give nothing.
        let mut error = reply.clone();
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(parse_reply(&error), None);
        assert_eq!(parse_reply(&reply[..19]), None);
        let mut truncated = reply.clone();
        truncated[0..4].copy_from_slice(&9999u32.to_ne_bytes());
        assert_eq!(parse_reply(&truncated), None);
    }
}
