//! `hearth data` commands on bad input, end to end: each fails with exit 1 and one `error:`
//! line naming the file (and line), leaves nothing behind, and never prints a panic.

use std::path::Path;

mod common;
use common::{fails, hearth, s};

fn succeeds(args: &[&str]) -> String {
    let out = hearth(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hearth {args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn tiny_model(dir: &Path) -> std::path::PathBuf {
    let model = dir.join("model");
    succeeds(&["init-model", "--out", s(&model)]);
    model
}

/// A `datasets`-style Arrow stream cache (three `messages` rows) with one byte of a buffer
/// offset in the record batch damaged: arrow slices past the body and panics on it.
#[test]
fn a_damaged_arrow_file_is_one_error_line_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let damaged =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tests/fixtures/damaged-stream.arrow");
    let err = fails(
        &["data", "inspect", s(&damaged), "--tokenizer", s(&model)],
        &["damaged-stream.arrow", "the file is damaged"],
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn data_inspect_names_the_line_of_a_row_it_cannot_tokenise_or_skips_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = tmp.path().join("talks.jsonl");
    let talk = serde_json::json!({"messages": [
        {"role": "user", "content": "How do I start?"},
        {"role": "assistant", "content": "What feels hardest?"}]});
    let no_reply = serde_json::json!({"messages": [{"role": "user", "content": "anyone?"}]});
    std::fs::write(&data, format!("{talk}\n{no_reply}\n")).unwrap();
    let inspect = ["data", "inspect", s(&data), "--tokenizer", s(&model)];
    fails(&inspect, &["talks.jsonl: line 2", "no assistant tokens"]);
    let report = succeeds(&[&inspect[..], &["--skip-bad-rows"]].concat());
    assert!(
        report.contains("examples: 1 (1 bad rows skipped)"),
        "{report}"
    );
    // Asked for an example when every row was skipped, it says so, not to ask for one.
    std::fs::write(&data, format!("{no_reply}\n")).unwrap();
    let report = succeeds(&[&inspect[..], &["--skip-bad-rows", "--show-example"]].concat());
    assert!(
        report.contains("no example to show") && !report.contains("pass --show-example"),
        "{report}"
    );
}

/// With a recipe, `data inspect`'s flags win over its `[data]` (they were ignored, so the
/// report described settings other than those asked for).
#[test]
fn data_inspect_flags_win_over_a_recipes_data_section() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let recipe = tmp.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = {:?}\n[data]\ntrain = {:?}\nmax_length = 4096\n",
            s(&model),
            s(&root.join("data/examples/counseling-sft.jsonl"))
        ),
    )
    .unwrap();
    let inspect = ["data", "inspect", s(&recipe)];
    let report = succeeds(&inspect);
    assert!(report.contains("max_length 4096 (keep_start)"), "{report}");
    let report = succeeds(
        &[
            &inspect[..],
            &["--max-length", "16", "--truncation", "drop"],
        ]
        .concat(),
    );
    assert!(report.contains("max_length 16 (drop)"), "{report}");
    // The flag is held to what a recipe may say.
    fails(
        &[&inspect[..], &["--max-length", "0"]].concat(),
        &["--max-length 0 must be from 2"],
    );
    fails(
        &[&inspect[..], &["--format", "alpaca"]].concat(),
        &["counseling-sft.jsonl", "line 1"],
    );
}

/// A pair whose chosen reply is empty is read by training (it learns the end of turn), so
/// `--show-example` shows it too instead of refusing it as a blank conversation.
#[test]
fn show_example_reads_a_pair_as_training_does() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"Where do I start?\", \"chosen\": \"\", \"rejected\": \"Anywhere.\"}\n",
    )
    .unwrap();
    let inspect = ["data", "inspect", s(&data), "--tokenizer", s(&model)];
    assert!(succeeds(&inspect).contains("examples: 1"));
    let shown = succeeds(&[&inspect[..], &["--show-example"]].concat());
    assert!(
        shown.contains("chosen:\n")
            && shown.contains("⟦<|eot_id|>⟧")
            && shown.contains("⟦Anywhere."),
        "{shown}"
    );
}

#[test]
fn errors_name_the_kind_of_a_value_never_its_text() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let said = "I want to die and nobody would notice";
    for (name, row) in [
        (
            "object.jsonl",
            serde_json::json!({"prompt": {"text": said}, "completion": "c"}),
        ),
        (
            "role.jsonl",
            serde_json::json!({"messages": [{"role": said, "content": "hi"}]}),
        ),
        ("columns.jsonl", serde_json::json!({ said: "x" })),
    ] {
        let data = tmp.path().join(name);
        std::fs::write(&data, format!("{row}\n")).unwrap();
        let err = fails(
            &["data", "inspect", s(&data), "--tokenizer", s(&model)],
            &[name, "line 1"],
        );
        assert!(!err.contains("want to die"), "{err}");
    }
}

