//! A cgroup v2 directory a test creates for itself, so socket hooks attach
//! only there and no other process on the machine is affected. Removed on
//! drop (once its processes are gone).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct TestCgroup {
    path: PathBuf,
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .context("no cgroup2 mount in /proc/self/mounts")
}

impl TestCgroup {
    pub fn new() -> Result<TestCgroup> {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = cgroup2_mount()?.join(format!(
            "kep-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    /// A cgroup v1 memory cgroup (under `/sys/fs/cgroup/memory`) limited
    /// to `limit` bytes, swap included.
    pub fn memory_v1(limit: u64) -> Result<TestCgroup> {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = Path::new("/sys/fs/cgroup/memory");
        if !root.join("memory.limit_in_bytes").exists() {
            bail!("no cgroup v1 memory controller at {}", root.display());
        }
        let path = root.join(format!(
            "kep-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        let cgroup = TestCgroup { path };
        let set = |file: &str, value: u64| {
            let file = cgroup.path.join(file);
            std::fs::write(&file, value.to_string())
                .with_context(|| format!("write {}", file.display()))
        };
        set("memory.limit_in_bytes", limit)?;
        // No swap to hide in (absent when the kernel has no swap accounting).
        if cgroup.path.join("memory.memsw.limit_in_bytes").exists() {
            set("memory.memsw.limit_in_bytes", limit)?;
        }
        Ok(cgroup)
    }

    /// A v1 memory cgroup's counter (`memory.max_usage_in_bytes`,
    /// `memory.failcnt`, ...).
    pub fn read_u64(&self, file: &str) -> Result<u64> {
        let file = self.path.join(file);
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        Ok(text.trim().parse()?)
    }

    /// `memory.oom_control`'s `oom_kill` count (0 when not reported).
    pub fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.path.join("memory.oom_control"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file a process writes `0` to, to move itself into this cgroup.
    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    fn remove(&self) -> Result<()> {
        // A process that just exited may still be listed for a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => bail!("remove cgroup {}: {e}", self.path.display()),
            }
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("lab: {e:#}");
        }
    }
}
