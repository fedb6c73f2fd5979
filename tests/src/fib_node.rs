//! A network namespace whose routing is a node's, for feeding packets with
//! BPF_PROG_TEST_RUN to programs that call `bpf_fib_lookup` (the XDP fast
//! path, the TC node program's redirect): `eth0` on a fabric with the other
//! node and an external client as permanent neighbours, backend 0's pod
//! subnet behind the other node, and a pod veth leading to backend 1 on
//! this node. Nothing is sent anywhere: the namespace only answers lookups.
//! Run the programs on a thread inside it ([`Netns::run`]), giving `eth0`'s
//! index as the packet's ingress interface.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

use crate::{Netns, addr};

/// This node's address on `eth0`.
pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 11);
/// The other node: next hop to backend 0's pod subnet.
pub const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
pub const EXT_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
pub const OTHER_NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0x10];
pub const EXT_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0x64];
pub const LOCAL_POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x11, 0x02];

pub struct FibNode {
    pub ns: Netns,
    /// `eth0`'s index in the namespace.
    pub eth0: u32,
    pub eth0_mac: [u8; 6],
}

impl FibNode {
    pub fn new() -> Result<FibNode> {
        static N: AtomicU32 = AtomicU32::new(0);
        let ns = Netns::create(&format!(
            "kep-fib-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))?;
        // The FIB answers forwarding lookups only where forwarding is on.
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "fabric0",
        ])?;
        ns.ip(&[
            "link", "add", "veth-p1", "type", "veth", "peer", "name", "pod1",
        ])?;
        for dev in ["eth0", "fabric0", "veth-p1", "pod1"] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
        ns.ip(&["addr", "add", &format!("{NODE}/24"), "dev", "eth0"])?;
        let local_pod = addr::backend_ip(1);
        let [a, b, c, _] = local_pod.octets();
        ns.ip(&[
            "addr",
            "add",
            &format!("{a}.{b}.{c}.1/24"),
            "dev",
            "veth-p1",
        ])?;
        for (who, mac, dev) in [
            (OTHER_NODE, OTHER_NODE_MAC, "eth0"),
            (EXT_CLIENT, EXT_CLIENT_MAC, "eth0"),
            (local_pod, LOCAL_POD_MAC, "veth-p1"),
        ] {
            ns.ip(&[
                "neigh",
                "replace",
                &who.to_string(),
                "lladdr",
                &mac_text(mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        let [a, b, c, _] = addr::backend_ip(0).octets();
        ns.ip(&[
            "route",
            "add",
            &format!("{a}.{b}.{c}.0/24"),
            "via",
            &OTHER_NODE.to_string(),
            "dev",
            "eth0",
        ])?;
        // sysfs would show the namespace it was mounted in, not this one.
        let eth0 = ns.try_run(|| unsafe { libc::if_nametoindex(c"eth0".as_ptr()) })?;
        if eth0 == 0 {
            bail!("eth0 has no index in {}", ns.name());
        }
        let link = ns.ip(&["-o", "link", "show", "eth0"])?;
        let text = link
            .split("link/ether ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .with_context(|| format!("no MAC address in {link:?}"))?;
        let mut eth0_mac = [0u8; 6];
        for (byte, part) in eth0_mac.iter_mut().zip(text.split(':')) {
            *byte = u8::from_str_radix(part, 16)?;
        }
        Ok(FibNode { ns, eth0, eth0_mac })
    }
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
