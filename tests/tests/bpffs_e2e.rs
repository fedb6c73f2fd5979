//! The agent's bpffs directory is its own and is never a way to harm the
//! node (issue 17, items 3b, 5 and 6): a second agent on it exits with a
//! clear error, `cleanup` refuses while an agent runs (and, forced, the
//! agent pins everything again and keeps serving), bpffs is never mounted
//! anywhere but /sys/fs/bpf, and a directory others can write to is
//! refused.
//!
//! Every directory used is one this test creates (in the lab's temp dir, or
//! under /sys/fs/bpf with the lab's `kep-lab-<id>` prefix) and removes,
//! also on failure. Needs root and the agent binary; fails loudly without
//! them.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lab::addr::{DEMO_VIP, HTTP_PORT};
use lab::agent::{BPFFS_ROOT, agent_bin};
use lab::{Agent, Lab, hostile, loadgen, yaml};
use proxy_userspace::datapath::{links_dir, maps_dir};

const REFUSED: Duration = Duration::from_secs(10);

fn manifests(lab: &Lab) -> Vec<OsString> {
    vec!["--manifests".into(), lab.manifest_dir().into()]
}

/// The servers off, so a second agent in the same namespace clashes with
/// the first on nothing but the directory.
fn quiet(lab: &Lab) -> Vec<OsString> {
    let mut args = manifests(lab);
    for flag in ["--metrics-bind-address", "--healthz-bind-address"] {
        args.extend([flag.into(), "".into()]);
    }
    args
}

fn demo_answers(lab: &Lab) -> loadgen::Report {
    let target = SocketAddrV4::new(DEMO_VIP, HTTP_PORT);
    lab.client().run(move || {
        loadgen::tcp_requests(target, 20, Duration::from_secs(2), Duration::from_secs(20))
    })
}

fn cleanup_cmd(dir: &Path, force: bool) -> std::process::Output {
    let mut cmd = Command::new(agent_bin().unwrap());
    cmd.arg("cleanup").arg("--bpffs").arg(dir);
    if force {
        cmd.arg("--force");
    }
    cmd.output().expect("run kube-ebpf-proxy cleanup")
}

/// Removes a directory this test made, whatever it holds, on drop.
struct Made(PathBuf);

impl Drop for Made {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cannot remove {}: {e}", self.0.display());
        }
    }
}

/// Whether something is mounted exactly at `path`.
fn mounted_at(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|mount_point| Path::new(mount_point) == path)
}

/// Unmounts what a broken agent may have mounted over the test's own
/// directory (never anything else).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        while mounted_at(&self.0) {
            let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!("cannot unmount {}", self.0.display());
                break;
            }
        }
    }
}

fn refused(agent: &Agent<'_>) -> String {
    let (status, out) = agent
        .wait_exit(REFUSED)
        .expect("the agent refuses to start");
    assert!(!status.success(), "{status}: {out}");
    assert!(!out.contains("panicked"), "{out}");
    assert!(!out.contains("datapath programmed"), "{out}");
    out
}

#[test]
fn a_second_agent_on_the_same_directory_exits_with_a_clear_error() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    let first = lab.start_manifest_agent().expect("first agent");
    let mut second = lab.start_agent_args(&quiet(&lab)).expect("spawn second");
    // Whatever happens, the directory stays the first agent's.
    second.leave_directory();
    let out = refused(&second);
    let said = format!("held by another agent (pid {})", first.pid());
    assert!(out.contains(&said), "names the holder: {out}");
    assert!(
        out.contains(&lab.bpffs_dir().display().to_string()),
        "{out}"
    );
    drop(second);
    assert!(first.is_running(), "{}", first.log_tail(20));
    let r = demo_answers(&lab);
    assert_eq!(r.error_count(), 0, "{r}\n{}", first.log_tail(20));
}

#[test]
fn cleanup_refuses_a_running_agent_and_a_forced_one_is_undone() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0, 1, 2]))
        .unwrap();
    let agent = lab.start_manifest_agent().expect("agent");
    let dir = lab.bpffs_dir();
    let services = maps_dir(&dir).join("kep_services");

    let out = cleanup_cmd(&dir, false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "cleanup under a running agent: {out:?}"
    );
    assert!(
        stderr.contains(&format!("an agent (pid {}) is running on", agent.pid()))
            && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(services.exists(), "refused, yet the maps went");
    let r = demo_answers(&lab);
    assert_eq!(r.error_count(), 0, "{r}");

    // Forced: the datapath goes from under the agent, which pins it all
    // again and attaches its programs anew.
    let mark = agent.log_mark();
    let out = cleanup_cmd(&dir, true);
    assert!(out.status.success(), "{out:?}");
    agent
        .wait_for_log_since(mark, "pinned again", Duration::from_secs(5))
        .expect("the agent restores its pins");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut r = demo_answers(&lab);
    while r.error_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        r = demo_answers(&lab);
    }
    assert_eq!(r.error_count(), 0, "{r}\n{}", agent.log_tail(20));
    assert!(services.exists());
    assert!(links_dir(&dir).join("tc-ingress-veth-c0").exists());
    let health = lab.node().run(|| {
        hostile::probe(
            None,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256),
            "/healthz",
            Duration::from_secs(5),
        )
    });
    assert_eq!(health.status, Some(200), "{health:?}");
    let errors = agent
        .logs()
        .lines()
        .skip(mark)
        .filter(|l| l.contains("ERROR"))
        .count();
    assert!(errors < 5, "a flood of errors:\n{}", agent.log_tail(40));

    // Stopped, it lets cleanup have everything.
    agent.stop().unwrap();
    let out = cleanup_cmd(&dir, false);
    assert!(out.status.success(), "{out:?}");
    assert!(!dir.exists());
}

#[test]
fn bpffs_is_never_mounted_over_a_directory_that_is_not_one() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0])).unwrap();
    // A directory that stands for /dev or /etc: the agent's --bpffs below
    // it used to mount a bpffs over it (hiding what it held).
    let victim = lab.dir().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("marker"), "still here").unwrap();
    let _unmount = Unmount(victim.clone());
    let agent = lab
        .start_agent_on(&victim.join("kep"), &quiet(&lab))
        .expect("spawn");
    let out = refused(&agent);
    assert!(
        out.contains("is not on a bpffs") && out.contains("--bpffs"),
        "{out}"
    );
    assert!(!mounted_at(&victim), "a bpffs was mounted over {victim:?}");
    assert_eq!(
        std::fs::read_to_string(victim.join("marker")).unwrap(),
        "still here"
    );
    assert!(!victim.join("kep").exists());
}

#[test]
fn a_directory_others_can_write_to_is_refused() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &yaml::demo(&[0])).unwrap();
    // As a user would make it under the world-writable (sticky)
    // /sys/fs/bpf: theirs, mode 0777.
    let open = Path::new(BPFFS_ROOT).join(format!("kep-lab-{}-open", lab.id()));
    std::fs::create_dir(&open).unwrap();
    let _made = Made(open.clone());
    let c = std::ffi::CString::new(open.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
    assert_eq!(unsafe { libc::chmod(c.as_ptr(), 0o777) }, 0);
    for dir in [open.join("agent"), open.clone()] {
        let agent = lab.start_agent_on(&dir, &quiet(&lab)).expect("spawn");
        let out = refused(&agent);
        assert!(
            out.contains("owned by uid 65534 with mode 0777"),
            "{dir:?}: {out}"
        );
        assert!(!open.join("agent").exists(), "{dir:?}: made a directory");
        assert!(!maps_dir(&open).exists(), "{dir:?}: pinned maps");
    }
}
