//! A file written beside its final name and renamed into place once complete, so that a
//! loader never picks up half a file under the real name. Every writer in hearth (weights,
//! configs, caches, GGUF files, data outputs) goes through [`PendingFile`], and every
//! command that makes a model directory (merge, convert, init-model) through
//! [`write_dir`], so that the temporary files are removed on every way out: an error, an
//! early return, a panic that unwinds, and (through [`abandon_all`]) a signal.
//!
//! The temporary name is `NAME.<pid>.<n>.tmp`, created new: ranks of a data-parallel job
//! on nodes that share a file system, which may have equal process ids, still never write
//! into each other's file.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::{CheckpointError, Result};

/// The temporary files (`false`) and directories (`true`) of this process that are being
/// written, for [`abandon_all`].
static UNFINISHED: Mutex<BTreeMap<PathBuf, bool>> = Mutex::new(BTreeMap::new());
static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Folders made to hold an output still to come ([`MadeDir`]), for [`abandon_all`].
static MADE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn made() -> MutexGuard<'static, Vec<PathBuf>> {
    MADE.lock().unwrap_or_else(|e| e.into_inner())
}

fn unfinished() -> MutexGuard<'static, BTreeMap<PathBuf, bool>> {
    // A panic while the set was locked left it consistent (inserts and removes are single
    // calls), so a poisoned lock is still usable.
    UNFINISHED.lock().unwrap_or_else(|e| e.into_inner())
}

fn file_name(target: &Path) -> Result<&std::ffi::OsStr> {
    target
        .file_name()
        .ok_or_else(|| CheckpointError::io(target, std::io::ErrorKind::InvalidInput.into()))
}

/// The longest file name the common Unix file systems take, in bytes.
const MAX_NAME_BYTES: usize = 255;

/// Makes (with `make`) the first free `NAME.<pid>.<n>.tmp` in `dir` and records it as
/// unfinished. A name that exists already belongs to another process with our id on a
/// shared file system: the next one is taken.
fn claim<T>(
    dir: &Path,
    name: &std::ffi::OsStr,
    is_dir: bool,
    make: impl Fn(&Path) -> std::io::Result<T>,
) -> Result<(PathBuf, T)> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut set = unfinished();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let suffix = format!(".{}.{n}.tmp", std::process::id());
        // A name near the file system's 255-byte limit still gets a temporary beside it:
        // its start, cut to leave room for the suffix.
        let room = MAX_NAME_BYTES.saturating_sub(suffix.len());
        let mut tmp = name.as_bytes()[..name.len().min(room)].to_vec();
        tmp.extend_from_slice(suffix.as_bytes());
        let tmp = dir.join(std::ffi::OsString::from_vec(tmp));
        match make(&tmp) {
            Ok(made) => {
                set.insert(tmp.clone(), is_dir);
                return Ok((tmp, made));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            // Named by what was asked for: the temporary's name is hearth's business.
            Err(e) => return Err(CheckpointError::io(dir.join(name), e)),
        }
    }
}

