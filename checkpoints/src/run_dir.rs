//! The run directory owns its layout: `recipe.toml`, `metrics.jsonl` (and its TensorBoard
//! twin under `tb/`), `loss.svg`,
//! `checkpoint-STEP/` (kept to the last K) and `final/`. Checkpoints are written into a
//! hidden temporary directory, synced, and renamed into place, so a crash never leaves a
//! half-written directory under a checkpoint's name.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{CheckpointError, Result, peft};

/// The run's recipe, as resolved (overrides applied).
pub const RECIPE_FILE: &str = "recipe.toml";
/// One JSON line per logged step.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// GRPO's sampled completions, one JSON line each.
pub const COMPLETIONS_FILE: &str = "completions.jsonl";
/// The loss chart.
pub const LOSS_CHART: &str = "loss.svg";
/// The trained weights, once the run is done.
pub const FINAL_DIR: &str = "final";
/// `checkpoint-STEP/`.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// Where a run stands ([`crate::run_state::TrainerState`]).
pub const STATE_FILE: &str = "trainer_state.json";
/// The optimizer's state.
pub const OPTIMIZER_FILE: &str = "optimizer.bin";
/// GRPO samples still to be reused by the steps after a checkpoint.
pub const ROLLOUTS_FILE: &str = "rollouts.json";
/// Locked (`flock`) while a process writes the run. The kernel drops the lock when the
/// process ends, however it ends, so a killed run leaves none behind to clear.
pub const LOCK_FILE: &str = ".hearth.lock";

/// The files every complete checkpoint of a run has: its state and optimizer, and the
/// adapter (`lora`) or the model's configuration.
pub fn required_files(lora: bool) -> Vec<&'static str> {
    let mut required = vec![STATE_FILE, OPTIMIZER_FILE];
    if lora {
        required.extend_from_slice(&[peft::WEIGHTS_FILE, peft::CONFIG_FILE]);
    } else {
        required.push(crate::names::CONFIG);
    }
    required
}

/// A training run's directory.
pub struct RunDir {
    root: PathBuf,
    /// Whether this process writes. In a data-parallel run only rank 0 does; the others
    /// read checkpoints to resume and skip every write.
    writer: bool,
    /// The writer's hold on [`LOCK_FILE`]: a second `hearth train` into the same
    /// directory, or a resume of a run still training, is refused instead of interleaving
    /// its steps with this one's.
    _lock: Option<std::fs::File>,
}

/// Takes the run's lock, or says which process holds it. Where the file system has no
/// locks (or the directory cannot be written, which the run's first write reports), the
/// run goes on without one.
/// Holds `root`'s lock while the returned file lives ([`lock`]'s rules): a pipeline holds
/// its directory's for its whole run, and a stage's before clearing it, so two processes
/// never write, or delete, each other's runs.
pub fn hold(root: &Path) -> Result<Option<std::fs::File>> {
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    lock(root)
}

fn lock(root: &Path) -> Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join(LOCK_FILE);
    // A link in the lock's place would have the holder's pid written through it, over a
    // file outside the run.
    if path.symlink_metadata().is_ok_and(|m| !m.is_file()) {
        return Err(refuse(
            root,
            format!("{LOCK_FILE} is not a plain file (a link?); remove it or choose another --out"),
        ));
    }
    let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    else {
        return Ok(None);
    };
    // SAFETY: flock on a descriptor this function owns; it touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        let mut holder = String::new();
        let _ = std::io::Read::read_to_string(&mut file, &mut holder);
        let holder = holder.trim();
        let who = if holder.is_empty() {
            "another hearth process".to_string()
        } else {
            format!("hearth process {holder}")
        };
        return Err(refuse(
            root,
            format!("{who} is writing this run; wait for it to end, or choose another --out"),
        ));
    }
    // Who holds it, for the message above; a failure here loses only that.
    let _ = file.set_len(0);
    let _ = write!(file, "{}", std::process::id());
    Ok(Some(file))
}

