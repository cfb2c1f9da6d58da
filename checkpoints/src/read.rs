//! Reading weights: one `model.safetensors` or a sharded set behind
//! `model.safetensors.index.json`, memory-mapped so the file bytes live only in the page
//! cache and each tensor is converted once, straight into the model.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};

use crate::{CheckpointError, Result, names};

/// Smallest possible safetensors file: the 8-byte header length plus `{}`.
const MIN_FILE_LEN: u64 = 10;

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section.
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self> {
        let file = File::open(&path).map_err(|e| CheckpointError::io(&path, e))?;
        let len = file
            .metadata()
            .map_err(|e| CheckpointError::io(&path, e))?
            .len();
        if len < MIN_FILE_LEN {
            return Err(CheckpointError::Safetensors {
                path,
                reason: format!("truncated: only {len} bytes"),
            });
        }
        // SAFETY: the map is read-only and private to this process. A checkpoint rewritten
        // underneath a running job is outside what any loader can defend against; safetensors
        // validates the header and every offset against the mapped length before we read.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(&path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| CheckpointError::Safetensors {
                path: path.clone(),
                reason: describe(&e),
            })?;
        Ok(Self {
            path,
            map,
            data_start: 8 + header_len,
            metadata,
        })
    }
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "truncated or padded: the header's offsets do not match the file size".into()
        }
        E::InvalidHeaderLength | E::HeaderTooSmall => {
            "truncated: the header is longer than the file".into()
        }
        other => other.to_string(),
    }
}

/// A tensor inside a mapped file: raw little-endian bytes plus what they mean.
///
/// Only [`WeightFiles`] makes one: [`TensorRef::to_f32`] hands the bytes' pages back to the
/// kernel, which is harmless for a read-only file map but would zero the memory under any
/// other slice, so the bytes stay private and are read through [`TensorRef::bytes`].
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    bytes: &'a [u8],
}

