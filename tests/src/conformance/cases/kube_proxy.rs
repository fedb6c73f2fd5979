//! test/e2e/network/kube_proxy.go: `[sig-network] KubeProxy ...`.

use super::Case;

pub(super) fn cases() -> Vec<Case> {
    vec![Case::unsupported(
        "[sig-network] KubeProxy should set TCP CLOSE_WAIT timeout [Privileged]",
        "checks netfilter's nf_conntrack table; the eBPF datapath keeps its own conntrack and sets no nf_conntrack sysctls",
    )]
}
