//! Tokenizers: loading a checkpoint's `tokenizer.json`, and training a small byte-level BPE
//! in-process for the tiny models tests and demos make (nothing is downloaded).

use std::path::Path;

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer, TokenizerBuilder,
};

use crate::DataError;

/// Counseling-style dialogue bundled with hearth, for training tiny tokenizers and smoke runs.
pub const BUNDLED_CORPUS: &str = include_str!("../corpus/counseling.txt");

/// The special tokens of the Llama 3 chat format, which tiny models use.
pub const LLAMA3_SPECIAL_TOKENS: [&str; 6] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
];

/// Loads `tokenizer.json` (a file, or a checkpoint directory holding one), or the tokenizer
/// of a GGUF model (a `.gguf` file, or a directory holding one).
pub fn load(path: &Path) -> Result<Tokenizer, DataError> {
    if let Some(gguf) = checkpoints::gguf::locate(path)? {
        let json = checkpoints::gguf::GgufModel::open(&gguf)?.tokenizer_json()?;
        return Tokenizer::from_bytes(json.as_bytes()).map_err(|e| DataError::Tokenizer {
            path: gguf,
            reason: e.to_string(),
        });
    }
    let path = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    let bytes = checkpoints::small_file::read(&path, checkpoints::small_file::TOKENIZER_LIMIT)
        .map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
    // Told apart first: a file that is not JSON, JSON that is not a tokenizer, and a
    // tokenizer this library cannot read; the tokenizer's own parser says only where its
    // schema broke ("expected `,` or `}`").
    let json: serde_json::Value =
        serde_json::from_slice(strip_bom(&bytes)).map_err(|e| DataError::json(&path, &e))?;
    if json.get("model").is_none_or(|m| !m.is_object()) {
        return Err(DataError::Tokenizer {
            path,
            reason: "this JSON is not a tokenizer (no `model` object; a tokenizer.json as \
                     the tokenizers library writes it is needed)"
                .into(),
        });
    }
    Tokenizer::from_bytes(strip_bom(&bytes)).map_err(|e| DataError::Tokenizer {
        path,
        reason: e.to_string(),
    })
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// The largest id the tokenizer can produce (its vocabulary and added tokens).
pub fn largest_id(tokenizer: &Tokenizer) -> Option<u32> {
    tokenizer.get_vocab(true).into_values().max()
}

/// Refuses a tokenizer that can produce an id the model has no embedding for, which would
/// otherwise fail deep inside an embedding gather.
pub fn check_fits(
    tokenizer: &Tokenizer,
    tokenizer_path: &Path,
    model: &Path,
    vocab_size: usize,
) -> Result<(), DataError> {
    match largest_id(tokenizer) {
        Some(max) if max as usize >= vocab_size => Err(DataError::Tokenizer {
            path: tokenizer_path.to_path_buf(),
            reason: format!(
                "its largest id is {max}, but the model {} has vocab_size {vocab_size}; \
                 the tokenizer and the model do not belong together",
                model.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// Trains a byte-level BPE with at most `vocab_size` entries on `texts`. The special tokens
/// get the first ids, in order. Deterministic for the same inputs.
pub fn train_bpe(
    texts: &[&str],
    vocab_size: usize,
    special_tokens: &[&str],
) -> Result<Tokenizer, DataError> {
    let byte_level = ByteLevel::default().add_prefix_space(false);
    train_bpe_with(
        texts,
        vocab_size,
        special_tokens,
        ByteLevel::alphabet().into_iter().collect(),
        BpePipeline {
            pre: byte_level.into(),
            post: Some(byte_level.trim_offsets(false).into()),
            decoder: Some(byte_level.into()),
        },
    )
}

/// The pieces around a BPE model: how text is split before it, how offsets are reported
/// after it, and how ids decode back.
pub struct BpePipeline {
    pub pre: PreTokenizerWrapper,
    pub post: Option<PostProcessorWrapper>,
    pub decoder: Option<DecoderWrapper>,
}

/// [`train_bpe`] with another pipeline and starting alphabet, for tests that need the
/// tokenizer shapes real checkpoints have (Metaspace, trimmed offsets, no added tokens).
pub fn train_bpe_with(
    texts: &[&str],
    vocab_size: usize,
    special_tokens: &[&str],
    alphabet: std::collections::HashSet<char>,
    pipeline: BpePipeline,
) -> Result<Tokenizer, DataError> {
    let specials: Vec<AddedToken> = special_tokens
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(alphabet)
        .build()
        .into();
    let mut tokenizer = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default().into())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(pipeline.pre))
    .with_post_processor(pipeline.post)
    .with_decoder(pipeline.decoder)
    .build()
    .map_err(|e| DataError::Training(e.to_string()))?;
    let lines = texts.iter().flat_map(|t| t.lines());
    tokenizer
        .train(&mut trainer, lines)
        .map_err(|e| DataError::Training(e.to_string()))?;
    Ok(Tokenizer::from(tokenizer))
}

/// Grows `tokenizer` to exactly `size` ids with Llama 3's unused
/// `<|reserved_special_token_K|>` tokens, the way Llama 3 fills its vocabulary past the
/// trained merges, so a benchmark can make any embedding shape. A tokenizer already larger
/// than `size` is an error: ids would point past the embedding.
pub fn pad_vocab(tokenizer: &mut Tokenizer, size: usize) -> Result<(), DataError> {
    let have = tokenizer.get_vocab_size(true);
    if have > size {
        return Err(DataError::Training(format!(
            "vocabulary size {size} is below the {have} tokens the byte-level tokenizer \
             needs (256 bytes, the special tokens and the merges)"
        )));
    }
    let pads: Vec<AddedToken> = (0..size - have)
        .map(|k| AddedToken::from(format!("<|reserved_special_token_{k}|>"), true))
        .collect();
    tokenizer.add_special_tokens(&pads);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece GGUF vocabulary built by hand, encoded as the legacy Llama tokenizer
    /// does: `▁` prefixed and for spaces, merges taken best score first, a byte token for a
    /// character the vocabulary lacks, `<unk>` when there is none, BOS added.
    #[test]
    fn a_sentencepiece_gguf_vocabulary_encodes_as_llama_does() {
        use checkpoints::gguf::{GgmlType, GgufWriter, MetaValue, TensorOut};
        let pieces = [
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("</s>", 0.0, 3),
            ("<0x21>", 0.0, 6),
            ("\u{2581}", -1.0, 1),
            ("h", -2.0, 1),
            ("e", -3.0, 1),
            ("l", -4.0, 1),
            ("o", -5.0, 1),
            ("\u{2581}h", -6.0, 1),
            ("ll", -7.0, 1),
            ("\u{2581}he", -8.0, 1),
            ("llo", -9.0, 1),
            ("\u{2581}hello", -10.0, 1),
        ];
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::Str("llama".into()))
            .sentencepiece_vocab(&pieces)
            .meta("tokenizer.ggml.unknown_token_id", MetaValue::U32(0))
            .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
            .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
        w.tensor(TensorOut {
            name: "token_embd.weight".into(),
            dims: vec![4, pieces.len() as u64],
            ty: GgmlType::F32,
            bytes: vec![0; 4 * 4 * pieces.len()],
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spm.gguf");
        w.write(&path).unwrap();
        let tok = load(&path).unwrap();
        let ids = |text: &str| tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(ids("hello"), [1, 13]);
        assert_eq!(ids("hello!"), [1, 13, 3]);
        assert_eq!(ids("hello hello"), [1, 13, 13]);
        assert_eq!(ids("hi"), [1, 9, 0]);
        assert_eq!(tok.decode(&[1, 13, 3, 13], true).unwrap(), "hello! hello");
    }

    #[test]
    fn json_that_is_not_a_tokenizer_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, r#"{"version": "1.0", "vocab": {"a": 0}}"#).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not a tokenizer"),
            "{err}"
        );
        std::fs::write(&path, "{\"model\": ").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("invalid JSON"),
            "{err}"
        );
    }

    #[test]
    fn a_bom_is_accepted_and_ids_must_fit_the_model() {
        let tok = train_bpe(&[BUNDLED_CORPUS], 300, &LLAMA3_SPECIAL_TOKENS).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let mut bytes = b"\xEF\xBB\xBF".to_vec();
        bytes.extend(tok.to_string(false).unwrap().into_bytes());
        std::fs::write(&path, bytes).unwrap();
        let loaded = load(&path).unwrap();
        let max = largest_id(&loaded).unwrap();
        assert_eq!(max as usize + 1, loaded.get_vocab_size(true));
        check_fits(&loaded, &path, Path::new("m"), max as usize + 1).unwrap();
        let err = check_fits(&loaded, &path, Path::new("m"), max as usize)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer.json")
                && err.contains(&format!("largest id is {max}"))
                && err.contains("vocab_size"),
            "{err}"
        );
    }

    #[test]
    fn trained_bpe_round_trips_text_and_keeps_special_ids_first() {
        let tok = train_bpe(&[BUNDLED_CORPUS], 400, &LLAMA3_SPECIAL_TOKENS).unwrap();
        assert_eq!(tok.token_to_id("<|begin_of_text|>"), Some(0));
        assert_eq!(tok.token_to_id("<|eot_id|>"), Some(4));
        let size = tok.get_vocab_size(true);
        assert!(size > 256 + 6 && size <= 400, "vocab {size}");
        let text = "Counselor: How are you feeling today? Ünïcode too.";
        let enc = tok.encode(text, false).unwrap();
        // Merges must have been learned: fewer tokens than bytes.
        assert!(enc.get_ids().len() < text.len());
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    }

    #[test]
    fn padding_gives_exactly_the_size_asked_and_encodes_as_before() {
        let plain = train_bpe(&[BUNDLED_CORPUS], 8192, &LLAMA3_SPECIAL_TOKENS).unwrap();
        let trained = plain.get_vocab_size(true);
        assert!(trained < 8192, "the bundled corpus gives fewer merges");
        let mut padded = plain.clone();
        pad_vocab(&mut padded, 8192).unwrap();
        assert_eq!(padded.get_vocab_size(true), 8192);
        assert_eq!(largest_id(&padded), Some(8191));
        assert_eq!(
            padded.token_to_id("<|reserved_special_token_0|>"),
            Some(trained as u32)
        );
        let text = "Counselor: How are you feeling today?";
        assert_eq!(
            padded.encode(text, false).unwrap().get_ids(),
            plain.encode(text, false).unwrap().get_ids()
        );
        // Saved and loaded, it is still 8192.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer.json"),
            padded.to_string(false).unwrap(),
        )
        .unwrap();
        assert_eq!(load(dir.path()).unwrap().get_vocab_size(true), 8192);
        // Asking for exactly the trained size adds nothing; below it is refused.
        let mut same = plain.clone();
        pad_vocab(&mut same, trained).unwrap();
        assert_eq!(same.get_vocab_size(true), trained);
        let err = pad_vocab(&mut plain.clone(), 100).unwrap_err().to_string();
        assert!(err.contains("vocabulary size 100"), "{err}");
    }

    #[test]
    fn training_is_deterministic_and_saves_loadably() {
        let a = train_bpe(&[BUNDLED_CORPUS], 350, &LLAMA3_SPECIAL_TOKENS).unwrap();
        let b = train_bpe(&[BUNDLED_CORPUS], 350, &LLAMA3_SPECIAL_TOKENS).unwrap();
        let (ja, jb) = (a.to_string(false).unwrap(), b.to_string(false).unwrap());
        assert_eq!(ja, jb);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, ja).unwrap();
        let loaded = load(dir.path()).unwrap();
        let text = "I feel overwhelmed at work.";
        assert_eq!(
            loaded.encode(text, false).unwrap().get_ids(),
            a.encode(text, false).unwrap().get_ids()
        );
    }

    #[test]
    fn bad_tokenizer_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
        let bad = dir.path().join("tokenizer.json");
        std::fs::write(&bad, "{\"model\": 3}").unwrap();
        let err = load(&bad).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not a valid tokenizer"),
            "{err}"
        );
    }
}
