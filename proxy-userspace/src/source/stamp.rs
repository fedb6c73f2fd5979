//! Whether a manifest file changed, told without reading it.
//!
//! A re-read after inotify woke the source used to read and hash every
//! file of the directory: with 30,000 Services that is 26 MB for one
//! changed endpoint (36 ms at p99), whichever file changed. A file whose
//! [`Stamp`] is the one it had when it was last read is not read again.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::{Duration, SystemTime},
};

/// What a write, a truncation, a rename over the file or a ConfigMap's
/// symlink swap changes (the symlink is followed): device, inode, size,
/// and the modification and status-change times. The status-change time
/// cannot be set from user space, so a tool that restores the
/// modification time after a same-size edit still changes the stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// A file's timestamps come from a clock that advances a tick at a time
/// (1 to 10 ms), so a second write in the tick of the first one can leave
/// every field of the stamp as it was; a stamp is only trusted once this
/// much older than the moment the file was stat-ed before its read.
const SETTLE: Duration = Duration::from_millis(100);

/// Filesystems that keep whole seconds only (their nanoseconds are 0)
/// need longer.
const SETTLE_COARSE: Duration = Duration::from_secs(2);

impl Stamp {
    /// The stamp of `file` (following symlinks); `None` when it cannot be
    /// stat-ed (the read then says why).
    pub fn of(file: &Path) -> Option<Stamp> {
        let m = fs::metadata(file).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// Whether any later write is sure to change the stamp taken at `at`
    /// (before the file was read): its status-change time is then at least
    /// a tick later than this one's.
    pub fn settled(&self, at: SystemTime) -> bool {
        let (secs, nanos) = self.ctime;
        let (Ok(secs), Ok(nanos)) = (u64::try_from(secs), u32::try_from(nanos)) else {
            return false;
        };
        let changed =
            SystemTime::UNIX_EPOCH + Duration::new(secs, 0) + Duration::from_nanos(nanos.into());
        let settle = if nanos == 0 && self.mtime.1 == 0 {
            SETTLE_COARSE
        } else {
            SETTLE
        };
        at.duration_since(changed).is_ok_and(|age| age >= settle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_just_written_is_not_settled_and_an_old_one_is() {
        let dir = std::env::temp_dir().join(format!("kep-stamp-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.yaml");
        fs::write(&file, "a").unwrap();
        let stamp = Stamp::of(&file).unwrap();
        assert!(!stamp.settled(SystemTime::now()));
        assert!(stamp.settled(SystemTime::now() + SETTLE_COARSE));
        // Same size, other text: the inode stays, the times move.
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&file, "b").unwrap();
        assert_ne!(Stamp::of(&file), Some(stamp));
        fs::remove_dir_all(&dir).unwrap();
    }
}
