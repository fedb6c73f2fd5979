//! Named network namespaces (`ip netns`) and running code inside them.
//!
//! A [`Netns`] owns its namespace: dropping it runs `ip netns del`. Code runs
//! inside a namespace on a fresh thread that `setns(2)`s into it, so the
//! calling thread (and the rest of the process) never changes namespace.
//! Sockets keep the namespace they were created in, so a socket made inside
//! [`Netns::run`] can be returned and used from any thread.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};

/// Directory where `ip netns` keeps its bind-mounted namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Runs a command to completion; fails with the command line, status and
/// stderr when it cannot be started or exits non-zero. Returns its stdout.
pub fn run_cmd(program: &str, args: &[&str]) -> Result<String> {
    let line = command_line(program, args);
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: plain syscall on a valid, open file descriptor.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns({}, CLONE_NEWNET)", path.display()));
    }
    Ok(())
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    delete_on_drop: bool,
}

impl Netns {
    /// Creates namespace `name` (`ip netns add`) with `lo` up. A stale
    /// namespace of the same name is deleted first: names embed the pid of
    /// the process that made them, so one that exists now is left over from
    /// a dead process that had our pid.
    pub fn create(name: &str) -> Result<Netns> {
        let path = Path::new(NETNS_RUN_DIR).join(name);
        if path.exists() {
            eprintln!("lab: deleting stale network namespace {name}");
            run_cmd("ip", &["netns", "del", name])?;
        }
        run_cmd("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
            path,
            delete_on_drop: true,
        };
        // No duplicate address detection on the links made in here, not
        // even for link-local addresses (`nodad` covers only the addresses
        // the labs add): while a router's link-local address is tentative
        // it sends no neighbour solicitation for a packet it forwards, so
        // the first seconds of a new lab would lose IPv6 traffic. A real
        // node's links have been up far longer than DAD takes.
        ns.exec(
            "sysctl",
            &[
                "-q",
                "-w",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on an existing namespace that is not deleted on drop.
    pub fn open(name: &str) -> Result<Netns> {
        let path = Path::new(NETNS_RUN_DIR).join(name);
        if !path.exists() {
            bail!("network namespace {name} does not exist");
        }
        Ok(Netns {
            name: name.to_string(),
            path,
            delete_on_drop: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `ip -n NAME ARGS...`, returning its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_cmd("ip", &all)
    }

    /// Runs `ip netns exec NAME PROGRAM ARGS...`, returning its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run_cmd("ip", &all)
    }

    /// Counter `name` of `group` (e.g. `Icmp`, `TcpExt`) in this
    /// namespace's `/proc/net/<file>` (`snmp`, `netstat`), where a group's
    /// first line names the columns and its second holds the values.
    pub fn net_counter(&self, file: &str, group: &str, name: &str) -> Result<u64> {
        let text = self.exec("cat", &[&format!("/proc/net/{file}")])?;
        let prefix = format!("{group}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            bail!("no {group} lines in /proc/net/{file}");
        };
        let column = names
            .split_whitespace()
            .position(|n| n == name)
            .with_context(|| format!("no {group} {name} in /proc/net/{file}"))?;
        values
            .split_whitespace()
            .nth(column)
            .with_context(|| format!("no value for {group} {name}"))?
            .parse()
            .with_context(|| format!("{group} {name}"))
    }

    /// `sysctl -w KEY=VALUE` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a new thread inside this namespace and returns its
    /// result. Panics (with the reason) if the namespace cannot be entered;
    /// a panic in `f` is propagated.
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        match self.try_run(f) {
            Ok(r) => r,
            Err(e) => panic!("cannot run in network namespace {}: {e:#}", self.name),
        }
    }

    /// Like [`Netns::run`] but returns an error if the namespace cannot be
    /// entered.
    pub fn try_run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path.clone();
        std::thread::scope(|s| {
            let handle = s.spawn(move || -> Result<R> {
                enter_netns(&path)?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Spawns a thread inside this namespace (e.g. background load while a
    /// test changes something). Fails if the namespace cannot be entered,
    /// in which case `f` never runs.
    pub fn spawn<F, R>(&self, name: &str, f: F) -> Result<NsThread<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = self.path.clone();
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Err(e) = enter_netns(&path) {
                    let _ = tx.send(Err(e));
                    return None;
                }
                let _ = tx.send(Ok(()));
                Some(f())
            })
            .context("spawn thread")?;
        match rx.recv() {
            Ok(Ok(())) => Ok(NsThread { handle }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => bail!("thread {name} died before entering {}", self.name),
        }
    }

    /// Deletes the namespace now (also done on drop).
    pub fn delete(mut self) -> Result<()> {
        self.delete_on_drop = false;
        run_cmd("ip", &["netns", "del", &self.name]).map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.delete_on_drop {
            return;
        }
        if let Err(e) = run_cmd("ip", &["netns", "del", &self.name]) {
            eprintln!("lab: cannot delete network namespace {}: {e:#}", self.name);
        }
    }
}

/// A thread running inside a namespace, from [`Netns::spawn`].
pub struct NsThread<R> {
    handle: JoinHandle<Option<R>>,
}

impl<R> NsThread<R> {
    /// Waits for the thread; a panic in it is propagated.
    pub fn join(self) -> R {
        match self.handle.join() {
            Ok(Some(r)) => r,
            Ok(None) => unreachable!("NsThread exists only once the namespace was entered"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Adds `ip/len` to `dev` in `ns` with `nodad`: the address is usable at
/// once instead of after duplicate address detection (about a second), and
/// a lab link holds no other claimant.
pub fn add_addr6(ns: &Netns, dev: &str, ip: std::net::Ipv6Addr, len: u8) -> Result<()> {
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip}/{len}"),
        "dev",
        dev,
        "nodad",
    ])
    .map(|_| ())
}

/// Names of all namespaces in `/run/netns` starting with `prefix`.
pub fn list_netns(prefix: &str) -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_RUN_DIR),
    };
    let mut names = Vec::new();
    for entry in dir {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}
