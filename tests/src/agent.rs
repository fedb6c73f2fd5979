//! The agent process, run inside the lab's node namespace.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Lab;
use crate::netns::Netns;

/// Magic number of bpffs in `statfs.f_type`.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// Where bpffs is (or gets) mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Path of the agent binary: `$KEP_AGENT_BIN`, else
/// `<target>/debug/kube-ebpf-proxy` where `<target>` is `$CARGO_TARGET_DIR`
/// or `<workspace>/target`.
pub fn agent_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("KEP_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => crate::target_dir().join("debug/kube-ebpf-proxy"),
    };
    if !path.is_file() {
        bail!(
            "agent binary {} not found: build it with `cargo build -p proxy-userspace` \
             (after `cargo xtask build-ebpf`) or point KEP_AGENT_BIN at it",
            path.display()
        );
    }
    Ok(path)
}

/// Mounts bpffs on /sys/fs/bpf unless it already is (the agent pins there).
pub fn ensure_bpffs() -> Result<()> {
    if is_bpffs(Path::new(BPFFS_ROOT))? {
        return Ok(());
    }
    eprintln!("lab: mounting bpffs on {BPFFS_ROOT}");
    crate::netns::run_cmd("mount", &["-t", "bpf", "bpf", BPFFS_ROOT])?;
    if !is_bpffs(Path::new(BPFFS_ROOT))? {
        bail!("{BPFFS_ROOT} is still not a bpffs after mounting");
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs into a zeroed struct with a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Lines the agent printed (stdout and stderr, ANSI colours stripped).
type Lines = Arc<Mutex<Vec<String>>>;

/// A running agent. Borrowing the lab (or cluster) makes the compiler drop
/// the agent before it. On drop: SIGTERM, SIGKILL after 2 s, reap, then remove the
/// agent's bpffs directory.
pub struct Agent<'lab> {
    child: Mutex<Child>,
    pid: u32,
    lines: Lines,
    readers: Vec<JoinHandle<()>>,
    bpffs: PathBuf,
    log_path: PathBuf,
    /// Set by [`Agent::kill_keeping_pins`]: the pinned datapath outlives it.
    keep_pins: bool,
    _lab: PhantomData<&'lab ()>,
}

impl<'lab> Agent<'lab> {
    /// `args` choose the source (`--manifests DIR`, `--kubeconfig PATH`)
    /// and add any flag a test needs.
    pub(crate) fn spawn(
        lab: &'lab Lab,
        bin: &Path,
        args: &[std::ffi::OsString],
        bpffs: &Path,
        log_path: &Path,
    ) -> Result<Agent<'lab>> {
        Agent::spawn_in(
            lab.node(),
            crate::LAB_NODE,
            bin,
            args,
            bpffs,
            log_path,
            None,
        )
    }

    /// Starts the agent inside `node` with `NODE_NAME=node_name` (the
    /// `nodeName` of the endpoints local to it); otherwise as
    /// [`Agent::spawn`]. The agent borrows `node`, so it stops before the
    /// namespace goes. With `cgroup_procs` (a cgroup's `cgroup.procs`) it
    /// joins that cgroup before it runs, so everything it allocates, BPF
    /// maps included, is charged there.
    pub(crate) fn spawn_in(
        node: &'lab Netns,
        node_name: &str,
        bin: &Path,
        args: &[std::ffi::OsString],
        bpffs: &Path,
        log_path: &Path,
        cgroup_procs: Option<&Path>,
    ) -> Result<Agent<'lab>> {
        ensure_bpffs()?;
        let netns =
            File::open(node.path()).with_context(|| format!("open {}", node.path().display()))?;
        let netns_fd = netns.as_raw_fd();
        let cgroup = cgroup_procs
            .map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()))
            .transpose()?;
        let log = Arc::new(Mutex::new(
            File::create(log_path).with_context(|| format!("create {}", log_path.display()))?,
        ));

        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .args(args)
            .args(["--interfaces", "veth-*"])
            .arg("--bpffs")
            .arg(bpffs)
            .env("RUST_LOG", "info")
            // The manifests' EndpointSlices put their pods on this node.
            .env("NODE_NAME", node_name)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe syscalls between fork and exec. The
        // netns fd is O_CLOEXEC, so the agent does not inherit it. Joining
        // the namespace with setns (not `ip netns exec`) keeps the mount
        // namespace, and so the real /sys/fs/bpf.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(procs) = &cgroup {
                    // "0" moves the writing process (the child) itself.
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                // If the test process dies without running destructors, the
                // agent is told to stop too (the signal comes when the
                // spawning thread exits).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                Ok(())
            });
        }
        let shown: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = format!(
            "{} run {} --interfaces veth-* --bpffs {}",
            bin.display(),
            shown.join(" "),
            bpffs.display()
        );
        eprintln!("lab: starting agent in {}: {line}", node.name());
        let mut child = cmd.spawn().with_context(|| format!("spawn `{line}`"))?;
        drop(netns);

        let lines: Lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        for (tag, stream) in [("stdout", stdout), ("stderr", stderr)] {
            let Some(stream) = stream else { continue };
            let (lines, log) = (lines.clone(), log.clone());
            readers.push(
                std::thread::Builder::new()
                    .name(format!("agent-{tag}"))
                    .spawn(move || capture(stream, lines, log))?,
            );
        }
        Ok(Agent {
            pid: child.id(),
            child: Mutex::new(child),
            lines,
            readers,
            bpffs: bpffs.to_path_buf(),
            log_path: log_path.to_path_buf(),
            keep_pins: false,
            _lab: PhantomData,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The agent's `--bpffs` directory.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs
    }

    /// A datapath counter (`proxy_common::stat` index), read through
    /// `kube-ebpf-proxy status --json` from this agent's pinned maps.
    pub fn counter(&self, index: u32) -> Result<u64> {
        let out = std::process::Command::new(agent_bin()?)
            .args(["status", "--json", "--bpffs"])
            .arg(&self.bpffs)
            .output()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("status --json: {}", String::from_utf8_lossy(&out.stderr)))?;
        let name = proxy_common::stat::NAMES[index as usize];
        status["counters"][name]
            .as_u64()
            .with_context(|| format!("counter {name} in {status}"))
    }

    /// File with everything the agent printed.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Number of lines captured so far; pass to [`Agent::wait_for_log_since`]
    /// to wait for a line printed after this point.
    pub fn log_mark(&self) -> usize {
        self.lock_lines().len()
    }

    /// Everything captured so far, one line per agent line.
    pub fn logs(&self) -> String {
        self.lock_lines().join("\n")
    }

    /// The last `n` captured lines.
    pub fn log_tail(&self, n: usize) -> String {
        let lines = self.lock_lines();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.lock_lines().iter().any(|l| l.contains(needle))
    }

    /// How many captured lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.lock_lines()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Exit status if the agent has exited.
    pub fn exit_status(&self) -> Result<Option<ExitStatus>> {
        Ok(self.lock_child().try_wait()?)
    }

    pub fn is_running(&self) -> bool {
        matches!(self.exit_status(), Ok(None))
    }

    /// Waits until some captured line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_log_since(0, needle, timeout)
    }

    /// Waits until a line captured after `mark` (from [`Agent::log_mark`])
    /// contains `needle`. Fails at once if the agent exits, with the tail of
    /// its output.
    pub fn wait_for_log_since(&self, mark: usize, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .lock_lines()
                .iter()
                .skip(mark)
                .any(|l| l.contains(needle))
            {
                return Ok(());
            }
            if let Some(status) = self.exit_status()? {
                // Let the readers drain what the agent printed last.
                std::thread::sleep(Duration::from_millis(200));
                if self
                    .lock_lines()
                    .iter()
                    .skip(mark)
                    .any(|l| l.contains(needle))
                {
                    return Ok(());
                }
                bail!(
                    "agent exited ({status}) before printing {needle:?}; last output:\n{}",
                    self.log_tail(40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent did not print {needle:?} within {timeout:?}; last output:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 2 s) and returns how it
    /// exited. Idempotent.
    pub fn stop(&self) -> Result<ExitStatus> {
        let mut child = self.lock_child();
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: signalling our own unreaped child, so the pid is ours.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "lab: agent {} ignored SIGTERM for 2 s; killing it",
            self.pid
        );
        child.kill()?;
        Ok(child.wait()?)
    }

    fn lock_lines(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Agent<'_> {
    /// Drop leaves the bpffs directory alone: it is another agent's (a test
    /// of two agents on one directory) or the test's own.
    pub fn leave_directory(&mut self) {
        self.keep_pins = true;
    }

    /// Waits for the agent to exit by itself (a refused start), and
    /// returns its status and everything it printed; fails if it is still
    /// running after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status()? {
                // Let the output readers catch up with the exited process.
                std::thread::sleep(Duration::from_millis(100));
                return Ok((status, self.logs()));
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent still running after {timeout:?}:\n{}",
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `ops=` of the first `datapath programmed` line: 0 when an agent
    /// adopting pinned maps found them as it wants them.
    pub fn first_sync_ops(&self) -> Option<u64> {
        let lines = self.lock_lines();
        let first = lines.iter().find(|l| l.contains("datapath programmed"))?;
        first
            .split_whitespace()
            .find_map(|w| w.strip_prefix("ops="))?
            .parse()
            .ok()
    }

    /// SIGKILL, as an OOM kill or a node problem would, leaving the pinned
    /// maps and links in place for the next agent to adopt (the lab removes
    /// them when it is dropped).
    pub fn kill_keeping_pins(mut self) {
        self.keep_pins = true;
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        // Drop reaps it (stop() on a dead process returns at once).
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        match self.stop() {
            Ok(status) => eprintln!("lab: agent {} exited: {status}", self.pid),
            Err(e) => eprintln!("lab: cannot stop agent {}: {e:#}", self.pid),
        }
        // The pipes close when the agent exits, unless it left children that
        // hold them; do not wait for those forever.
        let deadline = Instant::now() + Duration::from_secs(1);
        for r in self.readers.drain(..) {
            while !r.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
        if self.keep_pins {
            return;
        }
        match std::fs::remove_dir_all(&self.bpffs) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("lab: cannot remove {}: {e}", self.bpffs.display()),
        }
    }
}

fn capture(stream: Box<dyn Read + Send>, lines: Lines, log: Arc<Mutex<File>>) {
    let mut reader = BufReader::new(stream);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = strip_ansi(&String::from_utf8_lossy(&raw));
                let line = line.trim_end_matches(['\n', '\r']).to_string();
                if let Ok(mut f) = log.lock() {
                    let _ = writeln!(f, "{line}");
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}
