//! From the recipe's files to tokenised examples of the shape the objective takes: the
//! template and tokenizer, the eval split, bad rows named by file and line (or skipped).

use std::path::Path;

use data::Example;
use data::batch::split_by_group;
use data::render::{TemplateChoice, template_for};
use data::tokenize::{Tokenized, Tokenizing, TruncationCounts};

use crate::examples::{Examples, PairItem, PromptItem, Shape};
use crate::objectives::Objective;
use crate::recipe::Recipe;
use crate::{Result, TrainerError};

/// What tokenisation needs to know of the method: its name, for errors, and its shape.
pub struct Method {
    pub name: &'static str,
    pub shape: Shape,
}

impl Method {
    pub fn of(objective: &dyn Objective) -> Self {
        Self {
            name: objective.name(),
            shape: objective.shape(),
        }
    }
}

/// Tokenised training and evaluation sets.
pub(super) struct Sets {
    pub train: Examples,
    pub eval: Examples,
    pub counts: TruncationCounts,
    /// Bad rows skipped under `skip_bad_rows`, across the train and eval files.
    pub skipped_rows: usize,
    /// Preference pairs whose two sides are the same tokens.
    pub identical_pairs: usize,
}

/// `vocab_size`: the base model's, which the tokenizer must fit.
pub(super) fn prepare_data(
    recipe: &Recipe,
    objective: &dyn Objective,
    vocab_size: usize,
) -> Result<Sets> {
    let d = &recipe.data;
    let dir = &recipe.model.path;
    let template = template_for(dir, TemplateChoice::new(d.template.as_deref(), None))?;
    let tokenizer = crate::model::load_tokenizer(dir, vocab_size)?;
    let mut options = d.load_options().map_err(TrainerError::Input)?;
    options.pairs_first = objective.shape() == Shape::Pairs;
    let truncation = d.truncation().map_err(TrainerError::Input)?;
    let t = Tokenizing {
        template: &template,
        tokenizer: &tokenizer,
        max_length: d.max_length,
        truncation,
    };
    let margin = objective.margin_column();
    let method = Method::of(objective);
    let mut counts = TruncationCounts::default();
    // A row that cannot be read stops the load at once; rows before it that cannot be
    // tokenised are named first, as they come first in the file.
    let load = |path: &Path| {
        data::load_examples_in_order(path, &options, &mut |example, location| {
            let rows = Rows {
                path,
                locations: &[location],
                skip: false,
            };
            let mut ignore = TruncationCounts::default();
            tokenize(
                &method,
                &t,
                std::slice::from_ref(example),
                &rows,
                margin,
                &mut ignore,
            )
            .map(|_| ())
        })
    };
    let loaded = load(&d.train)?;
    let eval_loaded = match &d.eval {
        Some(path) => Some((path, load(path)?)),
        None => None,
    };
    let mut skipped_rows =
        loaded.skipped.len() + eval_loaded.as_ref().map_or(0, |(_, l)| l.skipped.len());
    let mut identical_pairs = 0;
    let mut run = |examples: &[data::Example],
                   rows: Rows,
                   counts: &mut TruncationCounts|
     -> Result<Examples> {
        let set = tokenize(&method, &t, examples, &rows, margin, counts)?;
        skipped_rows += set.skipped;
        identical_pairs += set.identical_pairs;
        Ok(set.examples)
    };
    let skip = d.skip_bad_rows;
    let (train, eval) = match &eval_loaded {
        Some((path, eval_loaded)) => {
            let train_rows = Rows {
                path: &d.train,
                locations: &loaded.locations,
                skip,
            };
            let eval_rows = Rows {
                path,
                locations: &eval_loaded.locations,
                skip,
            };
            (
                run(&loaded.examples, train_rows, &mut counts)?,
                run(&eval_loaded.examples, eval_rows, &mut counts)?,
            )
        }
        None => {
            let all = &loaded.examples;
            let keys: Vec<String> = all.iter().map(data::Example::group_key).collect();
            let (ti, ei) = split_by_group(&keys, d.eval_fraction, d.seed);
            if ti.is_empty() && !all.is_empty() {
                return Err(TrainerError::Input(format!(
                    "{}: data.eval_fraction {} held out all {} rows for evaluation, leaving \
                     none to train on; lower it or give an evaluation file in data.eval",
                    d.train.display(),
                    d.eval_fraction,
                    all.len()
                )));
            }
            let pick = |idx: &[usize]| idx.iter().map(|&i| all[i].clone()).collect::<Vec<_>>();
            let locations = |idx: &[usize]| {
                idx.iter()
                    .filter_map(|&i| loaded.locations.get(i).copied())
                    .collect::<Vec<_>>()
            };
            let (tl, el) = (locations(&ti), locations(&ei));
            let rows = |locations| Rows {
                path: &d.train,
                locations,
                skip,
            };
            (
                run(&pick(&ti), rows(&tl), &mut counts)?,
                run(&pick(&ei), rows(&el), &mut counts)?,
            )
        }
    };
    if train.is_empty() {
        return Err(TrainerError::Input(format!(
            "{}: no training examples left after tokenisation{}",
            d.train.display(),
            if skipped_rows > 0 {
                format!(" ({skipped_rows} bad rows skipped)")
            } else {
                String::new()
            }
        )));
    }
    Ok(Sets {
        train,
        eval,
        counts,
        skipped_rows,
        identical_pairs,
    })
}

