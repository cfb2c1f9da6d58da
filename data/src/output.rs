//! Writing an output file so that it appears only once complete, and never over a file
//! that is already there.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use checkpoints::pending::PendingFile;

use crate::DataError;

fn io(path: &Path, source: std::io::Error) -> DataError {
    DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn refused(out: &Path, reason: &str) -> DataError {
    DataError::Unsupported {
        path: out.to_path_buf(),
        reason: format!("refusing to write here: {reason}; choose another --out"),
    }
}

/// What an output file holds, so that its name can be checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    JsonLines,
    Json,
    Gguf,
    Safetensors,
}

impl OutputFormat {
    fn name(self) -> &'static str {
        match self {
            Self::JsonLines => "JSON Lines",
            Self::Json => "JSON",
            Self::Gguf => "GGUF",
            Self::Safetensors => "safetensors",
        }
    }

    /// Its own extensions, the first the one to suggest.
    fn extensions(self) -> &'static [&'static str] {
        match self {
            // hearth reads `.json` as JSON Lines too.
            Self::JsonLines => &["jsonl", "ndjson", "json"],
            Self::Json => &["json"],
            Self::Gguf => &["gguf"],
            Self::Safetensors => &["safetensors"],
        }
    }
}

/// Extensions that say a format: data files, model files, pages, and compressed files
/// (the text is written as it is).
const KNOWN_FORMATS: [&str; 22] = [
    "jsonl",
    "ndjson",
    "json",
    "parquet",
    "arrow",
    "feather",
    "ipc",
    "csv",
    "tsv",
    "safetensors",
    "gguf",
    "bin",
    "pt",
    "pth",
    "html",
    "toml",
    "gz",
    "zst",
    "bz2",
    "xz",
    "zip",
    "lz4",
];

/// Refuses an `out` whose name says another format than the `format` written into it
/// (`o.parquet` would hold JSON text that every Parquet reader, hearth's included, then
/// calls damaged). A name without an extension, or with one no format goes by, is the
/// user's choice. `what` says what is written.
pub fn check_output_name(out: &Path, what: &str, format: OutputFormat) -> Result<(), DataError> {
    let ext = extension(out);
    if !KNOWN_FORMATS.contains(&ext.as_str()) || format.extensions().contains(&ext.as_str()) {
        return Ok(());
    }
    Err(wrong_name(out, what, format, &format!(", not .{ext}")))
}

/// [`check_output_name`] for JSON Lines.
pub fn check_jsonl_name(out: &Path, what: &str) -> Result<(), DataError> {
    check_output_name(out, what, OutputFormat::JsonLines)
}

/// [`check_jsonl_name`] for rows written for hearth to read back: its readers tell JSON
/// Lines by the name, so only `.jsonl`, `.ndjson` or `.json` will do.
pub fn check_readable_jsonl_name(out: &Path, what: &str) -> Result<(), DataError> {
    let format = OutputFormat::JsonLines;
    if format.extensions().contains(&extension(out).as_str()) {
        return Ok(());
    }
    Err(wrong_name(out, what, format, " only"))
}

fn extension(out: &Path) -> String {
    out.extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase()
}

fn wrong_name(out: &Path, what: &str, format: OutputFormat, qualifier: &str) -> DataError {
    let own = format.extensions();
    let suggestion = match own {
        [one] => format!(".{one}"),
        [first, .., last] => format!(".{first} (or .{last})"),
        [] => String::new(),
    };
    DataError::Unsupported {
        path: out.to_path_buf(),
        reason: format!(
            "{what} are written as {}{qualifier}: name the file {suggestion}",
            format.name()
        ),
    }
}

/// Refuses `out` if anything is there already (a file, a directory, a link).
fn refuse_existing(out: &Path) -> Result<(), DataError> {
    match out.symlink_metadata() {
        Ok(meta) if meta.is_dir() => Err(refused(out, "it is a directory")),
        Ok(_) => Err(refused(out, "it already exists")),
        Err(_) => Ok(()),
    }
}

