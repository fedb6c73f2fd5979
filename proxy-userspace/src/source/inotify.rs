//! Change notification for the manifest directory: Linux inotify on the
//! directory, so an edit is seen as it happens rather than at the next poll,
//! and nothing is read while nothing changes.
//!
//! Only completed changes wake it: a file closed after writing, renamed in
//! or out (how `kubectl`-style tools, editors and a mounted ConfigMap's
//! atomic `..data` swap replace files), created (a symlink), or deleted. A
//! file still being written is not read half way.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tokio::io::unix::AsyncFd;

const MASK: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// Why the directory woke the watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// Something in the directory changed.
    Changed,
    /// The directory itself went away (deleted, moved): the watch is dead
    /// and a new one is needed once it is back.
    DirectoryGone,
}

/// An inotify watch on one directory.
pub struct DirNotify {
    fd: AsyncFd<OwnedFd>,
}

impl DirNotify {
    /// Watches `dir`; fails when it is not a directory (yet).
    pub fn new(dir: &Path) -> io::Result<Self> {
        // SAFETY: plain syscalls; the fd is owned at once.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = CString::new(dir.as_os_str().as_bytes())?;
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), MASK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the
        // same for as long as it lives.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Waits for the next change. Cancel-safe: events not read stay queued
    /// in the kernel.
    pub async fn wait(&self) -> io::Result<Woken> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| drain(fd.get_ref())) {
                Ok(Ok(Some(woken))) => return Ok(woken),
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Reads every queued event; `None` when there were none after all.
fn drain(fd: &OwnedFd) -> io::Result<Option<Woken>> {
    // Aligned for `struct inotify_event`.
    let mut buf = [0u64; 512];
    let mut woken = None;
    loop {
        // SAFETY: reading into a buffer we own, of its size.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                std::mem::size_of_val(&buf),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock && woken.is_some() {
                return Ok(woken);
            }
            return Err(e);
        }
        let bytes = &bytemuck_bytes(&buf)[..n as usize];
        let mut at = 0;
        while at + std::mem::size_of::<libc::inotify_event>() <= bytes.len() {
            // SAFETY: the kernel wrote a whole event at `at`; read unaligned
            // to be safe about the name padding of the one before.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(bytes[at..].as_ptr().cast()) };
            let gone =
                event.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0;
            woken = Some(if gone || woken == Some(Woken::DirectoryGone) {
                Woken::DirectoryGone
            } else {
                Woken::Changed
            });
            at += std::mem::size_of::<libc::inotify_event>() + event.len as usize;
        }
    }
}

fn bytemuck_bytes(buf: &[u64]) -> &[u8] {
    // SAFETY: any u64 buffer is a valid byte buffer of 8 times its length.
    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), std::mem::size_of_val(buf)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn wakes_on_a_renamed_in_file_and_when_the_directory_goes() {
        let dir = std::env::temp_dir().join(format!("kep-inotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let watch = DirNotify::new(&dir).unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(50), watch.wait()).await;
        assert!(quiet.is_err(), "no event without a change");
        let staging = std::env::temp_dir().join(format!("kep-inotify-{}.yaml", std::process::id()));
        std::fs::write(&staging, "a: 1\n").unwrap();
        std::fs::rename(&staging, dir.join("a.yaml")).unwrap();
        let woken = tokio::time::timeout(Duration::from_secs(2), watch.wait()).await;
        assert_eq!(woken.unwrap().unwrap(), Woken::Changed);
        std::fs::remove_dir_all(&dir).unwrap();
        // The file's deletion may come in a read of its own first.
        let gone = tokio::time::timeout(Duration::from_secs(2), async {
            while watch.wait().await.unwrap() != Woken::DirectoryGone {}
        })
        .await;
        assert!(gone.is_ok(), "the directory's removal is reported");
    }
}
