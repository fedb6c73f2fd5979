//! The control plane at scale, for both sources: the agent alone in the
//! lab, N Services × 3 endpoints from a manifest file or from the fake API
//! server (list + watch, objects as a real API server stores them). Per
//! source and N: time from agent start to programmed and to the last
//! Service answering, peak and steady RSS, the pinned maps' kernel memory
//! (`bytes_memlock`), the agent's CPU over an idle period with no change,
//! and endpoint switches of the last Service: from the change to the last
//! map write (the agent's own `since_event_us`) and to the first answer a
//! client gets from a new endpoint.

use std::net::SocketAddrV4;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::peers::{Peer, peak_rss_kb};
use super::rules::{self, BenchService};
use super::switch::{Prober, SwitchSettings};
use crate::fake_apiserver::FakeApiServer;
use crate::{Agent, Lab, addr, backend_name, loadgen};

/// Where the agent reads its objects from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpSource {
    /// Multi-document manifest files of 500 Services each (`--manifests`).
    Manifests,
    /// The fake API server (`--kubeconfig`).
    Api,
}

impl CpSource {
    pub const ALL: [CpSource; 2] = [CpSource::Manifests, CpSource::Api];

    pub fn name(self) -> &'static str {
        match self {
            CpSource::Manifests => "manifests",
            CpSource::Api => "api",
        }
    }
}

/// What the control-plane part runs.
#[derive(Debug, Clone, Serialize)]
pub struct ControlSettings {
    pub service_counts: Vec<usize>,
    /// Seconds of no change over which the agent's CPU is measured.
    pub idle_s: u64,
    /// Endpoint switches of the last Service per source and N.
    pub switches: usize,
    pub switch: SwitchSettings,
}

/// One source at one N.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlRun {
    pub source: Option<CpSource>,
    pub services: usize,
    /// Agent start until its first `datapath programmed` line.
    pub programmed_ms: Option<f64>,
    /// Agent start until the last Service answered a client.
    pub last_answer_ms: Option<f64>,
    /// The first sync's own `took_us`.
    pub agent_took_us: Option<u64>,
    pub peak_rss_kb: Option<u64>,
    /// VmRSS after the idle period.
    pub rss_kb: Option<u64>,
    /// Sum of the pinned maps' `bytes_memlock` (kernel memory charged).
    pub map_memlock_bytes: Option<u64>,
    /// Agent CPU (user + system) over `idle_s` seconds without a change, in
    /// percent of one core.
    pub idle_cpu_percent: Option<f64>,
    /// Per switch: the agent's `since_event_us` (change reaching the source
    /// to the last map write).
    pub event_to_map_us: Vec<u64>,
    /// Per switch: change (manifest written, or the slice applied to the
    /// API server) to a client's first answer from a new endpoint.
    pub seen_by_client_ms: Vec<f64>,
    /// Per switch: the agent's `ops`.
    pub switch_ops: Vec<u64>,
    pub error: Option<String>,
}

/// Services per manifest file: 500, i.e. 1,000 documents (a Service and
/// its slice), about 0.45 MB, the size of one application's or
/// namespace's manifests as an operator keeps them (and under the agent's
/// 64 MiB bound on one file whatever N). Until 2026-12-02 every N up to
/// 50,000 was one file: an endpoint change then re-read the whole 26 MB at
/// 30,000 (36.5 ms at p99); the README keeps that row.
const FILE_SERVICES: usize = 500;

/// The manifest files holding `services`: (file name, its Services).
fn manifest_files(services: &[BenchService]) -> impl Iterator<Item = (String, &[BenchService])> {
    services
        .chunks(FILE_SERVICES)
        .enumerate()
        .map(|(i, chunk)| (format!("control-plane-{i}.yaml"), chunk))
}
/// Services-map entries of one benchmark Service.
const SERVICE_ENTRIES: usize = 5;
const PROGRAMMED: &str = "datapath programmed";

