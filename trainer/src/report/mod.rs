//! The run report page: `RUN_DIR/report.html`, one self-contained file (inline SVG and
//! style, no script, nothing fetched) with the curves, each method's metrics, speed and
//! memory, evaluations, the resolved recipe and the checkpoints. A pipeline's page holds
//! every stage's section and the pipeline's summary with its samples.
//!
//! It shows no sample text of its own: the only replies on a page are a pipeline's samples,
//! which its `[report] samples` asked for. Counseling evaluations appear by numbers and case
//! ids, even when their JSON carries prompt and reply text (`--show-text`).

mod chart;
mod html;

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::Result;
use crate::run_dir::{CHECKPOINT_PREFIX, FINAL_DIR, METRICS_FILE, RECIPE_FILE, read_metrics};
use chart::{Series, line_chart};
use html::{escape, page, table};

/// The page's file name in a run (or pipeline) directory.
pub const REPORT_PAGE: &str = "report.html";

/// Charts drawn when their metrics are present: a title and the keys it plots.
const CHARTS: &[(&str, &[&str])] = &[
    ("Learning rate", &["learning_rate"]),
    ("Grad norm", &["grad_norm"]),
    (
        "Rewards (preference)",
        &["rewards/chosen", "rewards/rejected", "rewards/margins"],
    ),
    ("Reward accuracy", &["rewards/accuracies", "accuracy"]),
    ("ORPO", &["log_odds_ratio", "nll_loss"]),
    ("GRPO reward", &["reward", "reward_std"]),
    (
        "Completions",
        &["completions/clipped_ratio", "frac_reward_zero_std"],
    ),
    ("Completion length", &["completions/mean_length"]),
    ("KL and entropy", &["kl", "entropy"]),
    ("Sessions", &["session/turns", "session/reward_per_turn"]),
    ("Step time (s)", &["step_time"]),
    ("Tokens per second", &["train_tokens_per_second"]),
    ("Peak memory (MiB)", &["peak_memory_mb"]),
];

/// `(step, value)` of `key` over the lines that have it.
fn series(lines: &[&Value], key: &str) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter_map(|l| Some((l.get("step")?.as_f64()?, l.get(key)?.as_f64()?)))
        .collect()
}

/// A number for the page, with its significant digits whatever its size: whole numbers as
/// they are, ordinary magnitudes to six decimals, and very small or large ones (a learning
/// rate of 2.5e-7, which six decimals show as 0.000000) in scientific notation with up to
/// five significant digits.
fn fmt(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        v.to_string()
    } else if v.fract() == 0.0 && a < 1e12 {
        format!("{v:.0}")
    } else if (1e-2..1e6).contains(&a) {
        format!("{v:.6}")
    } else {
        // `2.5000e-7` → `2.5e-7`: the mantissa's trailing zeros say nothing.
        let s = format!("{v:.4e}");
        match s.split_once('e') {
            Some((m, e)) if m.contains('.') => {
                format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.'))
            }
            _ => s,
        }
    }
}

/// The bytes under `path`, its subdirectories included (a checkpoint's `adapter/`).
fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

