//! Everything before the first step: the run directory, the trained model with its
//! adapters and reference, and the optimizer.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use checkpoints::ModelConfig;

use crate::model::adapter::{LoraSettings, attach_lora, load_adapter};
use crate::model::precision::Precision;
use crate::model::quantized::Quantization;
use crate::model::with_precision;
use crate::model::{Llama, NewModel, init_model, load_model, load_model_with, with_score_head};
use crate::objectives::{Objective, Reference};
use crate::recipe::Recipe;
use crate::run_dir::RunDir;
use crate::{Result, TrainerError};

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
    /// The base checkpoint, named in adapters and copied from (tokenizer, template).
    pub base: PathBuf,
    /// The built-in template the recipe trained with (`data.template`), which a checkpoint
    /// that carries the tokenizer carries too, in place of the base's.
    pub template: Option<String>,
}

/// Builds the trained model: base (+ score head for reward) with fresh adapters, the
/// recipe's `init_from` adapter, or the checkpoint being resumed; and the DPO reference,
/// which is the initial policy — the base with adapters off, a frozen copy of the initial
/// adapter, or the initial full weights.
pub fn setup(
    recipe: &Recipe,
    objective: &dyn Objective,
    device: &Device,
    resume_from: Option<&Path>,
    pad: u32,
) -> Result<Setup> {
    let quant = Quantization::new(recipe.model.quantize, &recipe.model.quantize_skip)
        .with_embeddings(recipe.model.quantize_embeddings);
    let (config, mut base) = load_model_with(&recipe.model.path, device, &quant)?;
    let reward = objective.needs_score_head();
    if reward {
        if let Some(labels) = config.score_labels {
            crate::model::one_label(&recipe.model.path.display().to_string(), labels)?;
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
            let settings = lora.settings();
            let initial = match &lora.init_from {
                Some(dir) => Some(load_adapter(dir, base.clone(), device).map_err(|e| {
                    let e = e.to_string();
                    // A missing or foreign directory's error names a file, not the key.
                    if e.contains("lora.init_from") {
                        TrainerError::Input(e)
                    } else {
                        TrainerError::Input(format!("lora.init_from: {e}"))
                    }
                })?),
                None => None,
            };
            // A reward model's adapter brings its score head and drops the LM head: nothing
            // a language-model method could train or save as one.
            if let (Some(dir), Some((loaded, _))) = (&lora.init_from, &initial)
                && !reward
                && loaded.score.is_some()
            {
                return Err(TrainerError::Input(format!(
                    "lora.init_from {}: a reward model's adapter (task_type SEQ_CLS, with a \
                     score head), but train.method = \"{}\" trains a language model; start \
                     from a language model's adapter",
                    dir.display(),
                    recipe.train.method
                )));
            }
            let reference = match (objective.needs_reference(), &initial) {
                (true, Some((m, _))) => Some(m.clone().no_grad()),
                (true, None) => Some(base.clone().no_grad()),
                (false, _) => None,
            };
            // A checkpoint's adapter is the initial adapter's shape, not necessarily the
            // recipe's (see `adapter_warnings`): its own config says what it is.
            let (model, settings) = match (resume_from, initial) {
                (Some(dir), _) => load_adapter(dir, base, device)?,
                (None, Some(loaded)) => loaded,
                (None, None) => (attach_lora(base, &settings, device)?, settings),
            };
            (model, reference, Tuning::Lora(settings))
        }
        None => {
            let reference = objective.needs_reference().then(|| base.clone().no_grad());
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
        base: recipe.model.path.clone(),
        template: recipe.data.template.clone(),
    })
}

