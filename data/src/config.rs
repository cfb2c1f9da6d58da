//! The `[data]` section of a recipe: which file, in which shape, tokenised how.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use crate::tokenize::Truncation;
use crate::{Format, LoadOptions};

/// A path a recipe names: every path-valued key reads through this (or
/// [`optional_named_path`]) with `deserialize_with`. An empty string names nothing, and
/// read as a path it failed far from the recipe, naming neither it nor the key; refused
/// here, the recipe's error names the key.
pub fn named_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    let path = PathBuf::deserialize(d)?;
    if path.to_str().is_some_and(|s| s.trim().is_empty()) {
        return Err(serde::de::Error::custom(
            "an empty path names nothing; name a file or directory",
        ));
    }
    Ok(path)
}

/// [`named_path`] for an optional key.
pub fn optional_named_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    // A present key is read as a path; TOML has no null, so a value is always given.
    named_path(d).map(Some)
}

/// `[data]` in a recipe. Unknown keys are errors, so a typo is never silently ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training data: JSON Lines, JSON, Parquet or Arrow. Paths are used as given.
    #[serde(deserialize_with = "named_path")]
    pub train: PathBuf,
    /// Evaluation data; without it, `eval_fraction` of the prompts are held out.
    #[serde(default, deserialize_with = "optional_named_path")]
    pub eval: Option<PathBuf>,
    /// The format (messages, sharegpt, alpaca, prompt_completion, preference, prompt_only,
    /// psychocounsel, cactus, cpsycoun); detected from the columns when absent.
    pub format: Option<String>,
    /// Column renames applied first, e.g. `{ question = "prompt" }`.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    #[serde(default)]
    pub skip_bad_rows: bool,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// keep_start, keep_end or drop.
    #[serde(default = "default_truncation")]
    pub truncation: String,
    /// A built-in template (llama3, chatml) instead of the tokenizer's own.
    pub template: Option<String>,
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default)]
    pub seed: u64,
    /// Pack short examples into rows of `max_length` tokens.
    #[serde(default)]
    pub packing: bool,
}

fn default_max_length() -> usize {
    1024
}

fn default_truncation() -> String {
    "keep_start".into()
}

fn default_eval_fraction() -> f64 {
    0.05
}

impl DataConfig {
    /// The reader options this section asks for.
    pub fn load_options(&self) -> Result<LoadOptions, String> {
        let columns: Vec<(String, String)> = self
            .columns
            .iter()
            .map(|(f, t)| (f.clone(), t.clone()))
            .collect();
        crate::format::check_renames(&columns, "data.columns")?;
        Ok(LoadOptions {
            format: self
                .format
                .as_deref()
                .map(str::parse::<Format>)
                .transpose()?,
            columns,
            skip_bad_rows: self.skip_bad_rows,
            pairs_first: false,
        })
    }

    pub fn truncation(&self) -> Result<Truncation, String> {
        self.truncation.parse()
    }
}