#[test]
fn data_render_of_an_empty_input_fails_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let input = work.join("empty.jsonl");
    std::fs::write(&input, "\n").unwrap();
    let out = work.join("rendered.jsonl");
    let render = [
        "data",
        "render",
        "--tokenizer",
        s(&model),
        "--input",
        s(&input),
        "--out",
        s(&out),
    ];
    fails(&render, &["empty.jsonl", "no rows to read"]);
    assert_eq!(names(&work), ["empty.jsonl"]);
}

#[test]
fn data_generate_refuses_what_it_cannot_write_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let generate = |rows: &str, out: &Path| {
        let args = [
            "data",
            "generate",
            "--kind",
            "sft",
            "--rows",
            rows,
            "--out",
            s(out),
        ];
        args.map(str::to_string)
    };
    let run = |rows: &str, out: &Path, needles: &[&str]| {
        let args = generate(rows, out);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&args, needles);
    };
    let dir = tmp.path().join("a-directory.jsonl");
    std::fs::create_dir(&dir).unwrap();
    run("4", &dir, &["a-directory.jsonl", "directory"]);
    run(
        "4",
        &tmp.path().join("rows.parquet"),
        &["rows.parquet", "JSON Lines"],
    );
    run(
        "4",
        &tmp.path().join("rows.arrow"),
        &["rows.arrow", "JSON Lines"],
    );
    run(
        "0",
        &tmp.path().join("none.jsonl"),
        &["none.jsonl", "--rows"],
    );
    let kept = tmp.path().join("kept.jsonl");
    std::fs::write(&kept, "mine\n").unwrap();
    run("4", &kept, &["kept.jsonl", "exists"]);
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), "mine\n");
    assert_eq!(names(tmp.path()), ["a-directory.jsonl", "kept.jsonl"]);
    assert!(names(&dir).is_empty());
}

/// Ctrl-C (or a TERM) while `data generate` writes ends the process with the shell's
/// 128 + signal code and removes the half-written temporary file: nothing is left.
#[test]
fn a_signal_while_writing_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    for (signal, code) in [("INT", 130), ("TERM", 143), ("HUP", 129)] {
        let out = tmp.path().join(format!("rows-{signal}.jsonl"));
        let child = common::hup(
            &mut std::process::Command::new(env!("CARGO_BIN_EXE_hearth")),
            false,
        )
        .args(["data", "generate", "--kind", "sft", "--rows", "1000000000"])
        .arg("--out")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        // Wait until rows are on their way to disk.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let writing = || {
            names(tmp.path()).iter().any(|n| {
                n.ends_with(".tmp")
                    && std::fs::metadata(tmp.path().join(n)).is_ok_and(|m| m.len() > 0)
            })
        };
        while !writing() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(writing(), "SIG{signal}: no temporary file appeared");
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let done = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(code), "SIG{signal}: {stderr}");
        assert_eq!(stderr.trim(), format!("stopped by SIG{signal}"));
        assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));
    }
    // Under nohup (SIGHUP ignored) a hangup is ignored still: the writing goes on, and a
    // TERM then stops it as before.
    let out = tmp.path().join("rows-nohup.jsonl");
    let mut child = common::hup(
        &mut std::process::Command::new(env!("CARGO_BIN_EXE_hearth")),
        true,
    )
    .args(["data", "generate", "--kind", "sft", "--rows", "1000000000"])
    .arg("--out")
    .arg(&out)
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while names(tmp.path()).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let kill = |signal: &str, pid: u32| {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    kill("HUP", child.id());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "a HUP under nohup stopped it"
    );
    kill("TERM", child.id());
    let done = child.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(143));
    assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));
}

/// `data render` writes JSON Lines under any name but one that promises another format:
/// `rendered` is fine, `rendered.parquet` is refused before anything is written.
#[test]
fn render_takes_any_name_but_another_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/examples/counseling-sft.jsonl");
    let plain = tmp.path().join("rendered");
    let parquet = tmp.path().join("rendered.parquet");
    fn render<'a>(model: &'a Path, input: &'a Path, out: &'a Path) -> [&'a str; 8] {
        let s = |p: &'a Path| p.to_str().unwrap();
        [
            "data",
            "render",
            "--tokenizer",
            s(model),
            "--input",
            s(input),
            "--out",
            s(out),
        ]
    }
    let render = |out| render(&model, &input, out);
    succeeds(&render(&plain));
    assert!(std::fs::read_to_string(&plain).unwrap().lines().count() > 0);
    fails(&render(&parquet), &["rendered.parquet", "not .parquet"]);
    assert!(!parquet.exists());
}
