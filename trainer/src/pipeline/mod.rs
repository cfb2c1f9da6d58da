//! Pipelines: several recipes run in order, each stage able to start from what an earlier
//! one wrote — SFT, then a reward model, then DPO from the SFT adapter, then GRPO from the
//! DPO adapter scored by that reward model — ending with a short report.
//!
//! A pipeline file lists `[[stage]]`s, each a recipe (relative to the pipeline file) with
//! `--set`-style overrides in which `{out}` is the pipeline's directory and `{NAME}` the run
//! directory of the earlier stage called NAME.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dist::Group;
use crate::recipe::Recipe;
use crate::run_dir::{FINAL_DIR, METRICS_FILE, RECIPE_FILE, RunDir, read_metrics};
use crate::train::{Outcome, train};
use crate::{Result, TrainerError};

mod report;
use report::{clipped_ratio, distinct_2, figures, length_gaming, replies};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Overrides for every stage, before each stage's own.
    #[serde(default)]
    pub set: Vec<String>,
    pub stage: Vec<Stage>,
    #[serde(default)]
    pub report: ReportSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// The stage's run directory under the pipeline's: `{out}/{name}`.
    pub name: String,
    pub recipe: PathBuf,
    #[serde(default)]
    pub set: Vec<String>,
}

/// The pipeline's report, in its output directory.
pub const REPORT_FILE: &str = "report.md";

/// `[report]`: sample generations before and after. Off unless `samples` > 0, because a
/// report is printed and prompts may be sensitive.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportSection {
    /// A prompt file (prompt-only rows, or any format with a prompt).
    pub prompts: Option<PathBuf>,
    pub samples: usize,
    pub max_new_tokens: usize,
}

impl Default for ReportSection {
    fn default() -> Self {
        Self {
            prompts: None,
            samples: 0,
            max_new_tokens: 32,
        }
    }
}

/// One stage's result.
#[derive(Debug, Clone)]
pub struct StageReport {
    pub name: String,
    pub method: String,
    pub outcome: Outcome,
    /// The headline figures: name, and value (or first → last for a trend).
    pub figures: Vec<(String, String)>,
}

/// What a pipeline ran, and the report text.
#[derive(Debug, Clone)]
pub struct PipelineReport {
    pub stages: Vec<StageReport>,
    pub text: String,
}

/// Reads a pipeline file.
pub fn load(path: &Path) -> Result<Pipeline> {
    let text =
        checkpoints::small_file::read_text_or_stream(path, checkpoints::small_file::TEXT_LIMIT)
            .map_err(|e| TrainerError::Input(format!("{}: {e}", path.display())))?;
    let p: Pipeline = toml::from_str(&text).map_err(|e| {
        TrainerError::Input(format!(
            "{}: {}",
            path.display(),
            crate::recipe::located(&text, &e)
        ))
    })?;
    for (i, s) in p.stage.iter().enumerate() {
        if s.recipe.as_os_str().is_empty() {
            return Err(TrainerError::Input(format!(
                "{}: stage {} (`{}`): `recipe` is an empty path; name a recipe file",
                path.display(),
                i + 1,
                s.name
            )));
        }
    }
    if p.report
        .prompts
        .as_ref()
        .is_some_and(|f| f.as_os_str().is_empty())
    {
        return Err(TrainerError::Input(format!(
            "{}: `report.prompts` is an empty path; name a file or leave it out",
            path.display()
        )));
    }
    if p.stage.is_empty() {
        return Err(TrainerError::Input(format!(
            "{}: no [[stage]] to run",
            path.display()
        )));
    }
    let mut seen = Vec::new();
    for s in &p.stage {
        // The name is a directory under the pipeline's: `.` and `..` would put a stage's
        // run in the pipeline's own directory or its parent, and hearth's own hidden files
        // (the lock, temporary files) sit there under dotted names.
        let path_like = s.name.starts_with('.');
        // The pipeline's own files sit beside the stages' directories.
        // `{out}` is the pipeline's directory: a stage named `out` would take the name over
        // for every later stage.
        // A run's own files would make the pipeline's directory look like a run to a rerun.
        let reserved = [
            REPORT_FILE,
            crate::report::REPORT_PAGE,
            "out",
            RECIPE_FILE,
            METRICS_FILE,
            FINAL_DIR,
        ]
        .contains(&s.name.as_str());
        if s.name.is_empty()
            || path_like
            || reserved
            || s.name.contains(['/', '\\', '{', '}', '"', '\'', '\0'])
            || seen.contains(&s.name)
        {
            return Err(TrainerError::Input(format!(
                "{}: stage name `{}` must be unique, non-empty, not start with `.`, not be \
                 `out` (the pipeline's `{{out}}`), `{REPORT_FILE}`, `{}`, `{RECIPE_FILE}`, \
                 `{METRICS_FILE}` or `{FINAL_DIR}`, and be without / \\ {{ }} \" '",
                path.display(),
                s.name,
                crate::report::REPORT_PAGE
            )));
        }
        seen.push(s.name.clone());
    }
    p.report.validate(path)?;
    Ok(p)
}

