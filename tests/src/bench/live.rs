//! Live per-packet cost of the agent's programs under the benchmark's real
//! traffic: the kernel's BPF run-time statistics (`run_time_ns`,
//! `run_cnt` of each program), enabled with `BPF_ENABLE_STATS` only while
//! a sampler holds its file descriptor (not the global sysctl, which would
//! stay on for everything else on the machine), read before and after a
//! peer's trials. Next to the BPF_PROG_TEST_RUN rows they show what a
//! packet costs with real skbs, caches and contention.

use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::{Context, Result};
use aya::programs::{ProgramInfo, links::FdLink, links::PinnedLink, loaded_programs};
use aya::sys::{Stats, enable_stats};
use serde::Serialize;

use super::peers::Peer;

/// One program's packets and mean cost during one peer's trials.
#[derive(Debug, Clone, Serialize)]
pub struct LiveCost {
    pub peer: Peer,
    pub services: usize,
    pub round: usize,
    pub program: String,
    pub packets: u64,
    pub ns_per_packet: f64,
}

/// Statistics on, and the program's counters when they were.
pub struct Sampler {
    _stats: OwnedFd,
    program: String,
    prog_id: u32,
    start: (u64, u64),
}

fn counters(prog_id: u32) -> Result<(u64, u64)> {
    let info: ProgramInfo = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .with_context(|| format!("program {prog_id} is no longer loaded"))?;
    Ok((info.run_time().as_nanos() as u64, info.run_count()))
}

impl Sampler {
    /// Starts sampling the program behind the link pinned at `link` (one of
    /// the agent's, under its bpffs `links/`): every interface's link of a
    /// hook runs the same program, so its counters cover them all.
    pub fn start(link: &Path, program: &str) -> Result<Sampler> {
        let stats = enable_stats(Stats::RunTime).context("BPF_ENABLE_STATS")?;
        let pinned = PinnedLink::from_pin(link)
            .with_context(|| format!("open the pinned link {}", link.display()))?;
        let prog_id = FdLink::from(pinned).info()?.program_id();
        let start = counters(prog_id)?;
        Ok(Sampler {
            _stats: stats,
            program: program.into(),
            prog_id,
            start,
        })
    }

    /// The packets and mean ns per packet since [`Sampler::start`].
    pub fn finish(self, peer: Peer, services: usize, round: usize) -> Result<LiveCost> {
        let (time, runs) = counters(self.prog_id)?;
        let packets = runs.saturating_sub(self.start.1);
        let ns = time.saturating_sub(self.start.0);
        Ok(LiveCost {
            peer,
            services,
            round,
            program: self.program,
            packets,
            ns_per_packet: if packets == 0 {
                0.0
            } else {
                ns as f64 / packets as f64
            },
        })
    }
}
