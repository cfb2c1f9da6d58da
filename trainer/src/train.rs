//! The training loop, shared by every method: batching, gradient accumulation, global-norm
//! clipping, the learning-rate schedule, evaluation, metrics, checkpoints. Objectives only
//! compute a loss.

use std::path::Path;
use std::time::Instant;

use burn::module::ParamGroup;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use checkpoints::{ModelConfig, WeightDtype};
use data::batch::split_by_group;
use data::render::{TemplateChoice, template_for};
use data::tokenize::{Tokenizing, TruncationCounts};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::dist::Group;
use crate::dist::outcomes::Outcome as StepOutcome;
use crate::grpo::{Grpo, PromptItem, Rollouts};
use crate::method::{
    Examples, Method, Micro, Reference, Rows, epoch_micro_batches, eval_micro_batches, micro_loss,
    tokenize,
};
use crate::model::lora::{LoraSettings, attach_lora, load_adapter, merge_lora, save_adapter};
use crate::model::precision::{Precision, with_precision};
use crate::model::{
    Llama, NewModel, copy_companions, init_model, load_model, save_model, with_score_head,
};
use crate::objectives::Metrics;
use crate::recipe::Recipe;
use crate::ref_cache::{RefCacheKey, default_cache_dir, precompute};
use crate::rewards::{RewardContext, Rewards};
use crate::run_dir::RunDir;
use crate::{Result, TrainerError};

/// What a run ended with.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub eval_loss: Option<f64>,
    /// The final evaluation's metrics (TRL names, without the `eval_` prefix).
    pub eval_metrics: Metrics,
}

