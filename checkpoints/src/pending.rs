//! A file written beside its final name and renamed into place once complete, so that a
//! loader never picks up half a file under the real name. Every writer in hearth (weights,
//! configs, caches, GGUF files, data outputs) goes through [`PendingFile`], so that the
//! temporary files are removed on every way out: an error, an early return, a panic that
//! unwinds, and (through [`abandon_all`]) a signal.
//!
//! The temporary name is `NAME.<pid>.<n>.tmp`, created new: ranks of a data-parallel job
//! on nodes that share a file system, which may have equal process ids, still never write
//! into each other's file.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::{CheckpointError, Result};

/// The temporary files of this process that are being written, for [`abandon_all`].
static UNFINISHED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unfinished() -> MutexGuard<'static, BTreeSet<PathBuf>> {
    // A panic while the set was locked left it consistent (inserts and removes are single
    // calls), so a poisoned lock is still usable.
    UNFINISHED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A temporary file beside `target` that becomes `target` on [`PendingFile::commit`] and
/// is removed if dropped before.
#[derive(Debug)]
pub struct PendingFile {
    tmp: PathBuf,
    target: PathBuf,
    file: File,
}

impl PendingFile {
    /// Creates the temporary file in `target`'s directory (the same file system, so the
    /// final rename is atomic). The directory must exist.
    pub fn create(target: &Path) -> Result<Self> {
        let name = target
            .file_name()
            .ok_or_else(|| CheckpointError::io(target, std::io::ErrorKind::InvalidInput.into()))?;
        let mut set = unfinished();
        loop {
            let mut tmp = name.to_os_string();
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            tmp.push(format!(".{}.{n}.tmp", std::process::id()));
            let tmp = target.with_file_name(tmp);
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(file) => {
                    set.insert(tmp.clone());
                    return Ok(Self {
                        tmp,
                        target: target.to_path_buf(),
                        file,
                    });
                }
                // Another process with our id on a shared file system: take the next name.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(CheckpointError::io(&tmp, e)),
            }
        }
    }

    /// The temporary file's path, for libraries that write by path and for error messages.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Puts the data on disk and renames the file into place, replacing what `target`
    /// held. On failure the temporary file is removed and `target` is left as it was.
    pub fn commit(mut self) -> Result<()> {
        // A library that wrote through `path()` wrote through another handle; syncing ours
        // still flushes that data, which belongs to the file, not to the handle.
        self.file
            .sync_all()
            .map_err(|e| CheckpointError::io(&self.tmp, e))?;
        let mut set = unfinished();
        std::fs::rename(&self.tmp, &self.target)
            .map_err(|e| CheckpointError::io(&self.target, e))?;
        set.remove(&self.tmp);
        // Renamed: nothing left for `drop` to remove.
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if self.tmp.as_os_str().is_empty() {
            return;
        }
        let mut set = unfinished();
        let _ = std::fs::remove_file(&self.tmp);
        set.remove(&self.tmp);
    }
}

/// Removes every temporary file this process is writing and keeps the list locked, so
/// that no new one starts: for a process about to exit on a signal. Returns how many
/// files it removed.
pub fn abandon_all() -> usize {
    let set = unfinished();
    let removed = set
        .iter()
        .filter(|tmp| std::fs::remove_file(tmp).is_ok())
        .count();
    // The lock is never released: a writer that tries to start or finish a file waits
    // until the process has exited.
    std::mem::forget(set);
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temporaries(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    fn registered(dir: &Path) -> usize {
        unfinished().iter().filter(|p| p.starts_with(dir)).count()
    }

    #[test]
    fn the_target_changes_only_on_commit_and_nothing_is_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model.safetensors");
        std::fs::write(&target, "old").unwrap();

        // Dropped before commit: the target keeps its bytes, the temporary file goes.
        let mut a = PendingFile::create(&target).unwrap();
        a.file().write_all(b"half").unwrap();
        let mut b = PendingFile::create(&target).unwrap();
        assert_ne!(a.path(), b.path(), "two writers share a temporary file");
        assert_eq!(temporaries(dir.path()).len(), 2);
        assert_eq!(registered(dir.path()), 2);
        drop(a);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "old");
        assert_eq!(temporaries(dir.path()).len(), 1);

        // Committed: the target holds the new bytes, written through the handle.
        b.file().write_all(b"new").unwrap();
        b.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert!(temporaries(dir.path()).is_empty());
        assert_eq!(registered(dir.path()), 0);

        // Written by path, as safetensors does.
        let c = PendingFile::create(&target).unwrap();
        std::fs::write(c.path(), "by path").unwrap();
        c.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "by path");
    }

    #[test]
    fn a_failed_rename_removes_the_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory cannot be replaced by a file.
        let target = dir.path().join("taken");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), "x").unwrap();
        let mut p = PendingFile::create(&target).unwrap();
        p.file().write_all(b"data").unwrap();
        let e = p.commit().unwrap_err().to_string();
        assert!(e.contains("taken"), "{e}");
        assert!(temporaries(dir.path()).is_empty());
        assert_eq!(registered(dir.path()), 0);
        assert!(target.join("inside").exists());
        // A missing directory is named.
        let e = PendingFile::create(&dir.path().join("no/such/file"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no/such"), "{e}");
    }

    #[test]
    fn a_name_taken_by_another_process_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("cache.json");
        // Squat the next few names this process would pick.
        let next = COUNTER.load(Ordering::Relaxed);
        for n in next..next + 64 {
            let name = format!("cache.json.{}.{n}.tmp", std::process::id());
            std::fs::write(dir.path().join(name), "theirs").unwrap();
        }
        let p = PendingFile::create(&target).unwrap();
        std::fs::write(p.path(), "ours").unwrap();
        p.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "ours");
        // The squatters' files are untouched.
        assert_eq!(temporaries(dir.path()).len(), 64);
    }
}
