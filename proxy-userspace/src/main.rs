//! `kube-ebpf-proxy`: the node agent and its operator commands.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, CommandFactory, Parser, Subcommand};
use proxy_common::defaults;
use proxy_userspace::{
    agent::{self, RunConfig},
    datapath::{self, DatapathConfig},
    encode::{LbAlgorithm, LbAlgorithms},
    inspect, interfaces, maglev,
    model::IpCidr,
    source::{ManifestSource, kube::KubeSource},
};

#[derive(Parser)]
#[command(
    name = "kube-ebpf-proxy",
    version,
    about = "eBPF replacement for kube-proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: program the datapath from Services and EndpointSlices.
    Run(Box<RunArgs>),
    /// Map fill and datapath counters of a running agent (its pinned maps).
    Status {
        #[arg(long, env = "KEP_BPFFS", default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
        bpffs: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print one of a running agent's maps as a table (or JSON).
    Dump {
        what: DumpWhat,
        #[arg(long, env = "KEP_BPFFS", default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
        bpffs: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove every link and map the agent pinned (like `kube-proxy
    /// --cleanup`). Refused while an agent runs on the directory.
    Cleanup {
        #[arg(long, env = "KEP_BPFFS", default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
        bpffs: PathBuf,
        /// Remove it even while an agent holds it (that agent pins
        /// everything again at once; stop it to keep the datapath gone).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DumpWhat {
    Services,
    Backends,
    Conntrack,
    Affinity,
}

#[derive(Args)]
struct RunArgs {
    /// Directory of Service and EndpointSlice YAML files (multi-document),
    /// watched for changes, instead of the API server.
    #[arg(long, env = "KEP_MANIFESTS", conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig to reach the API server with. Without it (and without
    /// --manifests): $KUBECONFIG, ~/.kube/config, or the in-cluster service
    /// account, in that order.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name in Kubernetes (set it from the downward API's
    /// spec.nodeName); defaults to the host name, as kubelet's does.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Pod-facing interfaces to attach to: names or glob patterns, comma
    /// separated (e.g. `veth*,cali*,lxc*`).
    #[arg(long, env = "KEP_INTERFACES")]
    interfaces: String,
    /// The node's own interfaces (traffic from outside the node: NodePort,
    /// LoadBalancer and external IPs, replies of flows translated on other
    /// nodes), names or globs, comma separated (e.g. `eth0,ens*`). Their
    /// IPv4 addresses are the node's; the first is the masquerade source.
    #[arg(long, env = "KEP_NODE_INTERFACES", default_value = "")]
    node_interfaces: String,
    /// NodePorts answer only on node addresses inside these CIDRs (comma
    /// separated); unset: on every node address.
    #[arg(long, env = "KEP_NODEPORT_ADDRESSES", default_value = "", value_parser = parse_cidr_list)]
    nodeport_addresses: CidrList,
    /// XDP fast path on the node interfaces: `auto` (native on NICs, none
    /// on virtual interfaces such as veth, which TC serves alone), `native`
    /// (falls back to generic with a warning), `generic` or `off`.
    #[arg(long, env = "KEP_XDP_MODE", default_value = "auto", value_parser = ["auto", "native", "generic", "off"])]
    xdp_mode: String,
    /// Directory on bpffs where maps and links are pinned, locked by the
    /// agent. bpffs is mounted at /sys/fs/bpf when the directory is below
    /// it and it is not mounted yet; any other path must already be on a
    /// bpffs. The directory and its ancestors must not be writable by other
    /// users.
    #[arg(long, env = "KEP_BPFFS", default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
    bpffs: PathBuf,
    /// Service CIDRs, comma separated (kube-apiserver's
    /// --service-cluster-ip-range): an address inside that is no cluster IP
    /// is dropped, as kube-proxy does.
    #[arg(long, env = "KEP_SERVICE_CIDR", default_value = "10.96.0.0/12", value_parser = parse_cidr_list)]
    service_cidr: CidrList,
    /// Source address for hairpin flows (a pod reaching itself through its
    /// Service). Link-local, so no pod or node owns it.
    #[arg(long, env = "KEP_HAIRPIN_SNAT_IP", default_value_t = datapath::DEFAULT_HAIRPIN_ADDR)]
    hairpin_snat_ip: std::net::Ipv4Addr,
    /// cgroup v2 directory whose processes (in this network namespace) reach
    /// Services by socket-level translation: the node's cgroup root
    /// (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts) in
    /// production, so kubelet probes and hostNetwork pods work. Unset: host
    /// processes are not translated.
    #[arg(long, env = "KEP_SOCKET_LB_CGROUP")]
    socket_lb_cgroup: Option<PathBuf>,
    /// Idle timeout of established TCP flows (e.g. 24h, 90m, 30s).
    #[arg(long, env = "KEP_CONNTRACK_TCP_TIMEOUT_ESTABLISHED", default_value = "24h", value_parser = parse_duration)]
    conntrack_tcp_timeout_established: Duration,
    /// Idle timeout of TCP flows after an RST, or a FIN from both sides.
    #[arg(long, env = "KEP_CONNTRACK_TCP_TIMEOUT_CLOSING", default_value = "10s", value_parser = parse_duration)]
    conntrack_tcp_timeout_closing: Duration,
    /// Idle timeout of half-closed TCP flows (a FIN from one side only), as
    /// kube-proxy's flag of this name (netfilter's CLOSE_WAIT).
    #[arg(long, env = "KEP_CONNTRACK_TCP_TIMEOUT_CLOSE_WAIT", default_value = "1h", value_parser = parse_duration)]
    conntrack_tcp_timeout_close_wait: Duration,
    /// Idle timeout of TCP (and SCTP) flows that have seen no reply
    /// (netfilter's SYN_SENT).
    #[arg(long, env = "KEP_CONNTRACK_TCP_TIMEOUT_SYN_SENT", default_value = "2m", value_parser = parse_duration)]
    conntrack_tcp_timeout_syn_sent: Duration,
    /// Service flows between pods (and to endpoints on other nodes)
    /// delivered past the host's routing and netfilter once their first
    /// reply is seen: `on` or `off`. Turn it off where netfilter must see
    /// that traffic (e.g. a CNI enforcing NetworkPolicy with iptables).
    #[arg(long, env = "KEP_FAST_PATH", default_value = "on", value_parser = ["on", "off"])]
    fast_path: String,

    /// Idle timeout of UDP flows.
    #[arg(long, env = "KEP_CONNTRACK_UDP_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    conntrack_udp_timeout: Duration,
    /// How often expired conntrack entries are deleted (1ms..=7d).
    #[arg(long, env = "KEP_CONNTRACK_GC_INTERVAL", default_value = "30s", value_parser = parse_interval)]
    conntrack_gc_interval: Duration,
    /// Capacity of the services map (frontends plus backend slots).
    #[arg(long, env = "KEP_SERVICES_MAX", default_value_t = defaults::SERVICES_MAX)]
    services_max: u32,
    /// Capacity of the backends map.
    #[arg(long, env = "KEP_BACKENDS_MAX", default_value_t = defaults::BACKENDS_MAX)]
    backends_max: u32,
    /// Capacity of the TCP conntrack map (two entries per flow).
    #[arg(long, env = "KEP_CONNTRACK_MAX", default_value_t = defaults::CONNTRACK_MAX)]
    conntrack_max: u32,
    /// Capacity of the conntrack map of every other protocol (UDP, SCTP,
    /// ICMP; two entries per flow): a flood of them never evicts a TCP flow.
    #[arg(long, env = "KEP_CONNTRACK_OTHER_MAX", default_value_t = defaults::CONNTRACK_OTHER_MAX)]
    conntrack_other_max: u32,
    /// How new flows from outside the cluster (NodePorts, load-balancer IPs
    /// and external IPs reached through a node interface) pick an endpoint:
    /// `maglev` (consistent hashing: a flow reaches the same endpoint
    /// whichever node it arrives at, and after conntrack state is lost; an
    /// endpoint change moves few flows) or `random`.
    #[arg(long, env = "KEP_LB_ALGORITHM", default_value = "maglev", value_parser = ["maglev", "random"])]
    lb_algorithm: String,
    /// How new flows from inside the cluster (pods and the node's processes,
    /// to cluster IPs and to every other frontend) pick an endpoint: `random`
    /// (they are translated on the client's node, whose conntrack keeps the
    /// flow) or `maglev` (the same choice on every node, at one 64 KiB table
    /// per frontend with endpoints).
    #[arg(long, env = "KEP_CLUSTER_LB_ALGORITHM", default_value = "random", value_parser = ["maglev", "random"])]
    cluster_lb_algorithm: String,
    /// Maglev table size per frontend (prime, 251..=16381). Each table
    /// takes one 64 KiB map value whatever the size; larger tables move
    /// fewer flows when one of many endpoints changes.
    #[arg(long, env = "KEP_MAGLEV_TABLE_SIZE", default_value_t = maglev::DEFAULT_SIZE, value_parser = parse_maglev_size)]
    maglev_table_size: u32,
    /// Capacity of the Maglev map (frontends with a table). Tables are
    /// allocated as needed, 64 KiB each; this only caps them.
    #[arg(long, env = "KEP_MAGLEV_MAX", default_value_t = defaults::MAGLEV_MAX)]
    maglev_max: u32,
    /// Capacity of the loadBalancerSourceRanges map (one entry per range of
    /// each load-balancer frontend entry).
    #[arg(long, env = "KEP_SOURCE_RANGES_MAX", default_value_t = defaults::SOURCE_RANGES_MAX)]
    source_ranges_max: u32,
    /// How often the pinned links are checked (re-attached when detached
    /// or unpinned behind the agent's back; interfaces and addresses are
    /// followed by netlink events), and a missing manifest directory looked
    /// for, in ms (1..=3600000).
    #[arg(long, env = "KEP_POLL_INTERVAL_MS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=MAX_POLL_INTERVAL_MS))]
    poll_interval_ms: u64,
    /// Period of the safety-net resync (the maps re-read and compared with
    /// everything desired), in seconds (1..=604800).
    #[arg(long, env = "KEP_RESYNC_INTERVAL_S", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=MAX_INTERVAL.as_secs()))]
    resync_interval_s: u64,
    /// Metrics server: Prometheus `/metrics`, `/proxyMode` (answers `ebpf`)
    /// and a plain `/healthz`, as kube-proxy's --metrics-bind-address.
    /// `IP:port`, or an IP alone for port 10249; empty: not served.
    #[arg(long, alias = "metrics-addr", env = "KEP_METRICS_BIND_ADDRESS",
          default_value = "127.0.0.1:10249", value_parser = parse_metrics_address)]
    metrics_bind_address: BindAddress,
    /// Health server: `/healthz` (fails once no sync completed for 2 x the
    /// resync interval, when the pinned datapath cannot be restored, or
    /// when this node is being deleted), `/livez` (the same, whatever the
    /// node) and `/readyz` (the first sync is written and nothing is left
    /// unprogrammed),
    /// as kube-proxy's --healthz-bind-address. `IP:port`, or an IP alone for
    /// port 10256; empty: not served.
    #[arg(long, env = "KEP_HEALTHZ_BIND_ADDRESS", default_value = "0.0.0.0:10256",
          value_parser = parse_healthz_address)]
    healthz_bind_address: BindAddress,
}

