//! `kube-ebpf-proxy`: the node agent and its operator commands.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use proxy_common::defaults;
use proxy_userspace::{
    agent::{self, RunConfig},
    datapath::{self, DatapathConfig},
    interfaces,
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
    Run(RunArgs),
    /// Remove every map the agent pinned (like `kube-proxy --cleanup`).
    Cleanup {
        #[arg(long, env = "KEP_BPFFS", default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
        bpffs: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Directory of Service and EndpointSlice YAML files (multi-document),
    /// watched for changes.
    #[arg(long, env = "KEP_MANIFESTS")]
    manifests: PathBuf,
    /// Pod-facing interfaces to attach to: names or glob patterns, comma
    /// separated (e.g. `veth*,cali*,lxc*`).
    #[arg(long, env = "KEP_INTERFACES")]
    interfaces: String,
    /// Directory on bpffs where maps are pinned; bpffs is mounted on its
    /// parent if it is not mounted yet.
    #[arg(long, env = "KEP_BPFFS", default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
    bpffs: PathBuf,
    /// Capacity of the services map (frontends plus backend slots).
    #[arg(long, env = "KEP_SERVICES_MAX", default_value_t = defaults::SERVICES_MAX)]
    services_max: u32,
    /// Capacity of the backends map.
    #[arg(long, env = "KEP_BACKENDS_MAX", default_value_t = defaults::BACKENDS_MAX)]
    backends_max: u32,
    /// Capacity of the conntrack map (two entries per flow).
    #[arg(long, env = "KEP_CONNTRACK_MAX", default_value_t = defaults::CONNTRACK_MAX)]
    conntrack_max: u32,
    /// How often the manifest directory and interfaces are checked, in ms.
    #[arg(long, env = "KEP_POLL_INTERVAL_MS", default_value_t = 200)]
    poll_interval_ms: u64,
    /// Full resync period in seconds.
    #[arg(long, env = "KEP_RESYNC_INTERVAL_S", default_value_t = 60)]
    resync_interval_s: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => {
            let cfg = RunConfig {
                manifests: args.manifests,
                interfaces: interfaces::parse_patterns(&args.interfaces),
                datapath: DatapathConfig {
                    bpffs: args.bpffs,
                    services_max: args.services_max,
                    backends_max: args.backends_max,
                    conntrack_max: args.conntrack_max,
                },
                poll_interval: Duration::from_millis(args.poll_interval_ms),
                resync_interval: Duration::from_secs(args.resync_interval_s),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(agent::run_manifests(cfg))
        }
        Command::Cleanup { bpffs } => {
            datapath::unpin_all(&bpffs)
                .with_context(|| format!("removing pinned maps under {}", bpffs.display()))?;
            println!("removed pinned maps under {}", bpffs.display());
            Ok(())
        }
    }
}
