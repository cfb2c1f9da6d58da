//! A stable 64-bit hash (FNV-1a over words) of what decides a computation: the DPO
//! reference cache's key, and the training data and model files a resumed run must find
//! unchanged.

use std::io::Read;
use std::path::Path;

use crate::{Result, TrainerError};

/// FNV-1a over 64-bit words: stable across runs and platforms. Files go through XXH3 first.
#[derive(Clone, Copy)]
pub(crate) struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub fn word(&mut self, w: u64) {
        self.0 ^= w;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    pub fn bytes(&mut self, b: &[u8]) {
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        }
        for &x in chunks.remainder() {
            self.word(x as u64);
        }
        self.word(b.len() as u64);
    }

    /// A file's content, through XXH3 (FNV's multiply chain reads about 0.6 GB/s; a
    /// base model is hashed at every start and resume, 16 GB for an 8B in bf16).
    pub fn file(&mut self, path: &Path) -> Result<()> {
        let io = |e| TrainerError::Input(format!("{}: {e}", path.display()));
        let mut f = std::fs::File::open(path).map_err(io)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut content = xxhash_rust::xxh3::Xxh3::new();
        let mut len = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            content.update(&buf[..n]);
            len += n as u64;
        }
        self.word(content.digest());
        self.word(len);
        Ok(())
    }
}

impl Fnv {
    /// A checkpoint as it is on disk. A directory: its `config.json`, safetensors weights
    /// (and their index), GGUF files and `adapter_config.json`, each by name and content, in name
    /// order; the tokenizer is left out (a run's data fingerprint covers the tokens it
    /// makes). A file (a GGUF): its name and content.
    pub fn checkpoint(&mut self, path: &Path) -> Result<()> {
        let files: Vec<std::path::PathBuf> = if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)
                .map_err(|e| TrainerError::Input(format!("{}: {e}", path.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    name.ends_with(".safetensors")
                        || name.ends_with(".safetensors.index.json")
                        || name.ends_with(".gguf")
                        || name == checkpoints::names::CONFIG
                        || name == checkpoints::peft::CONFIG_FILE
                })
                .collect();
            files.sort();
            files
        } else {
            vec![path.to_path_buf()]
        };
        for f in files {
            self.bytes(f.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
            self.file(&f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint's hash follows its weights and config, whatever else sits beside them.
    #[test]
    fn a_checkpoint_hash_follows_its_weights_and_config() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let hash = |p: &Path| {
            let mut h = Fnv::new();
            h.checkpoint(p).unwrap();
            h.0
        };
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("model.safetensors"), [1u8, 2, 3]).unwrap();
        let first = hash(dir);
        std::fs::write(dir.join("notes.txt"), "anything").unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        assert_eq!(hash(dir), first);
        std::fs::write(dir.join("model.safetensors"), [1u8, 2, 4]).unwrap();
        let weights = hash(dir);
        assert_ne!(weights, first);
        std::fs::write(dir.join("config.json"), "{ }").unwrap();
        assert_ne!(hash(dir), weights);
        // A GGUF in the directory is its weights too.
        std::fs::write(dir.join("m.gguf"), [7u8; 9]).unwrap();
        let with_gguf = hash(dir);
        std::fs::write(dir.join("m.gguf"), [8u8; 9]).unwrap();
        assert_ne!(hash(dir), with_gguf);
        std::fs::remove_file(dir.join("m.gguf")).unwrap();
        // A single file (a GGUF) is hashed whole; a missing one is an error naming it.
        let gguf = dir.join("m.gguf");
        std::fs::write(&gguf, [7u8; 9]).unwrap();
        let one = hash(&gguf);
        std::fs::write(&gguf, [7u8; 10]).unwrap();
        assert_ne!(hash(&gguf), one);
        let e = Fnv::new().checkpoint(&dir.join("gone.gguf")).unwrap_err();
        assert!(e.to_string().contains("gone.gguf"), "{e}");
    }
}
