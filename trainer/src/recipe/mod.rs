//! Recipes: TOML deserialised into typed sections with unknown keys refused (naming the
//! nearest valid key), `--set a.b=value` applied to the TOML before deserialising, and the
//! resolved recipe written back into the run directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::choices::{AttentionChoice, DistBackend, KernelsChoice, LrScheduler, Quantize};
use crate::objectives::cpo::CpoSection;
use crate::objectives::dpo::DpoSection;
use crate::objectives::grpo::GrpoSection;
use crate::objectives::orpo::OrpoSection;
use crate::objectives::reward::RewardSection;
use crate::objectives::simpo::SimpoSection;
use crate::{Result, TrainerError};

mod located;
pub(crate) use located::located;
mod overrides;
use overrides::{apply_override, key_of_error, with_suggestion};

/// A whole recipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: data::config::DataConfig,
    pub lora: Option<LoraSection>,
    #[serde(default)]
    pub train: TrainSection,
    /// Settings of `method = "dpo"`.
    pub dpo: Option<DpoSection>,
    /// Settings of `method = "orpo"`.
    pub orpo: Option<OrpoSection>,
    /// Settings of `method = "reward"`.
    pub reward: Option<RewardSection>,
    /// Settings of `method = "grpo"`.
    pub grpo: Option<GrpoSection>,
    /// Settings of `method = "simpo"`.
    pub simpo: Option<SimpoSection>,
    /// Settings of `method = "cpo"`.
    pub cpo: Option<CpoSection>,
    /// Data parallelism, when a launcher starts several processes.
    #[serde(default)]
    pub dist: DistSection,
}

/// `[dist]`: how the processes a launcher started (mpirun, srun, torchrun-style) train
/// together. Ignored by a single process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistSection {
    /// `auto` (NCCL on CUDA devices, MPI elsewhere), `mpi` or `nccl`.
    pub backend: DistBackend,
    /// Seconds a collective waits for the other ranks before this rank gives up on them.
    pub timeout_s: f64,
    /// Megabytes of gradients per all-reduce call.
    pub bucket_mb: f64,
}

impl Default for DistSection {
    fn default() -> Self {
        Self {
            backend: DistBackend::Auto,
            timeout_s: 600.0,
            bucket_mb: 25.0,
        }
    }
}

/// `[model]`: the base checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face checkpoint directory.
    #[serde(deserialize_with = "data::config::named_path")]
    pub path: PathBuf,
    /// Make a tiny random model at `path` first if none is there (CPU smoke runs).
    #[serde(default)]
    pub create_if_missing: bool,
    /// Store the frozen projection weights quantized (QLoRA): `nf4` (bitsandbytes' NF4,
    /// double-quantized scales) or `q8_0` (GGUF's); `none` keeps them in the compute dtype.
    #[serde(default = "default_quantize")]
    pub quantize: Quantize,
    /// Projections (`down_proj`) or weight prefixes (`model.layers.0.mlp.down_proj`) that
    /// stay dense under `quantize`.
    #[serde(default)]
    pub quantize_skip: Vec<String>,
    /// Quantize the token embeddings and the output head too (one matrix when tied); by
    /// default they stay in the compute dtype, as bitsandbytes leaves them.
    #[serde(default)]
    pub quantize_embeddings: bool,
}

fn default_quantize() -> Quantize {
    Quantize::None
}

/// `[lora]`: adapters on the named projections. Without this section the recipe asks for
/// full fine-tuning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub rslora: bool,
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    /// PEFT's `layers_to_transform`: adapters only on these decoder layers (all when
    /// absent). The head and the embeddings sit in no layer, so they cannot be targets too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<Vec<usize>>,
    /// Start from an existing PEFT adapter instead of a fresh one.
    #[serde(default, deserialize_with = "data::config::optional_named_path")]
    pub init_from: Option<PathBuf>,
}

impl LoraSection {
    /// The adapters' settings as PEFT writes them.
    pub fn settings(&self) -> checkpoints::peft::LoraSettings {
        checkpoints::peft::LoraSettings {
            r: self.r,
            lora_alpha: self.alpha,
            lora_dropout: self.dropout,
            target_modules: self.targets.clone(),
            use_rslora: self.rslora,
            layers_to_transform: self
                .layers_to_transform
                .clone()
                .map(checkpoints::peft::distinct_layers),
        }
    }
}

fn default_r() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_targets() -> Vec<String> {
    checkpoints::peft::LAYER_PROJECTIONS
        .map(String::from)
        .to_vec()
}

