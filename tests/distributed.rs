//! Data-parallel training over MPI: two ranks under `mpirun -np 2` on loopback train the
//! tiny recipes to the weights one process reaches with the same global batch; a run
//! resumes on another world size; a rank that dies stops the others with a message.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use checkpoints::WeightFiles;

mod common;
use common::{copy_dir, metric_lines, s};

/// Summation order is all that may differ between the runs. With one micro-batch per rank
/// both compute `g₀ + g₁` and the weights come out bit-identical (measured here: 0). With
/// two per rank, the ranks sum `(g₀ + g₁) + (g₂ + g₃)` where one process sums
/// `((g₀ + g₁) + g₂) + g₃`, and Adam carries the rounding through the steps: the bound is
/// that, relative to the largest weight (measured here: 2.6e-6), with room for other CPUs.
const WEIGHT_TOLERANCE: f32 = 1e-4;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `hearth train` arguments for a tiny recipe with `sets`.
fn train_args(recipe: &str, verb: &str, run: &Path, base: &Path, sets: &[String]) -> Vec<String> {
    let mut args = vec![
        "train".to_string(),
        s(&root().join("recipes").join(recipe)).into(),
        verb.into(),
        s(run).into(),
    ];
    let data = if recipe.contains("dpo") {
        "data/examples/counseling-preference.jsonl"
    } else if recipe.contains("grpo") {
        "data/examples/counseling-prompts.jsonl"
    } else {
        "data/examples/counseling-sft.jsonl"
    };
    let common = [
        format!("model.path={:?}", s(base)),
        format!("data.train={:?}", s(&root().join(data))),
    ];
    for set in common.iter().chain(sets) {
        args.push("--set".into());
        args.push(set.clone());
    }
    args
}

/// One thread per process, so both runs split their sums the same way inside each op.
fn single(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("run hearth")
}

fn mpirun_command(np: usize, extra: &[&str], args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "-np",
        &np.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .args(["-x", "RAYON_NUM_THREADS=1"])
    .args(extra)
    .arg(env!("CARGO_BIN_EXE_hearth"))
    .args(args)
    // mpirun refuses root without both (CI runs as root).
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

fn mpirun(np: usize, args: &[String]) -> Output {
    mpirun_command(np, &[], args)
        .output()
        .expect("mpirun (Open MPI's openmpi-bin) must be installed")
}

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The adapter's tensors, by name.
fn adapter(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let files = WeightFiles::open_file(&dir.join("adapter_model.safetensors")).unwrap();
    let mut names: Vec<String> = files.names().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let values = files.get(&n).unwrap().to_f32().unwrap();
            (n, values)
        })
        .collect()
}

/// The largest difference between two adapters, relative to the largest weight.
fn weight_gap(a: &Path, b: &Path) -> f32 {
    let (a, b) = (adapter(a), adapter(b));
    assert_eq!(a.len(), b.len());
    let (mut gap, mut scale) = (0f32, 0f32);
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            gap = gap.max((x - y).abs());
            scale = scale.max(x.abs());
        }
    }
    assert!(scale > 0.0);
    gap / scale
}

/// `(step, loss)` of each training line of a run's metrics.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    metric_lines(run)
        .iter()
        .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

fn eval_loss(run: &Path) -> f64 {
    metric_lines(run)
        .iter()
        .filter_map(|v| v.get("eval_loss")?.as_f64())
        .next_back()
        .expect("an eval line")
}