/// Every source at every N, each on a fresh agent in `lab`.
pub fn run(lab: &Lab, settings: &ControlSettings, backends: usize) -> Vec<ControlRun> {
    let mut out = Vec::new();
    for &n in &settings.service_counts {
        let services = rules::services(n, backends);
        for source in CpSource::ALL {
            let mut run = ControlRun {
                source: Some(source),
                services: n,
                ..ControlRun::default()
            };
            if let Err(e) = measure(lab, source, &services, settings, backends, &mut run) {
                eprintln!("bench: control plane {} N={n}: {e:#}", source.name());
                run.error = Some(format!("{e:#}"));
            }
            println!(
                "N={n:<6} control {:<9} programmed {} last answer {} peak RSS {} maps {} idle CPU {} event->map p50 {} client p50 {}",
                source.name(),
                ms(run.programmed_ms),
                ms(run.last_answer_ms),
                run.peak_rss_kb
                    .map_or("—".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
                run.map_memlock_bytes
                    .map_or("—".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
                run.idle_cpu_percent
                    .map_or("—".into(), |c| format!("{c:.2} %")),
                super::report::quantile(run.event_to_map_us.iter().map(|u| *u as f64 / 1e3), 0.5)
                    .map_or("—".into(), |v| format!("{v:.2} ms")),
                super::report::quantile(run.seen_by_client_ms.iter().copied(), 0.5)
                    .map_or("—".into(), |v| format!("{v:.1} ms")),
            );
            out.push(run);
        }
    }
    out
}

fn ms(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.1} ms"))
}

/// The source's side of a run: how the agent is started and how the last
/// Service's endpoints are changed.
enum Feed {
    /// The manifest files written.
    Manifests(Vec<String>),
    Api {
        server: FakeApiServer,
        kubeconfig: std::path::PathBuf,
    },
}

impl Feed {
    fn new(lab: &Lab, source: CpSource, services: &[BenchService]) -> Result<Feed> {
        match source {
            CpSource::Manifests => {
                let mut files = Vec::new();
                for (name, chunk) in manifest_files(services) {
                    lab.write_manifest(&name, &rules::manifest(chunk))?;
                    files.push(name);
                }
                Ok(Feed::Manifests(files))
            }
            CpSource::Api => {
                let server = FakeApiServer::start_in_netns(lab.node().path())?;
                // A real API server keeps a window of history, not all of it.
                server.set_history_limit(Some(10_000));
                for object in rules::api_objects(services) {
                    server.apply(object)?;
                }
                let kubeconfig = server.kubeconfig(lab.dir())?;
                Ok(Feed::Api { server, kubeconfig })
            }
        }
    }

    fn agent_args(&self, lab: &Lab, services: usize) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = match self {
            Feed::Manifests(_) => vec!["--manifests".into(), lab.manifest_dir().into()],
            Feed::Api { kubeconfig, .. } => vec!["--kubeconfig".into(), kubeconfig.into()],
        };
        // Five services-map entries per Service here (slot 0, three slots,
        // the cluster IP's port-less entry): above the default capacity's
        // ~52,000 Services, the map is sized as an operator would.
        let entries = services * SERVICE_ENTRIES;
        if entries > proxy_common::defaults::SERVICES_MAX as usize {
            args.extend([
                "--services-max".into(),
                entries.next_power_of_two().to_string().into(),
            ]);
        }
        args
    }

    /// Prepares replacing the last Service's endpoints with those of
    /// `services`' last: the manifest rendered and written aside, or the
    /// slice built. Nothing is visible to the agent before
    /// [`Change::publish`], which is what the measurements start from.
    fn prepare(&self, lab: &Lab, services: &[BenchService]) -> Result<Change<'_>> {
        match self {
            Feed::Manifests(_) => {
                // Only the file holding the last Service changes.
                let (name, chunk) = manifest_files(services).last().context("no service")?;
                let staging = lab.dir().join(format!(".staging-{name}"));
                std::fs::write(&staging, rules::manifest(chunk))?;
                Ok(Change::Rename {
                    from: staging,
                    to: lab.manifest_dir().join(name),
                })
            }
            Feed::Api { server, .. } => {
                let last = services.last().context("no service")?;
                let slice = rules::api_objects(std::slice::from_ref(last))
                    .into_iter()
                    .find(|o| o["kind"] == "EndpointSlice")
                    .context("no slice")?;
                Ok(Change::Apply { server, slice })
            }
        }
    }

    fn remove(&self, lab: &Lab) {
        if let Feed::Manifests(files) = self {
            for name in files {
                let _ = lab.remove_manifest(name);
            }
        }
    }
}

/// A prepared change of the last Service's endpoints.
enum Change<'a> {
    /// A manifest written aside, renamed into the manifest directory.
    Rename {
        from: std::path::PathBuf,
        to: std::path::PathBuf,
    },
    /// A slice applied to the API server.
    Apply {
        server: &'a FakeApiServer,
        slice: serde_json::Value,
    },
}

impl Change<'_> {
    fn publish(self) -> Result<()> {
        match self {
            Change::Rename { from, to } => Ok(std::fs::rename(from, to)?),
            Change::Apply { server, slice } => server.apply(slice).map(|_| ()),
        }
    }
}