/// Longest resync and garbage collection interval, and poll interval:
/// zero or unbounded periods would panic the agent's timers.
const MAX_INTERVAL: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_POLL_INTERVAL_MS: u64 = 3_600_000;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs usually go to a collector.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Run(args) => {
            // Flags that parse but cannot go together fail here, as a bad
            // value does, before anything is loaded or attached.
            if let Err(conflict) =
                check_bind_addresses(&args.metrics_bind_address, &args.healthz_bind_address)
            {
                Cli::command()
                    .error(clap::error::ErrorKind::ArgumentConflict, conflict)
                    .exit();
            }
            raise_fd_limit();
            let poll_interval = Duration::from_millis(args.poll_interval_ms);
            let node_name = match args.node_name {
                Some(n) => n,
                None => {
                    hostname().context("--node-name is unset and the host name is unreadable")?
                }
            };
            let cfg = RunConfig {
                node_name,
                interfaces: interfaces::parse_patterns(&args.interfaces),
                node_interfaces: interfaces::parse_patterns(&args.node_interfaces),
                nodeport_addresses: args.nodeport_addresses.0,
                datapath: DatapathConfig {
                    bpffs: args.bpffs,
                    services_max: args.services_max,
                    backends_max: args.backends_max,
                    conntrack_max: args.conntrack_max,
                    conntrack_other_max: args.conntrack_other_max,
                    maglev_max: args.maglev_max,
                    source_ranges_max: args.source_ranges_max,
                    service_cidrs: service_cidrs(&args.service_cidr.0),
                    service_cidrs6: service_cidrs6(&args.service_cidr.0),
                    hairpin_addr: Some(args.hairpin_snat_ip),
                    timeouts: datapath::CtTimeouts {
                        tcp_established: args.conntrack_tcp_timeout_established,
                        tcp_closing: args.conntrack_tcp_timeout_closing,
                        udp: args.conntrack_udp_timeout,
                        tcp_syn_sent: args.conntrack_tcp_timeout_syn_sent,
                        tcp_close_wait: args.conntrack_tcp_timeout_close_wait,
                    },
                    fast_path: args.fast_path == "on",
                    reject_limit: datapath::RejectLimit::of_node(),
                    xdp: args
                        .xdp_mode
                        .parse()
                        .map_err(|e: String| anyhow::anyhow!(e))?,
                },
                lb_algorithms: {
                    let algorithm = |name: &str| match name {
                        "maglev" => LbAlgorithm::Maglev {
                            table_size: args.maglev_table_size,
                        },
                        _ => LbAlgorithm::Random,
                    };
                    LbAlgorithms {
                        external: algorithm(&args.lb_algorithm),
                        internal: algorithm(&args.cluster_lb_algorithm),
                    }
                },
                socket_lb_cgroup: args.socket_lb_cgroup,
                poll_interval,
                conntrack_gc_interval: args.conntrack_gc_interval,
                resync_interval: Duration::from_secs(args.resync_interval_s),
                metrics_addr: args.metrics_bind_address.0,
                healthz_addr: args.healthz_bind_address.0,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match args.manifests {
                // The inotify watch registers with the runtime's reactor.
                Some(dir) => runtime.block_on(async {
                    agent::run(cfg, ManifestSource::new(dir, poll_interval)).await
                }),
                None => runtime.block_on(async {
                    let client = kube_client(args.kubeconfig.as_deref()).await?;
                    let source = KubeSource::new(client, &cfg.node_name);
                    agent::run(cfg, source).await
                }),
            }
        }
        Command::Status { bpffs, json } => {
            let pinned = read_pinned(&bpffs)?;
            // Without links the maps still tell a story (an agent that
            // never attached, or links removed by hand).
            let links = datapath::pinned_links(&bpffs).unwrap_or_default();
            let view = inspect::status(&pinned, links);
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                println!("frontends: {}", view.frontends);
                let mut rows = vec![vec!["map".into(), "entries".into(), "capacity".into()]];
                rows.extend(view.maps.iter().map(|(name, fill)| {
                    vec![
                        name.to_string(),
                        fill.entries.to_string(),
                        fill.capacity.to_string(),
                    ]
                }));
                print!("{}", inspect::table(&rows));
                let mut rows = vec![vec!["counter".into(), "packets".into()]];
                rows.extend(
                    view.counters
                        .iter()
                        .map(|(n, v)| vec![n.to_string(), v.to_string()]),
                );
                print!("{}", inspect::table(&rows));
                let mut rows = vec![vec!["link".into(), "ifindex".into()]];
                rows.extend(view.links.iter().map(|(pin, ifindex)| {
                    let at = ifindex.map_or("detached".into(), |i| i.to_string());
                    vec![pin.clone(), at]
                }));
                print!("{}", inspect::table(&rows));
            }
            Ok(())
        }
        Command::Dump { what, bpffs, json } => {
            let pinned = read_pinned(&bpffs)?;
            dump(&pinned, what, json)
        }
        Command::Cleanup { bpffs, force } => {
            datapath::cleanup(&bpffs, force)
                .with_context(|| format!("removing pinned maps under {}", bpffs.display()))?;
            println!("removed pinned maps under {}", bpffs.display());
            Ok(())
        }
    }
}