impl ReportSection {
    /// Samples need prompts, and the prompts must load: found before any stage trains,
    /// not after the last one.
    fn validate(&self, pipeline: &Path) -> Result<()> {
        if self.samples == 0 {
            return Ok(());
        }
        if self.max_new_tokens == 0 {
            return Err(TrainerError::Input(format!(
                "{}: [report] max_new_tokens = 0 leaves every sample reply empty; it must be \
                 at least 1",
                pipeline.display()
            )));
        }
        let Some(prompts) = &self.prompts else {
            return Err(TrainerError::Input(format!(
                "{}: [report] samples = {} needs `prompts`, a file of prompts to reply to",
                pipeline.display(),
                self.samples
            )));
        };
        data::load_examples(prompts, &Default::default()).map_err(|e| {
            TrainerError::Input(format!("{}: [report] prompts: {e}", pipeline.display()))
        })?;
        Ok(())
    }
}

/// One stage, resolved: its overrides substituted and its recipe loaded and checked.
struct PlannedStage {
    name: String,
    recipe: Recipe,
    run_dir: PathBuf,
}

/// Every stage's recipe, resolved and validated up front, so that a mistake in the last
/// stage stops the pipeline before the first one trains.
fn plan(p: &Pipeline, path: &Path, out: &Path, sets: &[String]) -> Result<Vec<PlannedStage>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // `{out}` is pasted into the overrides' TOML, where a double quote or backslash would
    // end or escape the (double-quoted) string it stands in.
    if out.to_string_lossy().contains(['"', '\\'])
        || out.to_string_lossy().chars().any(char::is_control)
    {
        return Err(TrainerError::Input(format!(
            "--out {}: a pipeline's directory may not hold double quotes, backslashes or \
             control characters: its path is written into the stages' recipes",
            out.display()
        )));
    }
    let mut vars: BTreeMap<String, PathBuf> = BTreeMap::new();
    vars.insert("out".into(), out.to_path_buf());
    let mut planned = Vec::with_capacity(p.stage.len());
    for (i, s) in p.stage.iter().enumerate() {
        let in_stage = |e: TrainerError| {
            TrainerError::Input(format!(
                "{}: stage {} (`{}`): {e}",
                path.display(),
                i + 1,
                s.name
            ))
        };
        // The command line's come last, so they win, as `train --set` wins over a recipe.
        let mut overrides = Vec::new();
        for o in p.set.iter().chain(&s.set).chain(sets) {
            overrides.push(substitute(o, &vars).map_err(in_stage)?);
        }
        let recipe = crate::recipe::load(&dir.join(&s.recipe), &overrides).map_err(in_stage)?;
        let run_dir = out.join(&s.name);
        vars.insert(s.name.clone(), run_dir.clone());
        planned.push(PlannedStage {
            name: s.name.clone(),
            recipe,
            run_dir,
        });
    }
    Ok(planned)
}