fn io(path: &Path, e: std::io::Error) -> CheckpointError {
    CheckpointError::io(path, e)
}

fn refuse(path: &Path, reason: String) -> CheckpointError {
    CheckpointError::Run {
        path: path.to_path_buf(),
        reason,
    }
}

/// Where a run goes when no `--out` is given: `runs/<the recipe's file stem>`, or
/// `runs/<fallback>` for a name without one.
pub fn default_root(recipe: &Path, fallback: &str) -> PathBuf {
    let name = recipe.file_stem().map_or_else(
        || fallback.to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    PathBuf::from("runs").join(name)
}

/// The first entry of `root` that a hearth run did not write, if any: everything but a
/// `recipe.toml` that `own_recipe` recognises.
fn foreign_entry(root: &Path, own_recipe: impl Fn(&str) -> bool) -> Result<Option<String>> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(None);
    };
    for entry in entries {
        let entry = entry.map_err(|e| io(root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name == LOCK_FILE
            || (name == RECIPE_FILE
                && std::fs::read_to_string(entry.path()).is_ok_and(|text| own_recipe(&text)));
        if !ours {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Whether `root` holds a `checkpoint-STEP/` with its trainer state: a run stopped before
/// its first metrics line (a long `logging_steps`) is a run all the same, to resume.
fn holds_a_checkpoint(root: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(root) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.strip_prefix(CHECKPOINT_PREFIX)
            .is_some_and(|step| !step.is_empty() && step.bytes().all(|b| b.is_ascii_digit()))
            && e.path().join(STATE_FILE).is_file()
    })
}

/// Every scalar of a run's TensorBoard events: `(step, tag, value)`, in order.
pub fn read_scalars_of(root: &Path) -> Result<Vec<(i64, String, f32)>> {
    crate::tensorboard::read_scalars(&crate::tensorboard::events_path(root))
}

/// The lines of a run's `metrics.jsonl`; a line cut short by a crash is skipped.
pub fn read_metrics(root: &Path) -> Result<Vec<serde_json::Value>> {
    let path = root.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The numbers of `metrics.jsonl`'s lines that [`read_metrics`] skips for being no JSON,
/// but for a last line without its newline: hearth was stopped while writing it.
pub fn damaged_metric_lines(root: &Path) -> Result<Vec<usize>> {
    let path = root.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    let cut_short = !text.is_empty() && !text.ends_with('\n');
    let count = text.lines().count();
    Ok(text
        .lines()
        .enumerate()
        .filter(|&(i, l)| {
            serde_json::from_str::<serde_json::Value>(l).is_err()
                && !l.trim().is_empty()
                && !(cut_short && i + 1 == count)
        })
        .map(|(i, _)| i + 1)
        .collect())
}

impl RunDir {
    /// Creates `root` for a new run. Only a new or empty directory is taken, or one that a
    /// run which failed before its first step left (its `recipe.toml` alone, which
    /// `own_recipe` recognises as one hearth wrote): anything else may be a user's, and a
    /// run would write over or prune it. A directory that holds a run is refused, so
    /// nothing an earlier run wrote is overwritten.
    pub fn create(root: &Path, own_recipe: impl Fn(&str) -> bool) -> Result<Self> {
        if root.join(METRICS_FILE).exists()
            || root.join(FINAL_DIR).exists()
            || holds_a_checkpoint(root)
        {
            return Err(refuse(
                root,
                "already holds a run; choose another --out, or continue it with --resume".into(),
            ));
        }
        if root.exists() && !root.is_dir() {
            return Err(refuse(
                root,
                "is not a directory; choose another --out".into(),
            ));
        }
        if !root.exists() && root.symlink_metadata().is_ok() {
            return Err(refuse(
                root,
                "is a link to nothing; choose another --out".into(),
            ));
        }
        // Locked before its entries are judged: a run starting there at the same moment
        // is named as such, not by the temporary file it is writing.
        std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
        let had_lock_file = root.join(LOCK_FILE).exists();
        let lock = lock(root)?;
        if let Some(name) = foreign_entry(root, own_recipe)? {
            // A user's directory keeps nothing of the refused run.
            if !had_lock_file {
                let _ = std::fs::remove_file(root.join(LOCK_FILE));
            }
            return Err(refuse(
                root,
                format!(
                    "holds `{name}`, which no hearth run wrote; a run needs a new or empty \
                     directory: choose another --out"
                ),
            ));
        }
        Ok(Self {
            root: root.to_path_buf(),
            writer: true,
            _lock: lock,
        })
    }

    /// Opens an existing run to resume it. A finished run (its `final/` written) has
    /// nothing left to do, and resuming it would train its last steps again over `final/`.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.join(RECIPE_FILE).is_file() {
            return Err(refuse(
                root,
                format!("not a run directory (no {RECIPE_FILE})"),
            ));
        }
        let lock = lock(root)?;
        if root.join(FINAL_DIR).exists() {
            return Err(refuse(
                root,
                format!(
                    "the run is finished ({FINAL_DIR}/ holds its weights); there is nothing to \
                     resume"
                ),
            ));
        }
        crate::pending::remove_stale(root);
        Ok(Self {
            root: root.to_path_buf(),
            writer: true,
            _lock: lock,
        })
    }

    /// The run rank 0 writes, seen from another rank: reads work, writes do nothing.
    pub fn follower(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            writer: false,
            _lock: None,
        }
    }

    /// The newest complete checkpoint: `(step, dir)`. Directories that lack a file a
    /// checkpoint always has are passed over.
    pub fn latest_checkpoint(&self, required: &[&str]) -> Option<(usize, PathBuf)> {
        self.checkpoints(required).pop()
    }

    /// The checkpoint to resume from: the newest, with every file in `required` and
    /// verified against its manifest. A newest one that fails either is refused (never
    /// silently skipped: an older one would train steps again over the newer), naming what
    /// is wrong and the next older checkpoint that is good.
    pub fn resumable_checkpoint(&self, required: &[&str]) -> Result<(usize, PathBuf)> {
        let good = |dir: &Path| -> std::result::Result<(), String> {
            match required.iter().find(|f| !dir.join(f).is_file()) {
                Some(missing) => Err(format!("no {missing}")),
                None => crate::verify_manifest(dir),
            }
        };
        let mut all = self.checkpoints(&[]);
        let (step, dir) = all
            .pop()
            .ok_or_else(|| refuse(&self.root, "no complete checkpoint to resume from".into()))?;
        match good(&dir) {
            Ok(()) => Ok((step, dir)),
            Err(what) => {
                let older = all.iter().rev().find(|(_, d)| good(d).is_ok());
                let advice = match older {
                    Some((_, d)) => format!(
                        "the next older good checkpoint is {}; move {} aside to resume from it",
                        d.display(),
                        dir.display()
                    ),
                    None => "no older checkpoint is good either".to_string(),
                };
                Err(refuse(
                    &dir,
                    format!("damaged checkpoint: {what}; {advice}"),
                ))
            }
        }
    }

    /// Where a resumed run continues: its newest good checkpoint, or `None` when the run
    /// was stopped before it wrote any (nor its final weights), so it starts again from
    /// step 0 with the lines it had logged dropped and ends where an uninterrupted run
    /// would. A damaged newest checkpoint is still an error.
    pub fn resume_point(&self, required: &[&str]) -> Result<Option<(usize, PathBuf)>> {
        if self.checkpoints(&[]).is_empty() && !self.root.join(FINAL_DIR).exists() {
            self.truncate_metrics(0)?;
            return Ok(None);
        }
        self.resumable_checkpoint(required).map(Some)
    }

    /// Whether the run wrote any checkpoint directory, complete or not.
    pub fn has_checkpoint(&self) -> bool {
        !self.checkpoints(&[]).is_empty()
    }

    /// The run's `final/` directory (which may not exist yet).
    pub fn final_dir(&self) -> PathBuf {
        self.root.join(FINAL_DIR)
    }

    /// The recipe the run was started with, if it wrote one.
    pub fn saved_recipe(&self) -> Option<String> {
        std::fs::read_to_string(self.root.join(RECIPE_FILE)).ok()
    }

    /// Complete checkpoints (every file in `required` present), oldest first.
    fn checkpoints(&self, required: &[&str]) -> Vec<(usize, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut found: Vec<(usize, PathBuf)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let step = e
                    .file_name()
                    .to_str()?
                    .strip_prefix(CHECKPOINT_PREFIX)?
                    .parse()
                    .ok()?;
                Some((step, e.path()))
            })
            .filter(|(_, dir)| required.iter().all(|f| dir.join(f).is_file()))
            .collect();
        found.sort_by_key(|(s, _)| *s);
        found
    }

    /// Drops lines logged after `step` (by a run killed past its last checkpoint) from
    /// `metrics.jsonl` and, where there is one, GRPO's `completions.jsonl`; the TensorBoard
    /// events are rewritten from what stays.
    pub fn truncate_metrics(&self, step: usize) -> Result<()> {
        if !self.writer {
            return Ok(());
        }
        self.truncate_log(METRICS_FILE, step)?;
        if self.root.join(COMPLETIONS_FILE).exists() {
            self.truncate_log(COMPLETIONS_FILE, step)?;
        }
        crate::tensorboard::rewrite(&self.root, &read_metrics(&self.root)?)
    }

    fn truncate_log(&self, name: &str, step: usize) -> Result<()> {
        let path = self.root.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::write_text(&path, &kept)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn write_recipe(&self, text: &str) -> Result<()> {
        if !self.writer {
            return Ok(());
        }
        crate::write_text(&self.root.join(RECIPE_FILE), text)?;
        Ok(())
    }

    /// Appends one JSON line to `metrics.jsonl` and flushes it, and its numbers to the
    /// TensorBoard events under `tb/`.
    pub fn log(&self, line: &serde_json::Value) -> Result<()> {
        self.append(METRICS_FILE, line)?;
        if self.writer {
            crate::tensorboard::append(&self.root, line)?;
        }
        Ok(())
    }

    /// Appends one JSON line to the run directory's file `name` and flushes it.
    pub fn append(&self, name: &str, line: &serde_json::Value) -> Result<()> {
        if !self.writer {
            return Ok(());
        }
        let path = self.root.join(name);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        writeln!(f, "{line}").map_err(|e| io(&path, e))?;
        f.flush().map_err(|e| io(&path, e))
    }

    /// Writes `checkpoint-STEP/` through `write`, then removes all but the newest `keep`.
    pub fn checkpoint<E: From<CheckpointError>>(
        &self,
        step: usize,
        keep: usize,
        write: impl FnOnce(&Path) -> std::result::Result<(), E>,
    ) -> std::result::Result<PathBuf, E> {
        self.sync_logs()?;
        let path = self.atomic_dir(&format!("{CHECKPOINT_PREFIX}{step}"), write)?;
        if keep > 0 && self.writer {
            let mut steps: Vec<usize> = std::fs::read_dir(&self.root)
                .map_err(|e| io(&self.root, e))?
                .filter_map(|e| {
                    e.ok()?
                        .file_name()
                        .to_str()?
                        .strip_prefix(CHECKPOINT_PREFIX)?
                        .parse()
                        .ok()
                })
                .collect();
            steps.sort_unstable();
            for old in steps.iter().take(steps.len().saturating_sub(keep)) {
                let dir = self.root.join(format!("{CHECKPOINT_PREFIX}{old}"));
                std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
            }
        }
        Ok(path)
    }

    /// The logs on disk before a checkpoint or final/ that follows them: appends are only
    /// flushed, and after a power loss a synced checkpoint beside a log missing its last
    /// lines would resume with those steps gone from the record.
    fn sync_logs(&self) -> Result<()> {
        if !self.writer {
            return Ok(());
        }
        for name in [METRICS_FILE, COMPLETIONS_FILE] {
            let path = self.root.join(name);
            if let Ok(f) = std::fs::File::open(&path) {
                f.sync_all().map_err(|e| io(&path, e))?;
            }
        }
        Ok(())
    }

    /// Writes `final/` through `write`.
    pub fn finish<E: From<CheckpointError>>(
        &self,
        write: impl FnOnce(&Path) -> std::result::Result<(), E>,
    ) -> std::result::Result<PathBuf, E> {
        self.sync_logs()?;
        self.atomic_dir(FINAL_DIR, write)
    }

    fn atomic_dir<E: From<CheckpointError>>(
        &self,
        name: &str,
        write: impl FnOnce(&Path) -> std::result::Result<(), E>,
    ) -> std::result::Result<PathBuf, E> {
        if !self.writer {
            return Ok(self.root.join(name));
        }
        let tmp = self.root.join(format!(".tmp-{name}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        // A write that fails (a full disk, weights refused as non-finite) leaves nothing
        // half-written behind: the temporary directory goes with it.
        let written = self.complete(&tmp, name, write);
        if written.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written
    }

    /// Writes `tmp` through `write`, seals it with its manifest and renames it to `name`.
    fn complete<E: From<CheckpointError>>(
        &self,
        tmp: &Path,
        name: &str,
        write: impl FnOnce(&Path) -> std::result::Result<(), E>,
    ) -> std::result::Result<PathBuf, E> {
        write(tmp)?;
        // The manifest comes last, so a directory with one is complete; every file it lists
        // is synced before the rename makes the directory visible under its name.
        let manifest = crate::write_manifest(tmp)?;
        for name in manifest
            .files
            .keys()
            .map(String::as_str)
            .chain([crate::MANIFEST])
        {
            let path = tmp.join(name);
            let f = std::fs::File::open(&path).map_err(|e| io(&path, e))?;
            f.sync_all().map_err(|e| io(&path, e))?;
        }
        // The directory's own entries (the file names) are durable before it is renamed.
        std::fs::File::open(tmp)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(tmp, e))?;
        let dest = self.root.join(name);
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(|e| io(&dest, e))?;
        }
        std::fs::rename(tmp, &dest).map_err(|e| io(&dest, e))?;
        if let Ok(dir) = std::fs::File::open(&self.root) {
            let _ = dir.sync_all();
        }
        Ok(dest)
    }

    /// `loss.svg`: training loss per step, and eval loss where measured.
    pub fn plot(&self, train: &[(usize, f64)], eval: &[(usize, f64)]) -> Result<()> {
        if !self.writer {
            return Ok(());
        }
        crate::write_text(&self.root.join(LOSS_CHART), &loss_svg(train, eval))?;
        Ok(())
    }
}

