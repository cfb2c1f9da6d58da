//! Direct Preference Optimization against a reference policy: the objective, its
//! settings and the reference cache. The loss types' formulas are in
//! [`super::dpo_losses`].

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

pub use super::dpo_losses::{DpoLoss, DpoLossType};
use super::fits_f32;
use super::objective::{LossInput, MicroOutput, Objective, Prepare};
pub use super::pairs::PairLogps;
use super::pairs::Pairs;
use super::sequences::LogitsOver;
use super::{Metrics, preference_metrics, values};
use crate::examples::{Examples, Micro, Shape};
use crate::recipe::Recipe;
use crate::ref_cache::{RefCacheKey, default_cache_dir, precompute};
use crate::{Result, TrainerError};

/// `[dpo]`, with TRL's names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoSection {
    pub beta: f64,
    /// One of TRL's loss types (`sigmoid`, `ipo`, `hinge`, `robust`, `exo_pair`,
    /// `nca_pair`, `bco_pair`, `sppo_hard`, `aot`, `aot_unpaired`, `apo_zero`, `apo_down`,
    /// `discopop`, `sft`, `sigmoid_norm`), or a list of them added up with `loss_weights`.
    pub loss_type: LossTypes,
    /// One weight per loss type (default 1 each).
    pub loss_weights: Option<Vec<f64>>,
    pub label_smoothing: f64,
    /// DiscoPOP's τ.
    pub discopop_tau: f64,
    /// Compute the reference log-probs once before training and cache them on disk, keyed
    /// by a hash of the tokenised data and the model files.
    pub precompute_ref_log_probs: bool,
    /// Where that cache lives (default: `$XDG_CACHE_HOME/hearth/ref-logps`, else
    /// `~/.cache/hearth/ref-logps`).
    #[serde(deserialize_with = "data::config::optional_named_path")]
    pub ref_cache_dir: Option<PathBuf>,
}

impl Default for DpoSection {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_type: LossTypes::One("sigmoid".into()),
            loss_weights: None,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            precompute_ref_log_probs: false,
            ref_cache_dir: None,
        }
    }
}

/// `dpo.loss_type`: one name, or a list of them (TRL's multi-loss form). A list of one is
/// read as that one name, so a resume sees `["sigmoid"]` and `"sigmoid"` as the same loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, from = "WrittenLossTypes")]
pub enum LossTypes {
    One(String),
    Many(Vec<String>),
}

/// `dpo.loss_type` as written.
#[derive(Deserialize)]
#[serde(untagged, expecting = "expected a loss type name, or a list of names")]
enum WrittenLossTypes {
    One(String),
    Many(Vec<String>),
}

impl From<WrittenLossTypes> for LossTypes {
    fn from(w: WrittenLossTypes) -> Self {
        match w {
            WrittenLossTypes::One(n) => Self::One(n),
            WrittenLossTypes::Many(mut v) if v.len() == 1 => Self::One(v.remove(0)),
            WrittenLossTypes::Many(v) => Self::Many(v),
        }
    }
}

/// The largest weight a loss type may take in a list: far past any mixture's (MPO's are
/// 0.2 to 1), and far below the 1e19 at which a weighted loss stops fitting f32.
const MAX_LOSS_WEIGHT: f64 = 1e3;

/// The smallest DiscoPOP τ: the margin is divided by it, and below about 1e-18 that
/// overflowed f32 and every step was NaN (the paper's τ is 0.05).
const MIN_DISCOPOP_TAU: f64 = 1e-3;