/// Settings and data that are valid but would make the run learn nothing, said once
/// before it starts.
///
/// `context` is the base model's `max_position_embeddings`.
pub(super) fn warnings(
    recipe: &Recipe,
    objective: &dyn Objective,
    sets: &Sets,
    context: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    // Rotary positions go on past the context (as in transformers), but nothing was
    // trained there: said, not refused, since a smaller `max_length` is the user's call.
    let beyond = [&sets.train, &sets.eval]
        .iter()
        .flat_map(|set| set.lengths())
        .filter(|&len| len > context)
        .count();
    if beyond > 0 {
        out.push(format!(
            "{beyond} examples are longer than the model's context of {context} tokens \
             (max_position_embeddings in {}); their positions past it are ones the model \
             never saw. Lower data.max_length to {context} to truncate them",
            recipe.model.path.display()
        ));
    }
    if recipe.lora.as_ref().is_some_and(|l| l.alpha == 0.0) {
        out.push(
            "lora.alpha = 0 scales every adapter's output by 0: nothing will ever be updated"
                .to_string(),
        );
    }
    out.extend(objective.warnings());
    if let Some(g) = recipe.grpo.as_ref().filter(|g| g.rollout == "session")
        && g.max_session_tokens > context
    {
        out.push(format!(
            "grpo.max_session_tokens = {} is more than the model's context ({context}, \
             max_position_embeddings in {}): sessions may run on into positions the model \
             never saw; lower it to {context}",
            g.max_session_tokens,
            recipe.model.path.display()
        ));
    }
    let d = &recipe.data;
    let prompts = matches!(sets.train, Examples::Prompts(_));
    if prompts && (d.eval.is_some() || !sets.eval.is_empty()) {
        out.push(format!(
            "train.method = \"{}\" learns from rewards and computes no eval loss: the {} \
             evaluation prompts (data.eval, data.eval_fraction) are never used; set \
             data.eval_fraction = 0 to train on them",
            recipe.train.method,
            sets.eval.len()
        ));
    }
    if d.packing && !matches!(sets.train, Examples::Sequences(_)) {
        out.push(format!(
            "data.packing packs SFT sequences only; train.method = \"{}\" reads {} whole, \
             unpacked",
            recipe.train.method,
            if prompts {
                "prompts"
            } else {
                "preference pairs"
            }
        ));
    }
    if !prompts && d.eval.is_none() && d.eval_fraction > 0.0 && sets.eval.is_empty() {
        out.push(format!(
            "data.eval_fraction {} held out no rows (too few distinct prompts): the run will \
             not be evaluated",
            d.eval_fraction
        ));
    }
    if !prompts && recipe.train.eval_steps > 0 && d.eval.is_none() && d.eval_fraction == 0.0 {
        out.push(format!(
            "train.eval_steps = {} asks for evaluations, but there is no eval set (set \
             data.eval or data.eval_fraction): the run will not be evaluated",
            recipe.train.eval_steps
        ));
    }
    if sets.identical_pairs > 0 {
        out.push(format!(
            "{} preference pairs have a chosen completion equal to the rejected one; they \
             carry no preference",
            sets.identical_pairs
        ));
    }
    out
}

/// Where the examples being tokenised came from, so that an example that cannot be
/// tokenised is named by its file and line (or row); with `skip` (the recipe's
/// `skip_bad_rows`) it is counted and left out instead of stopping the run.
pub struct Rows<'a> {
    pub path: &'a Path,
    pub locations: &'a [data::read::Location],
    pub skip: bool,
}

impl Rows<'_> {
    fn located(&self, i: usize, msg: impl std::fmt::Display) -> TrainerError {
        match self.locations.get(i) {
            Some(at) => TrainerError::Input(format!("{}: {at}: {msg}", self.path.display())),
            None => {
                TrainerError::Input(format!("{}: example {}: {msg}", self.path.display(), i + 1))
            }
        }
    }

    /// `Ok(None)` for a bad example that is skipped, the located error otherwise.
    fn bad<T>(
        &self,
        i: usize,
        msg: impl std::fmt::Display,
        skipped: &mut usize,
    ) -> Result<Option<T>> {
        if self.skip {
            *skipped += 1;
            Ok(None)
        } else {
            Err(self.located(i, msg))
        }
    }
}

/// What tokenisation made of a file's examples, and how many it skipped as bad rows.
pub struct TokenizedSet {
    pub examples: Examples,
    pub skipped: usize,
    /// Pairs whose chosen and rejected completions are the same tokens: they teach nothing.
    pub identical_pairs: usize,
}