fn sets(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// One process with micro-batches of 4 and `2 × accum` accumulation steps, and two ranks
/// with micro-batches of 4 and `accum` each, see the same global batch per step: the
/// losses of the first step are identical (same weights, same micro-batches, same dropout
/// draws), and the weights after six steps agree to within float-summation tolerance.
fn two_ranks_match_one_process(recipe: &str, dropout: &str, accum: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let common = [
        "train.max_steps=6",
        "train.per_device_train_batch_size=4",
        "train.eval_steps=0",
        "train.save_steps=3",
        dropout,
    ];
    let one = tmp.path().join("one");
    let mut s1 = sets(&common);
    s1.push(format!("train.gradient_accumulation_steps={}", 2 * accum));
    assert_ok(
        "one process",
        &single(&train_args(recipe, "--out", &one, &base, &s1)),
    );

    let two = tmp.path().join("two");
    let mut s2 = sets(&common);
    s2.push(format!("train.gradient_accumulation_steps={accum}"));
    // Small buckets (50 kB): many all-reduce calls of a few whole parameters each.
    s2.push("dist.bucket_mb=0.05".into());
    let args = train_args(recipe, "--out", &two, &base, &s2);
    assert_ok("mpirun -np 2", &mpirun(2, &args));

    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 6, "{l1:?}");
    assert_eq!(l2.len(), 6, "only rank 0 logs, once per step: {l2:?}");
    assert_eq!(
        l1[0], l2[0],
        "the first step sees the same batch and weights"
    );
    for (a, b) in l1.iter().zip(&l2) {
        assert!(
            (a.1 - b.1).abs() < 1e-4 * a.1.abs().max(1.0),
            "{a:?} vs {b:?}"
        );
    }
    let gap = weight_gap(&one.join("final"), &two.join("final"));
    eprintln!("{recipe}, {accum} per rank: weights differ by {gap:e} of the largest weight");
    if accum == 1 {
        assert_eq!(gap, 0.0, "one micro-batch per rank sums in the same order");
    }
    assert!(gap < WEIGHT_TOLERANCE, "{recipe}: weights differ by {gap}");
    let (e1, e2) = (eval_loss(&one), eval_loss(&two));
    assert!((e1 - e2).abs() < 1e-4, "eval loss {e1} vs {e2}");
    // Rank 0 alone wrote the run: one line per step, no second writer's files.
    let entries: Vec<String> = std::fs::read_dir(&two)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(entries.iter().all(|e| !e.contains(".tmp")), "{entries:?}");

    // The run resumes on one process from its step-3 checkpoint, keeping the global batch
    // by doubling the accumulation: it ends where the two ranks did.
    let resumed = tmp.path().join("resumed");
    copy_dir(&two, &resumed);
    std::fs::remove_dir_all(resumed.join("final")).unwrap();
    let args = train_args(recipe, "--resume", &resumed, &base, &s1);
    assert_ok("resume on one process", &single(&args));
    let l3 = losses(&resumed);
    assert_eq!(l3.len(), 6);
    assert_eq!(
        l3[..3],
        l2[..3],
        "steps before the checkpoint are kept as logged"
    );
    for (a, b) in l3.iter().zip(&l2) {
        assert!(
            (a.1 - b.1).abs() < 1e-4 * a.1.abs().max(1.0),
            "{a:?} vs {b:?}"
        );
    }
    let gap = weight_gap(&resumed.join("final"), &two.join("final"));
    assert!(
        gap < WEIGHT_TOLERANCE,
        "{recipe} resumed: weights differ by {gap}"
    );
}

#[test]
fn sft_on_two_ranks_matches_one_process_and_resumes_on_one() {
    // Dropout on: each micro-batch draws the same masks whichever rank runs it.
    two_ranks_match_one_process("tiny-sft.toml", "lora.dropout=0.1", 1);
    two_ranks_match_one_process("tiny-sft.toml", "lora.dropout=0.1", 2);
}

#[test]
fn dpo_on_two_ranks_matches_one_process_and_resumes_on_one() {
    two_ranks_match_one_process("tiny-dpo.toml", "lora.dropout=0.0", 1);
}

