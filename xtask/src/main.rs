//! Project tasks: `cargo xtask setup | build-ebpf | test | conformance | demo | bench`.
//!
//! Every child command is echoed before it runs; the first failure stops the
//! task with a non-zero exit.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "kube-ebpf-proxy project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: nightly rust-src, bpf-linker, Debian tools.
    Setup,
    /// Build the eBPF object with the nightly toolchain.
    BuildEbpf,
    /// setup, build-ebpf, build, clippy, fmt --check, test (needs root).
    Test,
    /// setup, build-ebpf, build, then Kubernetes' Service e2e cases on the
    /// two-node lab (needs root): prints the table and writes
    /// tests/conformance/results.md.
    Conformance {
        /// Only rows whose upstream name contains one of these (the results
        /// file is then target/conformance/results.md, not the committed one).
        filter: Vec<String>,
    },
    /// setup, build-ebpf, release build, then the lab demo (needs root).
    Demo,
    /// setup, build-ebpf, release build, then the benchmark (needs root):
    /// writes bench/results/latest.{md,json,svg} (quick.* with --quick,
    /// partial.* with --services or --nodeport-agent-args).
    Bench {
        /// N = 1 and 1,000, 2 rounds, small trials (< 3 minutes).
        #[arg(long)]
        quick: bool,
        /// Only these numbers of services, e.g. `--services 1` (a smoke run
        /// of the full settings); default: the mode's (full: 1, 1,000,
        /// 10,000, 30,000).
        #[arg(long, value_delimiter = ',')]
        services: Vec<usize>,
        /// Extra arguments for both agents of the NodePort measurement,
        /// whitespace-separated, e.g. `--nodeport-agent-args="--xdp-mode native"`.
        #[arg(long, allow_hyphen_values = true)]
        nodeport_agent_args: Option<String>,
        /// Only the control plane at scale (both sources, no data plane or
        /// NodePort part), e.g. `--control-plane-only --services 30000`.
        #[arg(long)]
        control_plane_only: bool,
    },
}

const DEBIAN_PACKAGES: [&str; 8] = [
    "bpftool",
    "ethtool",
    "iproute2",
    "iptables",
    "nftables",
    "iperf3",
    "tcpdump",
    "conntrack",
];

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup(),
        Task::BuildEbpf => build_ebpf().map(|_| ()),
        Task::Test => test(),
        Task::Conformance { filter } => conformance(&filter),
        Task::Demo => demo(),
        Task::Bench {
            quick,
            services,
            nodeport_agent_args,
            control_plane_only,
        } => bench(
            quick,
            &services,
            nodeport_agent_args.as_deref(),
            control_plane_only,
        ),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root: parent of this crate.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// `$CARGO_TARGET_DIR` or `<workspace>/target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

fn is_root() -> bool {
    // SAFETY: trivial syscall.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} must run as root (try `sudo -E cargo xtask ...`)");
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if let Some(dir) = cmd.get_current_dir() {
        s.push_str(&format!("    (in {})", dir.display()));
    }
    s
}

/// Echoes and runs `cmd`, failing unless it exits 0.
fn run(cmd: &mut Command) -> Result<()> {
    let line = show(cmd);
    println!("+ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed: {status}");
    }
    Ok(())
}

/// Echoes and runs `cmd` for its output; `None` if it cannot start or fails.
fn probe(cmd: &mut Command) -> Option<String> {
    println!("+ {}", show(cmd));
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cargo running this xtask (stable), for workspace steps.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace());
    c
}