/// Writes the new file `out`: `fill` writes into a temporary file beside it (see
/// [`checkpoints::pending`]), which becomes `out` only once `fill` succeeded and the data
/// is on disk. On any failure, or a signal, the temporary file is removed and `out` is
/// never touched. An `out` that already exists is refused, before the work and (linked in,
/// never renamed over) after it.
pub(crate) fn write_new<T>(
    out: &Path,
    fill: impl FnOnce(&mut BufWriter<&mut File>, &Path) -> Result<T, DataError>,
) -> Result<T, DataError> {
    refuse_existing(out)?;
    if out.file_name().is_none() {
        return Err(refused(out, "it does not name a file"));
    }
    let mut pending = PendingFile::create(out)?;
    let mut writer = BufWriter::new(pending.file());
    // `fill` names `out` in its errors: the temporary name means nothing to a user.
    let value = fill(&mut writer, out)?;
    writer.flush().map_err(|e| io(out, e))?;
    drop(writer);
    // Linked in, not renamed: a file that appeared at `out` while the work ran stays, and
    // is named as existing.
    pending.commit_new().map_err(|e| match e {
        checkpoints::CheckpointError::Io { ref source, .. }
            if source.kind() == std::io::ErrorKind::AlreadyExists =>
        {
            refused(out, "it already exists")
        }
        other => other.into(),
    })?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A JSON, GGUF or safetensors output under another format's name is refused with the
    /// name to use; its own name, or one no format goes by, is kept.
    #[test]
    fn each_format_refuses_the_names_of_the_others() {
        use OutputFormat::*;
        for (name, format, refused) in [
            ("e.json", Json, None),
            ("e.JSON", Json, None),
            (
                "e.parquet",
                Json,
                Some("written as JSON, not .parquet: name the file .json"),
            ),
            ("e.jsonl", Json, Some("not .jsonl: name the file .json")),
            ("e", Json, None),
            ("e.out", Json, None),
            ("m.gguf", Gguf, None),
            (
                "m.safetensors",
                Gguf,
                Some("written as GGUF, not .safetensors: name the file .gguf"),
            ),
            ("m.bin", Gguf, Some("not .bin")),
            ("l.safetensors", Safetensors, None),
            (
                "l.json",
                Safetensors,
                Some("not .json: name the file .safetensors"),
            ),
            (
                "r.html",
                JsonLines,
                Some("not .html: name the file .jsonl (or .json)"),
            ),
        ] {
            let got = check_output_name(Path::new(name), "things", format);
            match refused {
                None => assert!(got.is_ok(), "{name}: {got:?}"),
                Some(want) => {
                    let e = got.unwrap_err().to_string();
                    assert!(e.contains(want) && e.contains(name), "{name}: {e}");
                }
            }
        }
    }

    /// Another format's or a compressed name is refused by both rules; a name with no
    /// extension, or another one, only by the rule for files hearth reads back.
    #[test]
    fn json_lines_names_are_checked_loosely_or_for_reading_back() {
        let err = |r: Result<(), DataError>| r.map_err(|e| e.to_string()).err();
        for (name, loose, readable) in [
            ("o.jsonl", None, None),
            ("O.NDJSON", None, None),
            ("o.json", None, None),
            ("o", None, Some("JSON Lines only")),
            ("o.txt", None, Some("JSON Lines only")),
            ("o.parquet", Some("not .parquet"), Some("JSON Lines only")),
            ("o.jsonl.GZ", Some("not .gz"), Some("JSON Lines only")),
        ] {
            let out = Path::new(name);
            let got = err(check_jsonl_name(out, "rows"));
            assert_eq!(got.is_some(), loose.is_some(), "{name}: {got:?}");
            let got_readable = err(check_readable_jsonl_name(out, "rows"));
            assert_eq!(got_readable.is_some(), readable.is_some(), "{name}");
            for (m, want) in [(got, loose), (got_readable, readable)] {
                if let (Some(m), Some(want)) = (m, want) {
                    assert!(m.contains(want) && m.contains(name), "{m}");
                    assert!(m.contains("rows are written as JSON Lines"), "{m}");
                }
            }
        }
    }

    #[test]
    fn the_file_appears_only_when_complete_and_never_over_another() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let leftovers = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".tmp"))
                .collect::<Vec<_>>()
        };
        // A failing fill leaves nothing, not even its temporary file.
        let e = write_new(&out, |w, _| {
            w.write_all(b"half").unwrap();
            Err::<(), _>(DataError::Conversation("stopped".into()))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "stopped");
        assert!(!out.exists() && leftovers().is_empty(), "{:?}", leftovers());

        write_new(&out, |w, tmp| w.write_all(b"one\n").map_err(|e| io(tmp, e))).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one\n");
        assert!(leftovers().is_empty());

        // An existing file or a directory is refused, and left as it was.
        let e = write_new(&out, |w, tmp| w.write_all(b"two\n").map_err(|e| io(tmp, e)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("out.jsonl") && e.contains("already exists"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one\n");
        let e = write_new(dir.path(), |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a directory"), "{e}");
        // A file that appears while the work runs is not written over either.
        let late = dir.path().join("late.jsonl");
        let e = write_new(&late, |_, _| {
            std::fs::write(&late, "theirs").unwrap();
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(std::fs::read_to_string(&late).unwrap(), "theirs");
        assert!(leftovers().is_empty(), "{:?}", leftovers());
    }
}