impl<'a> TensorRef<'a> {
    /// The raw little-endian bytes, as stored in the file.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The values widened to f32 (exact for f16 and bf16). The file's pages the tensor
    /// read are then handed back (see [`release_pages`]).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let values = self.widen()?;
        release_pages(self.bytes);
        Ok(values)
    }

    fn widen(&self) -> Result<Vec<f32>> {
        let b = self.bytes;
        Ok(match self.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(CheckpointError::UnsupportedDtype {
                    path: self.path.to_path_buf(),
                    tensor: self.name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        })
    }

    /// The values as i64, for integer inputs such as token ids and masks.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        let b = self.bytes;
        match self.dtype {
            Dtype::I64 => Some(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            ),
            Dtype::I32 => Some(
                b.chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// The weights of one checkpoint, across however many shards. Tracks which tensors were
/// taken so a loader can report the ones it did not expect.
pub struct WeightFiles {
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    locate: BTreeMap<String, usize>,
    /// The file to blame for a missing tensor: the index, or the single file.
    listing: PathBuf,
    taken: RefCell<BTreeSet<String>>,
}

impl WeightFiles {
    /// Opens the weights of the checkpoint directory `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join(names::INDEX);
        let single = dir.join(names::SINGLE);
        if single.is_file() {
            Self::open_file(&single)
        } else if index.is_file() {
            Self::open_index(&index)
        } else if !dir.is_dir() {
            Err(CheckpointError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
            ))
        } else {
            // Pickled PyTorch weights can run code when loaded: hearth never reads them.
            let pickled = [
                "pytorch_model.bin",
                "pytorch_model.bin.index.json",
                "model.pt",
            ]
            .iter()
            .any(|f| dir.join(f).exists());
            Err(CheckpointError::NoWeights {
                dir: dir.to_path_buf(),
                hint: if pickled {
                    "; pickled PyTorch weights (.bin/.pt) are never loaded, convert them to \
                     safetensors first"
                        .into()
                } else {
                    String::new()
                },
            })
        }
    }

    /// Opens one safetensors file (also used for inputs such as `cases.safetensors`).
    pub fn open_file(path: &Path) -> Result<Self> {
        let shard = Shard::open(path.to_path_buf())?;
        let locate = shard
            .metadata
            .tensors()
            .into_keys()
            .map(|name| (name, 0))
            .collect();
        Ok(Self {
            shards: vec![shard],
            locate,
            listing: path.to_path_buf(),
            taken: RefCell::default(),
        })
    }

    fn open_index(index: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let text = std::fs::read_to_string(index).map_err(|e| CheckpointError::io(index, e))?;
        let parsed: Index =
            serde_json::from_str(&text).map_err(|source| CheckpointError::Json {
                path: index.to_path_buf(),
                source,
            })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let shard_names: BTreeSet<&String> = parsed.weight_map.values().collect();
        let mut shards = Vec::new();
        let mut shard_of: HashMap<&String, usize> = HashMap::new();
        for shard_name in shard_names {
            let path = dir.join(shard_name);
            // A shard is a file beside the index: a path that leaves the directory (or
            // is absolute) is refused for what it is, not reported as missing.
            let outside = Path::new(shard_name).is_absolute()
                || Path::new(shard_name)
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
                || shard_name.contains(['/', '\\']);
            if outside {
                return Err(CheckpointError::NotACheckpoint {
                    path: index.to_path_buf(),
                    reason: format!(
                        "names shard `{shard_name}`, a path outside the model directory; \
                         shards must be files beside the index"
                    ),
                });
            }
            if !path.is_file() {
                return Err(CheckpointError::MissingShard {
                    index: index.to_path_buf(),
                    shard: shard_name.clone(),
                });
            }
            shard_of.insert(shard_name, shards.len());
            shards.push(Shard::open(path)?);
        }
        let mut locate = BTreeMap::new();
        for (tensor, shard_name) in &parsed.weight_map {
            let i = shard_of[shard_name];
            if shards[i].metadata.info(tensor).is_none() {
                return Err(CheckpointError::IndexMismatch {
                    index: index.to_path_buf(),
                    tensor: tensor.clone(),
                    shard: shard_name.clone(),
                });
            }
            locate.insert(tensor.clone(), i);
        }
        Ok(Self {
            shards,
            locate,
            listing: index.to_path_buf(),
            taken: RefCell::default(),
        })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.locate.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.locate.contains_key(name)
    }

    /// Where this checkpoint's tensors are listed (the index, or the single file).
    pub fn listing(&self) -> &Path {
        &self.listing
    }

    /// The tensor `name`, without a shape check.
    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
        let Some((key, &i)) = self.locate.get_key_value(name) else {
            return Err(CheckpointError::MissingTensor {
                path: self.listing.clone(),
                tensor: name.to_string(),
                expected: None,
            });
        };
        let shard = &self.shards[i];
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                path: shard.path.clone(),
                tensor: name.to_string(),
                expected: None,
            })?;
        let (start, end) = info.data_offsets;
        self.taken.borrow_mut().insert(name.to_string());
        Ok(TensorRef {
            name: key,
            path: &shard.path,
            dtype: info.dtype,
            shape: &info.shape,
            // read_metadata checked that every offset lies inside the mapped file.
            bytes: &shard.map[shard.data_start + start..shard.data_start + end],
        })
    }

    /// The tensor `name`, which must have shape `expected`.
    pub fn take(&self, name: &str, expected: &[usize]) -> Result<TensorRef<'_>> {
        let tensor = self.get(name).map_err(|e| match e {
            CheckpointError::MissingTensor { path, tensor, .. } => CheckpointError::MissingTensor {
                path,
                tensor,
                expected: Some(expected.to_vec()),
            },
            e => e,
        })?;
        if tensor.shape != expected {
            return Err(CheckpointError::ShapeMismatch {
                path: tensor.path.to_path_buf(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: tensor.shape.to_vec(),
            });
        }
        Ok(tensor)
    }

    /// Fails on the first tensor nobody took, unless `ignorable` says it carries no weight
    /// (e.g. the `rotary_emb.inv_freq` buffers older checkpoints saved).
    pub fn ensure_all_taken(&self, ignorable: impl Fn(&str) -> bool) -> Result<()> {
        let taken = self.taken.borrow();
        for (name, &i) in &self.locate {
            if !taken.contains(name) && !ignorable(name) {
                let shape = self.shards[i]
                    .metadata
                    .info(name)
                    .map(|info| info.shape.clone())
                    .unwrap_or_default();
                return Err(CheckpointError::UnexpectedTensor {
                    path: self.shards[i].path.clone(),
                    tensor: name.clone(),
                    shape,
                });
            }
        }
        Ok(())
    }
}

/// Drops the process's mapping of the whole pages inside `bytes`, a slice of a read-only
/// file map: they stay in the page cache (a later read faults them back in, unchanged), but
/// no longer count in the process's memory. Without this a load held the file's pages and
/// the converted tensors at once, twice the model (BENCHMARKS.md: generation's peak).
fn release_pages(bytes: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: `sysconf` has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0);
        if page == 0 {
            return;
        }
        let start = (bytes.as_ptr() as usize).div_ceil(page) * page;
        let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
        if end > start {
            // SAFETY: `[start, end)` is whole pages inside a read-only private file mapping
            // that outlives this call; MADV_DONTNEED there only drops page-table entries,
            // and the next access reads the same bytes from the file again.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = bytes;
}