/// A rustup proxy (`cargo`, `rustc`, `rustup`) that understands `+nightly`:
/// `$CARGO_HOME/bin/NAME` when present (PATH may have a toolchain's own bin
/// first when we run under cargo), else NAME from PATH. The environment that
/// pins the outer toolchain or wraps rustc is removed.
fn rustup_tool(name: &str) -> Command {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let proxy = home
        .map(|h| h.join("bin").join(name))
        .filter(|p| p.is_file());
    let mut c = Command::new(
        proxy
            .map(PathBuf::into_os_string)
            .unwrap_or_else(|| name.into()),
    );
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let inherited_from_cargo = matches!(
            &*k,
            "CARGO"
                | "RUSTC"
                | "RUSTC_WRAPPER"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "RUSTDOC"
                | "RUSTUP_TOOLCHAIN"
                | "RUSTFLAGS"
                | "RUSTDOCFLAGS"
                | "CARGO_ENCODED_RUSTFLAGS"
                | "CARGO_ENCODED_RUSTDOCFLAGS"
                | "CARGO_TARGET_DIR"
                | "CARGO_MAKEFLAGS"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
        ) || k.starts_with("CARGO_BUILD_")
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_");
        if inherited_from_cargo {
            c.env_remove(&key);
        }
    }
    c
}

fn setup() -> Result<()> {
    // (a) rust-src for the nightly toolchain (build-std).
    let installed = probe(rustup_tool("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("cannot list nightly components: is the nightly toolchain installed?")?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        println!("setup: rust-src (nightly): present");
    } else {
        run(rustup_tool("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        println!("setup: rust-src (nightly): installed");
    }

    // (b) bpf-linker, linked against the nightly's own LLVM.
    if let Some(v) = probe(Command::new("bpf-linker").arg("--version")) {
        println!("setup: bpf-linker: present ({})", v.trim());
    } else {
        install_bpf_linker()?;
        println!("setup: bpf-linker: installed");
    }

    // (c) Debian packages.
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let present = probe(Command::new("dpkg").args(["-s", p])).is_some();
            println!(
                "setup: {p}: {}",
                if present { "present" } else { "missing" }
            );
            !present
        })
        .collect();
    if !missing.is_empty() {
        require_root(&format!("installing {}", missing.join(" ")))?;
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing))?;
        println!("setup: installed {}", missing.join(" "));
    }
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let sysroot = probe(rustup_tool("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("cannot find the nightly sysroot (`rustc +nightly --print sysroot`)")?;
    let libdir = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("read {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("libLLVM.so.22"))
        })
        .with_context(|| format!("no libLLVM.so.22* in {}", libdir.display()))?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(".local/share/kube-ebpf-proxy/llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("create {}", lib.display()))?;
    let own_name = llvm.file_name().unwrap().to_os_string();
    for link in [lib.join("libLLVM.so"), lib.join(&own_name)] {
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("remove {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("symlink {} -> {}", link.display(), llvm.display()))?;
        println!("setup: {} -> {}", link.display(), llvm.display());
    }
    run(rustup_tool("cargo").env("LLVM_PREFIX", &prefix).args([
        "install",
        "bpf-linker",
        "--version",
        "^0.13",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]))
}

/// Builds proxy-ebpf; returns the object's path.
fn build_ebpf() -> Result<PathBuf> {
    let ws = workspace();
    let crate_dir = ws.join("proxy-ebpf");
    if !crate_dir.join("Cargo.toml").is_file() {
        bail!("{} has no Cargo.toml", crate_dir.display());
    }
    let target_dir = ws.join("target/ebpf");
    run(rustup_tool("cargo")
        .current_dir(&crate_dir)
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir))?;
    let object = target_dir.join("bpfel-unknown-none/release/proxy-ebpf");
    if !object.is_file() {
        bail!("build succeeded but {} is missing", object.display());
    }
    println!("{}", object.display());
    Ok(object)
}

fn test() -> Result<()> {
    require_root("`cargo xtask test` (network namespaces, eBPF)")?;
    setup()?;
    // The pure tier first: it needs neither the eBPF object (a stub is
    // embedded when it is missing) nor root, and fails fastest.
    run(cargo().args([
        "test",
        "-p",
        "proxy-common",
        "-p",
        "proxy-userspace",
        "--lib",
    ]))?;
    build_ebpf()?;
    let agent = target_dir().join("debug/kube-ebpf-proxy");
    run(cargo().args(["build", "-p", "proxy-userspace"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().env("KEP_AGENT_BIN", &agent).args([
        "test",
        "--workspace",
        "--",
        "--test-threads=1",
    ]))?;
    Ok(())
}

fn conformance(filter: &[String]) -> Result<()> {
    require_root("`cargo xtask conformance` (network namespaces, eBPF)")?;
    setup()?;
    build_ebpf()?;
    run(cargo().args(["build", "-p", "proxy-userspace"]))?;
    let mut cmd = cargo();
    cmd.env("KEP_AGENT_BIN", target_dir().join("debug/kube-ebpf-proxy"));
    // A partial run must not overwrite the committed table.
    if filter.is_empty() {
        cmd.env(
            "KEP_CONFORMANCE_OUT",
            workspace().join("tests/conformance/results.md"),
        );
    }
    let result = run(cmd
        .args([
            "test",
            "-p",
            "kube-ebpf-proxy-lab",
            "--test",
            "conformance",
            "--",
        ])
        .args(filter));
    // The table is written whether or not every row passed.
    if filter.is_empty() {
        readme_table()?;
    }
    result
}

/// Copies the table of tests/conformance/results.md into README.md between
/// its `conformance:start` / `conformance:end` markers.
fn readme_table() -> Result<()> {
    let (start, end) = ("<!-- conformance:start -->\n", "<!-- conformance:end -->");
    let results = std::fs::read_to_string(workspace().join("tests/conformance/results.md"))
        .context("read tests/conformance/results.md")?;
    let table = results
        .find("| upstream name |")
        .map(|at| &results[at..])
        .context("no table in tests/conformance/results.md")?;
    let path = workspace().join("README.md");
    let readme = std::fs::read_to_string(&path).context("read README.md")?;
    let (Some(a), Some(b)) = (readme.find(start), readme.find(end)) else {
        bail!("README.md has no {start:?} ... {end:?} markers");
    };
    let updated = format!("{}{table}{}", &readme[..a + start.len()], &readme[b..]);
    std::fs::write(&path, updated).context("write README.md")?;
    println!("conformance: table copied into README.md");
    Ok(())
}

/// setup, build-ebpf and a release build of the agent and the lab, for the
/// lab binaries (`what` runs as root); returns the release directory.
fn release_lab_build(what: &str) -> Result<PathBuf> {
    require_root(what)?;
    setup()?;
    build_ebpf()?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "proxy-userspace",
        "-p",
        "kube-ebpf-proxy-lab",
    ]))?;
    Ok(target_dir().join("release"))
}