/// `[train]`, with TRL's names where TRL has one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub method: String,
    pub learning_rate: f64,
    /// constant, linear or cosine.
    pub lr_scheduler_type: LrScheduler,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Stop after this many optimizer steps; 0 means run `num_train_epochs`.
    pub max_steps: usize,
    /// Epochs to run when `max_steps` is 0; a fraction runs that share of the last one
    /// (the steps rounded up, as transformers counts them).
    pub num_train_epochs: f64,
    /// Global gradient-norm clip; 0 turns clipping off.
    pub max_grad_norm: f64,
    pub logging_steps: usize,
    /// When stderr is not a terminal (a log file, a CI job), where the progress bar stays
    /// silent: print a progress line at most once per this many seconds (0: every step).
    pub progress_seconds: f64,
    /// Evaluate every N steps; 0 means only at the end.
    pub eval_steps: usize,
    /// Checkpoint every N steps; 0 means only the final adapter.
    pub save_steps: usize,
    pub save_total_limit: usize,
    pub seed: u64,
    /// cpu, cuda[:N] or wgpu[:N].
    pub device: String,
    pub gradient_checkpointing: bool,
    /// Compute in bfloat16 / float16 (TRL's names): frozen weights stored and matmuls run
    /// in the half dtype; trainable weights, norms, attention's softmax and the loss in f32.
    pub bf16: bool,
    pub fp16: bool,
    /// Which implementation of the fused ops runs: `fused` (CubeCL kernels on GPU backends,
    /// hand-written backward passes everywhere), `reference` (plain tensor ops), or `auto`:
    /// the fused ops on every backend, the CPU included.
    pub kernels: KernelsChoice,
    /// How the GPU backends run fused attention: `flash` (the CubeCL flash kernel),
    /// `blocked` (a block of queries at a time through the backend's matmuls), or `auto`:
    /// flash, but blocked for decoding's few queries. The CPU ignores it.
    pub attention: AttentionChoice,
    /// Consecutive steps with a NaN or infinite loss or gradient (each skipped) after which
    /// the run stops.
    pub max_bad_steps: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            method: "sft".into(),
            learning_rate: 2e-4,
            lr_scheduler_type: LrScheduler::Linear,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            max_steps: 0,
            num_train_epochs: 1.0,
            max_grad_norm: 1.0,
            logging_steps: 1,
            progress_seconds: 10.0,
            eval_steps: 0,
            save_steps: 0,
            save_total_limit: 2,
            seed: 42,
            device: "cpu".into(),
            gradient_checkpointing: false,
            bf16: false,
            fp16: false,
            kernels: KernelsChoice::Auto,
            attention: AttentionChoice::Auto,
            max_bad_steps: 5,
        }
    }
}

/// Reads `path`, applies `overrides` (`section.key=value`), and checks every key.
pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe> {
    let text =
        checkpoints::small_file::read_text_or_stream(path, checkpoints::small_file::TEXT_LIMIT)
            .map_err(|e| TrainerError::Input(format!("{}: {e}", path.display())))?;
    parse(&text, &path.display().to_string(), overrides)
}

/// As [`load`], from text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<Recipe> {
    let mut table: toml::Table = toml::from_str(text)
        .map_err(|e| TrainerError::Input(format!("{origin}: {}", located(text, &e))))?;
    for o in overrides {
        apply_override(&mut table, o)?;
    }
    let recipe: Recipe = Recipe::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
        let message = with_suggestion(e.message());
        // Every field of the recipe itself is a section.
        let message = match (
            key_of_error(&table),
            message.strip_prefix("missing field `"),
        ) {
            (None, Some(rest)) => format!("missing section `[{}]`", rest.trim_end_matches('`')),
            _ => message,
        };
        // A named choice's message already starts with its key.
        let at = key_of_error(&table)
            .filter(|k| !message.starts_with(k.as_str()))
            .map_or(String::new(), |k| format!("`{k}`: "));
        TrainerError::Input(format!("{origin}: {at}{message}"))
    })?;
    recipe.validate(origin)?;
    Ok(recipe)
}

/// A number as a message shows it: in full, or in exponent form when it is huge or tiny.
pub(crate) fn shown(x: f64) -> String {
    if (x.abs() < 1e15 && (x == 0.0 || x.abs() >= 1e-4)) || !x.is_finite() {
        x.to_string()
    } else {
        format!("{x:e}")
    }
}

/// A maximum sequence length that can hold an example and that row sizes never overflow;
/// `KEY` names the setting in the message.
pub fn check_max_length(key: &str, n: usize) -> std::result::Result<(), String> {
    if (MIN_MAX_LENGTH..=MAX_MAX_LENGTH).contains(&n) {
        return Ok(());
    }
    Err(format!(
        "{key} {n} must be from {MIN_MAX_LENGTH} (a prompt token and a target) to \
         {MAX_MAX_LENGTH} tokens"
    ))
}

/// The longest wait a recipe may set, in seconds (about 31 years): beyond it a duration
/// no longer fits the clock's arithmetic.
pub const MAX_SECONDS: f64 = 1e9;
/// Sequences one optimizer step may take on one process: far beyond any data set, and
/// small enough that step counts never overflow.
const MAX_SEQUENCES_PER_STEP: usize = 1 << 24;
const MAX_EPOCHS: usize = 1 << 20;
/// Wider than any model's projections.
const MAX_LORA_RANK: usize = 1 << 16;
/// A row holds at least a prompt token and a token to learn.
const MIN_MAX_LENGTH: usize = 2;
/// Beyond any model's context (2^20 tokens), and small enough that row sizes never overflow.
const MAX_MAX_LENGTH: usize = 1 << 20;
/// 16 GiB of packed rows' attention masks in one batch: past any device's room beside the
/// model.
const MAX_PACKED_MASK_BYTES: u128 = 1 << 34;

