//! Socket-level load balancing for the node's own processes (kubelet
//! probes, hostNetwork pods, an operator's curl): their packets never cross
//! a pod-facing interface, so the service address is translated when the
//! socket connects (TCP, connected UDP) or sends (unconnected UDP), and the
//! application is shown the service address back (getpeername, recvmsg).
//!
//! Only sockets of the agent's own network namespace are touched
//! (`Config::netns_cookie`); pods keep the packet path.
//!
//! IPv6 sockets have their own hooks and reverse-NAT map; an IPv6 socket
//! addressing an IPv4-mapped address (`::ffff:10.96.0.10`, how dual-stack
//! applications reach IPv4 Services) is translated by the IPv4 frontend and
//! sent to the backend's IPv4-mapped address. (The kernel sends such a
//! socket's unconnected UDP datagrams by its IPv4 path, so `sendmsg4`
//! translates those; their answers are restored from the IPv4 map.)

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::{
    Addr6, BackendOf, SockRevNat, SockRevNat6, SockRevNatKey, SockRevNatKey6, proto, stat,
};

use crate::{
    lb::{self, Choice},
    maps::{SOCK_REVNAT, config, count, kep_sock_rnat6},
};

/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const ETIMEDOUT: i32 = 110;

#[cgroup_sock_addr(connect4)]
pub fn kep_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kep_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn kep_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    // recvmsg hooks may not refuse.
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn kep_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn kep_connect6(ctx: SockAddrContext) -> i32 {
    translate6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kep_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn kep_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn kep_getpeername6(ctx: SockAddrContext) -> i32 {
    restore6(&ctx);
    ALLOW
}

#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    match config() {
        Some(cfg) if cfg.netns_cookie != 0 => {
            let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            cookie == cfg.netns_cookie
        }
        _ => false,
    }
}

/// The socket's TCP or UDP protocol, if it is ours to translate.
#[inline(always)]
fn translatable(ctx: &SockAddrContext) -> Option<u8> {
    if !ours(ctx) {
        return None;
    }
    let l4 = unsafe { (*ctx.sock_addr).protocol } as u8;
    (l4 == proto::TCP || l4 == proto::UDP).then_some(l4)
}

/// A socket has no 5-tuple yet (its port may be unbound), so the Maglev
/// position is random: the same spread, per connect or datagram.
#[inline(always)]
fn socket_hash() -> u32 {
    unsafe { bpf_get_prandom_u32() }
}

/// The hook's verdict on `choice`; a backend is handed to `redirect`,
/// which points the socket at it.
#[inline(always)]
fn answer<A>(choice: Choice<A>, redirect: impl FnOnce(BackendOf<A>)) -> i32 {
    match choice {
        Choice::Backend { backend, .. } => {
            redirect(backend);
            count(stat::SOCK_TRANSLATED);
            ALLOW
        }
        Choice::Pass => ALLOW,
        // The socket's answer to kube-proxy's REJECT: connect() fails at
        // once with ECONNREFUSED.
        Choice::Reject => {
            count(stat::REJECTS);
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            DENY
        }
        // A dropped packet would time out; a socket learns the same at once.
        Choice::Drop => {
            unsafe { bpf_set_retval(-ETIMEDOUT) };
            DENY
        }
    }
}

/// Destination VIP:port -> a backend, remembered per socket for `restore`.
#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    let Some(l4) = translatable(ctx) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    // Both in network byte order; the port sits in the low 16 bits.
    let addr = unsafe { (*sa).user_ip4 };
    let port = unsafe { (*sa).user_port } as u16;
    // The node's own sockets share the node's address: one affinity client.
    let choice = lb::choose(addr, port, l4, 0, socket_hash(), false);
    answer(choice, |backend| {
        let key = SockRevNatKey {
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            addr: backend.addr,
            port: backend.port,
            _pad: 0,
        };
        let value = SockRevNat {
            addr,
            port,
            _pad: 0,
        };
        // Without the entry the application would see the backend as
        // its peer; the connection itself still works, so go on.
        let _ = SOCK_REVNAT.insert(key, value, 0);
        unsafe {
            (*sa).user_ip4 = backend.addr;
            (*sa).user_port = backend.port as u32;
        }
    })
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
#[inline(always)]
fn v4_mapped(addr: &Addr6) -> Option<u32> {
    (addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_PREFIX).then_some(addr[3])
}

