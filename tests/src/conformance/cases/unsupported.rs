//! Cases the project cannot run yet, listed so that the table shows them.

use super::Case;

const IPV6: &str = "IPv6 Services are written into the kep_*6 maps and the node's own IPv6 sockets are translated (cgroup hooks), but no TC/XDP program translates IPv6 packets yet (pods, external clients)";
const SCTP: &str = "this kernel has no sctp module (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) fails with \
     EPROTONOSUPPORT), so no association can be made; the datapath translates SCTP (tested with \
     BPF_PROG_TEST_RUN on packets with real CRC32c)";

pub(super) fn cases() -> Vec<Case> {
    let dual = |name| Case::unsupported(name, IPV6);
    let sctp = |name| Case::unsupported(name, SCTP);
    vec![
        sctp(
            "[sig-network] Services should allow creating a basic SCTP service with pod and endpoints [LinuxOnly] [Serial]",
        ),
        sctp(
            "[sig-network] Networking Granular Checks: Services should function for pod-Service: sctp [Feature:SCTPConnectivity]",
        ),
        sctp(
            "[sig-network] Networking Granular Checks: Services should function for node-Service: sctp [Feature:SCTPConnectivity]",
        ),
        sctp(
            "[sig-network] Networking Granular Checks: Services should function for endpoint-Service: sctp [Feature:SCTPConnectivity]",
        ),
        dual(
            "[sig-network] [Feature:IPv6DualStack] should create a single stack service with cluster ip from primary service range",
        ),
        dual("[sig-network] [Feature:IPv6DualStack] should create service with ipv4 cluster ip"),
        dual("[sig-network] [Feature:IPv6DualStack] should create service with ipv6 cluster ip"),
        dual("[sig-network] [Feature:IPv6DualStack] should create service with ipv4,v6 cluster ip"),
        dual("[sig-network] [Feature:IPv6DualStack] should create service with ipv6,v4 cluster ip"),
        dual(
            "[sig-network] [Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family [LinuxOnly] should function for pod-Service: http",
        ),
        dual(
            "[sig-network] [Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family [LinuxOnly] should function for pod-Service: udp",
        ),
        dual(
            "[sig-network] [Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family [LinuxOnly] should function for endpoint-Service: http",
        ),
        dual(
            "[sig-network] [Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family [LinuxOnly] should function for endpoint-Service: udp",
        ),
        dual(
            "[sig-network] [Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family [LinuxOnly] should update endpoints: http",
        ),
        dual(
            "[sig-network] [Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family [LinuxOnly] should update endpoints: udp",
        ),
        dual(
            "[sig-network] [Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family [LinuxOnly] should function for client IP based session affinity: http [LinuxOnly]",
        ),
        dual(
            "[sig-network] [Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family [LinuxOnly] should function for client IP based session affinity: udp [LinuxOnly]",
        ),
        dual(
            "[sig-network] [Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family [LinuxOnly] should be able to handle large requests: http",
        ),
        dual(
            "[sig-network] [Feature:IPv6DualStack] Granular Checks: Services Secondary IP Family [LinuxOnly] should be able to handle large requests: udp",
        ),
    ]
}
