//! Inside the agent's bpffs directory: where maps and links are pinned,
//! adopting and reading pinned links, and removing exactly what the agent
//! pinned (`cleanup`, older layouts).

use std::{
    collections::BTreeMap,
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use proxy_common::LAYOUT_VERSION;

use super::{
    Datapath, DatapathError,
    bpffs::{DirError, DirLock, ensure_dir, ensure_subdir},
    hooks::Pin,
};

/// Where this layout's maps are pinned under the agent's bpffs directory.
pub fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(format!("maps-v{LAYOUT_VERSION}"))
}

/// Where the agent pins its links, so the programs stay attached (and the
/// datapath keeps serving) while no agent runs.
pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

/// `kube-ebpf-proxy cleanup`: [`unpin_all`], refused while an agent holds
/// `dir` (it would be serving from what this removes) unless `force`; the
/// lock is held while removing, so no agent starts on a half-removed
/// directory.
pub fn cleanup(dir: &Path, force: bool) -> Result<(), DatapathError> {
    let _lock = match DirLock::acquire(dir) {
        Ok(lock) => Some(lock),
        Err(DatapathError::Bpffs {
            source: DirError::Io(e),
            ..
        }) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(DatapathError::Bpffs {
            source: DirError::Locked { .. },
            ..
        }) if force => None,
        Err(DatapathError::Bpffs {
            path,
            source: DirError::Locked { holder },
        }) => return Err(DatapathError::InUse { path, holder }),
        Err(e) => return Err(e),
    };
    unpin_all(dir).map_err(|source| DatapathError::Bpffs {
        path: dir.to_path_buf(),
        source: DirError::Io(source),
    })
}

