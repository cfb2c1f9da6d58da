//! Reading the small text files a model or run is described by (configs, tokenizers,
//! recipes, report pages) only when they are plain files of a sane size: a pipe named
//! `config.json` would wait forever for a writer, and `/dev/zero` would be read until memory
//! runs out.

use std::io::Read;
use std::path::Path;

/// Configs, recipes and pipeline files: far past any real one.
pub const TEXT_LIMIT: u64 = 64 << 20;
/// Tokenizers of the largest vocabularies take some tens of MiB.
pub const TOKENIZER_LIMIT: u64 = 1 << 30;

/// `path`'s bytes, when it is a regular file (a link to one counts) of at most `limit`
/// bytes; otherwise an error of kind `InvalidInput` saying which.
pub fn read(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a pipe or a device?)"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {what}"),
        ));
    }
    if meta.len() > limit {
        return Err(too_big(limit));
    }
    read_bounded(path, limit, meta.len() as usize)
}

/// At most `limit` bytes of `path`, refused when there are more (a file may have grown
/// since its size was read, and a stream has none).
fn read_bounded(path: &Path, limit: u64, expected: usize) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(expected);
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_big(limit));
    }
    Ok(bytes)
}

fn too_big(limit: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("is larger than the {} MiB such a file may be", limit >> 20),
    )
}

/// As [`read`], as UTF-8 text.
pub fn read_text(path: &Path, limit: u64) -> std::io::Result<String> {
    utf8(read(path, limit)?)
}

/// As [`read_text`], but a pipe or device is read too (a recipe from `<(sed …)` or
/// standard input), still only up to `limit`: what a user hands over on purpose. Only a
/// directory is refused.
pub fn read_text_or_stream(path: &Path, limit: u64) -> std::io::Result<String> {
    if std::fs::metadata(path)?.is_file() {
        return read_text(path, limit);
    }
    if path.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is a directory",
        ));
    }
    utf8(read_bounded(path, limit, 0)?)
}

/// The text, or an error naming the line of the first byte that is not UTF-8.
fn utf8(bytes: Vec<u8>) -> std::io::Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("line {line}: not UTF-8 text ({})", e.utf8_error()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_files_within_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        std::fs::write(&file, "{}").unwrap();
        assert_eq!(read_text(&file, 2).unwrap(), "{}");
        let e = read(&file, 1).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
        let e = read(dir.path(), 10).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
        // A device: read whole it never ends.
        let e = read(Path::new("/dev/zero"), 10).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path and a mode; mkfifo touches no memory of ours.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read(&fifo, 10).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // Streams handed over on purpose are read, within the limit.
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, "a = 1\n").unwrap())
        };
        assert_eq!(read_text_or_stream(&fifo, 100).unwrap(), "a = 1\n");
        writer.join().unwrap();
        let e = read_text_or_stream(Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than"), "{e}");
        assert!(read_text_or_stream(dir.path(), 10).is_err());
        std::fs::write(&file, b"a = 1\nb = \"\xff\"\n").unwrap();
        let e = read_text(&file, 100).unwrap_err().to_string();
        assert!(e.starts_with("line 2: not UTF-8 text"), "{e}");
    }
}
