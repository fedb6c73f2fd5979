//! The agent's control loop: objects from a source -> pure model -> map
//! contents -> diff against the live maps -> apply.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    datapath::{Datapath, DatapathConfig},
    diff::diff,
    encode::Encoder,
    interfaces, manifests, model,
};

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub manifests: PathBuf,
    /// Interface names or glob patterns to attach the TC program to.
    pub interfaces: Vec<String>,
    pub datapath: DatapathConfig,
    /// How often the manifest directory and the interface list are checked.
    pub poll_interval: Duration,
    /// Full re-derivation from the source and re-read of the maps, so an
    /// entry changed behind the agent's back is put right.
    pub resync_interval: Duration,
}

/// What one sync did, for the log line tests and operators read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    pub frontends: usize,
    pub backends: usize,
    pub ops: usize,
    pub failed: usize,
}

/// Owns the datapath and the id allocation; turns objects into map writes.
pub struct Syncer {
    datapath: Datapath,
    encoder: Encoder,
    /// Warnings already logged, so a periodic resync does not repeat them.
    reported: BTreeSet<String>,
}

impl Syncer {
    pub fn new(datapath: Datapath) -> Self {
        let mut encoder = Encoder::new();
        // A restarted agent keeps the ids already in the pinned maps, so its
        // first sync rewrites nothing that is already right.
        encoder.seed_from(datapath.live());
        Self {
            datapath,
            encoder,
            reported: BTreeSet::new(),
        }
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    /// Computes the desired maps from `objects` and applies the difference.
    /// Bad objects are skipped with one warning each; a failed map write is
    /// logged and the rest still applies.
    pub fn sync(
        &mut self,
        objects: &manifests::Objects,
        source_warnings: Vec<String>,
    ) -> SyncOutcome {
        let (desired, model_warnings) = model::compute(&objects.services, &objects.slices);
        let warnings: BTreeSet<String> = source_warnings
            .into_iter()
            .chain(model_warnings.iter().map(ToString::to_string))
            .collect();
        for w in warnings.difference(&self.reported) {
            tracing::warn!("skipped: {w}");
        }
        self.reported = warnings;

        let contents = self.encoder.encode(&desired);
        let ops = diff(self.datapath.live(), &contents);
        let failed = self.datapath.apply(&ops);
        for f in &failed {
            tracing::error!(op = ?f.op, error = %f.error, "map update failed");
        }
        SyncOutcome {
            frontends: desired.frontends.len(),
            backends: contents.backends.len(),
            ops: ops.len(),
            failed: failed.len(),
        }
    }
}

/// Attaches to every present interface matching `patterns` that is not
/// attached yet. Failures are logged and retried on the next scan.
fn attach_matching(datapath: &mut Datapath, patterns: &[String]) {
    let names = match interfaces::list() {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "listing interfaces");
            return;
        }
    };
    for name in names {
        if !interfaces::matches_any(patterns, &name) || datapath.attached().any(|a| a == name) {
            continue;
        }
        match datapath.attach(&name) {
            Ok(()) => tracing::info!(iface = %name, "attached TC ingress"),
            Err(e) => tracing::error!(iface = %name, error = %e, "attach failed"),
        }
    }
}

/// Runs the agent with a manifests directory as its source until SIGTERM or
/// SIGINT.
pub async fn run_manifests(cfg: RunConfig) -> anyhow::Result<()> {
    let datapath = Datapath::load(&cfg.datapath).context("loading the datapath")?;
    tracing::info!(
        bpffs = %cfg.datapath.bpffs.display(),
        adopted_frontends = datapath.live().services.len(),
        "datapath loaded"
    );
    let mut syncer = Syncer::new(datapath);
    attach_matching(syncer.datapath_mut(), &cfg.interfaces);

    let mut watcher = manifests::DirWatcher::new(&cfg.manifests);
    let mut last_resync = Instant::now();
    let mut generation: u64 = 0;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        let resync = last_resync.elapsed() >= cfg.resync_interval;
        if watcher.changed() || resync {
            if resync {
                last_resync = Instant::now();
                if let Err(e) = syncer.datapath_mut().refresh_live() {
                    tracing::error!(error = %e, "re-reading maps");
                }
            }
            let started = Instant::now();
            let (objects, warnings) = manifests::load_dir(&cfg.manifests);
            let out = syncer.sync(&objects, warnings.iter().map(ToString::to_string).collect());
            generation += 1;
            tracing::info!(
                "datapath programmed generation={generation} frontends={} backends={} ops={} failed={} took_us={}",
                out.frontends,
                out.backends,
                out.ops,
                out.failed,
                started.elapsed().as_micros()
            );
        }
        attach_matching(syncer.datapath_mut(), &cfg.interfaces);
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = tokio::time::sleep(cfg.poll_interval) => {}
        }
    }
    tracing::info!(
        "stopping; pinned maps stay under {}",
        cfg.datapath.bpffs.display()
    );
    Ok(())
}