/// GRPO spreads its prompts over the ranks and gathers the rewards before the advantages,
/// so batch-scaled advantages see the global batch. Sampling differs from one process (each
/// rank draws its own stream), so this checks the run, not the weights: every step is
/// logged once with its reward, samples are reused over two iterations, and the adapter is
/// written.
#[test]
fn grpo_on_two_ranks_trains_with_gathered_rewards() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let run = tmp.path().join("run");
    let args = train_args(
        "tiny-grpo.toml",
        "--out",
        &run,
        &base,
        &sets(&[
            "train.max_steps=4",
            "train.per_device_train_batch_size=8",
            "train.gradient_accumulation_steps=1",
            "grpo.num_generations=4",
            "grpo.max_completion_length=8",
            "grpo.scale_rewards=\"batch\"",
            "grpo.num_iterations=2",
            "grpo.log_completions=true",
        ]),
    );
    let out = mpirun(2, &args);
    assert_ok("mpirun -np 2 GRPO", &out);
    // The job says it trained once, not once per rank.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("trained 4 steps").count(), 1, "{stderr}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v.get("loss").is_some())
        .collect();
    assert_eq!(lines.len(), 4);
    for l in &lines {
        let reward = l["reward"].as_f64().expect("reward logged");
        assert!((0.0..=1.0).contains(&reward), "{l}");
        // Length metrics are of the whole batch, not ranks' figures averaged: whole
        // numbers, the stopped completions' mean within the lengths' range.
        let m = |k: &str| l[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {l}"));
        let (min, max) = (m("completions/min_length"), m("completions/max_length"));
        assert!(
            min.fract() == 0.0 && max.fract() == 0.0 && min <= max,
            "{l}"
        );
        if m("completions/clipped_ratio") < 1.0 {
            let stopped = m("completions/mean_terminated_length");
            assert!((min..=max).contains(&stopped), "{l}");
        }
    }
    // Input tokens are counted when sampled, as TRL counts them: a step that reuses the
    // samples (num_iterations 2) adds none.
    let seen: Vec<u64> = lines
        .iter()
        .map(|l| l["num_tokens"].as_u64().unwrap())
        .collect();
    assert!(
        seen[1] == seen[0] && seen[2] > seen[1] && seen[3] == seen[2],
        "{seen:?}"
    );
    assert!(run.join("final/adapter_model.safetensors").is_file());
    // Every rank's completions are logged: 2 ranks × 8 per sampling, which is every other
    // step (num_iterations 2) of 4. Rank 0's alone were 16.
    let logged = std::fs::read_to_string(run.join("completions.jsonl")).unwrap();
    assert_eq!(logged.lines().count(), 32);
    assert_reward_stats_are_the_batch(&run, &lines, 16, 2);
}

/// The one reward's mean and spread on each logged line are the whole batch's (`per_step`
/// samples from every rank, drawn every `iterations` steps), as `completions.jsonl`'s own
/// rewards give them; the ranks' spreads averaged differ.
fn assert_reward_stats_are_the_batch(
    run: &Path,
    lines: &[serde_json::Value],
    per_step: usize,
    iterations: u64,
) {
    let logged: Vec<serde_json::Value> = std::fs::read_to_string(run.join("completions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for l in lines {
        let step = l["step"].as_u64().unwrap();
        let sampled = step - (step - 1) % iterations;
        let r: Vec<f64> = logged
            .iter()
            .filter(|c| c["step"].as_u64() == Some(sampled))
            .map(|c| c["reward"].as_f64().unwrap())
            .collect();
        assert_eq!(r.len(), per_step, "step {sampled}");
        let n = per_step as f64;
        let mean = r.iter().sum::<f64>() / n;
        let std = (r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let got = |k: &str| l[k].as_f64().unwrap();
        assert!((got("rewards/length/mean") - mean).abs() < 1e-9, "{l}");
        assert!((got("rewards/length/std") - std).abs() < 1e-9, "{l}");
    }
}

/// Session GRPO's reward metrics are the whole batch's too: each session's scores come
/// back from every rank before their mean and spread are taken.
#[test]
fn session_grpo_on_two_ranks_reports_the_batch_rewards() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let run = tmp.path().join("run");
    let args = train_args(
        "tiny-session-grpo.toml",
        "--out",
        &run,
        &base,
        &sets(&[
            "train.max_steps=2",
            "train.per_device_train_batch_size=4",
            "grpo.num_generations=2",
            "grpo.max_turns=2",
            "grpo.client.max_new_tokens=6",
            "grpo.log_completions=true",
        ]),
    );
    let out = mpirun(2, &args);
    assert_ok("mpirun -np 2 session GRPO", &out);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v.get("loss").is_some())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_reward_stats_are_the_batch(&run, &lines, 8, 1);
}

