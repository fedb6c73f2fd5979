//! The agent's directory on bpffs: where it may be, who may own it, and the
//! lock that makes it one agent's.
//!
//! The agent mounts bpffs only at the standard [`BPFFS_MOUNT`]; any other
//! `--bpffs` must already be on a bpffs (mounting on the parent of an
//! arbitrary path once turned `/dev` into an empty bpffs for every process).
//! Whoever can write to the directory or rename one of its ancestors can
//! delete the pins and so detach the programs, so every directory on the way
//! must be the agent's user's or root's and closed to others (a
//! world-writable ancestor must be sticky, as `/sys/fs/bpf` is).

use std::{
    ffi::CString,
    fs::DirBuilder,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{
            ffi::OsStrExt,
            fs::{DirBuilderExt, MetadataExt},
        },
    },
    path::{Path, PathBuf},
};

use super::DatapathError;

/// The standard bpffs mount point: the only place the agent mounts one.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// `statfs(2)` magic of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mode of the directories the agent makes: only their owner writes.
const DIR_MODE: u32 = 0o755;

/// Why a bpffs directory is refused.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("must be an absolute path")]
    Relative,
    #[error(
        "{existing} is not on a bpffs; the agent mounts bpffs only at {BPFFS_MOUNT}, \
         any other --bpffs must already be on one"
    )]
    NotBpffs { existing: PathBuf },
    #[error("{0} exists and is not a directory")]
    NotDirectory(PathBuf),
    #[error(
        "{path} is owned by uid {owner} with mode {mode:04o}: anyone who can write to it \
         could delete the pins and detach the programs; make it root's and not group- or \
         world-writable (chown 0 and chmod go-w), or remove it"
    )]
    Unsafe {
        path: PathBuf,
        owner: u32,
        mode: u32,
    },
    #[error(
        "held by another agent{}: two agents on one directory undo each other's writes; \
         give each its own --bpffs",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { holder: Option<u32> },
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl DirError {
    fn at(self, path: &Path) -> DatapathError {
        DatapathError::Bpffs {
            path: path.to_path_buf(),
            source: self,
        }
    }
}

/// Makes sure `dir` is a safe directory on bpffs, creating what is missing
/// of it. bpffs is mounted at [`BPFFS_MOUNT`] when `dir` is below it and it
/// is not one yet (a fresh node, or a container without the host's), and
/// nowhere else.
pub fn ensure_dir(dir: &Path) -> Result<(), DatapathError> {
    check_and_create(dir).map_err(|e| e.at(dir))
}

fn check_and_create(dir: &Path) -> Result<(), DirError> {
    if !dir.is_absolute() {
        return Err(DirError::Relative);
    }
    let mount = Path::new(BPFFS_MOUNT);
    if dir.starts_with(mount) && mount.is_dir() && !is_bpffs(mount)? {
        mount_bpffs(mount)?;
        tracing::info!(path = BPFFS_MOUNT, "mounted bpffs");
    }
    let existing = dir
        .ancestors()
        .find(|p| p.symlink_metadata().is_ok())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing)? {
        return Err(DirError::NotBpffs {
            existing: existing.to_path_buf(),
        });
    }
    check_ancestors(existing)?;
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    check_own(dir)
}

/// Makes `sub` (a directory of the agent's, inside its checked `--bpffs`)
/// if missing, and checks it as [`ensure_dir`] checks the directory.
pub(super) fn ensure_subdir(sub: &Path) -> Result<(), DatapathError> {
    let made = match DirBuilder::new().mode(DIR_MODE).create(sub) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(DirError::Io(e)),
        _ => Ok(()),
    };
    made.and_then(|()| check_own(sub)).map_err(|e| e.at(sub))
}

/// `path` is a directory, the agent's user's (or root's), written by
/// nobody else.
fn check_own(path: &Path) -> Result<(), DirError> {
    let meta = path.symlink_metadata()?;
    if !meta.is_dir() {
        return Err(DirError::NotDirectory(path.to_path_buf()));
    }
    if !trusted_owner(meta.uid()) || meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(path, &meta));
    }
    Ok(())
}

