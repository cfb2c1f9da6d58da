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

/// Loads `tokenizer.json` (a file, or a checkpoint directory holding one).
pub fn load(path: &Path) -> Result<Tokenizer, DataError> {
    let path = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    Tokenizer::from_bytes(&bytes).map_err(|e| DataError::Tokenizer {
        path,
        reason: e.to_string(),
    })
}

/// Trains a byte-level BPE with at most `vocab_size` entries on `texts`. The special tokens
/// get the first ids, in order. Deterministic for the same inputs.
pub fn train_bpe(
    texts: &[&str],
    vocab_size: usize,
    special_tokens: &[&str],
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
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut tokenizer = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default().into())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(byte_level.into()))
    .with_post_processor(Some(byte_level.trim_offsets(false).into()))
    .with_decoder(Some(byte_level.into()))
    .build()
    .map_err(|e| DataError::Training(e.to_string()))?;
    let lines = texts.iter().flat_map(|t| t.lines());
    tokenizer
        .train(&mut trainer, lines)
        .map_err(|e| DataError::Training(e.to_string()))?;
    Ok(Tokenizer::from(tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;

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