/// GRPO's micro-batch is a rank's prompts of one step, so it changes with the number of
/// processes: a run resumed on one process from a two-process checkpoint (same global
/// batch) goes on at the same prompt, its epoch counter where the unbroken run's is.
#[test]
fn grpo_resumes_on_one_process_where_two_left_off() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    // 32 prompts, 4 a step: 8 steps an epoch. The checkpoint at step 6 stands 24 prompts
    // in, 12 two-prompt micro-batches; counted as one process's four-prompt ones, the epoch
    // would be over and step 7 would start the next.
    let common = [
        "train.max_steps=8",
        "train.save_steps=6",
        "train.per_device_train_batch_size=4",
        "grpo.num_generations=4",
        "grpo.max_completion_length=4",
    ];
    let two = tmp.path().join("two");
    let mut s2 = sets(&common);
    s2.push("train.gradient_accumulation_steps=2".into());
    assert_ok(
        "mpirun -np 2 GRPO",
        &mpirun(2, &train_args("tiny-grpo.toml", "--out", &two, &base, &s2)),
    );
    let resumed = tmp.path().join("resumed");
    copy_dir(&two, &resumed);
    std::fs::remove_dir_all(resumed.join("final")).unwrap();
    let mut s1 = sets(&common);
    s1.push("train.gradient_accumulation_steps=4".into());
    let args = train_args("tiny-grpo.toml", "--resume", &resumed, &base, &s1);
    assert_ok("resume on one process", &single(&args));
    let epochs = |run: &Path| -> Vec<(u64, f64)> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("loss").is_some())
            .map(|v| (v["step"].as_u64().unwrap(), v["epoch"].as_f64().unwrap()))
            .collect()
    };
    let (a, b) = (epochs(&two), epochs(&resumed));
    assert_eq!(a.len(), 8, "{a:?}");
    assert_eq!(a[6], (7, 0.875), "{a:?}");
    assert_eq!(a, b, "the resumed run's data position");
}

/// A pipeline under mpirun runs every stage data parallel (MPI initialised once for all
/// of them); stage directories are decided and cleared by rank 0 alone, and the report is
/// printed once.
#[test]
fn a_pipeline_runs_on_two_ranks_and_reports_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pipeline");
    let args: Vec<String> = vec![
        "pipeline".into(),
        s(&root().join("recipes/tiny-pipeline.toml")).into(),
        "--out".into(),
        s(&out).into(),
    ];
    let run = mpirun(2, &args);
    assert_ok("pipeline on two ranks", &run);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(
        stdout.matches("# hearth pipeline report").count(),
        1,
        "{stdout}"
    );
    for stage in ["sft", "reward", "dpo", "grpo"] {
        assert!(
            out.join(stage).join("final").is_dir(),
            "{stage} has no final/"
        );
    }
}

/// The pid of the process of this test's job (marked by `mark` in its environment) that
/// MPI made rank `rank`.
fn rank_pid(mark: &str, rank: usize) -> Option<u32> {
    let want_rank = format!("OMPI_COMM_WORLD_RANK={rank}");
    let want_mark = format!("HEARTH_TEST_MARK={mark}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        let has = |w: &str| vars.contains(&w.as_bytes());
        if has(&want_rank) && has(&want_mark) {
            return Some(pid);
        }
    }
    None
}

/// Whether process `pid` runs (a zombie waiting for its parent does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses.
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        !(state.starts_with('Z') || state.starts_with('X'))
    })
}