/// `{out}` and `{NAME}` of earlier stages, replaced in an override. An unknown `{word}`
/// (letters, digits, `_`, `-`) is an error naming it, most likely a misspelt stage; other
/// braces are the value's own (an inline table `{ question = "prompt" }`, a program's
/// argument `{"reward": 1}`) and stay as they are.
fn substitute(text: &str, vars: &BTreeMap<String, PathBuf>) -> Result<String> {
    let word = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            if after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                return Err(TrainerError::Input(format!(
                    "override `{text}`: unclosed `{{`"
                )));
            }
            out.push('{');
            rest = after;
            continue;
        };
        let name = &after[..close];
        if let Some(value) = vars.get(name) {
            out.push_str(&value.display().to_string());
            rest = &after[close + 1..];
        } else if word(name) {
            return Err(TrainerError::Input(format!(
                "override `{text}`: `{{{name}}}` is neither {{out}} nor an earlier stage"
            )));
        } else {
            out.push('{');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Runs one stage, picking up what an earlier run of the pipeline left: a finished stage
/// (its `final/` verifies and it ran this very recipe) is reused, an interrupted one resumes
/// from its newest checkpoint, anything else starts afresh. `trained` are the directories of
/// the stages this run of the pipeline trained rather than reused: a stage that starts from
/// one of them is neither reused nor resumed, as what it was trained from has changed.
///
/// In a data-parallel run every rank reads what is there between two agreements (so
/// none reads after rank 0 started writing), and only rank 0 removes anything.
fn run_stage(
    dp: &Group,
    recipe: &Recipe,
    dir: &Path,
    (earlier, trained): (&[PathBuf], &[PathBuf]),
    progress: bool,
) -> Result<(Outcome, bool)> {
    dp.agree(true, "starting a pipeline stage")?;
    let run = RunDir::follower(dir);
    let saved = run.saved_recipe();
    let text = recipe.to_toml();
    let same_recipe = saved.as_deref() == Some(text.as_str());
    let final_check = checkpoints::verify_manifest(&run.final_dir());
    // An input trained again since this stage started: in this run of the pipeline, or
    // in an earlier one (its weights are newer than this stage's recipe, written at its
    // start), which a refusal in that run left in place.
    let started = std::fs::metadata(dir.join(RECIPE_FILE)).and_then(|m| m.modified());
    let newer = |input: &Path| {
        let finished = std::fs::metadata(input.join(FINAL_DIR).join(checkpoints::MANIFEST))
            .and_then(|m| m.modified());
        matches!((&started, finished), (Ok(s), Ok(f)) if f > *s)
    };
    let retrained_input = earlier.iter().find(|d| {
        let name = d.display().to_string();
        let named = text.contains(&format!("{name}/")) || text.contains(&format!("{name}\""));
        named && (trained.contains(d) || newer(d))
    });
    if let (true, Some(input)) = (same_recipe, retrained_input)
        && (run.has_checkpoint() || run.final_dir().exists())
    {
        return Err(TrainerError::Input(format!(
            "{}: holds a run that started from {} before that stage was trained again; move \
             it aside to train it from the new one",
            dir.display(),
            input.display()
        )));
    }
    if same_recipe && final_check.is_ok() {
        if progress {
            eprintln!("  reusing the finished run in {}", dir.display());
        }
        return Ok((outcome_of(dir)?, false));
    }
    let has_checkpoint = run.has_checkpoint();
    let has_final = run.final_dir().exists();
    dp.agree(true, "starting a pipeline stage")?;
    let progress = progress && dp.is_main();
    if same_recipe && !has_final {
        if has_checkpoint {
            if progress {
                eprintln!("  resuming {}", dir.display());
            }
            return Ok((train(recipe, dir, true, progress)?, true));
        }
        // Stopped before its first checkpoint: nothing in it can be used; start it again,
        // unless a process still writes it (its lock, which clearing would delete).
        let removed = if dp.is_main() {
            checkpoints::run_dir::hold(dir)
                .map_err(TrainerError::from)
                .and_then(|_held| {
                    std::fs::remove_dir_all(dir)
                        .map_err(|e| TrainerError::Input(format!("{}: {e}", dir.display())))
                })
        } else {
            Ok(())
        };
        dp.agree(removed.is_ok(), "clearing a pipeline stage")?;
        removed?;
    } else if let (true, Err(what)) = (same_recipe, &final_check) {
        // This very stage, finished, but its weights are no longer what it wrote.
        return Err(TrainerError::Input(format!(
            "{}: damaged final weights: {what}; move the stage's directory aside to train it \
             again",
            run.final_dir().display()
        )));
    } else if saved.is_some() && (has_checkpoint || has_final || dir.join(METRICS_FILE).exists()) {
        // Another recipe's run: never written over. One that stopped before its first step
        // (its recipe alone) holds nothing to lose, and training takes its directory.
        return Err(TrainerError::Input(format!(
            "{}: holds a run of a different recipe (the pipeline or its --set changed); move \
             it aside or choose another --out",
            dir.display()
        )));
    }
    Ok((train(recipe, dir, false, progress)?, true))
}

/// A finished run's outcome, read back from its `metrics.jsonl`.
fn outcome_of(dir: &Path) -> Result<Outcome> {
    let lines = read_metrics(dir)?;
    let losses: Vec<(usize, f64)> = lines
        .iter()
        .filter_map(|l| Some((l.get("step")?.as_u64()? as usize, l.get("loss")?.as_f64()?)))
        .collect();
    let eval = lines.iter().rev().find(|l| l.get("eval_loss").is_some());
    let mut eval_metrics = crate::objectives::Metrics::default();
    if let Some(obj) = eval.and_then(|l| l.as_object()) {
        for (k, v) in obj {
            if let (Some(name), Some(v)) = (k.strip_prefix("eval_"), v.as_f64())
                && name != "loss"
            {
                eval_metrics.mean(name.to_string(), v);
            }
        }
    }
    Ok(Outcome {
        steps: losses.last().map_or(0, |l| l.0),
        first_loss: losses.first().map_or(f64::NAN, |l| l.1),
        last_loss: losses.last().map_or(f64::NAN, |l| l.1),
        eval_loss: eval.and_then(|l| l.get("eval_loss")?.as_f64()),
        eval_metrics,
        // Read back from the stage's own files, which every rank sees alike.
        reports: true,
    })
}

/// Runs every stage into `out/{name}` and writes `out/report.md`. `sets` (from the command
/// line) apply to every stage, after the pipeline's own and the stage's, so they win.
pub fn run(path: &Path, out: &Path, sets: &[String], progress: bool) -> Result<PipelineReport> {
    let p = load(path)?;
    // `runs/p`, `./runs/p/` and `../here/runs/p` are one directory, and the stages'
    // recipes (which a rerun compares) must say it the same way: absolute, with `.` and `..`
    // resolved by name.
    let absolute = std::path::absolute(out)
        .map_err(|e| TrainerError::Input(format!("--out {}: {e}", out.display())))?;
    let mut resolved = PathBuf::new();
    for c in absolute.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                resolved.pop();
            }
            other => resolved.push(other),
        }
    }
    let out = resolved.as_path();
    let planned = plan(&p, path, out, sets)?;
    let names: Vec<&str> = p.stage.iter().map(|s| s.name.as_str()).collect();
    check_root(out, &names)?;
    let mut dp: Option<Group> = None;
    let mut _held = None;
    let mut stages = Vec::new();
    let mut done: Vec<(String, Recipe, PathBuf)> = Vec::new();
    let mut trained: Vec<PathBuf> = Vec::new();
    let count = planned.len();
    for (i, stage) in planned.into_iter().enumerate() {
        let PlannedStage {
            name,
            recipe,
            run_dir,
        } = stage;
        if dp.is_none() {
            let group = Group::from_env(&crate::train::dist_options(&recipe))?;
            // A second pipeline into the same directory would clear and write this one's
            // stages under it: refused while this one runs.
            if group.is_main() {
                _held = checkpoints::run_dir::hold(out)?;
            }
            dp = Some(group);
        }
        let dp = dp
            .as_ref()
            .ok_or_else(|| TrainerError::Input("internal: no group".into()))?;
        if progress && dp.is_main() {
            eprintln!("stage {}/{count}: {name} ({})", i + 1, recipe.train.method);
        }
        // A stage stopped by a signal goes on when the pipeline is run again, which
        // resumes it from its checkpoint; `--resume` is no flag of `hearth pipeline`.
        let earlier: Vec<PathBuf> = done.iter().map(|(_, _, d)| d.clone()).collect();
        let run = run_stage(dp, &recipe, &run_dir, (&earlier, &trained), progress).map_err(
            |e| match e {
                TrainerError::Interrupted {
                    signal,
                    step,
                    checkpoint,
                    ..
                } => TrainerError::Interrupted {
                    signal,
                    step,
                    checkpoint,
                    then: format!(
                        "run the pipeline again with --out {} to continue",
                        out.display()
                    ),
                },
                other => other,
            },
        )?;
        let (outcome, was_trained) = run;
        if was_trained {
            trained.push(run_dir.clone());
        }
        // The report reads every stage from its metrics.jsonl, as it does one a rerun
        // reuses: a stage's first and last losses as trained are single steps, as logged
        // they are windows of logging_steps, and the same pipeline must report the same
        // whether its stages were trained now, resumed or reused. (The first rank writes
        // the report, and the metrics.)
        let outcome = if dp.is_main() {
            Outcome {
                reports: outcome.reports,
                ..outcome_of(&run_dir)?
            }
        } else {
            outcome
        };
        stages.push(StageReport {
            name: name.clone(),
            method: recipe.train.method.clone(),
            figures: figures(&recipe, &run_dir, &outcome)?,
            outcome,
        });
        done.push((name, recipe, run_dir));
    }
    // Replies of every generating stage (LoRA, not a reward model), when the report asks.
    // Each on its own base: stages may start from different models.
    let generating: Vec<(String, PathBuf, PathBuf)> = done
        .iter()
        .filter(|(_, recipe, _)| recipe.lora.is_some() && !scores(recipe))
        .map(|(name, recipe, dir)| (name.clone(), recipe.model.path.clone(), dir.join(FINAL_DIR)))
        .collect();
    let replies = if p.report.samples > 0 && !generating.is_empty() {
        Some(replies(&generating, &p.report)?)
    } else {
        None
    };
    let mut text = format!("{REPORT_HEADING}\n");
    for (s, (_, recipe, dir)) in stages.iter().zip(&done) {
        text.push_str(&format!(
            "## {} ({}, {} steps)\n",
            s.name, s.method, s.outcome.steps
        ));
        for (k, v) in &s.figures {
            text.push_str(&format!("- {k}: {v}\n"));
        }
        if let Some(r) = &replies
            && let Some((_, at, own)) = r.stages.iter().find(|(n, _, _)| *n == s.name)
            && let Some(base) = r.bases.get(*at)
        {
            text.push_str(&format!(
                "- replies to the report's prompts: clipped_ratio {:.2}, distinct-2 {:.2} \
                 (base model: {:.2}, {:.2})\n",
                clipped_ratio(own),
                distinct_2(own),
                clipped_ratio(&base.replies),
                distinct_2(&base.replies)
            ));
        }
        if has_rollouts(recipe)
            && let Some(w) = length_gaming(&read_metrics(dir)?, recipe.grpo.as_ref())
        {
            text.push_str(&format!("- {w}\n"));
        }
        text.push('\n');
    }
    if let Some(r) = &replies
        && let Some((name, at, after)) = r.stages.last()
        && let (Some(first), Some(own)) = (r.bases.first(), r.bases.get(*at))
    {
        text.push_str(&format!(
            "## Samples (greedy): base model → after the pipeline (`{name}`)\n\n"
        ));
        for ((prompt, before), after) in r.prompts.iter().zip(&first.replies).zip(after) {
            text.push_str(&format!(
                "- client: {prompt}\n  - before: {}\n  - after: {}\n",
                first.text(before).trim(),
                own.text(after).trim()
            ));
        }
    }
    if dp.as_ref().is_none_or(Group::is_main) {
        checkpoints::write_text(&out.join(REPORT_FILE), &text)?;
        let stages: Vec<(String, PathBuf)> = done
            .iter()
            .map(|(name, _, dir)| (name.clone(), dir.clone()))
            .collect();
        crate::report::write_pipeline_page(out, &stages, &text)?;
    }
    Ok(PipelineReport { stages, text })
}