impl Recipe {
    /// Every checkpoint the run reads, by the key that names it: the base, the initial
    /// adapter, GRPO's reward models and its client's model. A resumed run must find
    /// their files as they were.
    pub fn checkpoints(&self) -> Vec<(String, &std::path::Path)> {
        let mut out = vec![("model.path".to_string(), self.model.path.as_path())];
        if let Some(init) = self.lora.as_ref().and_then(|l| l.init_from.as_deref()) {
            out.push(("lora.init_from".into(), init));
        }
        if let Some(g) = &self.grpo {
            for (i, r) in g.rewards.iter().enumerate() {
                let key = |k: &str| format!("grpo.rewards[{i}].{k}");
                out.extend(r.model.as_deref().map(|p| (key("model"), p)));
                out.extend(r.adapter.as_deref().map(|p| (key("adapter"), p)));
            }
            if let Some(c) = &g.client {
                out.extend(
                    c.path
                        .as_deref()
                        .map(|p| ("grpo.client.path".to_string(), p)),
                );
                out.extend(
                    c.adapter
                        .as_deref()
                        .map(|p| ("grpo.client.adapter".to_string(), p)),
                );
            }
        }
        out
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let t = &self.train;
        let bad = |msg: String| Err(TrainerError::Input(format!("{origin}: {msg}")));
        if let Err(why) = crate::device::split(&t.device) {
            return bad(format!("train.device `{}`: {why}", t.device));
        }
        if t.bf16 && t.fp16 {
            return bad("train.bf16 and train.fp16 are both on; choose one".into());
        }
        if self.model.quantize != Quantize::None && self.lora.is_none() {
            return bad(format!(
                "model.quantize = \"{}\" freezes the base, which full fine-tuning trains: add \
                 a [lora] section (QLoRA) or set model.quantize = \"none\"",
                self.model.quantize.as_str()
            ));
        }
        let m = &self.model;
        if m.quantize == Quantize::None && (!m.quantize_skip.is_empty() || m.quantize_embeddings) {
            return bad(
                "model.quantize_skip and model.quantize_embeddings describe model.quantize, \
                 which is \"none\"; set it (nf4, q8_0, keep) or drop them"
                    .into(),
            );
        }
        crate::model::quantized::check_skip(&m.quantize_skip, None)
            .map_err(|e| TrainerError::Input(format!("{origin}: model.quantize_skip {e}")))?;
        let d = &self.dist;
        if !(d.timeout_s > 0.0 && d.timeout_s <= MAX_SECONDS) {
            return bad(format!(
                "dist.timeout_s {} must be positive (at most {MAX_SECONDS:e} seconds)",
                shown(d.timeout_s)
            ));
        }
        if !(d.bucket_mb > 0.0 && d.bucket_mb.is_finite()) {
            return bad(format!("dist.bucket_mb {} must be positive", d.bucket_mb));
        }
        if t.per_device_train_batch_size == 0 || t.gradient_accumulation_steps == 0 {
            return bad("train.per_device_train_batch_size and gradient_accumulation_steps must be positive".into());
        }
        let per_step = t
            .per_device_train_batch_size
            .checked_mul(t.gradient_accumulation_steps)
            .filter(|&n| n <= MAX_SEQUENCES_PER_STEP);
        if per_step.is_none() {
            return bad(format!(
                "train.per_device_train_batch_size ({}) × train.gradient_accumulation_steps \
                 ({}) must be at most {MAX_SEQUENCES_PER_STEP} sequences per step",
                t.per_device_train_batch_size, t.gradient_accumulation_steps
            ));
        }
        if !(t.num_train_epochs.is_finite() && t.num_train_epochs >= 0.0) {
            return bad(format!(
                "train.num_train_epochs {} must be a number ≥ 0",
                shown(t.num_train_epochs)
            ));
        }
        if t.max_steps == 0 && t.num_train_epochs == 0.0 {
            return bad("set train.max_steps or train.num_train_epochs".into());
        }
        if t.num_train_epochs > MAX_EPOCHS as f64 {
            return bad(format!(
                "train.num_train_epochs {} must be at most {MAX_EPOCHS}",
                shown(t.num_train_epochs)
            ));
        }
        // The objective's own checks use the batch sizes, checked above.
        if let Err(e) = crate::objectives::registry::objective(self) {
            return bad(e);
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return bad(format!(
                "train.learning_rate {} must be positive",
                t.learning_rate
            ));
        }
        // The optimizer steps in f32: beyond its range every update is infinite.
        if t.learning_rate > f64::from(f32::MAX) {
            return bad(format!(
                "train.learning_rate {:e} is beyond f32's range (the optimizer's)",
                t.learning_rate
            ));
        }
        if !(t.max_grad_norm >= 0.0 && t.max_grad_norm.is_finite()) {
            return bad(format!(
                "train.max_grad_norm {} must be ≥ 0 (0 turns clipping off)",
                t.max_grad_norm
            ));
        }
        // AdamW's own domain: β = 1 divides by zero in the bias correction, ε ≤ 0 by zero
        // (or a negative root) on a flat gradient; a negative decay grows every weight.
        for (key, beta) in [("adam_beta1", t.adam_beta1), ("adam_beta2", t.adam_beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(format!("train.{key} {beta} must be in [0, 1)"));
            }
        }
        if !(t.adam_epsilon > 0.0 && t.adam_epsilon.is_finite()) {
            return bad(format!(
                "train.adam_epsilon {} must be positive",
                t.adam_epsilon
            ));
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            return bad(format!("train.weight_decay {} must be ≥ 0", t.weight_decay));
        }
        if let Some(lora) = &self.lora {
            if !lora.alpha.is_finite() {
                return bad(format!("lora.alpha {} must be a finite number", lora.alpha));
            }
            if !(0.0..1.0).contains(&lora.dropout) {
                return bad(format!("lora.dropout {} must be in [0, 1)", lora.dropout));
            }
            if lora.r > MAX_LORA_RANK {
                return bad(format!(
                    "lora.r {} must be at most {MAX_LORA_RANK} (a rank above a projection's \
                     width adds nothing)",
                    lora.r
                ));
            }
            if lora.alpha < 0.0 {
                return bad(format!(
                    "lora.alpha {} must be ≥ 0: a negative one turns every adapter's update \
                     around",
                    lora.alpha
                ));
            }
            if let Some(layers) = &lora.layers_to_transform {
                if layers.is_empty() {
                    return bad(
                        "lora.layers_to_transform is empty: name at least one layer, or leave \
                         it out for all of them"
                            .into(),
                    );
                }
                if let Some(t) = lora
                    .targets
                    .iter()
                    .find(|t| *t == "lm_head" || *t == checkpoints::peft::EMBEDDINGS)
                {
                    return bad(format!(
                        "lora.targets names `{t}`, which sits in no layer: with \
                         lora.layers_to_transform PEFT gives it no adapter; drop one of the two"
                    ));
                }
            }
            // The checks an adapter's own config gets when loaded, here before a run starts.
            lora.settings()
                .validate("lora")
                .map_err(|e| TrainerError::Input(format!("{origin}: {e}")))?;
        }
        if !(t.progress_seconds >= 0.0 && t.progress_seconds <= MAX_SECONDS) {
            return bad(format!(
                "train.progress_seconds {} must be ≥ 0 (0 prints a line every step) and at most \
                 {MAX_SECONDS:e}",
                shown(t.progress_seconds)
            ));
        }
        let f = self.data.eval_fraction;
        if !(0.0..1.0).contains(&f) {
            return bad(format!(
                "data.eval_fraction {f} must be in [0, 1): it is the share of rows held out for \
                 evaluation"
            ));
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return bad(format!(
                "train.warmup_ratio {} must be in [0, 1)",
                t.warmup_ratio
            ));
        }
        let d = &self.data;
        if let Err(e) = check_max_length("data.max_length", d.max_length) {
            return bad(e);
        }
        // Every packed row is `max_length` long, and attention holds a `[T, T]` mask of
        // bools per row: refused here, not as an allocation that aborts mid-run.
        let mask_bytes = (d.max_length as u128).pow(2) * t.per_device_train_batch_size as u128;
        if d.packing && mask_bytes > MAX_PACKED_MASK_BYTES {
            return bad(format!(
                "data.packing with data.max_length {} and train.per_device_train_batch_size {} \
                 needs a {:.0} GiB attention mask per batch (each packed row is max_length \
                 long); lower either, or turn packing off",
                d.max_length,
                t.per_device_train_batch_size,
                mask_bytes as f64 / f64::from(1u32 << 30)
            ));
        }
        if let Some(name) = &d.template
            && !data::template::BUILTIN.contains(&name.as_str())
        {
            return bad(format!(
                "data.template `{name}` is no built-in template (one of {}); leave it out to \
                 use the tokenizer's own",
                data::template::BUILTIN.join(", ")
            ));
        }
        self.data
            .truncation()
            .map_err(|e| TrainerError::Input(format!("{origin}: data.truncation: {e}")))?;
        self.data
            .load_options()
            .map_err(|e| TrainerError::Input(format!("{origin}: data.format: {e}")))?;
        Ok(())
    }

