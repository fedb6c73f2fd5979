//! One endpoint change seen from the client: a prober makes a TCP request
//! on a new connection to the service every ~1 ms while the service's
//! endpoint set is replaced by backends it did not have; the result is the
//! time from the change (ours: the manifest write; iptables / nftables: the
//! start of the full re-sync) to the first answer from a new backend.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::peers::Peer;
use crate::Lab;
use crate::loadgen::{self, SwitchProbes};
use crate::netns::NsThread;

/// How switches are probed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SwitchSettings {
    /// Switches per peer (alternating: spare backend, original endpoints).
    pub repetitions: usize,
    pub probe_interval_us: u64,
    pub probe_timeout_ms: u64,
    /// The prober gives up after this long (bounds a peer that never
    /// switches; must exceed the slowest re-sync).
    pub max_s: u64,
    /// Consecutive answers from new backends the prober waits for before
    /// stopping.
    pub confirm: u64,
}

/// One switch of one peer.
#[derive(Debug, Clone, Serialize)]
pub struct Switch {
    pub peer: Peer,
    pub services: usize,
    pub repetition: usize,
    /// The backends the service was switched to.
    pub to: Vec<String>,
    /// Change until the first answer from one of `to`; `None` if none came
    /// within `max_s`.
    pub change_to_first_new_ms: Option<f64>,
    /// Change until the first answer after which only new backends
    /// answered (`confirm` in a row until the prober stopped). Differs from
    /// the first new answer when some connections still reached old
    /// backends after it (e.g. a reused source port matching a stale
    /// conntrack entry).
    pub change_to_settled_ms: Option<f64>,
    /// Change until the peer reported done (ours: the `datapath
    /// programmed` line; iptables / nftables: the command returned).
    pub programmed_ms: f64,
    pub probes_sent: u64,
    pub probes_answered: u64,
    /// Probes that failed (refused, timeout, ...) during the change.
    pub probes_failed: u64,
    /// Answers from old backends after the first new one.
    pub old_after_first_new: u64,
    pub per_backend: BTreeMap<String, u64>,
    pub error_samples: Vec<String>,
}

/// A prober running in the client namespace.
pub struct Prober {
    thread: NsThread<SwitchProbes>,
    /// When the prober was started (probes before the change are answered
    /// by old backends only, so it is running well before the change).
    started: Instant,
}

impl Prober {
    /// Starts probing `target` until `confirm` answers came from `to`.
    pub fn start(
        lab: &Lab,
        target: SocketAddrV4,
        to: &[String],
        s: SwitchSettings,
    ) -> Result<Prober> {
        let wanted: BTreeSet<String> = to.iter().cloned().collect();
        let thread = lab.client().spawn("bench-prober", move || {
            loadgen::switch_prober(
                target,
                Duration::from_micros(s.probe_interval_us),
                Duration::from_millis(s.probe_timeout_ms),
                Duration::from_secs(s.max_s),
                s.confirm,
                |name| wanted.contains(name),
            )
        })?;
        let started = Instant::now();
        // Some probes answered by the old endpoints first.
        std::thread::sleep(Duration::from_millis(20));
        Ok(Prober { thread, started })
    }

    /// Waits for the prober; `changed` is when the change started.
    pub fn finish(
        self,
        peer: Peer,
        services: usize,
        repetition: usize,
        to: Vec<String>,
        changed: Instant,
        programmed: Duration,
    ) -> Switch {
        let p = self.thread.join();
        debug_assert!(self.started <= changed);
        let since = |t: Instant| t.saturating_duration_since(changed).as_secs_f64() * 1e3;
        Switch {
            peer,
            services,
            repetition,
            to,
            change_to_first_new_ms: p.first_wanted.map(since),
            change_to_settled_ms: p.settled.map(since),
            programmed_ms: programmed.as_secs_f64() * 1e3,
            probes_sent: p.sent,
            probes_answered: p.answered,
            probes_failed: p.failed,
            old_after_first_new: p.unwanted_after_first,
            per_backend: p.per_backend,
            error_samples: p.error_samples,
        }
    }
}