/// The heading every pipeline report starts with, by which a rerun knows its own.
const REPORT_HEADING: &str = "# hearth pipeline report\n";

/// Refuses, before any stage trains, a pipeline directory that is a run's or a model's
/// (the stages and reports would be written in among their files, the run's page
/// replaced), or whose report files (rewritten at the end of every run) are a user's
/// files of the same names rather than hearth's.
fn check_root(out: &Path, stages: &[&str]) -> Result<()> {
    let run_file = [RECIPE_FILE, METRICS_FILE, FINAL_DIR]
        .into_iter()
        .find(|name| out.join(name).exists());
    let what = match run_file {
        Some(name) => Some(format!("a run (`{name}`)")),
        None if checkpoints::guard::holds_checkpoint(out) => Some("a model".to_string()),
        None => None,
    };
    if let Some(what) = what {
        return Err(TrainerError::Input(format!(
            "{}: holds {what}; a pipeline writes its stages and report into a directory of \
             its own: choose another --out",
            out.display()
        )));
    }
    // A folder of the user's (the one holding the pipeline file, say) would get the stages'
    // directories and the reports in among its files: only a new or empty directory is
    // taken, or one an earlier run of a pipeline wrote (a stage's directory or the report).
    let earlier = stages.iter().any(|s| out.join(s).is_dir()) || out.join(REPORT_FILE).is_file();
    if !earlier && let Ok(entries) = std::fs::read_dir(out) {
        let foreign = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n != checkpoints::run_dir::LOCK_FILE);
        if let Some(name) = foreign {
            return Err(TrainerError::Input(format!(
                "{}: holds `{name}`, which no run of a pipeline wrote; a pipeline needs a new or \
                 empty directory, or its own from an earlier run: choose another --out",
                out.display()
            )));
        }
    }
    let report = out.join(REPORT_FILE);
    let ours = !report.exists()
        || std::fs::read_to_string(&report).is_ok_and(|t| t.starts_with(REPORT_HEADING));
    let page = out.join(crate::report::REPORT_PAGE);
    for (path, ok) in [
        (report, ours),
        (page.clone(), crate::report::page_replaceable(&page)),
    ] {
        if !ok {
            return Err(TrainerError::Input(format!(
                "{}: not a report of hearth's; refusing to write over it (move it aside or \
                 choose another --out)",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Whether a stage's method learns a score head (a reward model), not replies.
fn scores(recipe: &Recipe) -> bool {
    crate::objectives::registry::for_recipe(recipe).is_ok_and(|o| o.needs_score_head())
}

/// Whether a stage's method logs rollout rewards and completion lengths.
fn has_rollouts(recipe: &Recipe) -> bool {
    crate::objectives::registry::for_recipe(recipe).is_ok_and(|o| o.has_rollouts())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_samples_need_tokens_to_generate() {
        let section = ReportSection {
            prompts: Some(PathBuf::from("prompts.jsonl")),
            samples: 3,
            max_new_tokens: 0,
        };
        let e = section
            .validate(Path::new("p.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.toml: [report] max_new_tokens = 0"), "{e}");
    }

    #[test]
    fn a_run_or_a_model_is_no_pipeline_directory() {
        let tmp = tempfile::tempdir().unwrap();
        check_root(&tmp.path().join("new"), &["sft"]).unwrap();
        check_root(tmp.path(), &["sft"]).unwrap();
        // A folder of the user's is not taken; an earlier run's (its stage there) is.
        let mine = tmp.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        std::fs::write(mine.join("notes.txt"), "x").unwrap();
        let e = check_root(&mine, &["sft"]).unwrap_err().to_string();
        assert!(
            e.contains("holds `notes.txt`") && e.contains("--out"),
            "{e}"
        );
        std::fs::create_dir(mine.join("sft")).unwrap();
        check_root(&mine, &["sft"]).unwrap();
        for (file, want) in [
            (RECIPE_FILE, "holds a run (`recipe.toml`)"),
            (METRICS_FILE, "holds a run (`metrics.jsonl`)"),
            ("model.safetensors", "holds a model"),
        ] {
            let dir = tmp.path().join(file.replace('.', "-"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join(file), "x").unwrap();
            let e = check_root(&dir, &["sft"]).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("--out"), "{e}");
        }
    }

    #[test]
    fn overrides_name_earlier_stages() {
        let mut vars = BTreeMap::new();
        vars.insert("out".to_string(), PathBuf::from("/runs/p"));
        vars.insert("sft".to_string(), PathBuf::from("/runs/p/sft"));
        assert_eq!(
            substitute("lora.init_from=\"{sft}/final\"", &vars).unwrap(),
            "lora.init_from=\"/runs/p/sft/final\""
        );
        assert_eq!(substitute("x={out}", &vars).unwrap(), "x=/runs/p");
        let e = substitute("x={dpo}/final", &vars).unwrap_err().to_string();
        assert!(e.contains("`{dpo}`"), "{e}");
        assert!(substitute("x={out", &vars).is_err());
        // The value's own braces stay: inline tables, a program's JSON, an empty table.
        for own in [
            r#"data.columns={ question = "prompt", answer = "response" }"#,
            r#"grpo.rewards.0.command=["python3", "-c", "print({'reward': 1})"]"#,
            r#"x={ a = { b = 1 } }"#,
            "x={}",
            "x=\"{\"",
        ] {
            assert_eq!(substitute(own, &vars).unwrap(), own);
        }
        assert_eq!(
            substitute(r#"x={ path = "{sft}/final" }"#, &vars).unwrap(),
            r#"x={ path = "/runs/p/sft/final" }"#
        );
        // A stage name is matched whole, whatever it holds.
        vars.insert(
            "first stage".to_string(),
            PathBuf::from("/runs/p/first stage"),
        );
        assert_eq!(
            substitute("x={first stage}", &vars).unwrap(),
            "x=/runs/p/first stage"
        );
    }
}
