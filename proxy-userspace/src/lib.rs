//! kube-ebpf-proxy agent library: the pure model (Services + EndpointSlices ->
//! desired map contents), its encoding and diffing, the manifest source, and
//! the datapath that owns the loaded eBPF object and its pinned maps.

pub mod agent;
pub mod capacity;
pub mod contents;
pub mod datapath;
pub mod diff;
pub mod encode;
pub mod healthcheck;
pub mod http;
pub mod inspect;
pub mod interfaces;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod source;
pub mod tables;
pub mod yaml_limits;