/// Removes everything the agent pinned under `dir` (links first, so the
/// programs detach, then every layout's maps), and `dir` itself once empty.
/// Only names the agent creates are touched, so a `--bpffs` pointing at a
/// shared directory loses nothing else. Idempotent.
pub fn unpin_all(dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut layouts = Vec::new();
    for entry in entries {
        let path = entry?.path();
        match path.file_name().and_then(|n| n.to_str()) {
            Some(n) if n.starts_with("maps-v") => layouts.push(path),
            _ => {}
        }
    }
    remove_pins(&links_dir(dir))?;
    for layout in layouts {
        remove_pins(&layout)?;
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Unpins the agent's objects in one of its directories (links, or one
/// layout's maps), then removes the directory.
pub(super) fn remove_pins(dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| Pin::parse(n).is_some() || super::resize::is_map_pin(n));
        if ours {
            std::fs::remove_file(&path)?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Pins a link just made (a TCX or cgroup link) at `pin`, so it outlives this
/// process and the next agent can adopt it.
pub(super) fn pin_link<L>(
    link: L,
    pin: &Path,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    let link = FdLink::try_from(link)?;
    link.pin(pin)?;
    Ok(())
}

/// [`adopt_pinned`] for links aya cannot update (cgroup programs have no
/// `attach_to_link`): BPF_LINK_UPDATE on the pinned link.
pub(super) fn adopt_link(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> bool {
    if !pin.exists() {
        return false;
    }
    match update_pinned_link(pin, prog) {
        Ok(()) => true,
        Err(e) => not_adoptable(pin, &e),
    }
}

const BPF_OBJ_GET: libc::c_long = 7;

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

const BPF_LINK_UPDATE: libc::c_long = 29;

/// The link pinned at `pin`, opened.
pub(super) fn open_pinned_link(pin: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // The leading fields of `union bpf_attr` for BPF_OBJ_GET; the kernel
    // zero-fills the rest.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = CString::new(pin.as_os_str().as_bytes())?;
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf_syscall(BPF_OBJ_GET, &get)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The agent's pinned links (TC, XDP and socket hooks) by pin name, with
/// what each is attached to (interface index, or cgroup id; `None`:
/// detached, its interface gone).
pub fn pinned_links(bpffs: &Path) -> io::Result<BTreeMap<String, Option<u32>>> {
    let mut links = BTreeMap::new();
    for entry in std::fs::read_dir(links_dir(bpffs))? {
        let entry = entry?;
        let target = pinned_link_target(&entry.path()).unwrap_or(None);
        links.insert(
            entry.file_name().to_string_lossy().into_owned(),
            target.map(|t| t as u32),
        );
    }
    Ok(links)
}

/// What a pinned TCX, XDP or cgroup link is attached to: its interface
/// index, or its cgroup's id; `None` once it has been detached (the kernel
/// reports 0 for a defunct link). aya's `LinkInfo` does not expose the
/// per-type part of `struct bpf_link_info`, hence the raw call.
pub(super) fn pinned_link_target(pin: &Path) -> io::Result<Option<u64>> {
    link_target(&open_pinned_link(pin)?)
}

/// [`pinned_link_target`] of a link already open.
pub(super) fn link_target(link: &std::os::fd::OwnedFd) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    const BPF_LINK_TYPE_CGROUP: u64 = 3;
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the
    // per-type union, whose tcx and xdp members start with the ifindex
    // (u32) and whose cgroup member starts with the cgroup id (u64).
    let mut info = [0u64; 16];
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    let target = if info[0] & 0xffff_ffff == BPF_LINK_TYPE_CGROUP {
        info[2]
    } else {
        info[2] & 0xffff_ffff
    };
    Ok((target != 0).then_some(target))
}

/// The link pinned at `pin`, for `adopt` to point at this process's
/// program (aya's `attach_to_link`: BPF_LINK_UPDATE swaps the program
/// atomically, so packets never see a moment without one). `false` when
/// there is nothing to adopt: no pin, or a pin whose link is defunct or of
/// another kind, which is removed so a fresh attach can take its place.
pub(super) fn adopt_pinned(
    pin: &Path,
    adopt: impl FnOnce(FdLink) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> bool {
    let link = match PinnedLink::from_pin(pin) {
        Ok(link) => FdLink::from(link),
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
            return false;
        }
        Err(e) => return not_adoptable(pin, &e),
    };
    match adopt(link) {
        Ok(()) => true,
        Err(e) => not_adoptable(pin, &*e),
    }
}

fn not_adoptable(pin: &Path, e: &dyn std::fmt::Display) -> bool {
    tracing::warn!(pin = %pin.display(), error = %e, "pinned link not adoptable; attaching afresh");
    unpin_link(pin, None);
    false
}

/// Removes a link's pin so that the link is gone when this returns: the
/// kernel frees a link whose last reference was its pin later, in a
/// workqueue, and attaching the same program to the same hook before then
/// fails (EEXIST); with the link held open (`held`, or opened here) across
/// the unlink, the close is the last reference and frees it at once.
pub(super) fn unpin_link(pin: &Path, held: Option<std::os::fd::OwnedFd>) {
    let held = held.or_else(|| open_pinned_link(pin).ok());
    if let Err(e) = std::fs::remove_file(pin)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(pin = %pin.display(), error = %e, "removing a dead link's pin");
    }
    drop(held);
}

fn update_pinned_link(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let link = open_pinned_link(pin)?;
    let update = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf_syscall(BPF_LINK_UPDATE, &update).map(|_| ())
}

/// [`bpf_syscall`] for commands that write their answer into `attr`.
pub(crate) fn bpf_syscall_mut<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// `bpf(cmd, attr, sizeof attr)`; `attr` is the leading part of the
/// command's `union bpf_attr` (the kernel zero-fills the rest).
pub(crate) fn bpf_syscall<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

impl Datapath {
    /// Puts back what was removed from the agent's directory behind its
    /// back (a forced `cleanup`, `rm`): the directory, its lock, its
    /// subdirectories and the map pins (this process still holds every
    /// map). Links are the hooks' business: a missing link pin reads as a
    /// detached link and is attached again. Returns what was put back; an
    /// error means the pins cannot be restored (the agent is then
    /// unhealthy).
    pub fn restore_pins(&mut self) -> Result<Vec<String>, DatapathError> {
        let mut restored = Vec::new();
        if !self.lock.still_there() {
            ensure_dir(&self.bpffs)?;
            self.lock = DirLock::acquire(&self.bpffs)?;
            restored.push(self.bpffs.display().to_string());
        }
        let maps = maps_dir(&self.bpffs);
        for dir in [&maps, &links_dir(&self.bpffs)] {
            if dir.symlink_metadata().is_err() {
                ensure_subdir(dir)?;
                restored.push(dir.display().to_string());
            }
        }
        for (name, map) in &self.pinned {
            let pin = maps.join(name);
            if pin.symlink_metadata().is_err() {
                map.pin(&pin).map_err(|e| DatapathError::Map {
                    name,
                    source: Box::new(aya::maps::MapError::PinError {
                        name: Some(name.to_string()),
                        error: e,
                    }),
                })?;
                restored.push(pin.display().to_string());
            }
        }
        Ok(restored)
    }

    /// Removes the maps of older layout versions. Call once this agent's
    /// programs are attached everywhere: until then, old programs still
    /// read them.
    pub fn retire_old_layouts(&self) -> io::Result<Vec<PathBuf>> {
        let current = maps_dir(&self.bpffs);
        let mut retired = Vec::new();
        for entry in std::fs::read_dir(&self.bpffs)? {
            let path = entry?.path();
            let is_layout = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("maps-v"));
            if is_layout && path != current {
                remove_pins(&path)?;
                retired.push(path);
            }
        }
        Ok(retired)
    }
}