/// Tokenises `examples` into what `method` learns from. Examples of the wrong shape are an
/// error naming the method and the example's line; examples that cannot be rendered (no
/// assistant turn, a template that refuses them) are bad rows.
pub fn tokenize(
    method: &Method,
    t: &Tokenizing,
    examples: &[Example],
    rows: &Rows,
    margin_column: Option<&str>,
    counts: &mut TruncationCounts,
) -> Result<TokenizedSet> {
    let pairs_wanted = match method.shape {
        Shape::Prompts => return tokenize_prompts(t, examples, rows, counts, false),
        Shape::Openings => return tokenize_prompts(t, examples, rows, counts, true),
        Shape::Pairs => true,
        Shape::Sequences => false,
    };
    let mut seqs = Vec::new();
    let mut pairs = Vec::new();
    let mut skipped = 0;
    for (i, e) in examples.iter().enumerate() {
        let wrong = |what: &str| rows.located(i, format!("method `{}` needs {what}", method.name));
        let tokenized = match t.example(e, counts) {
            Ok(tokenized) => tokenized,
            Err(err) => rows.bad(i, err, &mut skipped)?,
        };
        match tokenized {
            None => {}
            Some(Tokenized::Sequence(s)) if !pairs_wanted => seqs.push(s),
            Some(Tokenized::Pair(p)) if pairs_wanted => {
                let margin = match (margin_column, e) {
                    (Some(col), Example::Pair { extra, .. }) => {
                        match extra.get(col).and_then(|v| v.as_f64()) {
                            // The loss takes it in f32: past f32's range it is infinite,
                            // and every step over its batch would be skipped unseen.
                            Some(m) if !crate::objectives::fits_f32(m) => {
                                let msg = format!(
                                    "margin column `{col}` is {m}, beyond f32's range (±3.4e38)"
                                );
                                rows.bad::<()>(i, msg, &mut skipped)?;
                                continue;
                            }
                            Some(m) => m,
                            None => {
                                let msg =
                                    format!("margin column `{col}` is missing or not a number");
                                rows.bad::<()>(i, msg, &mut skipped)?;
                                continue;
                            }
                        }
                    }
                    _ => 0.0,
                };
                pairs.push(PairItem {
                    tokens: p,
                    margin,
                    reference: None,
                });
            }
            Some(_) if pairs_wanted => {
                return Err(wrong("preference pairs (prompt/chosen/rejected)"));
            }
            Some(_) => return Err(wrong("conversations or prompt/completion data")),
        }
    }
    let identical_pairs = pairs
        .iter()
        .filter(|p| p.tokens.chosen == p.tokens.rejected)
        .count();
    let examples = if pairs_wanted {
        Examples::Pairs(pairs)
    } else {
        Examples::Sequences(seqs)
    };
    Ok(TokenizedSet {
        examples,
        skipped,
        identical_pairs,
    })
}

/// A session's opening from a whole conversation: its messages through the client's first
/// turn, with any counselor greeting before it (Cactus dialogues open with one).
fn opening(messages: &[data::Message]) -> std::result::Result<Vec<data::Message>, String> {
    let first = messages
        .iter()
        .position(|m| m.role == "user")
        .ok_or_else(|| {
            "the conversation has no client (user) turn to open a session".to_string()
        })?;
    Ok(messages[..=first].to_vec())
}

/// GRPO's prompts: prompt-only rows, or the prompts of preference pairs; with `openings`,
/// also conversations, up to the client's first turn (see [`opening`]).
fn tokenize_prompts(
    t: &Tokenizing,
    examples: &[Example],
    rows: &Rows,
    counts: &mut TruncationCounts,
    openings: bool,
) -> Result<TokenizedSet> {
    let mut out = Vec::new();
    let mut skipped = 0;
    for (i, e) in examples.iter().enumerate() {
        let cut;
        let (prompt, extra) = match e {
            Example::Prompt { prompt, extra } | Example::Pair { prompt, extra, .. } => {
                (prompt, extra)
            }
            Example::Conversation {
                messages, extra, ..
            } if openings => {
                cut = match opening(messages) {
                    Ok(m) => m,
                    Err(err) => {
                        rows.bad::<()>(i, err, &mut skipped)?;
                        continue;
                    }
                };
                (&cut, extra)
            }
            Example::Conversation { .. } => {
                return Err(rows.located(
                    i,
                    "method `grpo` needs prompts (a `prompt` column, without completions)",
                ));
            }
        };
        let as_prompt = Example::Prompt {
            prompt: prompt.clone(),
            extra: extra.clone(),
        };
        let tokenized = match t.example(&as_prompt, counts) {
            Ok(tokenized) => tokenized,
            Err(err) => rows.bad(i, err, &mut skipped)?,
        };
        if let Some(Tokenized::Prompt(ids)) = tokenized {
            out.push(PromptItem {
                ids,
                messages: prompt.clone(),
                extra: extra.clone(),
            });
        }
    }
    Ok(TokenizedSet {
        examples: Examples::Prompts(out),
        skipped,
        identical_pairs: 0,
    })
}
