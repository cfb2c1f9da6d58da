//! The run report page: `RUN_DIR/report.html`, one self-contained file (inline SVG and
//! style, no script, nothing fetched) with the curves, each method's metrics, speed and
//! memory, evaluations, the resolved recipe and the checkpoints. A pipeline's page holds
//! every stage's section and the pipeline's summary with its samples.
//!
//! It shows no sample text of its own: the only replies on a page are a pipeline's samples,
//! which its `[report] samples` asked for.

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

fn fmt(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{v:.0}")
    } else {
        format!("{v:.6}")
    }
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
    let mut summary = vec![
        vec!["method".to_string(), method],
        vec![
            "steps".into(),
            train
                .last()
                .and_then(|l| l.get("step")?.as_u64())
                .map_or("none yet".into(), |s| s.to_string()),
        ],
    ];
    for (name, key) in [
        ("final loss", "loss"),
        ("tokens seen", "num_tokens"),
        ("peak memory (MiB)", "peak_memory_mb"),
    ] {
        if let Some(v) = last(key) {
            summary.push(vec![name.into(), fmt(v)]);
        }
    }
    if let Some(v) = evals.last().and_then(|l| l.get("eval_loss")?.as_f64()) {
        summary.push(vec!["final eval_loss".into(), fmt(v)]);
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
                if k.starts_with("eval_") && v.is_number() && !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
        let rows: Vec<Vec<String>> = evals
            .iter()
            .map(|l| {
                cols.iter()
                    .map(|c| l.get(c).and_then(Value::as_f64).map_or("–".into(), fmt))
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
                let files: Vec<(String, u64)> = std::fs::read_dir(path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| {
                        let len = e.metadata().map_or(0, |m| m.len());
                        (e.file_name().to_string_lossy().into_owned(), len)
                    })
                    .collect();
                let bytes: u64 = files.iter().map(|f| f.1).sum();
                let mut names: Vec<String> = files.into_iter().map(|f| f.0).collect();
                names.sort();
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

/// The `hearth eval counseling` results filed under `dir/evals/`, one table each.
fn counseling_evals(dir: &Path, level: usize) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(crate::counseling_eval::EVALS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut out = String::new();
    for file in files {
        let Some(report) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .filter(|v| v.get("kind").and_then(Value::as_str) == Some("counseling"))
        else {
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
        for who in ["model", "against"] {
            let cases = crate::counseling_eval::table::worst_cases(&report, who);
            if !cases.is_empty() {
                out.push_str(&format!(
                    "<p class=\"note\">Worst crisis cases ({who}):</p>\n<pre>{}</pre>\n",
                    escape(&cases.join("\n"))
                ));
            }
        }
    }
    out
}

/// Whether `path` is free for a report page: missing, or a page hearth wrote (its title
/// starts with `hearth `). Pages are rewritten on every run, never over a user's file.
pub fn page_replaceable(path: &Path) -> bool {
    !path.exists() || std::fs::read_to_string(path).is_ok_and(|t| t.contains("<title>hearth "))
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