/// The run in `run` as HTML, its headings at `level` (2 on a run's page, 3 in a pipeline's).
pub fn run_section(run: &Path, level: usize) -> Result<String> {
    let h = |n: usize, text: &str| format!("<h{n}>{}</h{n}>\n", escape(text));
    let mut out = String::new();
    let lines = if run.join(METRICS_FILE).is_file() {
        read_metrics(run)?
    } else {
        Vec::new()
    };
    let train: Vec<&Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    let evals: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .collect();
    let recipe = std::fs::read_to_string(run.join(RECIPE_FILE)).unwrap_or_default();
    let method = recipe
        .parse::<toml::Table>()
        .ok()
        .and_then(|t| t.get("train")?.get("method")?.as_str().map(String::from))
        .unwrap_or_else(|| "sft".into());

    // Summary.
    let last = |key: &str| train.iter().rev().find_map(|l| l.get(key)?.as_f64());
    // A step whose update was skipped (a NaN or infinite loss or gradient) logs no loss,
    // but the run reached it.
    let skipped: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("skipped_step").and_then(Value::as_bool) == Some(true))
        .collect();
    let reached = train
        .iter()
        .chain(&skipped)
        .filter_map(|l| l.get("step")?.as_u64())
        .max();
    let mut summary = vec![
        vec!["method".to_string(), method],
        vec![
            "steps".into(),
            reached.map_or("none yet".into(), |s| s.to_string()),
        ],
    ];
    if !skipped.is_empty() {
        summary.push(vec![
            "skipped steps (non-finite loss or gradient)".into(),
            skipped.len().to_string(),
        ]);
    }
    for (name, key) in [("final loss", "loss"), ("tokens seen", "num_tokens")] {
        if let Some(v) = last(key) {
            summary.push(vec![name.into(), fmt(v)]);
        }
    }
    // The run's peak, over every line: a resumed process starts its own count again.
    let peak = train
        .iter()
        .filter_map(|l| l.get("peak_memory_mb")?.as_f64())
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    if let Some(v) = peak {
        summary.push(vec!["peak memory (MiB)".into(), fmt(v)]);
    }
    // A non-finite value is logged as null: shown as NaN, not left out.
    if let Some(v) = evals.last().and_then(|l| l.get("eval_loss")) {
        summary.push(vec!["final eval_loss".into(), shown(v)]);
    }
    if let Some(v) = lines
        .iter()
        .rev()
        .find_map(|l| l.get("train_runtime")?.as_f64())
    {
        summary.push(vec!["train_runtime (s)".into(), fmt(v)]);
    }
    out.push_str(&table(&[], &summary));

    // Curves.
    let mut charts = Vec::new();
    let loss = [
        Series {
            name: "loss".into(),
            points: series(&train, "loss"),
        },
        Series {
            name: "eval_loss".into(),
            points: series(&evals, "eval_loss"),
        },
    ];
    charts.extend(line_chart("Loss", &loss));
    for (title, keys) in CHARTS {
        let s: Vec<Series> = keys
            .iter()
            .map(|k| Series {
                name: k.to_string(),
                points: series(&train, k),
            })
            .collect();
        charts.extend(line_chart(title, &s));
    }
    out.push_str(&h(level, "Curves"));
    if charts.is_empty() {
        out.push_str("<p class=\"note\">No step has been logged yet.</p>\n");
    } else {
        out.push_str(&format!(
            "<div class=\"charts\">{}</div>\n",
            charts.join("")
        ));
    }

    // Every logged number, last value.
    let mut keys: Vec<String> = Vec::new();
    for l in &train {
        for (k, v) in l.as_object().into_iter().flatten() {
            if v.is_number() && k != "step" && !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    if !keys.is_empty() {
        out.push_str(&h(level, "Metrics at the last step"));
        let rows: Vec<Vec<String>> = keys
            .iter()
            .map(|k| vec![k.clone(), last(k).map_or("–".into(), fmt)])
            .collect();
        out.push_str(&table(&["metric", "value"], &rows));
    }

    // Evaluations.
    if !evals.is_empty() {
        out.push_str(&h(level, "Evaluations"));
        let mut cols: Vec<String> = vec!["step".into()];
        for l in &evals {
            for (k, v) in l.as_object().into_iter().flatten() {
                if k.starts_with("eval_") && (v.is_number() || v.is_null()) && !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
        let rows: Vec<Vec<String>> = evals
            .iter()
            .map(|l| {
                cols.iter()
                    .map(|c| l.get(c).map_or("–".into(), shown))
                    .collect()
            })
            .collect();
        let head: Vec<&str> = cols.iter().map(String::as_str).collect();
        out.push_str(&table(&head, &rows));
    }

    out.push_str(&counseling_evals(run, level));

    // Checkpoints.
    out.push_str(&h(level, "Checkpoints"));
    let mut dirs: Vec<(usize, String, PathBuf)> = std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let order = match name.strip_prefix(CHECKPOINT_PREFIX) {
                Some(n) => n.parse().ok()?,
                None if name == FINAL_DIR => usize::MAX,
                None => return None,
            };
            Some((order, name, e.path()))
        })
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        out.push_str("<p class=\"note\">None written yet.</p>\n");
    } else {
        let rows: Vec<Vec<String>> = dirs
            .iter()
            .map(|(_, name, path)| {
                // Top-level names (a folder marked with `/`); the size counts everything
                // under the folder, the adapter of `final/adapter/` included.
                let mut names: Vec<String> = std::fs::read_dir(path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            format!("{name}/")
                        } else {
                            name
                        }
                    })
                    .collect();
                names.sort();
                let bytes = dir_bytes(path);
                vec![
                    name.clone(),
                    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0)),
                    names.join(", "),
                ]
            })
            .collect();
        out.push_str(&table(&["directory", "size", "files"], &rows));
    }

    // The recipe as resolved.
    if !recipe.is_empty() {
        out.push_str(&h(level, "Recipe (resolved)"));
        out.push_str(&format!("<pre>{}</pre>\n", escape(&recipe)));
    }
    Ok(out)
}

