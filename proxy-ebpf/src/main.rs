//! kube-ebpf-proxy datapath.
//!
//! Laid out by stage, as Katran splits its balancer: `packet` parses,
//! `flow` tracks connections and opens flows, `lb` chooses an endpoint,
//! `maps` holds the maps, and the hooks are thin: `tc` (pod and node
//! interfaces), `xdp` (node interfaces' fast path), `sock` (the node's own
//! sockets), with `fib` (sending past the stack by FIB lookup), `fast`
//! (Service flows between pods past the host stack), `reject`
//! (kube-proxy's REJECT answer), `icmp` (ICMP errors about translated
//! flows), `frag` (IP fragments), `sctp` (its CRC32c) and `csum`
//! (checksums) beside them.
#![no_std]
#![no_main]
// Inline assembly on the BPF target (an empty barrier, see `frag`).
#![feature(asm_experimental_arch)]

mod csum;
mod fast;
mod fib;
mod flow;
mod frag;
mod icmp;
mod lb;
mod maps;
mod packet;
mod reject;
mod sctp;
mod sock;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