/// The third word of an IPv4-mapped address (bytes `00 00 ff ff`).
const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// [`translate`] for an IPv6 socket: an IPv6 frontend, or an IPv4 one
/// behind an IPv4-mapped address.
#[inline(always)]
fn translate6(ctx: &SockAddrContext) -> i32 {
    let Some(l4) = translatable(ctx) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    let addr = user_ip6(ctx);
    let port = unsafe { (*sa).user_port } as u16;
    let hash = socket_hash();
    match v4_mapped(&addr) {
        Some(v4) => answer(lb::choose(v4, port, l4, 0, hash, false), |backend| {
            redirect6(
                ctx,
                addr,
                port,
                [0, 0, V4_MAPPED_PREFIX, backend.addr],
                backend.port,
            )
        }),
        None => answer(lb::choose(addr, port, l4, [0; 4], hash, false), |backend| {
            redirect6(ctx, addr, port, backend.addr, backend.port)
        }),
    }
}

/// Points an IPv6 socket that addressed `(vip, vport)` at `(to, port)`,
/// remembering the frontend for [`restore6`].
#[inline(always)]
fn redirect6(ctx: &SockAddrContext, vip: Addr6, vport: u16, to: Addr6, port: u16) {
    let key = SockRevNatKey6 {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: to,
        port,
        _pad: [0; 3],
    };
    let value = SockRevNat6 {
        addr: vip,
        port: vport,
        _pad: 0,
    };
    // As for IPv4: without it only the peer the application sees is wrong.
    let _ = kep_sock_rnat6.insert(key, value, 0);
    set_user_ip6(ctx, &to);
    unsafe { (*ctx.sock_addr).user_port = port as u32 };
}

/// The socket address's IPv6 address. Read word by word at fixed offsets
/// from the context: the verifier refuses a context pointer moved to the
/// array and dereferenced, which a whole-array copy compiles to.
#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> Addr6 {
    let sa = ctx.sock_addr;
    unsafe {
        [
            core::ptr::read_volatile(&(*sa).user_ip6[0]),
            core::ptr::read_volatile(&(*sa).user_ip6[1]),
            core::ptr::read_volatile(&(*sa).user_ip6[2]),
            core::ptr::read_volatile(&(*sa).user_ip6[3]),
        ]
    }
}

/// Writes the socket address's IPv6 address, likewise word by word.
#[inline(always)]
fn set_user_ip6(ctx: &SockAddrContext, addr: &Addr6) {
    let sa = ctx.sock_addr;
    unsafe {
        core::ptr::write_volatile(&mut (*sa).user_ip6[0], addr[0]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[1], addr[1]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[2], addr[2]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[3], addr[3]);
    }
}

/// Backend address seen by the application -> the VIP:port it asked for.
#[inline(always)]
fn restore(ctx: &SockAddrContext) {
    if !ours(ctx) {
        return;
    }
    let sa = ctx.sock_addr;
    let key = SockRevNatKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: unsafe { (*sa).user_ip4 },
        port: unsafe { (*sa).user_port } as u16,
        _pad: 0,
    };
    if let Some(vip) = unsafe { SOCK_REVNAT.get(key) } {
        unsafe {
            (*sa).user_ip4 = vip.addr;
            (*sa).user_port = vip.port as u32;
        }
    }
}

/// [`restore`] for an IPv6 socket.
#[inline(always)]
fn restore6(ctx: &SockAddrContext) {
    if !ours(ctx) {
        return;
    }
    let sa = ctx.sock_addr;
    let key = SockRevNatKey6 {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: user_ip6(ctx),
        port: unsafe { (*sa).user_port } as u16,
        _pad: [0; 3],
    };
    if let Some(vip) = unsafe { kep_sock_rnat6.get(key) } {
        set_user_ip6(ctx, &vip.addr);
        unsafe { (*sa).user_port = vip.port as u32 };
        return;
    }
    // An unconnected IPv6 UDP socket's datagram to an IPv4-mapped address
    // is sent by the IPv4 path, whose sendmsg4 hook translated it into the
    // IPv4 map; its answers come back here, mapped.
    let Some(v4) = v4_mapped(&key.addr) else {
        return;
    };
    let key4 = SockRevNatKey {
        cookie: key.cookie,
        addr: v4,
        port: key.port,
        _pad: 0,
    };
    if let Some(vip) = unsafe { SOCK_REVNAT.get(key4) } {
        set_user_ip6(ctx, &[0, 0, V4_MAPPED_PREFIX, vip.addr]);
        unsafe { (*sa).user_port = vip.port as u32 };
    }
}