/// With the launcher told not to tear the job down (as when a node is lost, or ranks are
/// started by something other than mpirun), rank 0 notices that rank 1 is gone at its next
/// collective and stops within `dist.timeout_s`, saying so.
#[test]
fn a_dead_rank_stops_the_others_within_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let run = tmp.path().join("run");
    let timeout = 5.0;
    let args = train_args(
        "tiny-sft.toml",
        "--out",
        &run,
        &base,
        &sets(&[
            "train.max_steps=100000",
            "train.save_steps=0",
            "train.eval_steps=0",
            &format!("dist.timeout_s={timeout}"),
        ]),
    );
    let mark: PathBuf = tmp.path().to_path_buf();
    let mark = s(&mark).to_string();
    let mut child = mpirun_command(2, &["--mca", "orte_abort_on_non_zero_status", "0"], &args)
        .env("HEARTH_TEST_MARK", &mark)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun");
    // Wait until both ranks train: rank 0 has logged a step.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !run.join("metrics.jsonl").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(run.join("metrics.jsonl").exists(), "the job never trained");
    let rank0 = rank_pid(&mark, 0).expect("rank 0's process");
    let rank1 = rank_pid(&mark, 1).expect("rank 1's process");
    unsafe { libc::kill(rank1 as i32, libc::SIGKILL) };
    let killed = Instant::now();
    // Told not to abort, mpirun itself lingers after both ranks end: what counts is rank
    // 0's process.
    let limit = Duration::from_secs_f64(timeout + 60.0);
    while alive(rank0) && killed.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let waited = killed.elapsed();
    let still = alive(rank0);
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        !still,
        "rank 0 still running {limit:?} after rank 1 died: {stderr}"
    );
    assert!(
        stderr.contains("rank 0 of 2")
            && stderr.contains("got no answer from the other ranks within 5 s"),
        "{stderr}"
    );
    assert!(
        waited >= Duration::from_secs_f64(timeout * 0.5),
        "stopped after {waited:?}: before the timeout, so not by it"
    );
    eprintln!("rank 0 stopped {waited:?} after rank 1 was killed");
}

/// A failure on one rank before training (here rank 0 refuses a directory that already
/// holds a run) stops every rank at once, with rank 0's message.
#[test]
fn a_failure_on_rank_0_stops_the_job_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(run.join("final")).unwrap();
    let args = train_args(
        "tiny-sft.toml",
        "--out",
        &run,
        &tmp.path().join("base"),
        &sets(&["train.max_steps=1"]),
    );
    let started = Instant::now();
    let out = mpirun(2, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("already holds a run"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
}

/// SIGTERM to one rank (Slurm signals all, but one is enough): every rank stops after the
/// same step, rank 0 writes the checkpoint before any rank exits, and the run resumed on
/// two ranks ends with the weights of a run never stopped.
#[test]
fn sigterm_to_one_rank_checkpoints_the_job_and_it_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let list = sets(&[
        "train.max_steps=30",
        "train.save_steps=0",
        "train.eval_steps=0",
        "train.per_device_train_batch_size=4",
        "lora.dropout=0.1",
    ]);
    let whole = tmp.path().join("whole");
    assert_ok(
        "uninterrupted",
        &mpirun(
            2,
            &train_args("tiny-sft.toml", "--out", &whole, &base, &list),
        ),
    );

    let run = tmp.path().join("run");
    let mark = s(tmp.path()).to_string();
    let child = mpirun_command(
        2,
        &[],
        &train_args("tiny-sft.toml", "--out", &run, &base, &list),
    )
    .env("HEARTH_TEST_MARK", &mark)
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !run.join("metrics.jsonl").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rank1 = rank_pid(&mark, 1).expect("rank 1's process");
    unsafe { libc::kill(rank1 as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !run.join("final").exists(),
        "the run ended before the signal: {stderr}"
    );
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    let checkpoint = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"))
        })
        .expect("a checkpoint written on the signal");
    checkpoints::verify_manifest(&checkpoint).unwrap();

    let resume = train_args("tiny-sft.toml", "--resume", &run, &base, &list);
    assert_ok("resume on two ranks", &mpirun(2, &resume));
    let read = |r: &Path| std::fs::read(r.join("final/adapter_model.safetensors")).unwrap();
    assert!(read(&whole) == read(&run), "resumed weights differ");
    assert_eq!(losses(&whole), losses(&run));
}

/// Without MPI's variables and with a launcher's world size above one, a build that has
/// no engine for it says so (here: torchrun-style variables without an MPI launcher).
#[test]
fn torchrun_variables_without_an_mpi_launcher_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let args = train_args(
        "tiny-sft.toml",
        "--out",
        &tmp.path().join("run"),
        &tmp.path().join("base"),
        &sets(&["train.max_steps=1"]),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(&args)
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("mpirun") && stderr.contains("torchrun"),
        "{stderr}"
    );
}
