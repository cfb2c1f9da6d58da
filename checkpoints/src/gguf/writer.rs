//! Writing a GGUF (version 3) file: metadata in the order given, tensor descriptors, and
//! the data section, each tensor aligned. The file appears only once complete (a temporary
//! file beside it, synced, then renamed), so a failed export leaves nothing half-written.

use std::io::Write;
use std::path::Path;

use super::container::{DEFAULT_ALIGNMENT, MAGIC, MetaValue};
use super::quant::GgmlType;
use crate::pending::PendingFile;
use crate::{CheckpointError, Result};

/// A tensor to write: ggml dims (innermost first) and its encoded bytes.
pub struct TensorOut {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub bytes: Vec<u8>,
}

/// A GGUF file under construction.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorOut>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// llama.cpp's SentencePiece vocabulary keys (`tokenizer.ggml.model = llama`) for
    /// `(piece, score, token type)` in id order: how a Llama 2 or Mistral GGUF carries its
    /// tokenizer.
    pub fn sentencepiece_vocab(&mut self, pieces: &[(&str, f32, i32)]) -> &mut Self {
        let array = |f: &dyn Fn(&(&str, f32, i32)) -> MetaValue| {
            MetaValue::Array(pieces.iter().map(f).collect())
        };
        self.meta("tokenizer.ggml.model", MetaValue::Str("llama".into()))
            .meta(
                "tokenizer.ggml.tokens",
                array(&|p| MetaValue::Str(p.0.into())),
            )
            .meta("tokenizer.ggml.scores", array(&|p| MetaValue::F32(p.1)))
            .meta("tokenizer.ggml.token_type", array(&|p| MetaValue::I32(p.2)))
    }

    pub fn meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    pub fn tensor(&mut self, tensor: TensorOut) -> &mut Self {
        self.tensors.push(tensor);
        self
    }

    /// The whole file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out)
            .expect("writing to memory cannot fail");
        out
    }

    /// Streams the file into `w`: the header is built in memory, the tensors' data is
    /// written straight from their buffers, never copied into one file-sized buffer.
    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut head, key);
            head.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut head, value);
        }
        let align = DEFAULT_ALIGNMENT as usize;
        let mut offset = 0usize;
        for t in &self.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + t.bytes.len()).div_ceil(align) * align;
        }
        head.resize(head.len().div_ceil(align) * align, 0);
        w.write_all(&head)?;
        let zeros = [0u8; DEFAULT_ALIGNMENT as usize];
        for (i, t) in self.tensors.iter().enumerate() {
            w.write_all(&t.bytes)?;
            // Padding between tensors, none after the last.
            if i + 1 < self.tensors.len() {
                let pad = t.bytes.len().div_ceil(align) * align - t.bytes.len();
                w.write_all(&zeros[..pad])?;
            }
        }
        Ok(())
    }

    /// Writes the file to `path`, atomically, replacing what is there.
    pub fn write(&self, path: &Path) -> Result<()> {
        self.pending(path)?.commit()
    }

    /// Writes the new file `path`, atomically; a file that appeared there meanwhile (a
    /// second export to the same name) stays, and this write fails.
    pub fn write_new(&self, path: &Path) -> Result<()> {
        self.pending(path)?.commit_new()
    }

    fn pending(&self, path: &Path) -> Result<PendingFile> {
        let mut pending = PendingFile::create(path)?;
        let mut file = std::io::BufWriter::new(pending.file());
        self.write_to(&mut file)
            .and_then(|()| file.flush())
            .map_err(|e| CheckpointError::io(path, e))?;
        drop(file);
        Ok(pending)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &MetaValue) {
    match value {
        MetaValue::U8(v) => out.push(*v),
        MetaValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(u8::from(*v)),
        MetaValue::Str(s) => put_str(out, s),
        MetaValue::Array(items) => {
            let item_ty = items.first().map_or(4, MetaValue::type_id);
            out.extend_from_slice(&item_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}