impl LossTypes {
    fn names(&self) -> Vec<&str> {
        match self {
            Self::One(n) => vec![n.as_str()],
            Self::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// DPO with its parsed settings.
pub struct Dpo {
    loss: DpoLoss,
    section: DpoSection,
}

/// The registry's constructor: the `[dpo]` section (or its defaults), checked.
pub fn build(recipe: &Recipe) -> std::result::Result<Box<dyn Objective>, String> {
    let d = recipe.dpo.clone().unwrap_or_default();
    let names = d.loss_type.names();
    if names.is_empty() {
        return Err("dpo.loss_type is an empty list; name at least one loss type".into());
    }
    let kinds = names
        .iter()
        .map(|n| n.parse::<DpoLossType>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("dpo.loss_type: {e}"))?;
    let weights = match &d.loss_weights {
        None => vec![1.0; kinds.len()],
        Some(w) if w.len() != kinds.len() => {
            return Err(format!(
                "dpo.loss_weights has {} weights for {} loss types; give one per type",
                w.len(),
                kinds.len()
            ));
        }
        Some(w) => w.clone(),
    };
    if let Some(w) = weights
        .iter()
        .find(|w| w.is_nan() || w.abs() > MAX_LOSS_WEIGHT)
    {
        return Err(format!(
            "dpo.loss_weights: {} is not a weight from -{MAX_LOSS_WEIGHT} to {MAX_LOSS_WEIGHT}",
            crate::recipe::shown(*w)
        ));
    }
    if !(d.beta > 0.0 && fits_f32(d.beta)) {
        return Err(format!(
            "dpo.beta {} must be positive (and within f32)",
            crate::recipe::shown(d.beta)
        ));
    }
    // A smoothing no loss reads would change nothing.
    if d.label_smoothing != 0.0 && !kinds.iter().any(|k| k.reads_label_smoothing()) {
        return Err(format!(
            "dpo.label_smoothing {} is read by loss_type sigmoid, robust, exo_pair, aot and \
             aot_unpaired only, not {}",
            d.label_smoothing,
            names.join(", ")
        ));
    }
    if kinds.contains(&DpoLossType::ExoPair) && d.label_smoothing <= 0.0 {
        return Err(
            "dpo.loss_type exo_pair takes its ε from dpo.label_smoothing, which must be \
             positive (the EXO paper uses 1e-3): at 0 its loss is infinite"
                .into(),
        );
    }
    if !(d.discopop_tau >= MIN_DISCOPOP_TAU && fits_f32(d.discopop_tau)) {
        return Err(format!(
            "dpo.discopop_tau {} must be from {MIN_DISCOPOP_TAU} (and within f32)",
            crate::recipe::shown(d.discopop_tau)
        ));
    }
    if d.ref_cache_dir.is_some() && !d.precompute_ref_log_probs {
        return Err(
            "dpo.ref_cache_dir keeps precomputed reference log-probs; it needs \
             dpo.precompute_ref_log_probs = true"
                .into(),
        );
    }
    if !(0.0..0.5).contains(&d.label_smoothing) {
        return Err(format!(
            "dpo.label_smoothing {} must be in [0, 0.5)",
            d.label_smoothing
        ));
    }
    let loss = DpoLoss {
        terms: kinds.into_iter().zip(weights).collect(),
        beta: d.beta,
        label_smoothing: d.label_smoothing,
        discopop_tau: d.discopop_tau,
    };
    Ok(Box::new(Dpo { loss, section: d }))
}

impl Objective for Dpo {
    fn name(&self) -> &'static str {
        "dpo"
    }

    fn shape(&self) -> Shape {
        Shape::Pairs
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn summary_keys(&self) -> &'static [&'static str] {
        &["rewards/accuracies", "rewards/margins"]
    }

    /// With `precompute_ref_log_probs`, the reference's log-probs of every pair come from
    /// the on-disk cache (computed into it on a miss), so no step runs the reference.
    fn prepare(&mut self, cx: Prepare) -> Result<()> {
        let (Some(r), true) = (cx.reference, self.section.precompute_ref_log_probs) else {
            return Ok(());
        };
        let dir = self
            .section
            .ref_cache_dir
            .clone()
            .unwrap_or_else(default_cache_dir);
        check_cache_dir(&dir)?;
        let key = RefCacheKey::new(cx.base, cx.lora_init, cx.precision)?;
        for set in [cx.train, cx.eval] {
            if let Examples::Pairs(pairs) = set {
                precompute(r, pairs, cx.pad, cx.batch_size, &key, &dir)?;
            }
        }
        Ok(())
    }

    fn loss(&self, input: &LossInput, micro: &Micro) -> Result<Option<MicroOutput>> {
        let Some(pairs) = Pairs::gather(input, micro, self.name())? else {
            return Ok(None);
        };
        let n = pairs.batch.pairs;
        let cached: Option<Vec<(f64, f64)>> = pairs.items.iter().map(|p| p.reference).collect();
        let reference_logps = match cached {
            Some(cached) => cached,
            None => input
                .reference
                .ok_or_else(|| TrainerError::Input("internal: DPO without a reference".into()))?
                .logps(&pairs.tokens, input.pad),
        };
        let (policy, _) = pairs.policy_with_stats(input, LogitsOver::CompletionTokens);
        let host = |f: fn(&(f64, f64)) -> f64| {
            let v: Vec<f32> = reference_logps.iter().map(|x| f(x) as f32).collect();
            Tensor::<1>::from_data(TensorData::new(v, [n]), input.device)
        };
        let reference = PairLogps {
            chosen: host(|x| x.0),
            rejected: host(|x| x.1),
            chosen_len: policy.chosen_len.clone(),
            rejected_len: policy.rejected_len.clone(),
            tokens: None,
        };
        Ok(Some(
            pairs.output(dpo_loss(&self.loss, &policy, &reference)),
        ))
    }
}

/// The DPO loss of `loss`'s types over the micro-batch's pairs, and TRL's metrics.
pub fn dpo_loss(loss: &DpoLoss, policy: &PairLogps, reference: &PairLogps) -> (Tensor<1>, Metrics) {
    let beta = loss.beta;
    let loss = loss.loss(policy, reference);

    // The metrics read the summed log-probs whatever the loss averages, as TRL's do: IPO
    // length-averages only inside its loss.
    let summed = |p: &Tensor<1>, r: &Tensor<1>| {
        values((p.clone().detach() - r.clone().detach()).mul_scalar(beta))
    };
    let chosen_rewards = summed(&policy.chosen, &reference.chosen);
    let rejected_rewards = summed(&policy.rejected, &reference.rejected);
    let mut m = preference_metrics(
        &chosen_rewards,
        &rejected_rewards,
        policy.chosen.clone(),
        policy.rejected.clone(),
    );
    // TRL's DPO averages the logits over the completion tokens, which are the positions
    // read here, and its token accuracy over the chosen ones.
    if let Some(t) = policy.tokens {
        t.log(&mut m);
    }
    (loss, m)
}

/// The reference cache's directory takes files named by hash: refused, before the
/// reference runs, where that is a file or a model's or adapter's own directory.
fn check_cache_dir(dir: &Path) -> Result<()> {
    let bad = |why: &str| {
        Err(TrainerError::Input(format!(
            "{}: dpo.ref_cache_dir {why}; choose a directory of its own",
            dir.display()
        )))
    };
    if dir.exists() && !dir.is_dir() {
        return bad("is not a directory");
    }
    if checkpoints::guard::holds_checkpoint(dir) {
        return bad("holds a model or an adapter");
    }
    // Anything but cache files (`<model hash>-<pairs hash>.json`, or one being written)
    // means the directory is another's: a run's, a pipeline's, the data's.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_cache_file(&name) {
                return bad(&format!(
                    "holds `{name}`, which is not a reference cache file"
                ));
            }
        }
    }
    Ok(())
}

