//! Refusing outputs that would write over a command's inputs or over a checkpoint: a
//! mistyped `--out` must never cost a user their model. Checked before any work starts.

use std::path::{Path, PathBuf};

use crate::{CheckpointError, Result, names};

/// Files whose presence makes a directory a checkpoint (a model or an adapter).
const CHECKPOINT_FILES: [&str; 4] = [
    names::CONFIG,
    names::SINGLE,
    names::INDEX,
    crate::peft::CONFIG_FILE,
];

/// Whether `dir` holds a model or adapter checkpoint.
pub fn holds_checkpoint(dir: &Path) -> bool {
    CHECKPOINT_FILES.iter().any(|f| dir.join(f).is_file())
        || (dir.is_dir() && matches!(crate::gguf::locate(dir), Ok(Some(_)) | Err(_)))
}

/// `path` made absolute and free of `.`/`..` and links, as far as it exists: a path that
/// does not exist yet resolves through its nearest existing ancestor.
fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    // Part of it is still to be made: the existing part canonical, the rest walked a
    // component at a time, so a `..` past a missing folder (`runs/nope/../w`) lands where
    // the filesystem would put it.
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    let mut out = PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => {
                out.push(other);
                if let Ok(p) = out.canonicalize() {
                    out = p;
                }
            }
        }
    }
    out
}

/// Whether a file of this name would be read as part of a checkpoint.
fn checkpoint_like(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".safetensors")
        || name.ends_with(".json")
        || name.ends_with(".jinja")
        || name.ends_with(".model")
        // A second GGUF file makes a directory of one ambiguous to every reader.
        || name.to_ascii_lowercase().ends_with(".gguf")
}

fn refuse(out: &Path, reason: String) -> CheckpointError {
    CheckpointError::NotACheckpoint {
        path: out.to_path_buf(),
        reason: format!("refusing to write here: {reason}; choose another --out"),
    }
}

/// For a command that writes the file `out` from `inputs` (files or checkpoint
/// directories): refuses `out` when it is one of the inputs, lies inside an input
/// directory, already exists (whatever it holds: nothing already written is overwritten),
/// or has no directory to go in. Checked before the work, so a mistyped `--out` costs
/// nothing.
pub fn check_output_file(out: &Path, inputs: &[&Path]) -> Result<()> {
    check_output_file_with(out, inputs, true)
}

/// [`check_output_file`] for an output whose directory the caller makes (if missing) when
/// it writes, and not before: a folder made at the start would have to be taken away
/// again on failure, while another process may already be counting on it.
pub fn check_output_file_to_make(out: &Path, inputs: &[&Path]) -> Result<()> {
    check_output_file_with(out, inputs, false)
}

fn check_output_file_with(out: &Path, inputs: &[&Path], parent_must_exist: bool) -> Result<()> {
    let at = resolve(out);
    for input in inputs {
        let input_at = resolve(input);
        if at == input_at {
            return Err(refuse(out, format!("it is the input {}", input.display())));
        }
        // Inside an input directory, a new file of another kind is harmless; one that a
        // checkpoint reader would pick up is not.
        if input.is_dir() && at.starts_with(&input_at) && checkpoint_like(&at) {
            return Err(refuse(
                out,
                format!("it lies inside the input {}", input.display()),
            ));
        }
    }
    if at.is_dir() {
        return Err(refuse(out, "it is a directory".into()));
    }
    if out.symlink_metadata().is_ok() {
        return Err(refuse(
            out,
            "it already exists; remove it first to write it again".into(),
        ));
    }
    match at.parent() {
        Some(parent) if parent_must_exist && !parent.is_dir() => Err(refuse(
            out,
            format!("its directory {} does not exist", parent.display()),
        )),
        _ => Ok(()),
    }
}

/// For a command that writes a run into the directory `out`: refuses `out` when it is
/// `input` or lies inside it (a run inside its base model's directory, say).
pub fn check_not_within(out: &Path, input: &Path) -> Result<()> {
    let (at, input_at) = (resolve(out), resolve(input));
    if at == input_at {
        return Err(refuse(out, format!("it is the input {}", input.display())));
    }
    if at.starts_with(&input_at) {
        return Err(refuse(
            out,
            format!("it lies inside the input {}", input.display()),
        ));
    }
    Ok(())
}

/// For a run that writes into the directory `out`: refuses it when it holds `input`, which
/// the run's checkpoints and final save would overwrite (a base at `RUN/final`, say) or its
/// fresh start would clear. `key` names the input in the message.
pub fn check_not_holding(out: &Path, input: &Path, key: &str) -> Result<()> {
    let (at, input_at) = (resolve(out), resolve(input));
    if input_at != at && input_at.starts_with(&at) {
        return Err(refuse(
            out,
            format!(
                "it holds {key} {}, which the run's checkpoints would overwrite",
                input.display()
            ),
        ));
    }
    Ok(())
}