fn demo() -> Result<()> {
    let release = release_lab_build("`cargo xtask demo` (network namespaces, eBPF)")?;
    let ws = workspace();
    run(Command::new(release.join("lab-demo"))
        .current_dir(&ws)
        .env("KEP_AGENT_BIN", release.join("kube-ebpf-proxy")))
}

fn bench(
    quick: bool,
    services: &[usize],
    nodeport_agent_args: Option<&str>,
    control_plane_only: bool,
) -> Result<()> {
    let release = release_lab_build("`cargo xtask bench` (network namespaces, eBPF)")?;
    let ws = workspace();
    let mut cmd = Command::new(release.join("lab-bench"));
    cmd.current_dir(&ws)
        .env("KEP_AGENT_BIN", release.join("kube-ebpf-proxy"))
        .arg("--out")
        .arg(ws.join("bench/results"));
    if quick {
        cmd.arg("--quick");
    }
    if !services.is_empty() {
        let list: Vec<String> = services.iter().map(usize::to_string).collect();
        cmd.arg("--services").arg(list.join(","));
    }
    if let Some(extra) = nodeport_agent_args {
        cmd.arg("--nodeport-agent-args").arg(extra);
    }
    if control_plane_only {
        cmd.arg("--control-plane-only");
    }
    run(&mut cmd)
}