/// A client from `--kubeconfig PATH`, else from the environment
/// (`$KUBECONFIG`, `~/.kube/config`, in-cluster). Only reading the
/// configuration can fail here: connecting happens (and is retried) in the
/// reflectors.
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no --manifests and no Kubernetes configuration found \
             (--kubeconfig, $KUBECONFIG, ~/.kube/config or in-cluster)",
        )?,
    };
    tracing::info!(server = %config.cluster_url, "API server source");
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Raises the soft limit on open files to the hard one: the agent keeps
/// one fd per link it checks (two or three per interface), and the usual
/// soft limit of 1024 would run out at a few hundred pods.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn hostname() -> std::io::Result<String> {
    let mut buf = [0u8; 256];
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
}

/// Comma-separated IPv4 CIDRs.
#[derive(Debug, Clone)]
struct CidrList(Vec<IpCidr>);

/// The service CIDRs of one family, which the datapath drops unallocated
/// addresses of (and rejects unserved ports of cluster IPs in).
fn service_cidrs(cidrs: &[IpCidr]) -> Vec<proxy_userspace::model::Ipv4Cidr> {
    cidrs.iter().filter_map(IpCidr::v4).collect()
}

fn service_cidrs6(cidrs: &[IpCidr]) -> Vec<IpCidr> {
    cidrs.iter().filter(|c| c.v4().is_none()).copied().collect()
}