/// Removes the temporary files (`NAME.<pid>.<n>.tmp`, as [`claim`] names them) that a
/// killed process left in `dir`. For a directory whose lock the caller holds: no live
/// writer can own one then unless its pid is alive, and those are left alone.
pub fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner(&name) else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists (EPERM: it does, as
        // another user's).
        let alive = pid > 0
            && (unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
        if !alive && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The pid in a temporary name [`claim`] made; `None` for any other name.
fn owner(name: &str) -> Option<i32> {
    let stem = name.strip_suffix(".tmp")?;
    let mut parts = stem.rsplitn(3, '.');
    let (n, pid, _) = (parts.next()?, parts.next()?, parts.next()?);
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Removes an uncommitted temporary file or directory (an empty path: committed).
fn release(tmp: &Path, is_dir: bool) {
    if tmp.as_os_str().is_empty() {
        return;
    }
    let mut set = unfinished();
    let _ = remove(tmp, is_dir);
    set.remove(tmp);
}

fn remove(tmp: &Path, is_dir: bool) -> std::io::Result<()> {
    if is_dir {
        std::fs::remove_dir_all(tmp)
    } else {
        std::fs::remove_file(tmp)
    }
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
        let name = file_name(target)?;
        let dir = target.parent().unwrap_or(Path::new(""));
        let (tmp, file) = claim(dir, name, false, |tmp| {
            OpenOptions::new().write(true).create_new(true).open(tmp)
        })?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            file,
        })
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

impl PendingFile {
    /// Like [`PendingFile::commit`], for an output that must be new: the file is linked
    /// in under its name, which fails if anything appeared there meanwhile (another
    /// command writing the same `--out`), and only then loses its temporary name. Where
    /// the file system has no links, a check and a rename do, leaving a moment's race.
    pub fn commit_new(mut self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| CheckpointError::io(&self.tmp, e))?;
        let mut set = unfinished();
        match std::fs::hard_link(&self.tmp, &self.target) {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.tmp);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CheckpointError::io(&self.target, e));
            }
            Err(_) => {
                if self.target.symlink_metadata().is_ok() {
                    let e = std::io::ErrorKind::AlreadyExists.into();
                    return Err(CheckpointError::io(&self.target, e));
                }
                std::fs::rename(&self.tmp, &self.target)
                    .map_err(|e| CheckpointError::io(&self.target, e))?;
            }
        }
        set.remove(&self.tmp);
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        release(&self.tmp, false);
    }
}

/// Makes the directory `target` whole or not at all: `fill` writes into a new temporary
/// directory, which becomes `target` once `fill` succeeded (each file in it written
/// through [`PendingFile`], so on disk). On failure the temporary directory is removed.
/// `target` must be missing or an empty directory (`guard::check_output_dir` says so
/// first, by name). A missing `target` is made by one rename; into an existing one (`.`,
/// a link to a directory) the files move one by one, `config.json` last, since a rename
/// over a directory would leave a shell inside it in a deleted one.
///
/// An error that names a file in the temporary directory names it under `target` instead:
/// the temporary name means nothing to the user, and is gone by the time they read it.
pub fn write_dir<T, E: From<CheckpointError> + std::fmt::Display>(
    target: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    let pending = PendingDir::create(target)?;
    let value = match fill(&pending.tmp) {
        Ok(value) => value,
        Err(e) => {
            let tmp = pending.tmp.display().to_string();
            let said = e.to_string();
            if !said.contains(&tmp) {
                return Err(e);
            }
            let reason = said.replace(&tmp, &target.display().to_string());
            return Err(CheckpointError::Invalid { reason }.into());
        }
    };
    pending.commit()?;
    Ok(value)
}

/// A temporary directory beside `target`, or inside it when it exists; removed with its
/// contents unless committed.
struct PendingDir {
    tmp: PathBuf,
    target: PathBuf,
    /// `target` existed: the files move into it.
    into: bool,
    /// The folders above `target` this made, outermost first: a failure takes them away
    /// again, innermost first.
    parents: Vec<MadeDir>,
}

impl PendingDir {
    fn create(target: &Path) -> Result<Self> {
        let into = target.is_dir();
        let (dir, name) = if into {
            (target.to_path_buf(), std::ffi::OsStr::new(".hearth"))
        } else {
            let name = file_name(target)?;
            let parent = target.parent().filter(|p| !p.as_os_str().is_empty());
            let parent = parent.unwrap_or(Path::new("."));
            (parent.to_path_buf(), name)
        };
        let parents = make_missing(&dir)?;
        let (tmp, ()) = claim(&dir, name, true, |tmp| std::fs::create_dir(tmp))?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            into,
            parents,
        })
    }

    fn commit(mut self) -> Result<()> {
        let mut set = unfinished();
        if self.into {
            let io = |path: &Path, e| CheckpointError::io(path, e);
            let mut names: Vec<_> = std::fs::read_dir(&self.tmp)
                .map_err(|e| io(&self.tmp, e))?
                .map(|entry| entry.map(|e| e.file_name()))
                .collect::<std::io::Result<_>>()
                .map_err(|e| io(&self.tmp, e))?;
            // A loader looks for the config first: it arrives once everything else is there.
            names.sort_by_key(|n| n == "config.json");
            for name in names {
                let to = self.target.join(&name);
                if to.symlink_metadata().is_ok() {
                    return Err(io(&to, std::io::ErrorKind::AlreadyExists.into()));
                }
                std::fs::rename(self.tmp.join(&name), &to).map_err(|e| io(&to, e))?;
            }
            std::fs::remove_dir(&self.tmp).map_err(|e| io(&self.tmp, e))?;
        } else {
            std::fs::rename(&self.tmp, &self.target)
                .map_err(|e| CheckpointError::io(&self.target, e))?;
        }
        set.remove(&self.tmp);
        self.tmp = PathBuf::new();
        drop(set);
        for made in self.parents.drain(..) {
            made.keep();
        }
        Ok(())
    }
}

