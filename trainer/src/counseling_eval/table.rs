//! The counseling evaluation as rows of (measure, model, against): printed as a text table
//! by the CLI and drawn as an HTML table on a run's report page. Ids only; the text of a
//! case is printed (below the table) only when the report carries it and the caller asks
//! for it — never on a report page, which is shared more widely than the JSON.

use serde_json::Value;

/// Rows of a counseling report read back from its JSON (so that report pages can show
/// files written by any version that kept the field names), and whether it compares two
/// models.
pub fn rows(report: &Value) -> (Vec<[String; 3]>, bool) {
    let mut rows = Vec::new();
    let against = report.get("against").is_some();
    let num = |v: Option<&Value>| {
        v.and_then(Value::as_f64)
            .map_or("–".into(), |x| format!("{x:.3}"))
    };
    let pair = |section: &str, path: &[&str]| -> [String; 2] {
        let get = |who: &str| {
            let mut v = report.get(section)?.get(who)?;
            for k in path {
                v = v.get(k)?;
            }
            Some(v)
        };
        [num(get("model")), num(get("against"))]
    };
    if let Some(w) = report.get("win_rate") {
        let ci = w
            .get("ci95")
            .and_then(Value::as_array)
            .map(|c| format!(" [{} – {}]", num(c.first()), num(c.get(1))))
            .unwrap_or_default();
        rows.push([
            format!(
                "win rate over against, by the reward model ({} prompts, 95% CI)",
                w.get("prompts").and_then(Value::as_u64).unwrap_or(0)
            ),
            format!("{}{ci}", num(w.get("win_rate"))),
            String::new(),
        ]);
        rows.push([
            "mean reward-model score".into(),
            num(w.get("mean_score")),
            num(w.get("mean_score_against")),
        ]);
    }
    let count = |section: &str, path: &[&str]| -> u64 {
        path.iter()
            .try_fold(report.get(section).and_then(|s| s.get("model")), |v, k| {
                Some(v?.get(k))
            })
            .flatten()
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let risk = count("crisis", &["risk", "probes"]);
    let ordinary = count("crisis", &["ordinary", "probes"]);
    for (label, path) in [
        (
            format!("crisis probes pointing to help ({risk} risk prompts)"),
            ["risk", "points_to_help"],
        ),
        (
            "crisis probes minimising (risk prompts)".into(),
            ["risk", "minimises"],
        ),
        (
            format!("ordinary prompts sent to crisis help ({ordinary})"),
            ["ordinary", "points_to_help"],
        ),
        (
            "ordinary prompts minimised".into(),
            ["ordinary", "minimises"],
        ),
    ] {
        let [m, a] = pair("crisis", &path);
        rows.push([label, m, a]);
    }
    let [m, a] = pair("crisis", &["mean_crisis_safety"]);
    rows.push(["mean crisis_safety reward (risk prompts)".into(), m, a]);
    let items = count("multiple_choice", &["items"]);
    let [m, a] = pair("multiple_choice", &["accuracy"]);
    rows.push([format!("multiple-choice accuracy ({items} items)"), m, a]);
    let [m, a] = pair("multiple_choice", &["accuracy_norm"]);
    rows.push(["multiple-choice accuracy, per byte".into(), m, a]);
    if let Some(p) = report.get("reward_model_pairs") {
        rows.push([
            format!(
                "reward-model pairwise accuracy ({} pairs)",
                p.get("pairs").and_then(Value::as_u64).unwrap_or(0)
            ),
            num(p.get("accuracy")),
            String::new(),
        ]);
        for (dim, acc) in p
            .get("by_dimension")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            rows.push([
                format!(
                    "  {dim} ({} pairs differ)",
                    acc.get("pairs").and_then(Value::as_u64).unwrap_or(0)
                ),
                num(acc.get("accuracy")),
                String::new(),
            ]);
        }
    }
    (rows, against)
}

/// The worst crisis cases of `who` (`model` or `against`) as lines: id, what went wrong,
/// and, with `with_text`, the prompt and reply when the report carries them.
pub fn worst_cases(report: &Value, who: &str, with_text: bool) -> Vec<String> {
    let cases = report
        .get("crisis")
        .and_then(|c| c.get(who))
        .and_then(|c| c.get("worst"))
        .and_then(Value::as_array);
    cases
        .into_iter()
        .flatten()
        .map(|c| {
            let flag = |k: &str| c.get(k).and_then(Value::as_bool).unwrap_or(false);
            let what = match (flag("risk"), flag("help"), flag("minimises")) {
                (true, false, true) => "risk: no help, minimises",
                (true, false, false) => "risk: no help",
                (true, true, _) => "risk: minimises",
                (false, _, _) => "ordinary: minimises",
            };
            let id = c.get("id").and_then(Value::as_str).unwrap_or("?");
            let mut line = format!("{id} ({what})");
            if !with_text {
                return line;
            }
            if let (Some(p), Some(r)) = (
                c.get("prompt").and_then(Value::as_str),
                c.get("reply").and_then(Value::as_str),
            ) {
                line.push_str(&format!("\n    prompt: {p}\n    reply: {r}"));
            }
            line
        })
        .collect()
}

/// The whole report as the text the CLI prints.
pub fn text(report: &Value) -> String {
    let (rows, against) = rows(report);
    let width = rows.iter().map(|r| r[0].chars().count()).max().unwrap_or(0);
    let mut out = format!(
        "{:width$}  {:>20}{}\n",
        "counseling evaluation",
        "model",
        if against {
            format!("  {:>8}", "against")
        } else {
            String::new()
        }
    );
    for [label, m, a] in &rows {
        out.push_str(&format!("{label:width$}  {m:>20}"));
        if against {
            out.push_str(&format!("  {a:>8}"));
        }
        out.push('\n');
    }
    for who in ["model", "against"] {
        let lines = worst_cases(report, who, true);
        if !lines.is_empty() {
            out.push_str(&format!("worst crisis cases ({who}):\n"));
            for l in lines {
                out.push_str(&format!("  {l}\n"));
            }
        }
    }
    out
}

/// Whether any worst case in the report carries its prompt or reply text (written with
/// `--show-text`).
pub fn carries_text(report: &Value) -> bool {
    ["model", "against"].iter().any(|who| {
        report
            .get("crisis")
            .and_then(|c| c.get(who))
            .and_then(|c| c.get("worst"))
            .and_then(Value::as_array)
            .is_some_and(|cases| {
                cases
                    .iter()
                    .any(|c| c.get("prompt").is_some() || c.get("reply").is_some())
            })
    })
}
