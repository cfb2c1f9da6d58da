//! A stable 64-bit hash (FNV-1a over words) of what decides a computation: the DPO
//! reference cache's key and a run's training-data fingerprint.

use std::io::Read;
use std::path::Path;

use crate::{Result, TrainerError};

/// FNV-1a over 64-bit words: stable across runs and platforms, fast enough for weights.
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

    pub fn file(&mut self, path: &Path) -> Result<()> {
        let io = |e| TrainerError::Input(format!("{}: {e}", path.display()));
        let mut f = std::fs::File::open(path).map_err(io)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            self.bytes(&buf[..n]);
        }
        Ok(())
    }
}