impl Drop for PendingDir {
    fn drop(&mut self) {
        release(&self.tmp, true);
        while let Some(made) = self.parents.pop() {
            drop(made);
        }
    }
}

/// Makes `dir` and whichever of its ancestors are missing, each as a [`MadeDir`],
/// outermost first.
fn make_missing(dir: &Path) -> Result<Vec<MadeDir>> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d.to_path_buf());
        at = d.parent();
    }
    let mut made = Vec::with_capacity(missing.len());
    while let Some(d) = missing.pop() {
        match MadeDir::create(&d) {
            Ok(m) => made.push(m),
            // Another process made it meanwhile: it is not ours to take away.
            Err(_) if d.is_dir() => {}
            Err(e) => {
                while let Some(m) = made.pop() {
                    drop(m);
                }
                return Err(e);
            }
        }
    }
    Ok(made)
}

/// Removes every temporary file and directory this process is writing and keeps the list
/// locked, so that no new one starts: for a process about to exit on a signal. Returns how
/// many it removed.
pub fn abandon_all() -> usize {
    let set = unfinished();
    let removed = set
        .iter()
        .filter(|&(tmp, &is_dir)| remove(tmp, is_dir).is_ok())
        .count();
    // Then the folders made for them, now empty (one holding anything else stays).
    let folders = made();
    for dir in folders.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
    // The locks are never released: a writer that tries to start or finish a file waits
    // until the process has exited.
    std::mem::forget(set);
    std::mem::forget(folders);
    removed
}

/// A folder made to hold an output still to be written (a missing parent of a model
/// directory's `--out`): taken away again, if nothing else went into it, when the work
/// fails, unwinds or is stopped by a signal, unless [`keep`](Self::keep) was called.
#[must_use = "the folder is removed again when this is dropped"]
struct MadeDir(PathBuf);

impl MadeDir {
    /// Makes `dir` (its parent must exist).
    fn create(dir: &Path) -> Result<Self> {
        let mut list = made();
        std::fs::create_dir(dir).map_err(|e| CheckpointError::io(dir, e))?;
        list.push(dir.to_path_buf());
        Ok(Self(dir.to_path_buf()))
    }

    /// The output went in: the folder stays.
    fn keep(mut self) {
        made().retain(|d| *d != self.0);
        self.0 = PathBuf::new();
    }
}