    /// The resolved recipe as TOML, for the run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[model]\npath = \"m\"\n[data]\ntrain = \"d.jsonl\"\n[lora]\n";

    /// A missing section is named as one; it was blamed on the section that was there
    /// (`` `data`: missing field `model` ``). A key missing inside a section still names
    /// the section.
    #[test]
    fn a_missing_section_is_named_not_its_neighbour() {
        for (text, want) in [
            (
                "[data]\ntrain = \"d.jsonl\"\n",
                "r.toml: missing section `[model]`",
            ),
            (
                "[model]\npath = \"m\"\n",
                "r.toml: missing section `[data]`",
            ),
            ("", "r.toml: missing section `[model]`"),
            (
                "[model]\n[data]\ntrain = \"d.jsonl\"\n",
                "r.toml: `model`: missing field `path`",
            ),
        ] {
            let e = parse(text, "r.toml", &[]).unwrap_err().to_string();
            assert_eq!(e, want, "{text:?}");
        }
    }

    /// A command reward or client whose program is an empty name is refused with the
    /// recipe (it failed at its start, as "cannot start ``", naming neither), and the
    /// client's settings each name their own key.
    #[test]
    fn programs_and_client_settings_are_checked_with_the_recipe() {
        let base = "[model]\npath = \"m\"\n[data]\ntrain = \"d.jsonl\"\n[lora]\n[train]\n\
                    method = \"grpo\"\n[grpo]\nnum_generations = 2\n";
        let reward = format!("{base}[[grpo.rewards]]\nkind = \"command\"\ncommand = [\" \"]\n");
        let e = parse(&reward, "r.toml", &[]).unwrap_err().to_string();
        assert!(
            e.starts_with("r.toml: grpo.rewards[0] (command): command's first element"),
            "{e}"
        );
        let session = format!(
            "{base}rollout = \"session\"\n[grpo.client]\nkind = \"command\"\n\
             command = [\"\", \"x\"]\n[[grpo.rewards]]\nkind = \"format\"\n"
        );
        let e = parse(&session, "r.toml", &[]).unwrap_err().to_string();
        assert!(
            e.contains("r.toml: grpo.client.command's first element"),
            "{e}"
        );
        let model_client = session.replace(
            "kind = \"command\"\ncommand = [\"\", \"x\"]",
            "kind = \"model\"",
        );
        parse(&model_client, "r.toml", &[]).unwrap();
        let e = parse(
            &model_client,
            "r.toml",
            &["grpo.client.max_new_tokens=0".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("grpo.client.max_new_tokens must be positive"),
            "{e}"
        );
    }

    /// Every path-valued key, set to an empty (or blank) string in the file or with
    /// `--set`, is refused naming itself; an empty string elsewhere (a column's new name) is
    /// not a path and is left to its own checks.
    #[test]
    fn an_empty_path_is_refused_naming_its_key() {
        let grpo = "[model]\npath = \"m\"\n[data]\ntrain = \"d.jsonl\"\n[lora]\n[train]\n\
                    method = \"grpo\"\n[grpo]\nnum_generations = 2\n[[grpo.rewards]]\n\
                    kind = \"reward_model\"\nmodel = \"rm\"\n";
        for (text, set, key) in [
            (MINIMAL, "model.path=\"\"", "`model.path`"),
            (MINIMAL, "data.train=\" \"", "`data.train`"),
            (MINIMAL, "data.eval=\"\"", "`data.eval`"),
            (MINIMAL, "lora.init_from=\"\"", "`lora.init_from`"),
            (MINIMAL, "dpo.ref_cache_dir=\"\"", "`dpo.ref_cache_dir`"),
            (grpo, "grpo.rewards.0.model=\"\"", "`grpo.rewards.0.model`"),
            (
                grpo,
                "grpo.rewards.0.adapter=\"\"",
                "`grpo.rewards.0.adapter`",
            ),
            (grpo, "grpo.client.path=\"\"", "`grpo.client.path`"),
            (grpo, "grpo.client.adapter=\"\"", "`grpo.client.adapter`"),
        ] {
            let e = parse(text, "r.toml", &[set.to_string()])
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("r.toml: {key}: an empty path names nothing")),
                "{set}: {e}"
            );
        }
        let e = parse(
            "[model]\npath = \"\"\n[data]\ntrain = \"d\"\n",
            "r.toml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`model.path`: an empty path"), "{e}");
        let e = parse(MINIMAL, "r.toml", &["data.columns.q=\"\"".to_string()])
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default();
        assert!(!e.contains("empty path"), "{e}");
    }

    #[test]
    fn defaults_overrides_and_round_trip() {
        let r = parse(
            MINIMAL,
            "r.toml",
            &[
                "train.learning_rate=1e-3".into(),
                "lora.targets=[\"q_proj\"]".into(),
                "train.device=cpu".into(),
            ],
        )
        .unwrap();
        assert_eq!(r.train.learning_rate, 1e-3);
        assert_eq!(r.lora.as_ref().unwrap().targets, vec!["q_proj"]);
        assert_eq!(r.lora.as_ref().unwrap().r, 16);
        assert_eq!(r.train.device, "cpu");
        let again = parse(&r.to_toml(), "resolved", &[]).unwrap();
        assert_eq!(again.to_toml(), r.to_toml());
    }

    #[test]
    fn every_shipped_recipe_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            // Pipelines (`[[stage]]` lists of recipes) are checked by their own tests.
            if path.extension().is_some_and(|e| e == "toml") && !text.contains("[[stage]]") {
                load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 9, "expected the SFT, DPO, ORPO and reward recipes");
        let orpo = load(&dir.join("psylite-orpo.toml"), &[]).unwrap();
        let o = orpo.orpo.unwrap();
        assert_eq!(orpo.train.method, "orpo");
        assert_eq!(
            (
                o.lambda,
                orpo.train.learning_rate,
                orpo.train.gradient_accumulation_steps,
                orpo.data.max_length,
                orpo.train.max_grad_norm
            ),
            (0.2, 5e-6, 64, 2048, 1.0)
        );
        for (name, method) in [
            ("psychocounsel-reward.toml", "reward"),
            ("psychocounsel-dpo.toml", "dpo"),
            ("tiny-dpo.toml", "dpo"),
            ("tiny-orpo.toml", "orpo"),
            ("tiny-reward.toml", "reward"),
            ("tiny-simpo.toml", "simpo"),
            ("tiny-cpo.toml", "cpo"),
        ] {
            assert_eq!(load(&dir.join(name), &[]).unwrap().train.method, method);
        }
        let psyche = load(&dir.join("psyche-grpo.toml"), &[]).unwrap();
        let g = psyche.grpo.unwrap();
        assert_eq!(psyche.train.method, "grpo");
        assert_eq!(g.num_generations, 8);
        assert_eq!(
            psyche.train.per_device_train_batch_size * psyche.train.gradient_accumulation_steps
                / g.num_generations,
            8,
            "prompts per step"
        );
        let kinds: Vec<&str> = g.rewards.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "reward_model",
                "crisis_safety",
                "format",
                "reflection",
                "length"
            ]
        );
        let tiny = load(&dir.join("tiny-grpo.toml"), &[]).unwrap();
        assert_eq!(tiny.train.device, "cpu");
        // GRPO multiplies the batch sizes for its groups: a product past the bound is an
        // error, not an overflow.
        let huge = [
            "train.per_device_train_batch_size=4294967296".to_string(),
            "train.gradient_accumulation_steps=4294967296".to_string(),
        ];
        let e = load(&dir.join("tiny-grpo.toml"), &huge)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sequences per step"), "{e}");
        for name in ["tiny-session-grpo.toml", "cactus-session-grpo.toml"] {
            let r = load(&dir.join(name), &[]).unwrap();
            let g = r.grpo.unwrap();
            assert_eq!(
                (g.rollout.as_str(), g.client.unwrap().kind.as_str()),
                ("session", "model"),
                "{name}"
            );
        }
        let cactus = load(&dir.join("cactus-session-grpo.toml"), &[]).unwrap();
        assert_eq!(cactus.data.format.as_deref(), Some("cactus"));
        let psylite = load(&dir.join("psylite-sft.toml"), &[]).unwrap();
        let l = psylite.lora.unwrap();
        assert_eq!((l.r, l.alpha, l.dropout), (64, 16.0, 0.1));
        assert!(psylite.data.packing && psylite.data.max_length == 4096);
        assert_eq!(
            load(&dir.join("cactus-sft.toml"), &[])
                .unwrap()
                .data
                .format
                .as_deref(),
            Some("cactus")
        );
    }

    #[test]
    fn out_of_range_numbers_name_their_key() {
        for (set, want) in [
            (
                "train.max_grad_norm=-1",
                "train.max_grad_norm -1 must be ≥ 0",
            ),
            (
                "data.eval_fraction=1.5",
                "data.eval_fraction 1.5 must be in [0, 1)",
            ),
            ("data.eval_fraction=-0.1", "data.eval_fraction -0.1"),
            (
                "train.progress_seconds=-2",
                "train.progress_seconds -2 must be ≥ 0",
            ),
            ("train.adam_beta1=1", "train.adam_beta1 1 must be in [0, 1)"),
            (
                "train.adam_beta2=nan",
                "train.adam_beta2 NaN must be in [0, 1)",
            ),
            (
                "train.adam_epsilon=0",
                "train.adam_epsilon 0 must be positive",
            ),
            (
                "train.learning_rate=1e300",
                "train.learning_rate 1e300 is beyond f32's range",
            ),
            (
                "train.weight_decay=nan",
                "train.weight_decay NaN must be ≥ 0",
            ),
            ("train.weight_decay=-1", "train.weight_decay -1 must be ≥ 0"),
            ("lora.alpha=inf", "lora.alpha inf must be a finite number"),
            ("lora.alpha=-5", "lora.alpha -5 must be ≥ 0"),
            (
                "lora.r=9223372036854775807",
                "lora.r 9223372036854775807 must be at most",
            ),
            (
                "dist.timeout_s=1e300",
                "dist.timeout_s 1e300 must be positive",
            ),
            (
                "train.progress_seconds=1e300",
                "train.progress_seconds 1e300 must be",
            ),
            (
                "train.per_device_train_batch_size=9223372036854775807",
                "must be at most 16777216 sequences per step",
            ),
            (
                "train.num_train_epochs=9223372036854775807",
                "train.num_train_epochs 9.223372036854776e18 must be at most",
            ),
            (
                "train.num_train_epochs=nan",
                "train.num_train_epochs NaN must be a number ≥ 0",
            ),
            (
                "train.num_train_epochs=-0.5",
                "train.num_train_epochs -0.5 must be a number ≥ 0",
            ),
            ("lora.dropout=nan", "lora.dropout NaN must be in [0, 1)"),
            ("lora.r=0", "lora: LoRA rank `r` must be positive"),
            ("lora.targets=[]", "lora: target_modules is empty"),
            (
                "lora.targets=[\"qproj\"]",
                "lora: unknown target module `qproj`",
            ),
            ("data.max_length=1", "data.max_length 1 must be from 2"),
            ("data.max_length=9223372036854775807", "to 1048576 tokens"),
            (
                "data.template=bogus",
                "data.template `bogus` is no built-in",
            ),
            (
                "lora.layers_to_transform=[]",
                "lora.layers_to_transform is empty",
            ),
            (
                "lora.layers_to_transform=[-1]",
                "`lora.layers_to_transform`",
            ),
            (
                "train.device=\"gpu\"",
                "train.device `gpu`: expected cpu, cuda[:N] or wgpu[:N]",
            ),
            (
                "train.device=\"cuda:first\"",
                "train.device `cuda:first`: the index after `:` must be a number",
            ),
        ] {
            let err = parse(MINIMAL, "r.toml", &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(err.contains("r.toml") && err.contains(want), "{set}: {err}");
        }
        let head_in_layers = [
            "lora.layers_to_transform=[1, 0]".into(),
            "lora.targets=[\"q_proj\", \"lm_head\"]".into(),
        ];
        let err = parse(MINIMAL, "r.toml", &head_in_layers)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("r.toml") && err.contains("`lm_head`, which sits in no layer"),
            "{err}"
        );
        let r = parse(MINIMAL, "r.toml", &head_in_layers[..1]).unwrap();
        assert_eq!(r.lora.unwrap().layers_to_transform, Some(vec![1, 0]));
        let r = parse(MINIMAL, "r.toml", &["train.max_grad_norm=0".into()]).unwrap();
        assert_eq!(r.train.max_grad_norm, 0.0);
        assert_eq!(r.data.eval_fraction, 0.05, "the documented default");
        // Packed rows are max_length long, each with a [T, T] mask: 8 × 65536² bools is
        // 32 GiB, refused; the same length unpacked, or packed one row at a time, is not.
        let packed = [
            "data.packing=true".to_string(),
            "data.max_length=65536".into(),
            "train.per_device_train_batch_size=8".into(),
        ];
        let err = parse(MINIMAL, "r.toml", &packed).unwrap_err().to_string();
        assert!(err.contains("needs a 32 GiB attention mask"), "{err}");
        parse(MINIMAL, "r.toml", &packed[1..]).unwrap();
        let one_row = [
            packed[0].clone(),
            packed[1].clone(),
            "train.per_device_train_batch_size=1".into(),
        ];
        parse(MINIMAL, "r.toml", &one_row).unwrap();
    }

    /// A value of the wrong type is named by its key, a table given for a path included (it
    /// is written out as a section of its own, whose header is the key).
    #[test]
    fn values_of_the_wrong_type_name_their_key() {
        for (text, want) in [
            (
                "[model]\npath = { a = 1 }\n[data]\ntrain = \"d.jsonl\"\n",
                "`model.path`: invalid type: map",
            ),
            (
                "[model]\npath = \"m\"\n[data]\ntrain = \"d.jsonl\"\n[train]\nmax_steps = \"x\"\n",
                "`train.max_steps`: invalid type: string",
            ),
            (
                "[model]\npath = [1]\n[data]\ntrain = \"d.jsonl\"\n",
                "`model.path`: invalid type: sequence",
            ),
        ] {
            let err = parse(text, "r.toml", &[]).unwrap_err().to_string();
            assert!(err.starts_with("r.toml: ") && err.contains(want), "{err}");
        }
    }

    /// `--set` reaches into arrays of tables by number, and the next number appends one.
    #[test]
    fn overrides_index_and_extend_arrays_of_tables() {
        let grpo = format!(
            "{MINIMAL}[train]\nmethod = \"grpo\"\nper_device_train_batch_size = 8\n\
             [grpo]\nnum_generations = 4\n[[grpo.rewards]]\nkind = \"format\"\n"
        );
        let r = parse(
            &grpo,
            "r.toml",
            &[
                "grpo.rewards.0.weight=2.5".into(),
                "grpo.rewards.1.kind=reward_model".into(),
                "grpo.rewards.1.model=runs/rm/final".into(),
            ],
        )
        .unwrap();
        let rewards = r.grpo.unwrap().rewards;
        assert_eq!(rewards.len(), 2);
        assert_eq!(rewards[0].weight, 2.5);
        assert_eq!(rewards[1].kind, "reward_model");
        assert_eq!(
            rewards[1].model.as_deref(),
            Some(Path::new("runs/rm/final"))
        );
        // A wrong type in the second entry names that entry.
        let err = parse(&grpo, "r.toml", &["grpo.rewards.1.weight=\"x\"".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`grpo.rewards.1.weight`"), "{err}");
        let err = parse(&grpo, "r.toml", &["grpo.rewards.5.weight=1".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has 1 entries") && err.contains("use 1"),
            "{err}"
        );
        // G must divide the completions of a step.
        let err = parse(&grpo, "r.toml", &["grpo.num_generations=3".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("must divide"), "{err}");
    }

    /// Settings a method would ignore, or that overflow the f32 tensors they go into, are
    /// refused when the recipe is read, naming the key.
    #[test]
    fn settings_a_method_would_ignore_or_overflow_are_refused() {
        let method = |m: &str, extra: &[&str]| {
            let mut sets = vec![format!("train.method={m}")];
            sets.extend(extra.iter().map(|e| e.to_string()));
            parse(MINIMAL, "r.toml", &sets).map(|_| ())
        };
        for (m, extra, want) in [
            (
                "dpo",
                &["dpo.loss_type=ipo", "dpo.label_smoothing=0.2"][..],
                "dpo.label_smoothing 0.2 is read by loss_type sigmoid, robust, exo_pair, aot \
                 and aot_unpaired only, not ipo",
            ),
            (
                "dpo",
                &["dpo.loss_type=exo_pair"][..],
                "which must be positive (the EXO paper uses 1e-3)",
            ),
            (
                "dpo",
                &[
                    "dpo.loss_type=[\"sigmoid\", \"sft\"]",
                    "dpo.loss_weights=[1.0]",
                ][..],
                "dpo.loss_weights has 1 weights for 2 loss types",
            ),
            (
                "dpo",
                &["dpo.loss_type=[]"][..],
                "dpo.loss_type is an empty list",
            ),
            (
                "dpo",
                &["dpo.loss_type=[\"sigmoid\", \"kto\"]"][..],
                "unknown DPO loss_type `kto`",
            ),
            (
                "dpo",
                &["dpo.loss_type=discopop", "dpo.discopop_tau=1e-20"][..],
                "dpo.discopop_tau 1e-20 must be from 0.001 (and within f32)",
            ),
            (
                "dpo",
                &[
                    "dpo.loss_type=[\"sigmoid\", \"sft\"]",
                    "dpo.loss_weights=[1e20, 1.0]",
                ][..],
                "dpo.loss_weights: 1e20 is not a weight from -1000 to 1000",
            ),
            (
                "dpo",
                &["dpo.loss_type=[1, 2]"][..],
                "expected a loss type name, or a list of names",
            ),
            (
                "dpo",
                &["dpo.ref_cache_dir=/tmp/refs"],
                "needs dpo.precompute_ref_log_probs",
            ),
            (
                "dpo",
                &["dpo.beta=1e39"],
                "dpo.beta 1e39 must be positive (and within f32)",
            ),
            ("simpo", &["simpo.gamma=-1e39"], "simpo.gamma"),
            (
                "grpo",
                &["grpo.max_turns=9"],
                "grpo.max_turns shapes session rollouts",
            ),
            (
                "grpo",
                &["grpo.aggregate=\"min\""],
                "grpo.aggregate shapes session rollouts",
            ),
            (
                "grpo",
                &["grpo.rollout=session", "grpo.client.timeout_s=5"],
                "grpo.client.timeout_s is for kind = \"command\"",
            ),
        ] {
            let mut all = vec!["train.per_device_train_batch_size=8"];
            if m == "grpo" {
                all.push("grpo.rewards=[{kind = \"format\"}]");
            }
            all.extend_from_slice(extra);
            let err = method(m, &all).unwrap_err().to_string();
            assert!(err.contains(want), "{m} {extra:?}: {err}");
        }
        method("dpo", &["dpo.label_smoothing=0.2"]).unwrap();
        method(
            "grpo",
            &[
                "train.per_device_train_batch_size=8",
                "grpo.rewards=[{kind = \"format\"}]",
                "grpo.rollout=session",
                "grpo.max_turns=9",
            ],
        )
        .unwrap();
    }

    /// A value that opens like TOML but does not parse is refused; bare words stay strings.
    #[test]
    fn broken_toml_values_are_refused_not_kept_as_text() {
        for bad in [
            "model.path=\"/tmp/base",
            "model.path='/tmp/base",
            "lora.targets=[\"q_proj\"",
            "train.device={",
        ] {
            let err = parse(MINIMAL, "r.toml", &[bad.into()])
                .unwrap_err()
                .to_string();
            assert!(err.contains("not valid TOML"), "{bad}: {err}");
        }
        let r = parse(MINIMAL, "r.toml", &["model.path=/tmp/it's here".into()]).unwrap();
        assert_eq!(r.model.path, Path::new("/tmp/it's here"));
        let grpo = format!(
            "{MINIMAL}[train]\nmethod = \"grpo\"\nper_device_train_batch_size = 8\n\
             [grpo]\nnum_generations = 4\n[[grpo.rewards]]\nkind = \"format\"\n"
        );
        for index in ["+0", "00", "-0", " 0"] {
            let set = format!("grpo.rewards.{index}.weight=1");
            let err = parse(&grpo, "r.toml", std::slice::from_ref(&set))
                .unwrap_err()
                .to_string();
            assert!(err.contains("is not a section"), "{set}: {err}");
        }
    }

    #[test]
    fn quoted_key_parts_keep_their_dots() {
        let r = parse(
            MINIMAL,
            "r.toml",
            &[
                "data.columns.\"meta.question\"=prompt".into(),
                "data.columns.'a=b'=\"completion\"".into(),
                "data.columns.\"x\\u002ey\"=chosen".into(),
            ],
        )
        .unwrap();
        let columns: Vec<(&str, &str)> = r
            .data
            .columns
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            columns,
            [
                ("a=b", "completion"),
                ("meta.question", "prompt"),
                ("x.y", "chosen")
            ]
        );
        for (set, want) in [
            ("data.columns.\"meta.question=prompt", "never closed"),
            ("data.columns.\"a\"b=prompt", "not one quoted string"),
        ] {
            let err = parse(MINIMAL, "r.toml", &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--set") && err.contains(want), "{set}: {err}");
        }
    }

    #[test]
    fn unknown_keys_name_the_nearest_valid_one() {
        let err = parse(
            &format!("{MINIMAL}[train]\nlearning_rat = 1.0\n"),
            "r.toml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("r.toml")
                && err.contains("`learning_rat`")
                && err.contains("did you mean `learning_rate`"),
            "{err}"
        );
        let err = parse(MINIMAL, "r.toml", &["train.warmup_ratoi=0.1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `warmup_ratio`"), "{err}");
        let err = parse(MINIMAL, "r.toml", &["train.max_grad_norm".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("section.key=value"), "{err}");
        for (set, want) in [
            ("train..seed=1", "a part of the key is empty"),
            (".seed=1", "a part of the key is empty"),
            ("train.seed=1\nmax_steps=5", "give each its own --set"),
            ("train={max_steps=1}", "set its keys one at a time"),
        ] {
            let err = parse(MINIMAL, "r.toml", &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--set") && err.contains(want), "{set}: {err}");
        }
        // A value may still span lines where TOML allows it.
        let r = parse(
            MINIMAL,
            "r.toml",
            &["lora.targets=[\"q_proj\",\n\"v_proj\"]".into()],
        )
        .unwrap();
        assert_eq!(r.lora.unwrap().targets, ["q_proj", "v_proj"]);
        let err = parse(
            &format!("{MINIMAL}[train]\nmethod = \"ppo\"\n"),
            "r.toml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`ppo`") && err.contains("reward") && err.contains("simpo, cpo"),
            "{err}"
        );
        let err = parse(
            &format!("{MINIMAL}[train]\nmethod = \"simpo\"\n[cpo]\ncpo_alpha = 0.5\n"),
            "r.toml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("[cpo]") && err.contains("`simpo`"), "{err}");
        for (section, set, key) in [
            ("simpo", "beta = 0.0", "simpo.beta"),
            ("simpo", "label_smoothing = 0.5", "simpo.label_smoothing"),
            ("cpo", "cpo_alpha = -1.0", "cpo.cpo_alpha"),
            (
                "reward",
                "center_rewards_coefficient = nan",
                "reward.center_rewards_coefficient",
            ),
        ] {
            let text = format!("{MINIMAL}[train]\nmethod = \"{section}\"\n[{section}]\n{set}\n");
            let err = parse(&text, "r.toml", &[]).unwrap_err().to_string();
            assert!(err.starts_with("r.toml: ") && err.contains(key), "{err}");
        }
        let err = parse(
            &format!("{MINIMAL}[train]\nmethod = \"simpo\"\n[simpo]\ngama = 1.0\n"),
            "r.toml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("did you mean `gamma`"), "{err}");
        let err = parse(&format!("{MINIMAL}[dpo]\nbeta = 0.1\n"), "r.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("[dpo]") && err.contains("`sft`"), "{err}");
        let err = parse(
            &format!("{MINIMAL}[train]\nmethod = \"dpo\"\n[dpo]\nloss_type = \"kto\"\n"),
            "r.toml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("dpo.loss_type") && err.contains("`kto`"),
            "{err}"
        );
        // MPO: several types with their weights, from the file; a single name still reads.
        let mpo = format!(
            "{MINIMAL}[train]\nmethod = \"dpo\"\n[dpo]\nloss_type = [\"sigmoid\", \"bco_pair\", \
             \"sft\"]\nloss_weights = [0.8, 0.2, 1.0]\n"
        );
        let recipe = parse(&mpo, "r.toml", &[]).unwrap();
        assert_eq!(
            recipe.dpo.as_ref().map(|d| d.loss_weights.clone()),
            Some(Some(vec![0.8, 0.2, 1.0]))
        );
        // The resolved recipe a run saves reads back the same.
        let again = parse(&recipe.to_toml(), "saved", &[]).unwrap();
        assert_eq!(
            again.dpo.map(|d| d.loss_type),
            recipe.dpo.map(|d| d.loss_type)
        );
        // A list of one is that one name (a resume compares them as the same loss).
        let one = |written: &str| {
            let text =
                format!("{MINIMAL}[train]\nmethod = \"dpo\"\n[dpo]\nloss_type = {written}\n");
            parse(&text, "r.toml", &[]).unwrap().to_toml()
        };
        assert_eq!(one("[\"ipo\"]"), one("\"ipo\""));
    }
}
