//! DPO reference log-probs computed once and cached on disk. The key hashes everything
//! that decides the values — the model's files (config and weights, and the initial
//! adapter's) and the tokenised pairs — so a changed model or data set never reads stale
//! values, and reruns of the same recipe skip the reference forward entirely.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::examples::PairItem;
use crate::fnv::Fnv;
use crate::objectives::Reference;
use crate::{Result, TrainerError};

/// The model half of a cache key.
#[derive(Debug, Clone, Copy)]
pub struct RefCacheKey {
    model: u64,
}

impl RefCacheKey {
    /// Hashes the base's files ([`Fnv::checkpoint`]: config and weights, or a GGUF), and
    /// the initial adapter's when there is one.
    /// `precision` is part of the key: the reference computes in it.
    pub fn new(
        base: &Path,
        adapter: Option<&Path>,
        precision: crate::model::precision::Precision,
    ) -> Result<Self> {
        let mut h = Fnv::new();
        h.bytes(format!("{precision:?}").as_bytes());
        for dir in std::iter::once(base).chain(adapter) {
            h.checkpoint(dir)?;
        }
        Ok(Self { model: h.0 })
    }
}

/// `$XDG_CACHE_HOME/hearth/ref-logps`, else `~/.cache/hearth/ref-logps`, else a directory
/// in the working directory.
pub fn default_cache_dir() -> PathBuf {
    let root = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".hearth-cache"));
    root.join("hearth").join("ref-logps")
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    /// `[chosen, rejected]` summed completion log-probs, one per pair in order.
    logps: Vec<(f64, f64)>,
}

/// Fills every pair's `reference` from the cache in `dir`, computing and storing the
/// values first when the cache lacks them. Returns whether the cache was hit.
pub fn precompute(
    reference: &Reference,
    pairs: &mut [PairItem],
    pad: u32,
    batch_size: usize,
    key: &RefCacheKey,
    dir: &Path,
) -> Result<bool> {
    if pairs.is_empty() {
        return Ok(true);
    }
    let mut h = Fnv::new();
    h.word(pad as u64);
    for p in pairs.iter() {
        for part in [&p.tokens.prompt, &p.tokens.chosen, &p.tokens.rejected] {
            h.word(part.len() as u64);
            for &id in part.iter() {
                h.word(id as u64);
            }
        }
    }
    let path = dir.join(format!("{:016x}-{:016x}.json", key.model, h.0));
    let cached = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str::<CacheFile>(&text).ok())
        .filter(|c| c.logps.len() == pairs.len());
    let hit = cached.is_some();
    let logps = match cached {
        Some(c) => c.logps,
        None => {
            let mut logps = Vec::with_capacity(pairs.len());
            for chunk in pairs.chunks(batch_size.max(1)) {
                let tokens: Vec<_> = chunk.iter().map(|p| &p.tokens).collect();
                logps.extend(reference.logps(&tokens, pad));
            }
            std::fs::create_dir_all(dir)
                .map_err(|e| TrainerError::Input(format!("{}: {e}", dir.display())))?;
            let text = serde_json::to_string(&CacheFile {
                logps: logps.clone(),
            })
            .unwrap_or_default();
            checkpoints::write_text(&path, &text)?;
            logps
        }
    };
    for (p, lp) in pairs.iter_mut().zip(logps) {
        p.reference = Some(lp);
    }
    Ok(hit)
}