impl Drop for MadeDir {
    fn drop(&mut self) {
        if self.0.as_os_str().is_empty() {
            return;
        }
        let mut list = made();
        let _ = std::fs::remove_dir(&self.0);
        list.retain(|d| *d != self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Only names `claim` makes are read as owned, and a dead owner's file goes while a
    /// live one's stays.
    #[test]
    fn stale_temporaries_are_those_of_dead_owners() {
        assert_eq!(owner("metrics.jsonl.123.0.tmp"), Some(123));
        for other in [
            "x.tmp",
            "a.1.tmp",
            "m.12.x.tmp",
            "m.x.0.tmp",
            "m.12.0",
            "notes.txt",
        ] {
            assert_eq!(owner(other), None, "{other}");
        }
        let dir = tempfile::tempdir().unwrap();
        // Pid 0 names no process; this test's own pid is alive.
        let dead = dir.path().join("metrics.jsonl.0.3.tmp");
        let live = dir
            .path()
            .join(format!("metrics.jsonl.{}.3.tmp", std::process::id()));
        let mine = dir.path().join("notes.0.tmp");
        for f in [&dead, &live, &mine] {
            std::fs::write(f, "x").unwrap();
        }
        remove_stale(dir.path());
        assert!(!dead.exists() && live.exists() && mine.exists());
    }

    fn temporaries(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    fn registered(dir: &Path) -> usize {
        unfinished().keys().filter(|p| p.starts_with(dir)).count()
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

    /// A name at the file system's limit still writes (its temporary's name is cut to
    /// fit), and a failure names the file asked for, not the temporary.
    #[test]
    fn long_names_fit_and_errors_name_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let long = dir.path().join(format!("{}.gguf", "x".repeat(250)));
        let f = PendingFile::create(&long).unwrap();
        std::fs::write(f.path(), "ok").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&long).unwrap(), "ok");
        let missing = dir.path().join("no-such-dir/out.json");
        let e = PendingFile::create(&missing).unwrap_err().to_string();
        assert!(e.contains("no-such-dir/out.json:"), "{e}");
    }

    #[test]
    fn a_new_file_never_replaces_one_that_appeared_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("rows.jsonl");
        let mut p = PendingFile::create(&target).unwrap();
        p.file().write_all(b"ours").unwrap();
        std::fs::write(&target, "theirs").unwrap();
        let e = p.commit_new().unwrap_err().to_string();
        assert!(e.contains("rows.jsonl") && e.contains("exists"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "theirs");
        assert!(temporaries(dir.path()).is_empty());
        std::fs::remove_file(&target).unwrap();
        let mut p = PendingFile::create(&target).unwrap();
        p.file().write_all(b"ours").unwrap();
        p.commit_new().unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "ours");
        assert!(temporaries(dir.path()).is_empty());
        assert_eq!(registered(dir.path()), 0);
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
    fn a_directory_appears_whole_or_not_at_all() {
        let root = tempfile::tempdir().unwrap();
        let names = |dir: &Path| {
            let mut n: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        // A failure halfway leaves nothing, not even the temporary directory or the
        // folders made to hold it.
        let out = root.path().join("deep/merged");
        let e = write_dir(&out, |tmp| {
            crate::write_text(&tmp.join("config.json"), "{}")?;
            assert_eq!(registered(root.path()), 1);
            Err::<(), _>(CheckpointError::Invalid {
                reason: "stopped".into(),
            })
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "stopped");
        assert!(names(root.path()).is_empty());
        assert_eq!(registered(root.path()), 0);
        // A failure naming a file being written names it as the target's.
        let e = write_dir(&out, |tmp| {
            Err::<(), _>(CheckpointError::NonFinite {
                path: tmp.join("model.safetensors"),
                tensor: "w".into(),
            })
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&format!(
                "{}: refusing",
                out.join("model.safetensors").display()
            )),
            "{e}"
        );

        // Success: every file under the real name, in a new directory or an empty one.
        let n = write_dir(&out, |tmp| {
            crate::write_text(&tmp.join("config.json"), "{}")?;
            crate::write_text(&tmp.join("tokenizer.json"), "[]")?;
            Ok::<_, CheckpointError>(2)
        })
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(names(&out), ["config.json", "tokenizer.json"]);
        assert_eq!(names(&root.path().join("deep")), ["merged"]);
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&empty, &link).unwrap();
        write_dir(&link, |tmp| {
            crate::write_text(&tmp.join("config.json"), "{}")
        })
        .unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(names(&empty), ["config.json"]);

        // Into an existing directory nothing already there is written over, and a failure
        // leaves what was there.
        std::fs::write(out.join("model.safetensors"), "theirs").unwrap();
        std::fs::remove_file(out.join("config.json")).unwrap();
        let e = write_dir(&out, |tmp| {
            crate::write_text(&tmp.join("config.json"), "{}")?;
            crate::write_text(&tmp.join("model.safetensors"), "ours")
        })
        .unwrap_err();
        assert!(e.to_string().contains("model.safetensors"), "{e}");
        assert_eq!(names(&out), ["model.safetensors", "tokenizer.json"]);
        assert_eq!(
            std::fs::read_to_string(out.join("model.safetensors")).unwrap(),
            "theirs"
        );
        assert_eq!(registered(root.path()), 0);
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