fn parse_cidr_list(list: &str) -> Result<CidrList, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|cidr| cidr.parse::<IpCidr>().map_err(|e| format!("{cidr}: {e}")))
        .collect::<Result<Vec<_>, _>>()
        .map(CidrList)
}

/// `500ms`, `30s`, `90m`, `24h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text}: missing unit (ms, s, m, h)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|e| format!("{text}: {e}"))?;
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{text}: too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(format!("{text}: unknown unit {unit:?} (ms, s, m, h)")),
    }
}

/// A duration for a timer: [`parse_duration`], more than zero and at most
/// [`MAX_INTERVAL`].
fn parse_interval(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() || d > MAX_INTERVAL {
        return Err(format!("{text}: must be more than 0 and at most 7 days"));
    }
    Ok(d)
}

/// A server's bind address, `None` for "not served".
#[derive(Debug, Clone)]
struct BindAddress(Option<std::net::SocketAddr>);

fn parse_metrics_address(text: &str) -> Result<BindAddress, String> {
    parse_bind_address(text, 10249)
}

fn parse_healthz_address(text: &str) -> Result<BindAddress, String> {
    parse_bind_address(text, 10256)
}

/// `IP:port`, `IP` (with `default_port`), or empty (not served), as
/// kube-proxy's bind address flags.
fn parse_bind_address(text: &str, default_port: u16) -> Result<BindAddress, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(BindAddress(None));
    }
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        return Ok(BindAddress(Some(addr)));
    }
    text.parse::<std::net::IpAddr>()
        .map(|ip| BindAddress(Some(std::net::SocketAddr::new(ip, default_port))))
        .map_err(|_| format!("{text:?}: expected IP:port, an IP, or empty to disable"))
}

