//! The GGUF container (versions 2 and 3): header, typed metadata, tensor descriptors and the
//! aligned data section, read from a memory map with every count, length and offset checked
//! against the file's size before it is used, so a damaged file is an error, never a panic or
//! a huge allocation.
//!
//! Why not a crate: the maintained readers we looked at (ggus 0.5, gguf-rs-lib 0.3) read only
//! version 3, and ggus slices its data section by the tensors' claimed end, which panics on a
//! truncated file instead of saying so.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::quant::GgmlType;
use crate::{CheckpointError, Result};

/// "GGUF" read as a little-endian u32.
pub(crate) const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section when `general.alignment` is absent.
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// One metadata value, as typed in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The value type's id in the file.
    pub(crate) fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::Str(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }

    /// Any integer type as u64 (negative values are not counts).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer or float type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// A tensor's descriptor. `dims` are ggml's: the first is the innermost (contiguous) one, so
/// the row-major shape Hugging Face uses is `dims` reversed.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset inside the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// The row-major shape (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
    data_start: usize,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
        // SAFETY: read-only and private; every offset read below is checked against the
        // mapped length first.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(path, e))?;
        let parsed = parse(&map).map_err(|reason| gguf_err(path, reason))?;
        let index = parsed
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            index,
            data_start: parsed.data_start,
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of `tensor` (checked to lie inside the file when it was opened).
    pub fn bytes(&self, tensor: &TensorInfo) -> &[u8] {
        let start = self.data_start + tensor.offset as usize;
        &self.map[start..start + tensor.size as usize]
    }
}

pub(crate) fn gguf_err(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Gguf {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    data_start: usize,
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

type ParseResult<T> = std::result::Result<T, String>;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> ParseResult<&'a [u8]> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "truncated: {what} at byte {} needs {n} bytes, the file has {left} left",
                self.pos
            ));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> ParseResult<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> ParseResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> ParseResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn left(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn string(&mut self, what: &str) -> ParseResult<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> ParseResult<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(what)?[0]),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                other => return Err(format!("{what}: {other} is not a boolean")),
            },
            8 => MetaValue::Str(self.string(what)?),
            9 => {
                if depth > 0 {
                    return Err(format!("{what}: arrays of arrays are not supported"));
                }
                let item_ty = self.u32(what)?;
                let len = self.u64(what)?;
                // Every item takes at least one byte (eight for a string's length), so a
                // count the rest of the file cannot hold is refused before allocating.
                let least = if item_ty == 8 { 8 } else { 1 };
                if len.saturating_mul(least) > self.left() {
                    return Err(format!(
                        "truncated: {what} claims {len} items, more than the file holds"
                    ));
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(item_ty, what, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(format!("{what}: unknown metadata value type {other}")),
        })
    }
}

fn parse(bytes: &[u8]) -> ParseResult<Parsed> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.take(4, "the magic number").map_err(|_| {
        format!(
            "truncated: {} bytes, shorter than a GGUF header",
            bytes.len()
        )
    })?;
    if magic != MAGIC {
        return Err("not a GGUF file (it does not start with `GGUF`)".into());
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unknown GGUF version {version} (this hearth reads versions 2 and 3)"
        ));
    }
    let tensor_count = c.u64("the tensor count")?;
    let kv_count = c.u64("the metadata count")?;
    // A metadata entry takes at least 13 bytes (key length, type, one byte), a tensor
    // descriptor at least 24 (name length, dims count, type, offset).
    if kv_count.saturating_mul(13) > c.left() {
        return Err(format!(
            "truncated or damaged: {kv_count} metadata entries do not fit the file"
        ));
    }
    if tensor_count.saturating_mul(24) > c.left() {
        return Err(format!(
            "truncated or damaged: a tensor count of {tensor_count} does not fit the file"
        ));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = c.string(&format!("the key of metadata entry {i}"))?;
        let ty = c.u32(&format!("the type of `{key}`"))?;
        let value = c.value(ty, &format!("`{key}`"), 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(format!("`general.alignment` = {v:?} is not a power of two")),
        },
    };
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    let mut names = std::collections::BTreeSet::new();
    for i in 0..tensor_count {
        let name = c.string(&format!("the name of tensor {i}"))?;
        let what = format!("tensor `{name}`");
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("{what} has {n_dims} dimensions (1 to 4 allowed)"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&what)?);
        }
        let type_id = c.u32(&what)?;
        let ty = GgmlType::from_id(type_id)
            .ok_or_else(|| format!("{what} has unknown tensor type {type_id}"))?;
        let offset = c.u64(&what)?;
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("{what}: its dimensions {dims:?} overflow"))?;
        if !dims[0].is_multiple_of(ty.block_len() as u64) {
            return Err(format!(
                "{what}: its rows of {} values are not whole {} blocks of {}",
                dims[0],
                ty.name(),
                ty.block_len()
            ));
        }
        let size = (elements / ty.block_len() as u64)
            .checked_mul(ty.block_bytes() as u64)
            .ok_or_else(|| format!("{what}: its size overflows"))?;
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            size,
        });
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    for t in &tensors {
        // ggml refuses these too: the tensor would be read shifted.
        if !t.offset.is_multiple_of(alignment) {
            return Err(format!(
                "tensor `{}`: its data offset {} is not a multiple of the alignment {alignment}",
                t.name, t.offset
            ));
        }
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.size));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(format!(
                    "truncated or damaged: tensor `{}` ({} bytes at offset {}) ends past the \
                     end of the file ({file_len} bytes)",
                    t.name, t.size, t.offset
                ));
            }
        }
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        data_start: data_start as usize,
    })
}