fn measure(
    lab: &Lab,
    source: CpSource,
    services: &[BenchService],
    settings: &ControlSettings,
    backends: usize,
    run: &mut ControlRun,
) -> Result<()> {
    let feed = Feed::new(lab, source, services)?;
    let result = measure_with(lab, &feed, services, settings, backends, run);
    feed.remove(lab);
    result
}

fn measure_with(
    lab: &Lab,
    feed: &Feed,
    services: &[BenchService],
    settings: &ControlSettings,
    backends: usize,
    run: &mut ControlRun,
) -> Result<()> {
    let timeout = Duration::from_secs(600);
    let t0 = Instant::now();
    let agent = lab.start_agent_args(&feed.agent_args(lab, services.len()))?;
    let line = wait_line(&agent, 1, timeout)?;
    run.programmed_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
    run.agent_took_us = field(&line, "took_us");
    let last = services.last().context("no service")?;
    let target = SocketAddrV4::new(last.vip, rules::SERVICE_PORT);
    let deadline = t0 + timeout;
    loop {
        let r = lab.client().run(move || {
            loadgen::tcp_requests(
                target,
                1,
                Duration::from_millis(200),
                Duration::from_secs(1),
            )
        });
        if r.ok == 1 {
            run.last_answer_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
            break;
        }
        if Instant::now() > deadline {
            bail!("the last service never answered: {r}");
        }
    }
    run.peak_rss_kb = peak_rss_kb(agent.pid());
    run.map_memlock_bytes = Some(map_memlock(agent.bpffs_dir())?);

    // Let the first sync's allocations settle, then measure doing nothing.
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_ticks(agent.pid())?;
    let idle_from = Instant::now();
    std::thread::sleep(Duration::from_secs(settings.idle_s));
    let ticks = cpu_ticks(agent.pid())? - before;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    run.idle_cpu_percent = Some(ticks as f64 / hz / idle_from.elapsed().as_secs_f64() * 100.0);
    run.rss_kb = rss_kb(agent.pid());

    let mut current = services.to_vec();
    for rep in 0..settings.switches {
        // Alternately the spare backend alone and the original endpoints:
        // always backends the Service did not have.
        let to: Vec<usize> = if rep % 2 == 0 {
            vec![backends]
        } else {
            (0..backends).collect()
        };
        if let Some(l) = current.last_mut() {
            l.endpoints = to.iter().map(|&i| addr::backend_ip(i)).collect();
        }
        let names: Vec<String> = to.iter().map(|&i| backend_name(i)).collect();
        let change = feed.prepare(lab, &current)?;
        let prober = Prober::start(lab, target, &names, settings.switch)?;
        let before = agent.log_count(PROGRAMMED);
        let changed = Instant::now();
        change.publish()?;
        let waited = wait_line(&agent, before + 1, timeout);
        let programmed = changed.elapsed();
        let switch = prober.finish(Peer::Ours, services.len(), rep, names, changed, programmed);
        let line = waited?;
        run.event_to_map_us.extend(field(&line, "since_event_us"));
        run.switch_ops.extend(field(&line, "ops"));
        if let Some(ms) = switch.change_to_first_new_ms {
            run.seen_by_client_ms.push(ms);
        }
    }
    drop(agent);
    Ok(())
}

/// The `count`-th `datapath programmed` line (waiting at most `timeout`).
fn wait_line(agent: &Agent<'_>, count: usize, timeout: Duration) -> Result<String> {
    super::peers::wait_programmed(agent, count, timeout)?;
    agent
        .logs()
        .lines()
        .filter(|l| l.contains(PROGRAMMED))
        .nth(count - 1)
        .map(str::to_string)
        .context("programmed line vanished")
}

/// `name=<number>` in a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    line.split(&format!(" {name}="))
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(") ").context("odd /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Sum of `bytes_memlock` over the maps pinned under `bpffs` (every
/// layout), as `bpftool map show` reports it.
pub fn map_memlock(bpffs: &Path) -> Result<u64> {
    let mut total = 0;
    for layout in std::fs::read_dir(bpffs)? {
        let layout = layout?.path();
        if !layout
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("maps-v"))
        {
            continue;
        }
        for map in std::fs::read_dir(&layout)? {
            let path = map?.path();
            let out = std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(&path)
                .output()
                .context("run bpftool")?;
            if !out.status.success() {
                bail!(
                    "bpftool map show pinned {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            total += info["bytes_memlock"].as_u64().unwrap_or(0);
        }
    }
    Ok(total)
}