/// Whether `name` is a reference cache file's (or its temporary file's while written).
fn is_cache_file(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() >= 38
        && bytes[..33].iter().enumerate().all(|(i, b)| {
            if i == 16 {
                *b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        })
        && name[33..].starts_with(".json")
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, logps, ls};
    use super::*;

    /// The cache never lands in a model's directory or on a file, and takes a new or
    /// existing directory of its own.
    #[test]
    fn the_reference_cache_needs_a_directory_of_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "").unwrap();
        for (dir, want) in [(&model, "holds a model"), (&file, "not a directory")] {
            let e = check_cache_dir(dir).unwrap_err().to_string();
            assert!(e.contains("dpo.ref_cache_dir") && e.contains(want), "{e}");
        }
        check_cache_dir(&tmp.path().join("new")).unwrap();
        // A directory of its own, cache files in it, takes more; one holding anything else
        // (a run's recipe, data) is another's.
        let cache = tmp.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        std::fs::write(cache.join("0123456789abcdef-fedcba9876543210.json"), "{}").unwrap();
        check_cache_dir(&cache).unwrap();
        let e = check_cache_dir(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("is not a reference cache file"), "{e}");
    }

    /// Two pairs; policy − reference log-ratios are (+1, −1) and (−0.5, +0.25).
    fn case() -> (PairLogps, PairLogps) {
        (
            logps(&[-10.0, -20.5], &[-12.0, -8.75], &[4.0, 5.0], &[2.0, 3.0]),
            logps(&[-11.0, -20.0], &[-11.0, -9.0], &[4.0, 5.0], &[2.0, 3.0]),
        )
    }

    fn scalar(x: Tensor<1>) -> f64 {
        values(x)[0]
    }

    #[test]
    fn sigmoid_with_label_smoothing_matches_the_formula() {
        let (p, r) = case();
        let (beta, eps) = (0.1, 0.2);
        let (loss, m) = dpo_loss(&DpoLoss::single(DpoLossType::Sigmoid, beta, eps), &p, &r);
        // Δ = β(h): h1 = 1 − (−1) = 2, h2 = −0.5 − 0.25 = −0.75.
        let d = [beta * 2.0, beta * -0.75];
        let want = d
            .iter()
            .map(|&d| -(1.0 - eps) * ls(d) - eps * ls(-d))
            .sum::<f64>()
            / 2.0;
        close(scalar(loss), want, 1e-6);
        close(
            m.get("rewards/chosen").unwrap(),
            (0.1 * 1.0 + 0.1 * -0.5) / 2.0,
            1e-6,
        );
        close(
            m.get("rewards/rejected").unwrap(),
            (-0.1 + 0.1 * 0.25) / 2.0,
            1e-6,
        );
        close(m.get("rewards/accuracies").unwrap(), 0.5, 0.0);
        close(m.get("rewards/margins").unwrap(), (0.2 - 0.075) / 2.0, 1e-6);
        close(m.get("logps/chosen").unwrap(), -15.25, 1e-6);
        close(m.get("logps/rejected").unwrap(), -10.375, 1e-6);
    }

    #[test]
    fn ipo_uses_length_averaged_log_ratios() {
        let (p, r) = case();
        let beta = 0.5;
        let (loss, m) = dpo_loss(&DpoLoss::single(DpoLossType::Ipo, beta, 0.0), &p, &r);
        let h1 = 1.0 / 4.0 - (-1.0) / 2.0;
        let h2 = -0.5 / 5.0 - 0.25 / 3.0;
        let want = ((h1 - 1.0) * (h1 - 1.0) + (h2 - 1.0) * (h2 - 1.0)) / 2.0;
        close(scalar(loss), want, 1e-6);
        // The metrics stay on the summed log-probs, as TRL logs them for IPO too.
        close(
            m.get("rewards/chosen").unwrap(),
            beta * (1.0 - 0.5) / 2.0,
            1e-6,
        );
        close(
            m.get("rewards/rejected").unwrap(),
            beta * (-1.0 + 0.25) / 2.0,
            1e-6,
        );
        close(m.get("logps/chosen").unwrap(), -15.25, 1e-6);
    }

    #[test]
    fn hinge_and_robust_match_the_formulas() {
        let (p, r) = case();
        let beta = 2.0;
        let (loss, _) = dpo_loss(&DpoLoss::single(DpoLossType::Hinge, beta, 0.0), &p, &r);
        let want = ((1.0f64 - 4.0).max(0.0) + (1.0f64 + 1.5).max(0.0)) / 2.0;
        close(scalar(loss), want, 1e-6);
        let eps = 0.1;
        let (loss, _) = dpo_loss(&DpoLoss::single(DpoLossType::Robust, beta, eps), &p, &r);
        let want = [4.0, -1.5]
            .iter()
            .map(|&d: &f64| (-(1.0 - eps) * ls(d) + eps * ls(-d)) / (1.0 - 2.0 * eps))
            .sum::<f64>()
            / 2.0;
        close(scalar(loss), want, 1e-6);
    }

    #[test]
    fn extreme_log_probs_stay_finite() {
        let p = logps(&[-1e-3, -5e4], &[-5e4, -1e-3], &[1.0, 900.0], &[900.0, 1.0]);
        let r = logps(&[-3e4, -1.0], &[-1.0, -3e4], &[1.0, 900.0], &[900.0, 1.0]);
        for kind in [
            DpoLossType::Sigmoid,
            DpoLossType::Ipo,
            DpoLossType::Hinge,
            DpoLossType::Robust,
        ] {
            let (loss, m) = dpo_loss(&DpoLoss::single(kind, 0.1, 0.1), &p, &r);
            let v = scalar(loss);
            assert!(v.is_finite(), "{kind:?}: {v}");
            assert!(m.0.iter().all(|x| x.1.is_finite()), "{kind:?}: {m:?}");
        }
        // Δ = 0.1·(3e4 + 5e4 ...) is huge: the sigmoid loss is ≈ 0 on the first pair and
        // ≈ |Δ| on the second, not inf.
        let (loss, _) = dpo_loss(&DpoLoss::single(DpoLossType::Sigmoid, 0.1, 0.0), &p, &r);
        let d = 0.1 * ((-1e-3 + 3e4) - (-5e4 + 1.0));
        close(scalar(loss), (ls(d) + ls(-d)) / -2.0, 1e-5);
    }
}