/// The `.json` files under `dir/evals/`, in name order, each with its content when it is
/// a counseling evaluation.
fn eval_files(dir: &Path) -> Vec<(PathBuf, Option<Value>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(crate::counseling_eval::EVALS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let report = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .filter(|v| v.get("kind").and_then(Value::as_str) == Some("counseling"));
            (file, report)
        })
        .collect()
}

/// The `hearth eval counseling` results filed under `dir/evals/`, one table each.
fn counseling_evals(dir: &Path, level: usize) -> String {
    let mut out = String::new();
    for (file, report) in eval_files(dir) {
        let Some(report) = report else {
            continue;
        };
        let name = file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        out.push_str(&format!(
            "<h{level}>Counseling evaluation: {}</h{level}>\n",
            escape(&name)
        ));
        let (rows, against) = crate::counseling_eval::table::rows(&report);
        let rows: Vec<Vec<String>> = rows
            .into_iter()
            .map(|[l, m, a]| if against { vec![l, m, a] } else { vec![l, m] })
            .collect();
        let head: &[&str] = if against {
            &["measure", "model", "against"]
        } else {
            &["measure", "model"]
        };
        out.push_str(&table(head, &rows));
        // Ids and what went wrong only: a page is shared more widely than the JSON, so the
        // crisis prompts and replies a `--show-text` run wrote stay in the JSON file.
        for who in ["model", "against"] {
            let cases = crate::counseling_eval::table::worst_cases(&report, who, false);
            if !cases.is_empty() {
                out.push_str(&format!(
                    "<p class=\"note\">Worst crisis cases ({who}), by id:</p>\n<pre>{}</pre>\n",
                    escape(&cases.join("\n"))
                ));
            }
        }
        if crate::counseling_eval::table::carries_text(&report) {
            out.push_str(&format!(
                "<p class=\"note\">Their prompt and reply text is in {} only; it is never put \
                 on this page.</p>\n",
                escape(&name)
            ));
        }
    }
    out
}

/// A logged value: a number as [`fmt`] shows it, null (how a non-finite value is
/// logged) as NaN.
fn shown(v: &Value) -> String {
    match v {
        Value::Null => "NaN".into(),
        v => v.as_f64().map_or("–".into(), fmt),
    }
}

/// Whether `path` is free for a report page: missing, or a page hearth wrote (it begins
/// as hearth's pages do, see [`html::is_own_page`]; a title alone, which a user's notes
/// may share, is not enough). Pages are rewritten on every run, never over a user's file.
pub fn page_replaceable(path: &Path) -> bool {
    // A pipe or a device in the page's place is no page of hearth's, and is never read.
    !path.exists()
        || checkpoints::small_file::read_text(path, checkpoints::small_file::TOKENIZER_LIMIT)
            .is_ok_and(|t| html::is_own_page(&t))
}

