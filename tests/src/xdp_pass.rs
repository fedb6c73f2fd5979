//! A two-instruction `XDP_PASS` program, loaded and attached with raw
//! `bpf(2)` calls, for the fabric side of the cluster lab's node links.
//!
//! A physical NIC always accepts what its driver's XDP program sends back
//! with `XDP_TX`. A veth hands such frames to its peer, and the kernel only
//! schedules the peer to take them when the peer runs an XDP program of its
//! own; without one they wait until something else wakes it (hundreds of
//! milliseconds). The fabric plays the wire and the switch, so it gets the
//! program that makes it behave like one.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Context, Result};

use crate::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// `r0 = XDP_PASS; exit`.
const PROGRAM: [u64; 2] = [
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 2.
    0x0000_0002_0000_00b7,
    // BPF_JMP | BPF_EXIT.
    0x0000_0000_0000_0095,
];

/// The attached program; detached when dropped (or when its namespace
/// goes).
#[derive(Debug)]
pub struct XdpPass {
    _link: OwnedFd,
}

/// Attaches the pass program in native mode to `iface` in `ns`.
pub fn attach(ns: &Netns, iface: &str) -> Result<XdpPass> {
    let name = std::ffi::CString::new(iface)?;
    let link = ns
        .try_run(move || -> io::Result<OwnedFd> {
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            let prog = load()?;
            link_create(&prog, ifindex)
        })?
        .with_context(|| format!("attaching an XDP pass program to {iface} in {}", ns.name()))?;
    Ok(XdpPass { _link: link })
}

fn load() -> io::Result<OwnedFd> {
    // The leading fields of `union bpf_attr` for BPF_PROG_LOAD.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
    }
    let license = c"GPL";
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: PROGRAM.len() as u32,
        insns: PROGRAM.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    bpf(BPF_PROG_LOAD, &attr)
}

fn link_create(prog: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    let attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
    };
    bpf(BPF_LINK_CREATE, &attr)
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a prefix of `union bpf_attr` for `cmd`, valid for
    // its size; the kernel treats the rest as zero.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new file descriptor the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
