//! Socket-level load balancing for the node's own processes (kubelet
//! probes, hostNetwork pods, an operator's curl): their packets never cross
//! a pod-facing interface, so the service address is translated when the
//! socket connects (TCP, connected UDP) or sends (unconnected UDP), and the
//! application is shown the service address back (getpeername, recvmsg).
//!
//! Only sockets of the agent's own network namespace are touched
//! (`Config::netns_cookie`); pods keep the packet path.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::{SockRevNat, SockRevNatKey, proto, stat};

use crate::{
    lb::{self, Choice},
    maps::{SOCK_REVNAT, config, count},
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

/// Destination VIP:port -> a backend, remembered per socket for `restore`.
#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    let l4 = unsafe { (*sa).protocol } as u8;
    if l4 != proto::TCP && l4 != proto::UDP {
        return ALLOW;
    }
    // Both in network byte order; the port sits in the low 16 bits.
    let addr = unsafe { (*sa).user_ip4 };
    let port = unsafe { (*sa).user_port } as u16;
    // The node's own sockets share the node's address: one affinity client.
    // A socket has no 5-tuple yet (its port may be unbound), so the Maglev
    // position is random: the same spread, per connect or datagram.
    let hash = unsafe { bpf_get_prandom_u32() };
    match lb::choose(addr, port, l4, 0, hash, false) {
        Choice::Backend { backend, .. } => {
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