/// For a command that writes a checkpoint into the directory `out` from `inputs`: refuses
/// `out` when it is, contains or lies inside one of the inputs, or already holds anything
/// (a model, or files of its own that the checkpoint's would replace or sit beside).
pub fn check_output_dir(out: &Path, inputs: &[&Path]) -> Result<()> {
    let at = resolve(out);
    for input in inputs {
        let input_at = resolve(input);
        if at == input_at || at.starts_with(&input_at) || input_at.starts_with(&at) {
            return Err(refuse(
                out,
                format!("it overlaps the input {}", input.display()),
            ));
        }
    }
    if holds_checkpoint(&at) {
        return Err(refuse(out, "it already holds a model".into()));
    }
    if at.is_file() {
        return Err(refuse(out, "it is a file".into()));
    }
    if !is_empty_dir(&at) {
        return Err(refuse(out, "it is a directory that is not empty".into()));
    }
    Ok(())
}

/// Whether `dir` is missing or an empty directory.
pub fn is_empty_dir(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(_) => !dir.exists(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("model.safetensors"), "x").unwrap();
    }

    #[test]
    fn a_run_directory_holding_an_input_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        for inside in ["final", "checkpoint-2", "base/model"] {
            let e = check_not_holding(&run, &run.join(inside), "model.path")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("it holds model.path") && e.contains(inside),
                "{e}"
            );
        }
        check_not_holding(&run, &tmp.path().join("base"), "model.path").unwrap();
        // A `..` past a folder that does not exist yet is where the filesystem puts it.
        let around = tmp.path().join("nope/../run");
        let e = check_not_holding(&around, &run.join("final"), "model.path").unwrap_err();
        assert!(e.to_string().contains("it holds model.path"), "{e}");
        let base = tmp.path().join("base3");
        std::fs::create_dir(&base).unwrap();
        check_not_within(&tmp.path().join("nope/../base3/run"), &base).unwrap_err();
        check_not_holding(&run, &tmp.path().join("run-other/final"), "model.path").unwrap();
    }

    #[test]
    fn outputs_over_inputs_or_checkpoints_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let m = tmp.path().join("m");
        let other = tmp.path().join("other");
        model(&m);
        model(&other);
        let weights = m.join("model.safetensors");
        let data = tmp.path().join("d.jsonl");
        std::fs::write(&data, "").unwrap();

        let refused = |r: Result<()>, want: &str| {
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("refusing to write here") && e.contains(want),
                "{e}"
            );
        };
        refused(check_output_file(&weights, &[&m]), "inside the input");
        refused(check_output_file(&data, &[&m, &data]), "it is the input");
        // Spelled another way, the same file.
        let dotted = tmp.path().join("m/../d.jsonl");
        refused(check_output_file(&dotted, &[&data]), "it is the input");
        refused(
            check_output_file(&other.join("config.json"), &[&m]),
            "already exists",
        );
        // Any existing file, a checkpoint's or not (a run's metrics, a user's notes).
        let notes = tmp.path().join("notes.txt");
        std::fs::write(&notes, "mine").unwrap();
        refused(check_output_file(&notes, &[&m]), "already exists");
        refused(check_output_file(&m, &[&data]), "a directory");
        refused(
            check_output_file(&tmp.path().join("nowhere/x.json"), &[&m]),
            "does not exist",
        );
        check_output_file(&tmp.path().join("logits.safetensors"), &[&m]).unwrap();
        // A new file beside a model's own is fine unless a reader would take it for one.
        check_output_file(&m.join("notes.jsonl"), &[&m]).unwrap();
        refused(
            check_output_file(&m.join("extra.safetensors"), &[&m]),
            "inside the input",
        );
        check_output_file(&other.join("new.safetensors"), &[&m]).unwrap();
        refused(
            check_output_file(&m.join("second.gguf"), &[&m]),
            "inside the input",
        );

        refused(check_output_dir(&m, &[&m]), "overlaps the input");
        refused(
            check_output_dir(&m.join("sub"), &[&m]),
            "overlaps the input",
        );
        refused(check_output_dir(tmp.path(), &[&m]), "overlaps the input");
        refused(check_output_dir(&other, &[&m]), "already holds a model");
        check_output_dir(&tmp.path().join("new"), &[&m]).unwrap();
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        check_output_dir(&empty, &[&m]).unwrap();
        // A directory with files of its own, none of them weights: a tokenizer the new
        // checkpoint's would replace, or anything else it would land beside.
        let tokenizer_only = tmp.path().join("tk");
        std::fs::create_dir(&tokenizer_only).unwrap();
        std::fs::write(tokenizer_only.join("tokenizer.json"), "{}").unwrap();
        refused(check_output_dir(&tokenizer_only, &[&m]), "not empty");
        refused(check_output_dir(&notes, &[&m]), "a file");
        refused(check_not_within(&m.join("run"), &m), "inside the input");
        refused(
            check_not_within(&tmp.path().join("m/."), &m),
            "it is the input",
        );
        check_not_within(&tmp.path().join("run"), &m).unwrap();
        // A run may hold the model it makes (`model.path = "{out}/base"` in a pipeline
        // stage's own directory is another matter: that is the stage's run).
        check_not_within(tmp.path(), &m).unwrap();
        assert_eq!(std::fs::read_to_string(&notes).unwrap(), "mine");
    }
}
