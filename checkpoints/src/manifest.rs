//! Checkpoint manifests: every file of a checkpoint directory with its size and SHA-256,
//! written last (before the directory is renamed into place) and checked before a run
//! resumes from it, so a truncated or corrupted checkpoint is refused instead of loaded.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::CheckpointError;

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Paths relative to the checkpoint directory, `/`-separated.
    pub files: BTreeMap<String, FileEntry>,
}

fn io(path: &Path, source: std::io::Error) -> CheckpointError {
    CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn hash(path: &Path) -> Result<FileEntry, CheckpointError> {
    let mut f = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| io(path, e))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(FileEntry { size, sha256 })
}

fn files_under(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), CheckpointError> {
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = entry.map_err(|e| io(dir, e))?.path();
        if path.is_dir() {
            files_under(root, &path, out)?;
        } else if path != root.join(MANIFEST) {
            out.push(path);
        }
    }
    Ok(())
}

fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Hashes every file under `dir` and writes `dir/manifest.json`.
pub fn write_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let mut paths = Vec::new();
    files_under(dir, dir, &mut paths)?;
    let mut m = Manifest::default();
    for p in paths {
        m.files.insert(relative(dir, &p), hash(&p)?);
    }
    let text = serde_json::to_string_pretty(&m).unwrap_or_default();
    crate::write_text(&dir.join(MANIFEST), &text)?;
    Ok(m)
}

/// Checks `dir` against its manifest: every listed file present with its size and hash.
/// The error says what is wrong, in a few words.
pub fn verify_manifest(dir: &Path) -> Result<(), String> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|_| format!("no {MANIFEST}"))?;
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| format!("{MANIFEST} is unreadable ({e})"))?;
    if m.files.is_empty() {
        return Err(format!("{MANIFEST} lists no files"));
    }
    for (name, want) in &m.files {
        let file = dir.join(name);
        let size = std::fs::metadata(&file)
            .map_err(|_| format!("`{name}` is missing"))?
            .len();
        if size != want.size {
            return Err(format!(
                "`{name}` is {size} bytes, the manifest says {} (truncated?)",
                want.size
            ));
        }
        let got = hash(&file).map_err(|e| e.to_string())?;
        if got.sha256 != want.sha256 {
            return Err(format!("`{name}` does not match its SHA-256 (corrupted)"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_catch_truncation_corruption_and_loss() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("a.bin"), vec![7u8; 3000]).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/b.json"), "{}").unwrap();
        let m = write_manifest(dir).unwrap();
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.files["a.bin"].size, 3000);
        assert!(m.files.contains_key("sub/b.json"));
        verify_manifest(dir).unwrap();

        let mut bytes = vec![7u8; 3000];
        bytes[1234] = 8;
        std::fs::write(dir.join("a.bin"), &bytes).unwrap();
        assert!(verify_manifest(dir).unwrap_err().contains("SHA-256"));
        std::fs::write(dir.join("a.bin"), &bytes[..100]).unwrap();
        assert!(verify_manifest(dir).unwrap_err().contains("truncated"));
        std::fs::remove_file(dir.join("sub/b.json")).unwrap();
        std::fs::write(dir.join("a.bin"), vec![7u8; 3000]).unwrap();
        assert!(verify_manifest(dir).unwrap_err().contains("missing"));
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
        assert!(verify_manifest(dir).unwrap_err().contains("no manifest"));
    }
}
