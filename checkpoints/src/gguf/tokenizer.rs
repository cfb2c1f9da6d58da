//! A GGUF file's tokenizer and chat template as the files transformers ships them:
//! `tokenizer.json` (a byte-level BPE from `tokenizer.ggml.tokens`, `merges` and
//! `token_type`) and `tokenizer_config.json` (`chat_template` and the special tokens).
//!
//! The pre-tokenizer follows `tokenizer.ggml.pre`, the name llama.cpp gives the original
//! tokenizer's splitting rules, so the result splits text as the original Hugging Face
//! tokenizer did (SmolLM's single digits, Llama 3's and Qwen2's regexes).

use serde_json::{Map, Value, json};

use super::container::MetaValue;
use super::model::GgufModel;
use crate::Result;

/// llama.cpp's token types.
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

pub(crate) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(crate) const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values understood, for the error that names the others.
pub const PRE_TOKENIZERS: [&str; 6] =
    ["default", "gpt-2", "smollm", "llama-bpe", "llama3", "qwen2"];

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

impl GgufModel {
    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let items = self
            .file()
            .get(key)
            .and_then(MetaValue::as_array)
            .ok_or_else(|| {
                crate::gguf::container::gguf_err(
                    self.path(),
                    format!("no `{key}` array in its metadata"),
                )
            })?;
        items
            .iter()
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    crate::gguf::container::gguf_err(
                        self.path(),
                        format!("`{key}` holds a non-string"),
                    )
                })
            })
            .collect()
    }

    fn meta_str(&self, key: &str) -> Option<&str> {
        self.file().get(key).and_then(MetaValue::as_str)
    }

    fn meta_bool(&self, key: &str) -> Option<bool> {
        self.file().get(key).and_then(MetaValue::as_bool)
    }

    fn special(&self, which: &str, tokens: &[&str]) -> Option<String> {
        let id = self
            .file()
            .get(&format!("tokenizer.ggml.{which}_token_id"))
            .and_then(MetaValue::as_u64)? as usize;
        tokens.get(id).map(|t| t.to_string())
    }

    /// `tokenizer.json` for this model.
    pub fn tokenizer_json(&self) -> Result<String> {
        let err = |reason: String| crate::gguf::container::gguf_err(self.path(), reason);
        let model = self.meta_str("tokenizer.ggml.model").unwrap_or("");
        match model {
            "gpt2" => {}
            "llama" => return self.sentencepiece_json(),
            other => {
                return Err(err(format!(
                    "tokenizer.ggml.model `{other}` is not supported (`gpt2`, a byte-level BPE, \
                     and `llama`, SentencePiece BPE, are)"
                )));
            }
        }
        let pre = self.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let (normalizer, pre_tokenizer, ignore_merges) = match pre {
            "default" | "gpt-2" => (Value::Null, byte_level(true), false),
            "smollm" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                false,
            ),
            "llama-bpe" | "llama3" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
                true,
            ),
            "qwen2" => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
                false,
            ),
            other => {
                return Err(err(format!(
                    "tokenizer.ggml.pre `{other}` is not supported ({})",
                    PRE_TOKENIZERS.join(", ")
                )));
            }
        };
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let types = self.token_types(tokens.len());
        let mut vocab = Map::new();
        for (id, token) in tokens.iter().enumerate() {
            vocab.insert(token.to_string(), json!(id));
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok(json!([a, b])),
                None => Err(err(format!("merge `{m}` is not two tokens"))),
            })
            .collect::<Result<_>>()?;
        let added = Self::added_tokens(&tokens, &types);
        let post_processor = self.post_processor(&tokens);
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                "vocab": vocab, "merges": merges,
            },
        });
        Ok(serde_json::to_string(&tokenizer).unwrap_or_default())
    }

    /// The tokens' types (llama.cpp's: 1 normal, 3 control, 4 user-defined, 6 byte).
    fn token_types(&self, n: usize) -> Vec<i64> {
        match self
            .file()
            .get("tokenizer.ggml.token_type")
            .and_then(MetaValue::as_array)
        {
            Some(items) => items
                .iter()
                .map(|v| v.as_f64().unwrap_or(1.0) as i64)
                .collect(),
            None => vec![1; n],
        }
    }

    /// Control and user-defined tokens, as `added_tokens` entries.
    fn added_tokens(tokens: &[&str], types: &[i64]) -> Vec<Value> {
        tokens
            .iter()
            .zip(types)
            .enumerate()
            .filter(|(_, (_, ty))| **ty == TOKEN_CONTROL || **ty == TOKEN_USER_DEFINED)
            .map(|(id, (token, ty))| {
                json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": *ty == TOKEN_CONTROL})
            })
            .collect()
    }

    /// A SentencePiece BPE vocabulary (`tokenizer.ggml.model = llama`: Llama 2, Mistral) as
    /// transformers converts one: merges recovered from the pieces' scores (every split of a
    /// piece into two pieces, best-scored piece first), byte fallback, and `▁` for spaces,
    /// prepended when `add_space_prefix` (the default), as the legacy Llama tokenizer does.
    fn sentencepiece_json(&self) -> Result<String> {
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let types = self.token_types(tokens.len());
        let Some(scores) = self
            .file()
            .get("tokenizer.ggml.scores")
            .and_then(MetaValue::as_array)
        else {
            return Err(crate::gguf::container::gguf_err(
                self.path(),
                "a SentencePiece vocabulary without `tokenizer.ggml.scores`",
            ));
        };
        let scores: Vec<f64> = scores.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect();
        let id: std::collections::HashMap<&str, usize> =
            tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
        // (left, right, score of the merged piece): each piece's splits ordered by their
        // halves' ids, pieces in id order, then all by score, best first (a stable sort).
        let mut merges: Vec<(usize, usize, f64)> = Vec::new();
        for (piece, &score) in tokens.iter().zip(&scores) {
            let mut local: Vec<(usize, usize, f64)> = piece
                .char_indices()
                .skip(1)
                .filter_map(|(at, _)| {
                    let (l, r) = piece.split_at(at);
                    Some((*id.get(l)?, *id.get(r)?, score))
                })
                .collect();
            local.sort_by_key(|&(l, r, _)| (l, r));
            merges.extend(local);
        }
        merges.sort_by(|a, b| b.2.total_cmp(&a.2));
        let merges: Vec<Value> = merges
            .iter()
            .map(|&(l, r, _)| json!([tokens[l], tokens[r]]))
            .collect();
        let mut vocab = Map::new();
        for (i, token) in tokens.iter().enumerate() {
            vocab.insert(token.to_string(), json!(i));
        }
        let prefix = self
            .meta_bool("tokenizer.ggml.add_space_prefix")
            .unwrap_or(true);
        let mut normalizers = Vec::new();
        if prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
        }
        normalizers
            .push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": Self::added_tokens(&tokens, &types),
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": self.post_processor_with(&tokens, true),
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": self.special("unknown", &tokens),
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        Ok(serde_json::to_string(&tokenizer).unwrap_or_default())
    }

    /// BOS and EOS around each sequence as `add_bos_token` / `add_eos_token` ask.
    fn post_processor(&self, tokens: &[&str]) -> Value {
        self.post_processor_with(tokens, false)
    }

    /// [`post_processor`](Self::post_processor), where `bos_default` stands for an absent
    /// `add_bos_token` (llama.cpp adds BOS by default for SentencePiece vocabularies).
    fn post_processor_with(&self, tokens: &[&str], bos_default: bool) -> Value {
        let add_bos = self
            .meta_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(bos_default);
        let add_eos = self
            .meta_bool("tokenizer.ggml.add_eos_token")
            .unwrap_or(false);
        let bos = add_bos.then(|| self.special("bos", tokens)).flatten();
        let eos = add_eos.then(|| self.special("eos", tokens)).flatten();
        if bos.is_none() && eos.is_none() {
            return Value::Null;
        }
        let special = |token: &String, type_id: u32| json!({"SpecialToken": {"id": token, "type_id": type_id}});
        let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
        let mut single = Vec::new();
        let mut pair = Vec::new();
        for (part, type_id) in [("A", 0), ("B", 1)] {
            let target = if part == "A" { &mut single } else { &mut pair };
            if let Some(b) = &bos {
                target.push(special(b, type_id));
            }
            target.push(seq(part, type_id));
            if let Some(e) = &eos {
                target.push(special(e, type_id));
            }
        }
        let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
        let mut specials = Map::new();
        for token in bos.iter().chain(eos.iter()) {
            let id = tokens.iter().position(|t| t == token).unwrap_or(0);
            specials.insert(
                token.clone(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            );
        }
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    }

    /// `tokenizer_config.json` for this model: its chat template and special tokens.
    pub fn tokenizer_config_json(&self) -> Result<String> {
        let tokens = self.strings("tokenizer.ggml.tokens").unwrap_or_default();
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.meta_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
            "add_eos_token": self.meta_bool("tokenizer.ggml.add_eos_token").unwrap_or(false),
            "clean_up_tokenization_spaces": false,
        });
        for (which, key) in [
            ("bos", "bos_token"),
            ("eos", "eos_token"),
            ("padding", "pad_token"),
            ("unknown", "unk_token"),
        ] {
            if let Some(token) = self.special(which, &tokens) {
                config[key] = json!(token);
            }
        }
        if let Some(template) = self.meta_str("tokenizer.chat_template") {
            config["chat_template"] = json!(template);
        }
        Ok(serde_json::to_string_pretty(&config).unwrap_or_default())
    }
}