/// A small self-contained SVG line chart.
fn loss_svg(train: &[(usize, f64)], eval: &[(usize, f64)]) -> String {
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let all = train.iter().chain(eval).filter(|p| p.1.is_finite());
    let (mut x_max, mut y_min, mut y_max) = (1usize, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    if y_max - y_min < 1e-9 {
        y_max = y_min + 1.0;
    }
    let px = |x: usize| pad + (x as f64 / x_max as f64) * (w - 2.0 * pad);
    let py = |y: f64| h - pad - (y - y_min) / (y_max - y_min) * (h - 2.0 * pad);
    let line = |points: &[(usize, f64)], color: &str| {
        let pts: Vec<String> = points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        )
    };
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{pad}\" y=\"{t}\">loss (blue: train, orange: eval)</text>\n\
         <text x=\"4\" y=\"{ytop}\">{y_max:.3}</text><text x=\"4\" y=\"{b}\">{y_min:.3}</text>\n\
         <text x=\"{r}\" y=\"{xl}\" text-anchor=\"end\">step {x_max}</text>\n{}\n{}\n</svg>\n",
        line(train, "#1f77b4"),
        line(eval, "#ff7f0e"),
        b = h - pad,
        r = w - pad,
        t = pad - 16.0,
        ytop = pad + 4.0,
        xl = h - pad + 20.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While one process writes a run, another cannot start or resume one in the same
    /// directory; once the first lets go (or dies), it can.
    #[test]
    fn one_writer_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("run");
        let first = RunDir::create(&root, |_| false).unwrap();
        first.write_recipe("x = 1\n").unwrap();
        let busy = format!("hearth process {} is writing this run", std::process::id());
        let e = RunDir::create(&root, |_| true).err().unwrap().to_string();
        assert!(e.contains(&busy) && e.contains("--out"), "{e}");
        let e = RunDir::open(&root).err().unwrap().to_string();
        assert!(e.contains(&busy), "{e}");
        // Readers of another rank take no lock.
        let _reader = RunDir::follower(&root);
        drop(first);
        let resumed = RunDir::open(&root).unwrap();
        drop(resumed);
        // The lock file is the run's own: a restart into the directory is not refused.
        RunDir::create(&root, |_| true).unwrap();
    }

    /// A run stopped before its first metrics line left a checkpoint and its recipe: a
    /// new run there is refused as one into a run, pointing at --resume, not as one into
    /// a user's folder; a folder merely named like a checkpoint is still a user's.
    #[test]
    fn a_checkpoint_alone_marks_a_run() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("run");
        std::fs::create_dir_all(root.join("checkpoint-2")).unwrap();
        let e = RunDir::create(&root, |_| true).err().unwrap().to_string();
        assert!(
            e.contains("`checkpoint-2`, which no hearth run wrote"),
            "{e}"
        );
        std::fs::write(root.join("checkpoint-2").join(STATE_FILE), "{}").unwrap();
        let e = RunDir::create(&root, |_| true).err().unwrap().to_string();
        assert!(
            e.contains("already holds a run") && e.contains("--resume"),
            "{e}"
        );
    }

    /// Resuming removes what killed processes left half-written (their pid is gone), and
    /// keeps a live process's temporary and anything else.
    #[test]
    fn resuming_clears_temporaries_of_dead_processes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("run");
        drop(RunDir::create(&root, |_| false).unwrap());
        std::fs::write(root.join(RECIPE_FILE), "x = 1\n").unwrap();
        // pid_max is at most 2^22 on Linux: this one cannot be running.
        let dead = root.join("loss.svg.99999999.0.tmp");
        let live = root.join(format!("loss.svg.{}.3.tmp", std::process::id()));
        let other = root.join("notes.tmp");
        for f in [&dead, &live, &other] {
            std::fs::write(f, "x").unwrap();
        }
        drop(RunDir::open(&root).unwrap());
        assert!(!dead.exists() && live.exists() && other.exists());
    }

    /// A final write that fails half-way leaves neither `final/` nor its temporary
    /// directory: nothing half-written stays in the run.
    #[test]
    fn a_failed_final_write_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(&tmp.path().join("run"), |_| false).unwrap();
        let failed = run.finish(|dir| {
            std::fs::write(dir.join("adapter_model.safetensors"), "half")
                .map_err(|e| CheckpointError::io(dir, e))?;
            Err(CheckpointError::Invalid {
                reason: "refused".into(),
            })
        });
        assert!(failed.is_err());
        let left: Vec<_> = std::fs::read_dir(run.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != LOCK_FILE)
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let written = run
            .finish(|dir| {
                std::fs::write(dir.join("adapter_model.safetensors"), "whole")
                    .map_err(|e| CheckpointError::io(dir, e))
            })
            .unwrap();
        assert_eq!(written, run.final_dir());
        assert!(written.join("manifest.json").is_file());
    }
}
