//! Writing weights in the layout transformers loads: `{"format":"pt"}` metadata, one file
//! below the shard threshold, numbered shards plus an index above it. Every file is written
//! beside its final name and renamed into place, so a crash never leaves a half file under a
//! name a loader would pick up.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, View};

use crate::pending::PendingFile;
use crate::{CheckpointError, Result, WeightDtype, names};

/// A tensor ready to be written.
#[derive(Debug, Clone)]
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OwnedTensor {
    /// Narrows f32 values to the storage dtype (round-to-nearest-even, as PyTorch does).
    pub fn from_f32(values: &[f32], shape: Vec<usize>, dtype: WeightDtype) -> Self {
        let (dtype, data) = match dtype {
            WeightDtype::F32 => (
                Dtype::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            WeightDtype::F16 => (
                Dtype::F16,
                values
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
            WeightDtype::BF16 => (
                Dtype::BF16,
                values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
        };
        Self { dtype, shape, data }
    }

    /// Integer tensors (token ids, masks) for test cases and inputs.
    pub fn from_i64(values: &[i64], shape: Vec<usize>) -> Self {
        Self {
            dtype: Dtype::I64,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Whether little-endian `bytes` of `dtype` hold only finite numbers (integer dtypes
/// hold nothing else).
pub(crate) fn all_finite(dtype: Dtype, bytes: &[u8]) -> bool {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .all(|b| half::f16::from_le_bytes([b[0], b[1]]).is_finite()),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .all(|b| half::bf16::from_le_bytes([b[0], b[1]]).is_finite()),
        _ => true,
    }
}

/// Refuses weights that hold NaN or ±∞ (also those that overflowed when narrowed to a
/// half-precision dtype) before anything is written to `path`.
pub(crate) fn check_finite<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a String, &'a OwnedTensor)>,
) -> Result<()> {
    for (name, t) in tensors {
        if !all_finite(t.dtype, &t.data) {
            return Err(CheckpointError::NonFinite {
                path: path.to_path_buf(),
                tensor: name.clone(),
            });
        }
    }
    Ok(())
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// How to lay the weights out on disk.
#[derive(Debug, Clone, Copy)]
pub struct SaveOptions {
    /// Shard once the weights exceed this many bytes (transformers' default is 5 GB).
    pub max_shard_bytes: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// Writes `tensors` into `dir` (created if needed) as `model.safetensors`, or as
/// `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`. Weight files of
/// the other layout left in `dir` by an earlier save are removed afterwards, so the directory
/// always holds exactly one consistent set. Weights holding NaN or ±∞ are refused before
/// anything is written (`dir` is not even created).
pub fn save_weights(
    dir: &Path,
    tensors: &BTreeMap<String, OwnedTensor>,
    options: SaveOptions,
) -> Result<Vec<PathBuf>> {
    check_finite(dir, tensors)?;
    std::fs::create_dir_all(dir).map_err(|e| CheckpointError::io(dir, e))?;
    let metadata = pt_metadata();

    // Greedy packing in name order, as transformers does in module order.
    let mut groups: Vec<Vec<(&String, &OwnedTensor)>> = vec![Vec::new()];
    let mut group_bytes = 0u64;
    let total: u64 = tensors.values().map(|t| t.data.len() as u64).sum();
    for (name, tensor) in tensors {
        let n = tensor.data.len() as u64;
        let last = groups.last().map_or(0, Vec::len);
        if last > 0 && group_bytes + n > options.max_shard_bytes {
            groups.push(Vec::new());
            group_bytes = 0;
        }
        group_bytes += n;
        if let Some(g) = groups.last_mut() {
            g.push((name, tensor));
        }
    }

    let mut written = Vec::new();
    if groups.len() == 1 {
        let path = dir.join(names::SINGLE);
        write_file(&path, &groups[0], &metadata)?;
        written.push(path);
        remove_if_present(&dir.join(names::INDEX))?;
    } else {
        let n = groups.len();
        let mut weight_map = BTreeMap::new();
        for (i, group) in groups.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            let path = dir.join(&file);
            write_file(&path, group, &metadata)?;
            for (name, _) in group {
                weight_map.insert((*name).clone(), file.clone());
            }
            written.push(path);
        }
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let path = dir.join(names::INDEX);
        let text = serde_json::to_string_pretty(&index).unwrap_or_default();
        write_atomic(&path, text.as_bytes())?;
        written.push(path);
        remove_if_present(&dir.join(names::SINGLE))?;
    }
    remove_stale_shards(dir, &written)?;
    Ok(written)
}

/// Writes one safetensors file (e.g. logits for a parity check) atomically, with
/// `{"format":"pt"}` metadata.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, OwnedTensor>) -> Result<()> {
    let group: Vec<_> = tensors.iter().collect();
    write_file(path, &group, &pt_metadata())
}

fn pt_metadata() -> HashMap<String, String> {
    [("format".to_string(), "pt".to_string())].into()
}

fn write_file(
    path: &Path,
    group: &[(&String, &OwnedTensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let pending = PendingFile::create(path)?;
    // Errors name the file being written, not its temporary name.
    let tmp = pending.path();
    safetensors::serialize_to_file(group.iter().copied(), Some(metadata.clone()), tmp).map_err(
        |e| match e {
            safetensors::SafeTensorError::IoError(source) => CheckpointError::io(path, source),
            other => CheckpointError::Safetensors {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        },
    )?;
    pending.commit()
}

/// Writes `bytes` to `path` through a temporary sibling and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut pending = PendingFile::create(path)?;
    pending
        .file()
        .write_all(bytes)
        .map_err(|e| CheckpointError::io(path, e))?;
    pending.commit()
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CheckpointError::io(path, e)),
        _ => Ok(()),
    }
}

fn remove_stale_shards(dir: &Path, keep: &[PathBuf]) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| CheckpointError::io(dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_shard = name.starts_with("model-") && name.ends_with(".safetensors");
        if is_shard && !keep.contains(&path) {
            remove_if_present(&path)?;
        }
    }
    Ok(())
}

/// Writes a text file (a config, a tokenizer) atomically.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, text.as_bytes())
}

/// Writes a binary file atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails at its last step (the rename) leaves the directory as it was:
    /// no temporary file beside the weights, the config or the index.
    #[test]
    fn a_failed_save_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let tensors: BTreeMap<String, OwnedTensor> = (0..3)
            .map(|i| {
                let t = OwnedTensor::from_f32(&[i as f32; 4], vec![4], WeightDtype::F32);
                (format!("w{i}"), t)
            })
            .collect();
        // Non-empty directories where the files should go cannot be replaced.
        for name in [
            names::SINGLE,
            "model-00002-of-00003.safetensors",
            "config.json",
        ] {
            std::fs::create_dir_all(dir.path().join(name).join("x")).unwrap();
        }
        let leftovers = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect::<Vec<_>>()
        };
        let e = save_weights(dir.path(), &tensors, SaveOptions::default()).unwrap_err();
        assert!(e.to_string().contains(names::SINGLE), "{e}");
        let sharded = SaveOptions {
            max_shard_bytes: 16,
        };
        let e = save_weights(dir.path(), &tensors, sharded).unwrap_err();
        assert!(e.to_string().contains("model-00002-of-00003"), "{e}");
        let e = write_text(&dir.path().join("config.json"), "{}").unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
        assert!(leftovers().is_empty(), "{:?}", leftovers());
    }
}