/// The metrics and health servers cannot share a port on one address.
fn check_bind_addresses(metrics: &BindAddress, healthz: &BindAddress) -> Result<(), String> {
    if let (Some(m), Some(h)) = (metrics.0, healthz.0) {
        let overlap = m.ip() == h.ip() || m.ip().is_unspecified() || h.ip().is_unspecified();
        if m.port() == h.port() && overlap {
            return Err(format!(
                "--metrics-bind-address {m} and --healthz-bind-address {h} would share a \
                 port: give them different ports"
            ));
        }
    }
    Ok(())
}

fn read_pinned(bpffs: &std::path::Path) -> anyhow::Result<inspect::Pinned> {
    inspect::Pinned::read(bpffs).with_context(|| {
        format!(
            "reading the agent's maps under {} (is it running there? see --bpffs)",
            bpffs.display()
        )
    })
}

fn dump(pinned: &inspect::Pinned, what: DumpWhat, json: bool) -> anyhow::Result<()> {
    let s = |v: &dyn ToString| v.to_string();
    let (value, rows): (serde_json::Value, Vec<Vec<String>>) = match what {
        DumpWhat::Services => {
            let v = inspect::services(pinned);
            (serde_json::to_value(&v)?, inspect::services_rows(&v, true))
        }
        DumpWhat::Backends => {
            let v = inspect::backends(pinned);
            (serde_json::to_value(&v)?, inspect::backends_rows(&v, true))
        }
        DumpWhat::Conntrack => {
            let v = inspect::conntrack(pinned);
            let mut rows = vec![
                [
                    "tuple", "dir", "nat", "backend", "closing", "snat", "idle_s",
                ]
                .map(String::from)
                .to_vec(),
            ];
            rows.extend(v.iter().map(|x| {
                vec![
                    x.tuple.clone(),
                    x.direction.clone(),
                    x.nat.clone(),
                    s(&x.backend_id),
                    s(&x.closing),
                    x.snat.clone(),
                    s(&x.idle_s),
                ]
            }));
            (serde_json::to_value(&v)?, rows)
        }
        DumpWhat::Affinity => {
            let v = inspect::affinity(pinned);
            let mut rows = vec![
                ["svc", "client", "backend", "idle_s"]
                    .map(String::from)
                    .to_vec(),
            ];
            rows.extend(v.iter().map(|x| {
                vec![
                    s(&x.svc_id),
                    x.client.clone(),
                    s(&x.backend_id),
                    s(&x.idle_s),
                ]
            }));
            (serde_json::to_value(&v)?, rows)
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", inspect::table(&rows));
    }
    Ok(())
}

fn parse_maglev_size(text: &str) -> Result<u32, String> {
    let size: u32 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    maglev::check_size(size).map_err(|e| e.to_string())
}