/// Where a `lora.init_from` adapter differs from the recipe's `[lora]` shape. The adapter is
/// trained as it is (its weights fix its rank and targets; a DPO recipe continuing an SFT
/// adapter that also adapts `lm_head` is the usual case), so each difference is said before
/// the run rather than left for the user to find in the saved `adapter_config.json`.
pub(super) fn adapter_warnings(recipe: &Recipe, setup: &Setup) -> Vec<String> {
    let (Some(lora), Tuning::Lora(used)) = (&recipe.lora, &setup.tuning) else {
        return Vec::new();
    };
    let Some(dir) = &lora.init_from else {
        return Vec::new();
    };
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    let layers = |l: &Option<Vec<usize>>| match l {
        Some(layers) => format!("{:?}", checkpoints::peft::distinct_layers(layers.clone())),
        None => "all".to_string(),
    };
    let mut differ = Vec::new();
    let mut key = |name: &str, adapter: String, recipe: String| {
        if adapter != recipe {
            differ.push(format!("{name} {adapter} (recipe: {recipe})"));
        }
    };
    key("r", used.r.to_string(), lora.r.to_string());
    key("alpha", used.lora_alpha.to_string(), lora.alpha.to_string());
    key(
        "dropout",
        used.lora_dropout.to_string(),
        lora.dropout.to_string(),
    );
    key(
        "rslora",
        used.use_rslora.to_string(),
        lora.rslora.to_string(),
    );
    key(
        "targets",
        format!("{:?}", sorted(&used.target_modules)),
        format!("{:?}", sorted(&lora.targets)),
    );
    key(
        "layers_to_transform",
        layers(&used.layers_to_transform),
        layers(&lora.layers_to_transform),
    );
    if differ.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "lora.init_from {} is trained with its own settings, which differ from [lora]: {}",
        dir.display(),
        differ.join("; ")
    )]
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

/// The `[dist]` settings of `recipe`, for [`Group::from_env`].
pub fn dist_options(recipe: &Recipe) -> crate::dist::Options {
    let d = &recipe.dist;
    crate::dist::Options {
        backend: d.backend.to_string(),
        timeout: std::time::Duration::from_secs_f64(d.timeout_s),
        bucket_bytes: (d.bucket_mb * 1e6) as usize,
        cuda: recipe.train.device.starts_with("cuda"),
    }
}

/// Opens (to resume) or creates the run directory, and makes the recipe's base model when
/// it is to be created and missing. Rank 0's part of starting a run.
pub(super) fn start_run(recipe: &Recipe, out: &Path, resume: bool) -> Result<RunDir> {
    // Before anything is written: a run inside a checkpoint it reads (its base, the adapter
    // it starts from, a reward or client model) would land its files among the model's,
    // and a run holding one would overwrite it with its saves.
    for (key, input) in recipe.checkpoints() {
        checkpoints::guard::check_not_within(out, input)?;
        checkpoints::guard::check_not_holding(out, input, &key)?;
    }
    let run = if resume {
        let run = RunDir::open(out)?;
        let path = out.join(crate::run_dir::RECIPE_FILE);
        let saved = std::fs::read_to_string(&path)
            .map_err(|e| TrainerError::Input(format!("{}: {e}", path.display())))?;
        if let Err(e) = crate::recipe::parse(&saved, &path.display().to_string(), &[]) {
            return Err(TrainerError::Input(format!(
                "the run's recipe is unreadable, so it cannot be resumed: {e}"
            )));
        }
        if let Err(difference) = same_run(&saved, recipe, &path.display().to_string()) {
            return Err(TrainerError::Input(format!(
                "{}: this recipe (with its --set overrides) differs from the one the run started with ({difference}); resume needs the same (only train.gradient_accumulation_steps, train.progress_seconds and [dist] may change)",
                path.display()
            )));
        }
        run
    } else {
        let run = RunDir::create(out, is_resolved_recipe)?;
        run.write_recipe(&recipe.to_toml())?;
        run
    };
    let base = &recipe.model.path;
    let present = base.join(checkpoints::names::CONFIG).exists()
        || checkpoints::gguf::locate(base)?.is_some();
    if !present && recipe.model.create_if_missing {
        init_model(
            base,
            &NewModel {
                seed: recipe.train.seed,
                ..Default::default()
            },
            Default::default(),
        )
        .map_err(|e| {
            TrainerError::Input(format!(
                "model.path (a new model, as model.create_if_missing = true): {e}"
            ))
        })?;
    }
    Ok(run)
}

/// Whether `text` is a recipe as hearth writes it into a run (resolved, every key, no
/// comments): a `recipe.toml` left by a run that failed before its first step, not a user's.
fn is_resolved_recipe(text: &str) -> bool {
    crate::recipe::parse(text, "recipe.toml", &[]).is_ok_and(|r| r.to_toml() == text)
}