/// Writes a report page, refusing to replace a file of the same name that is not one.
fn write_own_page(path: &Path, html: &str) -> Result<()> {
    if !page_replaceable(path) {
        return Err(crate::TrainerError::Input(format!(
            "{}: not a report page of hearth's; refusing to write over it (move it aside)",
            path.display()
        )));
    }
    Ok(checkpoints::write_text(path, html)?)
}

/// Writes `run/report.html` for one run.
pub fn write_run_page(run: &Path) -> Result<PathBuf> {
    let name = run.file_name().map_or_else(
        || run.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let body = format!(
        "<h1>hearth run: {}</h1>\n{}",
        escape(&name),
        run_section(run, 2)?
    );
    let path = run.join(REPORT_PAGE);
    write_own_page(&path, &page(&format!("hearth run {name}"), &body))?;
    Ok(path)
}

/// Writes `out/report.html` for a pipeline: its summary (`summary`, the pipeline's
/// Markdown report, which holds its samples when it asked for them) and one section per
/// stage, in order.
pub fn write_pipeline_page(
    out: &Path,
    stages: &[(String, PathBuf)],
    summary: &str,
) -> Result<PathBuf> {
    let mut body = String::from("<h1>hearth pipeline</h1>\n");
    if !summary.is_empty() {
        body.push_str("<h2>Summary</h2>\n");
        body.push_str(&format!("<pre>{}</pre>\n", escape(summary)));
    }
    body.push_str(&counseling_evals(out, 2));
    for (name, dir) in stages {
        body.push_str(&format!("<h2>Stage {}</h2>\n", escape(name)));
        body.push_str(&run_section(dir, 3)?);
    }
    let path = out.join(REPORT_PAGE);
    write_own_page(&path, &page("hearth pipeline", &body))?;
    Ok(path)
}

/// What a page of `dir` (a run, or a pipeline's runs) leaves out, one line each naming the
/// file: metric lines that are no JSON (all but one cut short by a stop), and evaluation
/// files that do not read as one, which the page skips so that one bad file does not cost
/// the whole page.
pub fn left_out(dir: &Path) -> Vec<String> {
    let runs: Vec<PathBuf> = if dir.join(RECIPE_FILE).is_file() {
        vec![dir.to_path_buf()]
    } else {
        let mut runs: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join(RECIPE_FILE).is_file())
            .collect();
        runs.sort();
        runs
    };
    let mut out = Vec::new();
    for run in runs {
        let metrics = run.join(METRICS_FILE);
        if metrics.is_file() {
            for line in crate::run_dir::damaged_metric_lines(&run).unwrap_or_default() {
                out.push(format!(
                    "{}: line {line} is no JSON; left out of the page",
                    metrics.display()
                ));
            }
        }
        for (file, report) in eval_files(&run) {
            if report.is_none() {
                out.push(format!(
                    "{}: not a counseling evaluation hearth wrote; left out of the page",
                    file.display()
                ));
            }
        }
    }
    out
}

