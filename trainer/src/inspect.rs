//! `hearth data inspect`: what a data file, or a recipe's `[data]`, turns into under a
//! tokenizer and template — counts, lengths and truncation — before any training runs.

use std::path::{Path, PathBuf};

use data::config::DataConfig;
use data::render::{TemplateChoice, template_for};

use crate::{Result, TrainerError};

/// What to inspect.
pub enum Source<'a> {
    /// A recipe: its `[data]` with the command line's flags over it, tokenized with its
    /// `[model] path` unless a tokenizer is given.
    Recipe(&'a Path, Overrides),
    /// A data file described on the command line.
    Data(DataConfig),
}

/// `data inspect`'s flags. Each one given wins over the recipe's `[data]`: a report for
/// settings other than those asked for would be worse than none.
#[derive(Debug, Default)]
pub struct Overrides {
    pub format: Option<String>,
    /// Replace the recipe's `data.columns` when any are given.
    pub columns: Vec<(String, String)>,
    pub max_length: Option<usize>,
    pub truncation: Option<String>,
    /// Only ever turns skipping on.
    pub skip_bad_rows: bool,
    pub template: Option<String>,
}

impl Overrides {
    pub fn apply(self, d: &mut DataConfig) {
        if self.format.is_some() {
            d.format = self.format;
        }
        if !self.columns.is_empty() {
            d.columns = self.columns.into_iter().collect();
        }
        if let Some(n) = self.max_length {
            d.max_length = n;
        }
        if let Some(t) = self.truncation {
            d.truncation = t;
        }
        d.skip_bad_rows |= self.skip_bad_rows;
        if self.template.is_some() {
            d.template = self.template;
        }
    }
}

/// The parts of a recipe `data inspect` reads: `[model] path` and `[data]`. Other sections
/// belong to training and are left to it.
#[derive(serde::Deserialize)]
struct InspectRecipe {
    model: Option<ModelSection>,
    data: DataConfig,
}

#[derive(serde::Deserialize)]
struct ModelSection {
    path: PathBuf,
}

/// Inspects `source` with the tokenizer (and chat template) in `tokenizer`, or the recipe's
/// model directory. Sample text appears only with `show_example`.
pub fn inspect(
    source: Source<'_>,
    tokenizer: Option<&Path>,
    show_example: bool,
) -> Result<data::inspect::Report> {
    let (config, tokenizer_dir) = match source {
        Source::Recipe(file, flags) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| TrainerError::Input(format!("{}: {e}", file.display())))?;
            let recipe: InspectRecipe = toml::from_str(&text).map_err(|e| {
                let line = e
                    .span()
                    .map_or(0, |s| text[..s.start].matches('\n').count() + 1);
                TrainerError::Input(format!("{}: line {line}: {}", file.display(), e.message()))
            })?;
            let dir = match (tokenizer, recipe.model) {
                (Some(dir), _) => dir.to_path_buf(),
                (None, Some(model)) => model.path,
                (None, None) => {
                    return Err(TrainerError::Input(format!(
                        "{}: no [model] path; pass --tokenizer DIR",
                        file.display()
                    )));
                }
            };
            let from_flag = flags.max_length.is_some();
            let mut data = recipe.data;
            flags.apply(&mut data);
            // The recipe's own value is held to what `hearth train` accepts (a flag's was
            // checked where it was read).
            if !from_flag {
                crate::recipe::check_max_length("data.max_length", data.max_length)
                    .map_err(|e| TrainerError::Input(format!("{}: {e}", file.display())))?;
            }
            (data, dir)
        }
        Source::Data(config) => {
            let dir = tokenizer.ok_or_else(|| {
                TrainerError::Input("--tokenizer DIR is needed when inspecting a data file".into())
            })?;
            (config, dir.to_path_buf())
        }
    };
    let choice = TemplateChoice::new(config.template.as_deref(), None);
    let template = template_for(&tokenizer_dir, choice)?;
    // A tokenizer that belongs to a model must fit its vocabulary, or training would fail
    // on the first out-of-range id while this report said all was well.
    let tokenizer = if tokenizer_dir.join(checkpoints::names::CONFIG).is_file() {
        let model = checkpoints::ModelConfig::from_path(&tokenizer_dir)?;
        crate::model::load_tokenizer(&tokenizer_dir, model.vocab_size)?
    } else {
        data::tokenizer::load(&tokenizer_dir)?
    };
    let load = config.load_options().map_err(TrainerError::Input)?;
    let truncation = config.truncation().map_err(TrainerError::Input)?;
    Ok(data::inspect::inspect(
        &config.train,
        &load,
        &template,
        &tokenizer,
        config.max_length,
        truncation,
        show_example,
    )?)
}