/// Whether `recipe` continues the run whose resolved recipe is `saved`: the same but for
/// what a resume on another number of processes changes — the accumulation steps (which
/// keep the global batch) and the `[dist]` settings.
pub(super) fn same_run(
    saved: &str,
    recipe: &Recipe,
    origin: &str,
) -> std::result::Result<(), String> {
    let before = crate::recipe::parse(saved, origin, &[]).map_err(|e| e.to_string())?;
    let mut now = recipe.clone();
    now.train.gradient_accumulation_steps = before.train.gradient_accumulation_steps;
    // Another number of processes, and how often progress is printed, change no result.
    now.dist = before.dist.clone();
    now.train.progress_seconds = before.train.progress_seconds;
    // Both through today's schema, so keys a run from an older hearth lacks read as their
    // defaults rather than as a difference.
    let table = |r: &Recipe| toml::from_str::<toml::Table>(&r.to_toml()).unwrap_or_default();
    match first_difference(&table(&before), &table(&now), "") {
        None => Ok(()),
        Some((key, was, is)) => Err(format!("`{key}` was {was}, now {is}")),
    }
}

/// The first dotted key whose value differs between `a` and `b`, with both values
/// (`unset` where a key is missing).
fn first_difference(
    a: &toml::Table,
    b: &toml::Table,
    prefix: &str,
) -> Option<(String, String, String)> {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter().find_map(|k| {
        let key = format!("{prefix}{k}");
        match (a.get(k), b.get(k)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                first_difference(x, y, &format!("{key}."))
            }
            (x, y) if x == y => None,
            (x, y) => {
                let shown =
                    |v: Option<&toml::Value>| v.map_or("unset".to_string(), |v| v.to_string());
                Some((key, shown(x), shown(y)))
            }
        }
    })
}

/// The run directory: rank 0 opens or creates it (and the base model, when it is to be
/// made); the other ranks only follow, and all agree before going on.
pub(super) fn open_run(
    dp: &crate::dist::Group,
    recipe: &Recipe,
    out: &Path,
    resume: bool,
) -> Result<RunDir> {
    let prepared = if dp.is_main() {
        start_run(recipe, out, resume)
    } else {
        Ok(RunDir::follower(out))
    };
    dp.agree(prepared.is_ok(), "starting the run")?;
    prepared
}

/// The training (autodiff) device, seeded, with the recipe's kernels. Under a launcher, a
/// plain `cuda` is this process's GPU: the local rank's.
pub(super) fn device(recipe: &Recipe, dp: &crate::dist::Group) -> Result<Device> {
    let t = &recipe.train;
    kernels::set_kernels(t.kernels.into());
    kernels::set_attention_path(t.attention.into());
    let name = if dp.world_size() > 1 && t.device == "cuda" {
        format!("cuda:{}", dp.local_rank)
    } else {
        t.device.clone()
    };
    let mut device = crate::device::parse(&name)?.autodiff();
    if t.gradient_checkpointing {
        device = device.gradient_checkpointing();
    }
    device.seed(t.seed);
    Ok(device)
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
        assert!(same_run(&saved, &with(&[]), "t").is_ok());
        assert!(
            same_run(
                &saved,
                &with(&[
                    "train.gradient_accumulation_steps=4",
                    "dist.timeout_s=30",
                    "train.progress_seconds=3",
                ]),
                "t"
            )
            .is_ok()
        );
        // What differs is named, with both values.
        assert_eq!(
            same_run(&saved, &with(&["train.learning_rate=0.02"]), "t").unwrap_err(),
            "`train.learning_rate` was 0.01, now 0.02"
        );
        assert_eq!(
            same_run(&saved, &with(&["train.bf16=true"]), "t").unwrap_err(),
            "`train.bf16` was false, now true"
        );
        assert_eq!(
            same_run(&saved, &with(&["data.train=\"./d.jsonl\""]), "t").unwrap_err(),
            "`data.train` was \"d.jsonl\", now \"./d.jsonl\""
        );
        // An older run's recipe.toml, without the [dist] section.
        let old: String = saved.split("\n[dist]").next().unwrap().to_string();
        assert_ne!(old, saved);
        assert!(same_run(&old, &with(&[]), "t").is_ok());
        assert!(same_run("not toml", &with(&[]), "t").is_err());
    }
}