/// Every directory from `deepest` up to the root of its bpffs mount is
/// trusted: owned by root or the agent's user, and either closed to others
/// or sticky (others may add entries but not remove or rename ours).
fn check_ancestors(deepest: &Path) -> Result<(), DirError> {
    let dev = deepest.symlink_metadata()?.dev();
    for dir in deepest.ancestors() {
        let meta = dir.symlink_metadata()?;
        if meta.dev() != dev {
            break;
        }
        if !meta.is_dir() {
            return Err(DirError::NotDirectory(dir.to_path_buf()));
        }
        let writable_by_others = meta.mode() & 0o022 != 0;
        let sticky = meta.mode() & 0o1000 != 0;
        if !trusted_owner(meta.uid()) || (writable_by_others && !sticky) {
            return Err(unsafe_dir(dir, &meta));
        }
    }
    Ok(())
}

fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == unsafe { libc::geteuid() }
}

fn unsafe_dir(path: &Path, meta: &std::fs::Metadata) -> DirError {
    DirError::Unsafe {
        path: path.to_path_buf(),
        owner: meta.uid(),
        mode: meta.mode() & 0o7777,
    }
}

pub(super) fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    let fstype = c"bpf";
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An exclusive `flock(2)` on the agent's directory itself (bpffs holds no
/// regular files to lock): held for the agent's life, released by the
/// kernel when the process ends however it ends.
#[derive(Debug)]
pub struct DirLock {
    fd: OwnedFd,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock on `dir`, or fails at once when another process
    /// holds it.
    pub fn acquire(dir: &Path) -> Result<Self, DatapathError> {
        Self::try_acquire(dir).map_err(|e| e.at(dir))
    }

    fn try_acquire(dir: &Path) -> Result<Self, DirError> {
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::from)?;
        let raw = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: open returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(DirError::Locked {
                    holder: lock_holder(dir),
                });
            }
            return Err(e.into());
        }
        Ok(Self {
            fd,
            path: dir.to_path_buf(),
        })
    }

    /// Whether the locked directory is still the one at its path (a forced
    /// `cleanup` removes it; a new one there is not locked by this fd).
    pub fn still_there(&self) -> bool {
        let Ok(there) = self.path.symlink_metadata() else {
            return false;
        };
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } != 0 {
            return false;
        }
        there.ino() == st.st_ino && there.dev() == st.st_dev
    }
}

/// The pid holding a `flock` on `dir`, from `/proc/locks` (`N: FLOCK
/// ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF`), in this pid
/// namespace's numbering; `None` when unknown.
fn lock_holder(dir: &Path) -> Option<u32> {
    let meta = dir.metadata().ok()?;
    let dev = meta.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let at = fields.iter().position(|f| *f == "FLOCK")?;
        let (pid, file) = (fields.get(at + 3)?, fields.get(at + 4)?);
        (*file == id).then(|| pid.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_non_bpffs_paths_are_refused_without_touching_them() {
        assert!(matches!(
            check_and_create(Path::new("relative/dir")),
            Err(DirError::Relative)
        ));
        let tmp = std::env::temp_dir().join(format!("kep-bpffs-unit-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let target = tmp.join("a/b");
        let refused = check_and_create(&target);
        let made = target.exists();
        std::fs::remove_dir_all(&tmp).unwrap();
        assert!(
            matches!(&refused, Err(DirError::NotBpffs { existing }) if *existing == tmp),
            "{refused:?}"
        );
        assert!(!made, "nothing is created outside a bpffs");
    }

    #[test]
    fn a_directory_is_locked_once() {
        let tmp = std::env::temp_dir().join(format!("kep-lock-unit-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let first = DirLock::try_acquire(&tmp).expect("first lock");
        assert!(first.still_there());
        let second = DirLock::try_acquire(&tmp);
        let holder = std::process::id();
        assert!(
            matches!(second, Err(DirError::Locked { holder: Some(p) }) if p == holder),
            "{second:?}"
        );
        drop(first);
        let again = DirLock::try_acquire(&tmp).expect("free once dropped");
        std::fs::remove_dir_all(&tmp).unwrap();
        assert!(!again.still_there(), "the directory went");
    }
}
