//! The `[data]` section of a recipe: which file, in which shape, tokenised how.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::tokenize::Truncation;
use crate::{Format, LoadOptions};

/// `[data]` in a recipe. Unknown keys are errors, so a typo is never silently ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training data: JSON Lines, JSON, Parquet or Arrow. Paths are used as given.
    pub train: PathBuf,
    /// Evaluation data; without it, `eval_fraction` of the prompts are held out.
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