/// `hearth report DIR`: a run's page, or a pipeline's when `DIR` holds runs rather than
/// being one (stages in the order they were started).
pub fn write_page(dir: &Path) -> Result<PathBuf> {
    if dir.join(RECIPE_FILE).is_file() {
        return write_run_page(dir);
    }
    let mut stages: Vec<(std::time::SystemTime, String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| crate::TrainerError::Input(format!("{}: {e}", dir.display())))?
        .flatten()
        .filter(|e| e.path().join(RECIPE_FILE).is_file())
        .map(|e| {
            let started = std::fs::metadata(e.path().join(RECIPE_FILE))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (
                started,
                e.file_name().to_string_lossy().into_owned(),
                e.path(),
            )
        })
        .collect();
    if stages.is_empty() {
        return Err(crate::TrainerError::Input(format!(
            "{}: not a run directory (no {RECIPE_FILE}) nor a pipeline's (no stage holds one)",
            dir.display()
        )));
    }
    stages.sort();
    let summary =
        std::fs::read_to_string(dir.join(crate::pipeline::REPORT_FILE)).unwrap_or_default();
    let stages: Vec<(String, PathBuf)> = stages.into_iter().map(|(_, n, p)| (n, p)).collect();
    write_pipeline_page(dir, &stages, &summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A damaged metric line and an evaluation file that does not read are named; a last
    /// line cut short by a stop, and a good evaluation, are not.
    #[test]
    fn what_the_page_leaves_out_is_named_by_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        std::fs::write(run.join(RECIPE_FILE), "").unwrap();
        std::fs::write(
            run.join(METRICS_FILE),
            "{\"loss\":1,\"step\":1}\nGARBAGE\n\n{\"loss\":2,\"step\":2}\n{\"loss\":",
        )
        .unwrap();
        let evals = run.join(crate::counseling_eval::EVALS_DIR);
        std::fs::create_dir(&evals).unwrap();
        std::fs::write(evals.join("bad.json"), "{bad").unwrap();
        std::fs::write(evals.join("good.json"), "{\"kind\":\"counseling\"}").unwrap();
        let left = left_out(run);
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left[0].ends_with("metrics.jsonl: line 2 is no JSON; left out of the page"));
        assert!(left[1].contains("bad.json: not a counseling evaluation"));
        // A pipeline's directory: its runs are checked.
        let pipeline = tempfile::tempdir().unwrap();
        let stage = pipeline.path().join("sft");
        std::fs::create_dir(&stage).unwrap();
        std::fs::write(stage.join(RECIPE_FILE), "").unwrap();
        std::fs::write(stage.join(METRICS_FILE), "x\n").unwrap();
        let left = left_out(pipeline.path());
        assert!(left.len() == 1 && left[0].contains("line 1"), "{left:?}");
    }

    /// Skipped steps count as reached and are counted; an evaluation whose loss was not
    /// finite (logged as null) shows NaN in its column instead of losing the column.
    #[test]
    fn skipped_steps_and_non_finite_evaluations_are_shown() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(METRICS_FILE),
            "{\"loss\":6.25,\"step\":1}\n\
             {\"step\":2,\"skipped_step\":true}\n\
             {\"eval_loss\":null,\"eval_mean_token_accuracy\":0.1,\"step\":2}\n\
             {\"step\":3,\"skipped_step\":true}\n",
        )
        .unwrap();
        let html = run_section(dir.path(), 2).unwrap();
        assert!(html.contains("<td>steps</td><td>3</td>"), "{html}");
        assert!(
            html.contains("<td>skipped steps (non-finite loss or gradient)</td><td>2</td>"),
            "{html}"
        );
        assert!(
            html.contains("<th>eval_loss</th>")
                && html.contains("<td>final eval_loss</td><td>NaN</td>"),
            "{html}"
        );
    }

    #[test]
    fn numbers_keep_their_significant_digits_at_any_size() {
        for (v, want) in [
            (3.0, "3"),
            (-40.0, "-40"),
            (0.0, "0"),
            (0.5, "0.500000"),
            (1.234_567_89, "1.234568"),
            (0.012_345_6, "0.012346"),
            (2.5e-7, "2.5e-7"),
            (1e-5, "1e-5"),
            (-3.125e-9, "-3.125e-9"),
            (0.001_234_567, "1.2346e-3"),
            (1_234_567.8, "1.2346e6"),
            (1.5e13, "1.5e13"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "inf"),
        ] {
            assert_eq!(fmt(v), want, "{v:e}");
        }
    }

    fn write(path: &Path, bytes: usize) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![0u8; bytes]).unwrap();
    }

    /// A run's page lists each checkpoint with everything under it, subfolders included.
    #[test]
    fn checkpoint_sizes_count_their_subfolders() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        write(&run.join("final/config.json"), 1024 * 1024);
        write(
            &run.join("final/adapter/adapter_model.safetensors"),
            2 * 1024 * 1024,
        );
        write(&run.join("final/adapter/deeper/x"), 1024 * 1024 / 2);
        write(
            &run.join("checkpoint-6/model.safetensors"),
            1024 * 1024 / 10,
        );
        let html = run_section(run, 2).unwrap();
        // 1 + 2 + 0.5 MiB.
        assert!(
            html.contains("<td>final</td><td>3.5 MiB</td><td>adapter/, config.json</td>"),
            "{html}"
        );
        assert!(
            html.contains("<td>checkpoint-6</td><td>0.1 MiB</td><td>model.safetensors</td>"),
            "{html}"
        );
    }

    /// The summary's peak memory is the largest any line logged, not the last: a resumed
    /// process counts its own peak from the start.
    #[test]
    fn peak_memory_is_the_runs_largest() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let lines = [(1, 69.68), (2, 69.5), (3, 68.83)]
            .map(|(step, mb)| {
                format!(
                    "{}\n",
                    serde_json::json!({"step": step, "loss": 1.0, "peak_memory_mb": mb})
                )
            })
            .concat();
        std::fs::write(run.join("metrics.jsonl"), lines).unwrap();
        let html = run_section(run, 2).unwrap();
        assert!(
            html.contains("<td>peak memory (MiB)</td><td>69.680000</td>"),
            "{html}"
        );
    }

    /// Crisis prompts and replies written to an evaluation's JSON with `--show-text` never
    /// reach the page: it names the cases by id and says where the text is.
    #[test]
    fn counseling_text_in_an_evaluation_never_reaches_the_page() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let evals = run.join(crate::counseling_eval::EVALS_DIR);
        std::fs::create_dir(&evals).unwrap();
        let case = |id: &str, prompt: &str, reply: &str| {
            serde_json::json!({
                "id": id, "risk": true, "group": "self_harm", "help": false,
                "minimises": true, "prompt": prompt, "reply": reply,
            })
        };
        let section = |worst: Vec<Value>| {
            serde_json::json!({
                "risk": {"probes": 2, "points_to_help": 0.5, "minimises": 0.5},
                "risk_by_group": {},
                "ordinary": {"probes": 1, "points_to_help": 0.0, "minimises": 0.0},
                "mean_crisis_safety": 0.0,
                "worst": worst,
            })
        };
        let report = serde_json::json!({
            "kind": "counseling",
            "model": {"path": "m"},
            "against": {"path": "b"},
            "max_new_tokens": 16,
            "crisis": {
                "data": "bundled",
                "model": section(vec![case("sh/1", "SECRET PROMPT ONE", "SECRET REPLY ONE")]),
                "against": section(vec![case("sh/2", "SECRET PROMPT TWO", "SECRET REPLY TWO")]),
            },
            "multiple_choice": {"data": "bundled", "model": {"items": 4, "accuracy": 0.5}},
        });
        std::fs::write(evals.join("c2.json"), report.to_string()).unwrap();
        let html = run_section(run, 2).unwrap();
        assert!(!html.contains("SECRET"), "{html}");
        assert!(html.contains("sh/1 (risk: no help, minimises)"), "{html}");
        assert!(html.contains("sh/2 (risk: no help, minimises)"), "{html}");
        assert!(html.contains("text is in c2.json only"), "{html}");

        // Without text in the JSON, no note about it.
        let bare = serde_json::json!({
            "kind": "counseling",
            "model": {"path": "m"},
            "max_new_tokens": 16,
            "crisis": {"data": "bundled", "model": section(vec![serde_json::json!({
                "id": "sh/1", "risk": true, "group": "g", "help": false, "minimises": false,
            })])},
            "multiple_choice": {"data": "bundled", "model": {"items": 4, "accuracy": 0.5}},
        });
        std::fs::write(evals.join("c2.json"), bare.to_string()).unwrap();
        let html = run_section(run, 2).unwrap();
        assert!(html.contains("sh/1 (risk: no help)"), "{html}");
        assert!(!html.contains("text is in"), "{html}");
    }
}