/// The multiplier on the peak learning rate at optimizer step `step` (0-based), as
/// transformers' schedulers compute it: linear warmup from 0, then constant, linear decay
/// to 0, or half a cosine to 0.
pub fn lr_factor(kind: &str, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match kind {
        "linear" => (1.0 - progress).max(0.0),
        "cosine" => 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
        _ => 1.0,
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping. burn's own clipping works per tensor, which is not what LLM recipes mean.
pub fn clip_global_norm(model: &Llama, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads
                    .register::<D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut sum = SumSquares { grads, total: None };
    model.visit(&mut sum);
    let norm = sum
        .total
        .map(|t| {
            t.into_data()
                .try_into_vec_as::<f64>()
                .ok()
                .and_then(|v| v.first().copied())
                .unwrap_or(0.0)
                .sqrt()
        })
        .unwrap_or(0.0);
    if max_norm > 0.0 && norm > max_norm {
        let mut scale = Scale {
            grads,
            factor: max_norm / (norm + 1e-6),
        };
        model.visit(&mut scale);
    }
    norm
}

/// What makes a step's update unsafe, if anything: a NaN or infinite loss, or a finite loss
/// whose gradient holds a NaN or ∞ somewhere (one such element makes the global norm
/// non-finite, so the norm is the whole check).
fn non_finite(loss: f64, grad_norm: f64) -> Option<&'static str> {
    if !loss.is_finite() {
        Some("loss")
    } else if !grad_norm.is_finite() {
        Some("gradient norm")
    } else {
        None
    }
}

/// Whether every parameter is finite (one reduction per tensor, read back once).
fn all_finite(model: &Llama) -> bool {
    struct Check(Option<Tensor<1>>);
    impl ModuleVisitor for Check {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            // Any NaN or ±∞ makes the sum of |x| non-finite (overflow to ∞ only for values
            // near f32's limit, which are as good as diverged).
            let s = crate::model::precision::f32(param.val().detach().abs().sum());
            self.0 = Some(match self.0.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
    let mut c = Check(None);
    model.visit(&mut c);
    c.0.is_none_or(|t| scalar(t).is_finite())
}

/// Tokenised training and evaluation sets.
struct Sets {
    train: Examples,
    eval: Examples,
    counts: TruncationCounts,
    /// Bad rows skipped under `skip_bad_rows`, across the train and eval files.
    skipped_rows: usize,
    /// Preference pairs whose two sides are the same tokens.
    identical_pairs: usize,
}

/// `vocab_size`: the base model's, which the tokenizer must fit.
fn prepare_data(recipe: &Recipe, method: &Method, vocab_size: usize) -> Result<Sets> {
    let d = &recipe.data;
    let dir = &recipe.model.path;
    let choice = match &d.template {
        Some(name) => TemplateChoice::Builtin(name),
        None => TemplateChoice::Shipped(None),
    };
    let template = template_for(dir, choice)?;
    let tokenizer = crate::model::load_tokenizer(dir, vocab_size)?;
    let options = d.load_options().map_err(TrainerError::Input)?;
    let truncation = d.truncation().map_err(TrainerError::Input)?;
    let t = Tokenizing {
        template: &template,
        tokenizer: &tokenizer,
        max_length: d.max_length,
        truncation,
    };
    let margin = recipe
        .reward
        .as_ref()
        .and_then(|r| r.margin_column.as_deref());
    let mut counts = TruncationCounts::default();
    let loaded = data::load_examples(&d.train, &options)?;
    let eval_loaded = match &d.eval {
        Some(path) => Some((path, data::load_examples(path, &options)?)),
        None => None,
    };
    let mut skipped_rows =
        loaded.skipped.len() + eval_loaded.as_ref().map_or(0, |(_, l)| l.skipped.len());
    let mut identical_pairs = 0;
    let mut run = |examples: &[data::Example],
                   rows: Rows,
                   counts: &mut TruncationCounts|
     -> Result<Examples> {
        let set = tokenize(method, &t, examples, &rows, margin, counts)?;
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
fn warnings(recipe: &Recipe, sets: &Sets) -> Vec<String> {
    let mut out = Vec::new();
    if recipe.lora.as_ref().is_some_and(|l| l.alpha == 0.0) {
        out.push(
            "lora.alpha = 0 scales every adapter's output by 0: nothing will ever be updated"
                .to_string(),
        );
    }
    if recipe.train.method == "grpo" && recipe.grpo.as_ref().is_some_and(|g| g.temperature == 0.0) {
        out.push(
            "grpo.temperature = 0 samples greedily: the completions of a prompt are identical, \
             so every advantage is 0 and nothing is learned"
                .to_string(),
        );
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

/// Weighted metrics and loss over `batches`, without gradients. Each rank evaluates a
/// contiguous share of the batches; the results combine in the batches' order, as in one
/// process.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    dp: &Group,
    method: &Method,
    model: &Llama,
    batches: &[Micro],
    examples: &Examples,
    reference: Option<&Reference>,
    pad: u32,
    device: &Device,
) -> Result<Option<(f64, Metrics, usize)>> {
    let share_len = batches.len().div_ceil(dp.world_size()).max(1);
    let mut local = Vec::new();
    for b in shard(batches, share_len, dp.rank()) {
        if let Some(o) = micro_loss(method, model, b, examples, reference, pad, device)? {
            local.push(StepOutcome {
                loss: scalar(o.loss),
                weight: o.weight,
                tokens: o.tokens,
                metrics: o.metrics,
            });
        }
    }
    let outs = crate::dist::outcomes::gather(dp, &local, None, &Metrics::default())?.outcomes;
    if outs.is_empty() {
        return Ok(None);
    }
    let (mut loss, mut metrics, mut tokens) = (0.0, Metrics::default(), 0);
    let weights: Vec<f64> = outs.iter().map(|o| o.weight).collect();
    for (o, share) in outs.iter().zip(shares(&weights)) {
        loss += o.loss * share;
        metrics.accumulate(&o.metrics, share);
        tokens += o.tokens;
    }
    Ok(Some((loss, metrics, tokens)))
}

/// Rank `rank`'s part of a group: its `per_rank` micro-batches, in rank order (empty for
/// ranks past a ragged last group's end).
fn shard<T>(group: &[T], per_rank: usize, rank: usize) -> &[T] {
    let start = (rank * per_rank).min(group.len());
    let end = (start + per_rank).min(group.len());
    &group[start..end]
}

/// Each micro-batch's share of a step (or an evaluation): its weight over the total, so
/// the step's loss is `Σ wᵢ·lossᵢ / Σ wᵢ`. When every weight is zero (e.g. GRPO `dapo`
/// with every completion masked) the micro-batches share equally, and the step still
/// counts, with zero loss.
fn shares(weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    if total > 0.0 {
        weights.iter().map(|w| w / total).collect()
    } else {
        vec![1.0 / weights.len().max(1) as f64; weights.len()]
    }
}

fn scalar(t: Tensor<1>) -> f64 {
    crate::objectives::values(t)
        .first()
        .copied()
        .unwrap_or(f64::NAN)
}

/// How the weights train, and so what a checkpoint holds.
#[derive(Debug, Clone)]
pub enum Tuning {
    /// Adapters on a frozen base: checkpoints are PEFT adapters.
    Lora(LoraSettings),
    /// Every weight: checkpoints are full HF checkpoints in f32 (exact resume).
    Full,
}

/// The model a run trains, with what saving and the DPO reference need.
pub struct Setup {
    /// The config checkpoints are written with (a reward model's is a classifier's).
    pub config: ModelConfig,
    pub model: Llama,
    pub reference: Option<Reference>,
    pub tuning: Tuning,
}

/// Builds the trained model: base (+ score head for reward) with fresh adapters, the
/// recipe's `init_from` adapter, or the checkpoint being resumed; and the DPO reference,
/// which is the initial policy — the base with adapters off, a frozen copy of the initial
/// adapter, or the initial full weights.
pub fn setup(
    recipe: &Recipe,
    method: &Method,
    device: &Device,
    resume_from: Option<&Path>,
    pad: u32,
) -> Result<Setup> {
    let (config, mut base) = load_model(&recipe.model.path, device)?;
    let reward = matches!(method, Method::Reward { .. });
    if reward {
        if config.score_labels.is_some_and(|n| n != 1) {
            return Err(TrainerError::Input(format!(
                "{}: a reward model needs one label; this classifier has {}",
                recipe.model.path.display(),
                config.score_labels.unwrap_or(0)
            )));
        }
        base = with_score_head(base, device);
    }
    let config = if reward {
        config.as_reward_model(config.pad_token_id.unwrap_or(pad))
    } else {
        config
    };
    let (model, reference, tuning) = match &recipe.lora {
        Some(lora) => {
            let settings = LoraSettings {
                r: lora.r,
                lora_alpha: lora.alpha,
                lora_dropout: lora.dropout,
                target_modules: lora.targets.clone(),
                use_rslora: lora.rslora,
            };
            let initial = match &lora.init_from {
                Some(dir) => Some(load_adapter(dir, base.clone(), device)?),
                None => None,
            };
            let reference = match (method.needs_reference(), &initial) {
                (true, Some((m, _))) => Some(m.clone().no_grad()),
                (true, None) => Some(base.clone().no_grad()),
                (false, _) => None,
            };
            let (model, settings) = match (resume_from, initial) {
                (Some(dir), _) => (load_adapter(dir, base, device)?.0, settings),
                (None, Some(loaded)) => loaded,
                (None, None) => (attach_lora(base, &settings, device)?, settings),
            };
            (model, reference, Tuning::Lora(settings))
        }
        None => {
            let reference = method.needs_reference().then(|| base.clone().no_grad());
            let model = match resume_from {
                Some(dir) => load_model(dir, device)?.1,
                None => base,
            };
            (model, reference, Tuning::Full)
        }
    };
    let precision = Precision::from_flags(recipe.train.bf16, recipe.train.fp16);
    Ok(Setup {
        config,
        model: with_precision(model, precision),
        reference: reference.map(|model| Reference {
            model: with_precision(model, precision),
            device: device.clone(),
        }),
        tuning,
    })
}

/// AdamW with the recipe's settings; norms and biases (every rank-1 parameter) in a group
/// without weight decay, as transformers' Trainer does.
pub(crate) fn optimizer(t: &crate::recipe::TrainSection, model: &Llama) -> ModuleOptimizer {
    struct RankOne(Vec<ParamId>);
    impl ModuleVisitor for RankOne {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if D == 1 {
                self.0.push(param.id);
            }
        }
    }
    let config = |decay: f64| {
        AdamWConfig::new()
            .with_beta_1(t.adam_beta1 as f32)
            .with_beta_2(t.adam_beta2 as f32)
            .with_epsilon(t.adam_epsilon as f32)
            .with_weight_decay(decay as f32)
    };
    let mut rank_one = RankOne(Vec::new());
    model.visit(&mut rank_one);
    let optim = config(t.weight_decay).init();
    if t.weight_decay > 0.0 && !rank_one.0.is_empty() {
        optim.with_group(ParamGroup::from_ids(rank_one.0), config(0.0).build(), None)
    } else {
        optim
    }
}

/// Writes the trained weights into `dir`: the adapter (LoRA) or a full checkpoint. The
/// final save of a full run uses the base's dtype; a LoRA reward model is also merged into a
/// `*ForSequenceClassification` checkpoint, with its adapter under `adapter/`.
fn save_weights(dir: &Path, s: &Setup, model: &Llama, base_name: &str, last: bool) -> Result<()> {
    let base = Path::new(base_name);
    match &s.tuning {
        Tuning::Lora(settings) if last && model.score.is_some() => {
            save_adapter(&dir.join("adapter"), model, settings, base_name)?;
            let merged = merge_lora(model.valid());
            save_model(dir, &s.config, &merged, s.config.dtype, Default::default())?;
            copy_companions(base, dir)
        }
        Tuning::Lora(settings) => save_adapter(dir, model, settings, base_name),
        Tuning::Full => {
            let dtype = if last {
                s.config.dtype
            } else {
                WeightDtype::F32
            };
            save_model(dir, &s.config, model, dtype, Default::default())?;
            copy_companions(base, dir)
        }
    }
}

/// Writes the optimizer state with its tensors sorted by name. burn lists them in hash-map
/// order, so the same state would otherwise be different bytes from run to run, and
/// identical runs could not be checked by their checkpoints' checksums.
fn save_optimizer(optim: &ModuleOptimizer, path: &Path) -> Result<()> {
    let bad = |e: &dyn std::fmt::Debug| TrainerError::Input(format!("{}: {e:?}", path.display()));
    let bytes = optim.to_record().into_bytes().map_err(|e| bad(&e))?;
    let reader = burn_pack::Reader::from_bytes(bytes).map_err(|e| bad(&e))?;
    let scalars = reader.scalars().clone();
    let metadata = reader.metadata().clone();
    let mut tensors = reader.into_tensors().map_err(|e| bad(&e))?;
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut writer = burn_pack::Writer::new(tensors);
    for (k, v) in &scalars {
        writer = writer.with_scalar(k, *v);
    }
    for (k, v) in &metadata {
        writer = writer.with_metadata(k, v);
    }
    let bytes = writer.into_bytes().map_err(|e| bad(&e))?;
    // The OS's own words ("No space left on device"), not the Debug form of the error.
    std::fs::write(path, &bytes[..])
        .map_err(|e| TrainerError::Input(format!("{}: {e}", path.display())))
}

/// Where a run stands, saved with every checkpoint so a resumed run continues exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    global_step: usize,
    /// The data position: the epoch, the micro-batches of it already consumed (counted
    /// over every rank, so a run can resume with another world size), and how often the
    /// group starting there was already used (GRPO's `num_iterations`).
    epoch: usize,
    #[serde(default)]
    next_micro: usize,
    #[serde(default)]
    next_iteration: usize,
    seen_tokens: usize,
    first_loss: f64,
    history: Vec<(usize, f64)>,
    eval_history: Vec<(usize, f64)>,
    /// Steps whose update was skipped for a non-finite loss or gradient.
    #[serde(default)]
    skipped_steps: usize,
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.bin";
/// GRPO samples still to be reused by the steps after a checkpoint.
const ROLLOUTS_FILE: &str = "rollouts.json";
/// GRPO's sampled completions, written only with `grpo.log_completions`.
const COMPLETIONS_FILE: &str = "completions.jsonl";
/// Keeps the sampler's stream apart from the dropout stream of the same step.
const SAMPLER_SEED: u64 = 0x5EED_0F5A_3B1E_D00D;

/// The device RNG is reseeded before every step from the seed and the step alone, so
/// dropout draws do not depend on what ran before — a resumed run draws the same.
fn step_seed(seed: u64, step: usize) -> u64 {
    seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The seed of a step's `index`-th micro-batch (counted over every rank): its dropout
/// draws are the same whichever rank runs it, so a data-parallel run trains as one
/// process with the whole global batch.
fn micro_seed(seed: u64, step: usize, index: usize) -> u64 {
    step_seed(seed, step) ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Keeps ranks' samplers apart (rank 0's stream is the single-process one).
const RANK_SEED: u64 = 0xA076_1D64_78BD_642F;

/// The `[dist]` settings of `recipe`, for [`Group::from_env`].
pub fn dist_options(recipe: &Recipe) -> crate::dist::Options {
    let d = &recipe.dist;
    crate::dist::Options {
        backend: d.backend.clone(),
        timeout: std::time::Duration::from_secs_f64(d.timeout_s),
        bucket_bytes: (d.bucket_mb * 1e6) as usize,
        cuda: recipe.train.device.starts_with("cuda"),
    }
}

/// Opens (to resume) or creates the run directory, and makes the recipe's base model when
/// it is to be created and missing. Rank 0's part of starting a run.
fn start_run(recipe: &Recipe, out: &Path, resume: bool) -> Result<RunDir> {
    let run = if resume {
        let run = RunDir::open(out)?;
        let path = out.join("recipe.toml");
        let saved = std::fs::read_to_string(&path).unwrap_or_default();
        if !same_run(&saved, recipe, &path.display().to_string()) {
            return Err(TrainerError::Input(format!(
                "{}: this recipe (with its --set overrides) differs from the one the run started with; resume needs the same (only train.gradient_accumulation_steps and [dist] may change, to keep the global batch on another number of processes)",
                path.display()
            )));
        }
        run
    } else {
        let run = RunDir::create(out)?;
        run.write_recipe(&recipe.to_toml())?;
        run
    };
    let base = &recipe.model.path;
    if !base.join("config.json").exists() && recipe.model.create_if_missing {
        init_model(
            base,
            &NewModel {
                seed: recipe.train.seed,
                ..Default::default()
            },
            Default::default(),
        )?;
    }
    Ok(run)
}

/// Whether `recipe` continues the run whose resolved recipe is `saved`: the same but for
/// what a resume on another number of processes changes — the accumulation steps (which
/// keep the global batch) and the `[dist]` settings.
fn same_run(saved: &str, recipe: &Recipe, origin: &str) -> bool {
    let Ok(before) = crate::recipe::parse(saved, origin, &[]) else {
        return false;
    };
    let mut now = recipe.clone();
    now.train.gradient_accumulation_steps = before.train.gradient_accumulation_steps;
    now.dist = before.dist.clone();
    // Both through today's schema, so keys a run from an older hearth lacks read as their
    // defaults rather than as a difference.
    now.to_toml() == before.to_toml()
}

/// Runs the recipe, writing everything into `out`; with `resume`, continues the run in
/// `out` from its newest complete checkpoint.
pub fn train(recipe: &Recipe, out: &Path, resume: bool, progress: bool) -> Result<Outcome> {
    let t = &recipe.train;
    let method = Method::from_recipe(recipe)?;
    let dp = Group::from_env(&dist_options(recipe))?;
    let (world, rank) = (dp.world_size(), dp.rank());
    // Rank 0 alone writes: the run directory, and the base model when it is made here.
    let prepared = if dp.is_main() {
        start_run(recipe, out, resume)
    } else {
        Ok(RunDir::follower(out))
    };
    dp.agree(prepared.is_ok(), "starting the run")?;
    let run = prepared?;
    let weights: &[&str] = if recipe.lora.is_some() {
        &["adapter_model.safetensors", "adapter_config.json"]
    } else {
        &["config.json"]
    };
    let mut required = vec![STATE_FILE, OPTIMIZER_FILE];
    required.extend_from_slice(weights);
    crate::signals::install();
    let resume_from = if resume {
        run.resume_point(&required)?
    } else {
        None
    };
    let base = &recipe.model.path;
    kernels::set_kernels(kernels::Kernels::parse(&t.kernels).unwrap_or_default());
    // Under a launcher, a plain `cuda` is this process's GPU: the local rank's.
    let device_name = if world > 1 && t.device == "cuda" {
        format!("cuda:{}", dp.local_rank)
    } else {
        t.device.clone()
    };
    let mut device = crate::device::parse(&device_name)?.autodiff();
    if t.gradient_checkpointing {
        device = device.gradient_checkpointing();
    }
    device.seed(t.seed);
    let base_config = ModelConfig::from_path(base)?;
    let pad = base_config
        .pad_token_id
        .or(base_config.eos_token_ids.first().copied())
        .unwrap_or(0);
    let setup = setup(
        recipe,
        &method,
        &device,
        resume_from.as_ref().map(|(_, d)| d.as_path()),
        pad,
    )?;
    let mut model = setup.model.clone();
    let reference = setup.reference.as_ref();

    let mut sets = prepare_data(recipe, &method, base_config.vocab_size)?;
    if dp.is_main() {
        for warning in warnings(recipe, &sets) {
            eprintln!("warning: {warning}");
        }
    }
    if let (Some(r), Some(d)) = (reference, &recipe.dpo)
        && d.precompute_ref_log_probs
    {
        let dir = d.ref_cache_dir.clone().unwrap_or_else(default_cache_dir);
        let key = RefCacheKey::new(
            base,
            recipe.lora.as_ref().and_then(|l| l.init_from.as_deref()),
            Precision::from_flags(t.bf16, t.fp16),
        )?;
        for set in [&mut sets.train, &mut sets.eval] {
            if let Examples::Pairs(pairs) = set {
                precompute(r, pairs, pad, t.per_device_train_batch_size, &key, &dir)?;
            }
        }
    }
    let inner = device.clone().inner();
    let mut grpo = match &method {
        Method::Grpo(settings) => {
            let tokenizer = crate::model::load_tokenizer(base, base_config.vocab_size)?;
            let stop = crate::generate::stop_tokens(base, &base_config, &tokenizer);
            let specs = recipe
                .grpo
                .as_ref()
                .map(|g| g.rewards.clone())
                .unwrap_or_default();
            let cx = RewardContext {
                tokenizer: &tokenizer,
                device: &inner,
            };
            let rewards = Rewards::from_specs(&specs, &cx)?;
            Some(Grpo {
                settings: settings.clone(),
                rewards,
                tokenizer,
                stop,
            })
        }
        _ => None,
    };
    let prompts: &[PromptItem] = match &sets.train {
        Examples::Prompts(p) => p,
        _ => &[],
    };
    let per_step = method.micros_per_step(t.gradient_accumulation_steps);
    let iterations = method.iterations();
    let eval_batches = eval_micro_batches(&sets.eval, t.per_device_train_batch_size, pad);
    let batches_per_epoch = epoch_micro_batches(recipe, &sets.train, 0, pad)?.len();
    // A step consumes `per_step` micro-batches on each rank: the global batch.
    let steps_per_epoch = batches_per_epoch.div_ceil(per_step * world).max(1) * iterations;
    let total = if t.max_steps > 0 {
        t.max_steps
    } else {
        t.num_train_epochs * steps_per_epoch
    };
    let warmup = if t.warmup_steps > 0 {
        t.warmup_steps
    } else {
        (t.warmup_ratio * total as f64).ceil() as usize
    };

    let mut optim = optimizer(t, &model);
    // GRPO's samples, kept across the `num_iterations` steps that reuse them.
    let mut rollouts: Option<Rollouts> = None;
    let mut state = TrainerState {
        global_step: 0,
        epoch: 0,
        next_micro: 0,
        next_iteration: 0,
        seen_tokens: 0,
        first_loss: f64::NAN,
        history: Vec::new(),
        eval_history: Vec::new(),
        skipped_steps: 0,
    };
    if let Some((step, dir)) = &resume_from {
        let text = std::fs::read_to_string(dir.join(STATE_FILE))
            .map_err(|e| TrainerError::Input(format!("{}: {e}", dir.join(STATE_FILE).display())))?;
        state = serde_json::from_str(&text)
            .map_err(|e| TrainerError::Input(format!("{}: {e}", dir.join(STATE_FILE).display())))?;
        let record = burn::optim::OptimizerRecord::load(dir.join(OPTIMIZER_FILE)).map_err(|e| {
            TrainerError::Input(format!("{}: {e:?}", dir.join(OPTIMIZER_FILE).display()))
        })?;
        optim = optim.load_record(record);
        run.truncate_metrics(*step)?;
        let saved = dir.join(ROLLOUTS_FILE);
        if saved.exists() && world == 1 {
            let text = std::fs::read_to_string(&saved)
                .map_err(|e| TrainerError::Input(format!("{}: {e}", saved.display())))?;
            rollouts = Some(
                serde_json::from_str(&text)
                    .map_err(|e| TrainerError::Input(format!("{}: {e}", saved.display())))?,
            );
        }
    }

    let bar = if progress && dp.is_main() {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let base_name = base.display().to_string();
    let save_state = |dir: &Path,
                      model: &Llama,
                      optim: &ModuleOptimizer,
                      state: &TrainerState,
                      rollouts: Option<&Rollouts>,
                      last: bool|
     -> Result<()> {
        if !all_finite(model) {
            return Err(TrainerError::Diverged(format!(
                "{}: refusing to write weights holding NaN or infinite values",
                dir.display()
            )));
        }
        save_weights(dir, &setup, model, &base_name, last)?;
        if let Some(r) = rollouts {
            let text = serde_json::to_string(r).unwrap_or_default();
            checkpoints::write_text(&dir.join(ROLLOUTS_FILE), &text)?;
        }
        save_optimizer(optim, &dir.join(OPTIMIZER_FILE))?;
        let text = serde_json::to_string(state).unwrap_or_default();
        checkpoints::write_text(&dir.join(STATE_FILE), &text)?;
        Ok(())
    };
    let run_eval = |model: &Llama, step: usize, epoch: f64| -> Result<Option<(f64, Metrics)>> {
        let valid = model.valid();
        let got = evaluate(
            &dp,
            &method,
            &valid,
            &eval_batches,
            &sets.eval,
            reference,
            pad,
            &inner,
        )?;
        if let Some((loss, m, tokens)) = &got {
            log_eval(&run, &method, *loss, m, *tokens, step, epoch)?;
        }
        Ok(got.map(|(l, m, _)| (l, m)))
    };

    let TrainerState {
        global_step: mut step,
        mut epoch,
        next_micro: mut skip_micro,
        next_iteration: mut skip_iteration,
        mut seen_tokens,
        mut first_loss,
        mut history,
        mut eval_history,
        mut skipped_steps,
    } = state;
    let mut bad_streak = 0usize;
    // A stop signal seen by any rank, acted on at the next checkpoint opportunity.
    let mut pending_signal: Option<i32> = None;
    let mut epoch_f;
    let started = Instant::now();
    bar.set_position(step as u64);
    'epochs: loop {
        let batches = epoch_micro_batches(recipe, &sets.train, epoch, pad)?;
        // Each step's group of micro-batches spans every rank, `per_step` each in rank
        // order, and is used once per iteration. A resumed epoch starts where the
        // checkpoint left it, whatever world size wrote it.
        let start = skip_micro.min(batches.len());
        let span = per_step * world;
        let groups: Vec<(usize, &[Micro], usize)> = batches[start..]
            .chunks(span)
            .enumerate()
            .flat_map(|(k, g)| (0..iterations).map(move |i| (start + k * span, g, i)))
            .skip(skip_iteration)
            .collect();
        let step_at_epoch_start = step;
        let resumed_mid_epoch = start > 0 || skip_iteration > 0;
        for &(offset, whole, iteration) in &groups {
            let group = shard(whole, per_step, rank);
            device.seed(step_seed(t.seed, step));
            let mut outs = Vec::new();
            let mut step_metrics = Metrics::default();
            match (&mut grpo, group) {
                (Some(grpo), [] | [Micro::Prompts(_)]) => {
                    let idx: &[usize] = match group {
                        [Micro::Prompts(idx)] => idx,
                        _ => &[],
                    };
                    if iteration == 0 || rollouts.is_none() {
                        let r = grpo.rollout(
                            &dp,
                            &model.valid(),
                            reference,
                            prompts,
                            idx,
                            step_seed(t.seed, step)
                                ^ SAMPLER_SEED
                                ^ (rank as u64).wrapping_mul(RANK_SEED),
                            t.per_device_train_batch_size,
                            pad,
                            &inner,
                        )?;
                        if grpo.settings.log_completions {
                            for line in grpo.completion_lines(step + 1, &r, prompts) {
                                run.append(COMPLETIONS_FILE, &line)?;
                            }
                        }
                        rollouts = Some(r);
                    }
                    let r = rollouts.as_ref().ok_or_else(|| {
                        TrainerError::Input("internal: GRPO step without samples".into())
                    })?;
                    step_metrics = r.metrics();
                    outs = grpo.micro_losses(
                        &model,
                        r,
                        prompts,
                        t.per_device_train_batch_size,
                        pad,
                        &device,
                    )?;
                }
                _ => {
                    for (j, micro) in group.iter().enumerate() {
                        device.seed(micro_seed(t.seed, step, rank * per_step + j));
                        if let Some(o) = micro_loss(
                            &method,
                            &model,
                            micro,
                            &sets.train,
                            reference,
                            pad,
                            &device,
                        )? {
                            outs.push(o);
                        }
                    }
                }
            }
            let reuse_next = iteration + 1 < iterations;
            // Every rank's outcomes in global order: the shares, the loss and the metrics
            // come out as one process holding the whole group computes them.
            let local: Vec<StepOutcome> = outs
                .iter()
                .map(|o| StepOutcome {
                    loss: scalar(o.loss.clone()),
                    weight: o.weight,
                    tokens: o.tokens,
                    metrics: o.metrics.clone(),
                })
                .collect();
            let all =
                crate::dist::outcomes::gather(&dp, &local, crate::signals::take(), &step_metrics)?;
            pending_signal = pending_signal.or(all.signal);
            if all.outcomes.is_empty() {
                continue;
            }
            let weights: Vec<f64> = all.outcomes.iter().map(|o| o.weight).collect();
            let shares = shares(&weights);
            let (mut loss_sum, mut metrics) = (0.0, Metrics::default());
            for (o, share) in all.outcomes.iter().zip(&shares) {
                loss_sum += o.loss * share;
                metrics.accumulate(&o.metrics, *share);
                seen_tokens += o.tokens;
            }
            let mut accumulator = GradientsAccumulator::new();
            for (o, share) in outs.into_iter().zip(&shares[all.first_local..]) {
                let grads =
                    GradientsParams::from_grads(o.loss.mul_scalar(*share).backward(), &model);
                accumulator.accumulate(&model, grads);
            }
            for (name, value, combine) in all.step_metrics.0 {
                metrics.push(name, value, combine);
            }
            let mut grads = accumulator.grads();
            crate::dist::grads::all_reduce(&dp, &model, &mut grads, &inner)?;
            let grad_norm = clip_global_norm(&model, &mut grads, t.max_grad_norm);
            let lr = t.learning_rate * lr_factor(&t.lr_scheduler_type, step, warmup, total);
            // A non-finite loss or gradient skips the update, so bad values never reach the
            // weights; too many in a row stop the run.
            let bad = non_finite(loss_sum, grad_norm);
            let finite = bad.is_none();
            if finite {
                model = optim.step(lr, model, grads);
                bad_streak = 0;
            } else {
                bad_streak += 1;
                skipped_steps += 1;
            }
            step += 1;
            epoch_f =
                epoch as f64 + (step - epoch * steps_per_epoch) as f64 / steps_per_epoch as f64;
            if let Some(what) = bad {
                run.log(&json!({
                    "step": step, "epoch": epoch_f, "skipped_step": true,
                    "skipped_steps": skipped_steps,
                }))?;
                if bad_streak >= t.max_bad_steps.max(1) {
                    let last = run
                        .latest_checkpoint(&required)
                        .map_or("none".to_string(), |(_, d)| d.display().to_string());
                    return Err(TrainerError::Diverged(format!(
                        "step {step}: the {what} was NaN or infinite for {bad_streak} consecutive steps, so training stopped (those updates were skipped); last good checkpoint: {last}"
                    )));
                }
            } else if step == 1 || first_loss.is_nan() {
                first_loss = loss_sum;
            }
            if finite {
                history.push((step, loss_sum));
            }
            if finite && (step % t.logging_steps.max(1) == 0 || step == total) {
                let mut line = json!({
                    "loss": loss_sum, "learning_rate": lr, "grad_norm": grad_norm,
                    "num_tokens": seen_tokens, "epoch": epoch_f, "step": step,
                });
                for (name, value, _) in &metrics.0 {
                    line[name.as_ref()] = json!(value);
                }
                run.log(&line)?;
            }
            let tps = seen_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_position(step as u64);
            // GRPO's loss says little; its mean reward is what a user watches.
            let reward = metrics
                .get("reward")
                .map_or(String::new(), |r| format!(" reward {r:.3}"));
            bar.set_message(format!(
                "loss {loss_sum:.4}{reward} lr {lr:.2e} {tps:.0} tok/s"
            ));
            let eval_now = t.eval_steps > 0 && step % t.eval_steps == 0 && step < total;
            if eval_now && let Some((loss, _)) = run_eval(&model, step, epoch_f)? {
                eval_history.push((step, loss));
            }
            let signal = pending_signal.take().filter(|_| step < total);
            if (t.save_steps > 0 && step % t.save_steps == 0 && step < total) || signal.is_some() {
                // The position after this group; the end of an epoch is the next one's start.
                let (e, m, i) = if reuse_next {
                    (epoch, offset, iteration + 1)
                } else if offset + whole.len() >= batches.len() {
                    (epoch + 1, 0, 0)
                } else {
                    (epoch, offset + whole.len(), 0)
                };
                let snapshot = TrainerState {
                    global_step: step,
                    epoch: e,
                    next_micro: m,
                    next_iteration: i,
                    seen_tokens,
                    first_loss,
                    history: history.clone(),
                    eval_history: eval_history.clone(),
                    skipped_steps,
                };
                // Samples for the iterations still to come are saved only in one process:
                // they are each rank's own, and rank 0 writes alone. A data-parallel run
                // resumed between iterations samples again.
                let pending = if reuse_next && world == 1 {
                    rollouts.as_ref()
                } else {
                    None
                };
                let dir = run
                    .checkpoint(step, t.save_total_limit, |dir| {
                        save_state(dir, &model, &optim, &snapshot, pending, false)
                    })
                    .map_err(|e| {
                        // Disk full, read-only output…: stop, and say what is still usable.
                        let last = run
                            .latest_checkpoint(&required)
                            .map_or("none".to_string(), |(_, d)| d.display().to_string());
                        TrainerError::Input(format!(
                            "writing checkpoint-{step} failed, training stopped: {e}; the last complete checkpoint is {last}"
                        ))
                    })?;
                run.plot(&history, &eval_history)?;
                if let Some(signal) = signal {
                    // No rank exits before rank 0 has written the checkpoint (a launcher
                    // tears the job down when the first one does).
                    dp.agree(true, "writing the checkpoint before stopping")?;
                    bar.finish_and_clear();
                    return Err(TrainerError::Interrupted {
                        signal,
                        step,
                        checkpoint: dir,
                    });
                }
            }
            if step >= total {
                break 'epochs;
            }
        }
        (skip_micro, skip_iteration) = (0, 0);
        if step == step_at_epoch_start && !resumed_mid_epoch {
            return Err(TrainerError::Input(format!(
                "{}: no batch has anything to learn from",
                recipe.data.train.display()
            )));
        }
        epoch += 1;
    }
    bar.finish_and_clear();
    let last_eval = run_eval(&model, step, epoch_f)?;
    if let Some((loss, _)) = &last_eval {
        eval_history.push((step, *loss));
    }
    let done = TrainerState {
        global_step: step,
        epoch,
        next_micro: 0,
        next_iteration: 0,
        seen_tokens,
        first_loss,
        history: history.clone(),
        eval_history: eval_history.clone(),
        skipped_steps,
    };
    run.finish(|dir| save_state(dir, &model, &optim, &done, None, true))?;
    run.plot(&history, &eval_history)?;
    run.log(&json!({
        "truncated": sets.counts.truncated, "dropped": sets.counts.dropped,
        "skipped_rows": sets.skipped_rows, "skipped_steps": skipped_steps,
        "train_runtime": started.elapsed().as_secs_f64(), "step": step,
    }))?;
    dp.agree(true, "writing the final weights")?;
    if sets.skipped_rows > 0 {
        eprintln!("skipped {} bad rows (skip_bad_rows)", sets.skipped_rows);
    }
    Ok(Outcome {
        steps: step,
        first_loss,
        last_loss: history.last().map_or(f64::NAN, |h| h.1),
        eval_loss: last_eval.as_ref().map(|e| e.0),
        eval_metrics: last_eval.map(|e| e.1).unwrap_or_default(),
    })
}

fn log_eval(
    run: &RunDir,
    method: &Method,
    loss: f64,
    metrics: &Metrics,
    tokens: usize,
    step: usize,
    epoch: f64,
) -> Result<()> {
    let mut line = json!({ "eval_loss": loss, "epoch": epoch, "step": step });
    if matches!(method, Method::Sft) {
        line["eval_perplexity"] = json!(loss.exp());
        line["eval_num_tokens"] = json!(tokens);
    }
    for (name, value, _) in &metrics.0 {
        line[format!("eval_{name}")] = json!(value);
    }
    run.log(&line)
}

#[cfg(test)]
mod tests {
    use super::lr_factor;

    #[test]
    fn schedules_follow_transformers() {
        // Warmup 2 of 10: 0, 0.5, then the decay.
        assert_eq!(lr_factor("linear", 0, 2, 10), 0.0);
        assert_eq!(lr_factor("linear", 1, 2, 10), 0.5);
        assert_eq!(lr_factor("linear", 2, 2, 10), 1.0);
        assert_eq!(lr_factor("linear", 6, 2, 10), 0.5);
        assert_eq!(lr_factor("linear", 10, 2, 10), 0.0);
        assert!((lr_factor("cosine", 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!(
            (lr_factor("cosine", 4, 2, 10) - (0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())))
                .abs()
                < 1e-12
        );
        assert_eq!(lr_factor("constant", 9, 2, 10), 1.0);
        assert_eq!(lr_factor("constant", 0, 0, 10), 1.0);
    }
}

#[cfg(test)]
mod resume_tests {
    use super::same_run;
    use crate::recipe::parse;

    const TEXT: &str =
        "[model]\npath = \"m\"\n[data]\ntrain = \"d.jsonl\"\n[train]\nlearning_rate = 0.01\n";

    /// A resume may change the accumulation and `[dist]` (another number of processes),
    /// nothing else; a run directory written before a key existed still resumes.
    #[test]
    fn resume_allows_only_what_another_world_size_changes() {
        let saved = parse(TEXT, "t", &[]).unwrap().to_toml();
        let with = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            parse(TEXT, "t", &sets).unwrap()
        };
        assert!(same_run(&saved, &with(&[]), "t"));
        assert!(same_run(
            &saved,
            &with(&["train.gradient_accumulation_steps=4", "dist.timeout_s=30"]),
            "t"
        ));
        assert!(!same_run(&saved, &with(&["train.learning_rate=0.02"]), "t"));
        assert!(!same_run(&saved, &with(&["train.bf16=true"]), "t"));
        // An older run's recipe.toml, without the [dist] section.
        let old: String = saved.split("\n[dist]").next().unwrap().to_string();
        assert_ne!(old, saved);
        assert!(same_run(&old, &with(&[]), "t"));
        assert!(!same_run("not toml", &with(&[]), "t"));
    }
}

#[cfg(test)]
mod optimizer_tests {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor, TensorData};

    use crate::model::{NewModel, init_model, load_model};
    use crate::recipe::TrainSection;

    /// With zero gradients AdamW's only update is decoupled decay, `θ ← θ(1 − lr·wd)`: the
    /// matrices shrink, the norms (rank-1) must not move.
    #[test]
    fn weight_decay_skips_norms_and_biases() {
        struct ZeroGrads(GradientsParams);
        impl ModuleVisitor for ZeroGrads {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0
                    .register::<D>(param.id, param.val().zeros_like().inner());
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        init_model(tmp.path(), &NewModel::default(), Default::default()).unwrap();
        let device = Device::flex().autodiff();
        let (_, model) = load_model(tmp.path(), &device).unwrap();
        let t = TrainSection {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut optim = super::optimizer(&t, &model);
        let mut zero = ZeroGrads(GradientsParams::new());
        model.visit(&mut zero);
        let host = |t: Tensor<1>| t.into_data().try_into_vec_as::<f32>().unwrap();
        let norm_before = host(model.norm.weight.val());
        let q_before = model.layers[0].self_attn.q_proj.weight.val();
        let model = optim.step(0.1, model, zero.0);
        assert_eq!(host(model.norm.weight.val()), norm_before);
        let q_after = model.layers[0].self_attn.q_proj.weight.val();
        let want = q_before.mul_scalar(1.0 - 0.1 * 0.5);
        let worst = (q_after - want)
            .abs()
            .max()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()[0];
        assert!(worst < 1e-7, "decayed matrices off by {worst}");
    }

    /// A single NaN in one gradient, with a finite loss, makes the global norm NaN, and the
    /// step is judged unsafe because of the gradient; clipping does not hide it.
    #[test]
    fn one_nan_gradient_element_marks_the_step_bad() {
        struct Grads(GradientsParams, bool);
        impl ModuleVisitor for Grads {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let mut g = param.val().ones_like().inner();
                if !self.1 {
                    // The first tensor gets a NaN in its first element only.
                    let mut v = vec![1f32; g.shape().num_elements()];
                    v[0] = f32::NAN;
                    g = Tensor::<D>::from_data(TensorData::new(v, g.dims()), &g.device());
                    self.1 = true;
                }
                self.0.register::<D>(param.id, g);
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        init_model(tmp.path(), &NewModel::default(), Default::default()).unwrap();
        let device = Device::flex().autodiff();
        let (_, model) = load_model(tmp.path(), &device).unwrap();
        let mut grads = Grads(GradientsParams::new(), false);
        model.visit(&mut grads);
        let norm = super::clip_global_norm(&model, &mut grads.0, 1.0);
        assert!(norm.is_nan(), "norm {norm}");
        assert_eq!(super::non_finite(0.7, norm), Some("gradient norm"));
        assert_eq!(super::non_finite(f64::INFINITY, norm), Some("loss"));
        assert_eq!(super::non_finite(0.7, 3.0), None);
        // Without the NaN the same gradients pass.
        let mut clean = Grads(GradientsParams::new(), true);
        model.visit(&mut clean);
        let norm = super::clip_global_norm(&model, &mut clean.0, 1.0);
        assert_eq!(super::non_finite(0.7, norm), None);
    }
}
