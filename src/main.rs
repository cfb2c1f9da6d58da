//! `hearth`: the command line. It parses, dispatches and reports; the work lives in the
//! library crates.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use checkpoints::{ModelType, SaveOptions};
use clap::Parser;
use data::render::TemplateChoice;
use trainer::logits::LogitsInput;

mod args;
use args::*;

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Report(a) => {
            let page = trainer::report::write_page(&a.dir)?;
            for what in trainer::report::left_out(&a.dir) {
                eprintln!("warning: {what}");
            }
            eprintln!("wrote {}", page.display());
        }
        Command::Selftest(a) => {
            kernels::set_attention_path(a.attention.into());
            let device = trainer::device::parse(&a.device)?.autodiff();
            let dtypes: Vec<_> = match a.dtypes.is_empty() {
                true => trainer::selftest::default_dtypes(&a.device),
                false => a.dtypes.iter().map(|d| d.dtype()).collect(),
            };
            trainer::selftest::run(&device, &a.device, &dtypes, a.small, a.out.as_deref(), emit)?;
        }
        Command::Logits(a) => {
            let device = trainer::device::parse(&a.device)?;
            let input = match &a.input {
                Some(path) => LogitsInput::File(path),
                None => LogitsInput::Texts(&a.text),
            };
            let shape = trainer::logits::write_logits(
                &a.model,
                a.adapter.as_deref(),
                input,
                &a.out,
                &device,
            )?;
            eprintln!(
                "wrote logits [{}, {}, {}] to {}",
                shape.batch,
                shape.tokens,
                shape.vocab,
                a.out.display()
            );
        }
        Command::InitModel(a) => init_model(a)?,
        Command::Convert(a) => {
            let save = SaveOptions {
                max_shard_bytes: a.max_shard_size,
            };
            trainer::model::convert(&a.model, &a.out, a.dtype.map(Into::into), save)
                .with_context(|| format!("converting {}", a.model.display()))?;
            eprintln!("wrote {}", a.out.display());
        }
        Command::Data(DataCommand::Render(a)) => {
            tokenizer_dir(&a.tokenizer)?;
            let choice = TemplateChoice::new(a.template.as_deref(), a.template_name.as_deref());
            checkpoints::guard::check_output_file(&a.out, &[&a.input, &a.tokenizer])?;
            let n = data::render::render_jsonl(&a.tokenizer, choice, &a.input, &a.out)?;
            eprintln!("rendered {n} conversations to {}", a.out.display());
        }
        Command::Data(DataCommand::Inspect(a)) => inspect(a)?,
        Command::Generate(a) => generate(a)?,
        Command::Merge(a) => {
            let plain = a.quantize == trainer::choices::Quantize::None;
            if plain && (!a.quantize_skip.is_empty() || a.quantize_embeddings) {
                bail!("merge: --quantize-skip and --quantize-embeddings describe --quantize");
            }
            let quant = trainer::model::quantized::Quantization::new(a.quantize, &a.quantize_skip)
                .with_embeddings(a.quantize_embeddings);
            trainer::model::adapter::merge_to_dir(&a.base, &a.adapter, &a.out, &quant)?;
            eprintln!("wrote merged model to {}", a.out.display());
        }
        Command::Export(ExportCommand::Gguf(a)) => {
            trainer::model::export_to_gguf(&a.model, a.adapter.as_deref(), &a.out, a.ty)?;
            eprintln!("wrote {}", a.out.display());
        }
        Command::Reward(RewardCommand::Score(a)) => {
            let device = trainer::device::parse(&a.device)?;
            let n = trainer::evaluate::score_file(
                &a.model,
                a.adapter.as_deref(),
                &a.input,
                &a.out,
                &device,
            )?;
            eprintln!("scored {n} conversations into {}", a.out.display());
        }
        Command::Eval(EvalCommand::Preference(a)) => {
            trainer::recipe::check_max_length("--max-length", a.max_length)
                .map_err(anyhow::Error::msg)?;
            let device = trainer::device::parse(&a.device)?;
            let report = trainer::evaluate::preference_accuracy(
                &a.model,
                a.adapter.as_deref(),
                &a.data,
                a.max_length,
                &device,
            )?;
            emit(&serde_json::to_string(&report)?)?;
        }
        Command::Eval(EvalCommand::Counseling(a)) => eval_counseling(a)?,
        Command::Pipeline(a) => {
            let out = a
                .out
                .unwrap_or_else(|| trainer::run_dir::default_root(&a.pipeline, "pipeline"));
            let report = trainer::pipeline::run(&a.pipeline, &out, &a.set, true)?;
            if trainer::dist::is_main_process() {
                emit(&report.text)?;
            }
            eprintln!(
                "report written to {}",
                out.join(trainer::pipeline::REPORT_FILE).display()
            );
        }
        Command::Train(a) => {
            let recipe = trainer::recipe::load(&a.recipe, &a.set)?;
            let resume = a.resume.is_some();
            let out = a
                .resume
                .or(a.out)
                .unwrap_or_else(|| trainer::run_dir::default_root(&a.recipe, "run"));
            // A new run writes its resolved recipe over `OUT/recipe.toml`: never the file it
            // was started from (a resume reads it and writes nothing there).
            let own = out.join(trainer::run_dir::RECIPE_FILE);
            anyhow::ensure!(
                resume || !same_file(&a.recipe, &own),
                "{}: this recipe is the run directory's own recipe.toml, which a new run \
                 writes; copy it elsewhere or choose another --out",
                a.recipe.display()
            );
            let outcome = trainer::train::train(&recipe, &out, resume, true)?;
            // Once per job: every rank of a data-parallel run returns here.
            if !outcome.reports {
                return Ok(());
            }
            eprintln!(
                "trained {} steps: loss {:.4} -> {:.4}{}; final weights in {}",
                outcome.steps,
                outcome.first_loss,
                outcome.last_loss,
                outcome
                    .eval_loss
                    .map(|l| format!(", eval_loss {l:.4}"))
                    .unwrap_or_default(),
                out.join(trainer::run_dir::FINAL_DIR).display()
            );
        }
        Command::Data(DataCommand::Generate(a)) => {
            let kind: data::synth::Kind = a.kind.parse().map_err(anyhow::Error::msg)?;
            checkpoints::guard::check_output_file(&a.out, &[])?;
            data::synth::write(kind, a.rows, a.seed, &a.out)?;
            eprintln!("wrote {} {} rows to {}", a.rows, a.kind, a.out.display());
        }
    }
    Ok(())
}

/// Whether `a` and `b` name one existing file, however spelled (links, `..`).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// `hearth init-model`: a new random model in Hugging Face layout.
fn init_model(a: InitModelArgs) -> Result<()> {
    let spec = trainer::model::NewModel {
        model_type: match a.model_type {
            Arch::Llama => ModelType::Llama,
            Arch::Qwen2 => ModelType::Qwen2,
            Arch::Mistral => ModelType::Mistral,
        },
        vocab_size: a.vocab_size,
        hidden_size: a.hidden_size,
        intermediate_size: a.intermediate_size,
        num_hidden_layers: a.layers,
        num_attention_heads: a.heads,
        num_key_value_heads: a.kv_heads,
        tie_word_embeddings: a.tie_embeddings,
        dtype: a.dtype.into(),
        seed: a.seed,
        init_std: a.init_std,
        ..Default::default()
    };
    let save = SaveOptions {
        max_shard_bytes: a.max_shard_size,
    };
    let config = trainer::model::init_model(&a.out, &spec, save)?;
    eprintln!(
        "made a {} model ({} layers, hidden {}, vocab {}) in {}",
        config.model_type.as_str(),
        config.num_hidden_layers,
        config.hidden_size,
        config.vocab_size,
        a.out.display()
    );
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    data::format::check_renames(&a.columns, "--column").map_err(anyhow::Error::msg)?;
    if let Some(n) = a.max_length {
        trainer::recipe::check_max_length("--max-length", n).map_err(anyhow::Error::msg)?;
    }
    let flags = trainer::inspect::Overrides {
        format: a.format,
        columns: a.columns,
        max_length: a.max_length,
        truncation: a.truncation,
        skip_bad_rows: a.skip_bad_rows,
        template: a.template,
    };
    let source = if a.file.extension().is_some_and(|e| e == "toml") {
        trainer::inspect::Source::Recipe(&a.file, flags)
    } else {
        let mut config = data::config::DataConfig {
            train: a.file.clone(),
            eval: None,
            format: None,
            columns: Default::default(),
            skip_bad_rows: false,
            max_length: 1024,
            truncation: "keep_start".into(),
            template: None,
            eval_fraction: 0.0,
            seed: 0,
            packing: false,
        };
        flags.apply(&mut config);
        trainer::inspect::Source::Data(config)
    };
    if let Some(dir) = &a.tokenizer {
        tokenizer_dir(dir)?;
    }
    let report = trainer::inspect::inspect(source, a.tokenizer.as_deref(), a.show_example)?;
    emit(&report.to_string())
}

fn generate(a: GenerateTextArgs) -> Result<()> {
    // clap's `requires = "input"` on --out does not hold beside --prompt or --chat.
    if let (None, Some(out)) = (&a.input, &a.out) {
        bail!(
            "generate: --out {} is where --input's replies go; with --prompt or --chat the \
             reply goes to standard output (redirect it)",
            out.display()
        );
    }
    if a.batch_size == 0 {
        bail!("generate: --batch-size must be at least 1");
    }
    if a.samples > MAX_SAMPLES {
        bail!(
            "generate: --samples {} is more replies per prompt than hearth draws (at most \
             {MAX_SAMPLES}); run it again with another --seed for more",
            a.samples
        );
    }
    if a.samples > 1 && a.temperature == 0.0 {
        bail!(
            "generate: --samples {} with greedy decoding gives {0} identical replies; set \
             --temperature above 0 to sample them",
            a.samples
        );
    }
    let device = trainer::device::parse(&a.device)?;
    let mut chat = trainer::chat::Chat::open(trainer::chat::ChatOptions {
        model: &a.model,
        adapter: a.adapter.as_deref(),
        template: a.template.as_deref(),
        system: a.system.as_deref(),
        sampling: trainer::generate::Sampling {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        device: &device,
    })?;
    if let (Some(input), Some(out)) = (&a.input, &a.out) {
        let done = chat.answer_file(input, out, a.batch_size, a.samples)?;
        let each = match a.samples {
            1 => String::new(),
            n => format!(" {n} times each"),
        };
        eprintln!(
            "answered {} prompts{each} with {} tokens in {:.2} s ({:.1} tokens/s) into {}",
            done.prompts,
            done.tokens,
            done.seconds,
            done.tokens as f64 / done.seconds.max(1e-9),
            out.display()
        );
        return Ok(());
    }
    match a.prompt {
        Some(text) => emit(&chat.reply(text)?),
        None => chat.converse(std::io::stdin().lock(), emit),
    }
}

/// Replies drawn per prompt at most: their streams are numbered by place, which must not
/// overflow, and far fewer fill a disk.
const MAX_SAMPLES: usize = 10_000;

/// More resamplings than this add nothing a 95% interval can show and hold their rates
/// in memory.
const MAX_BOOTSTRAP: usize = 1_000_000;

/// Refuses a `--tokenizer` that is a `tokenizer.json` (or other) file instead of the
/// directory holding it: read alone, its `tokenizer_config.json` (the BOS and the template's
/// special tokens) was silently missed. A GGUF model file holds both, so it is taken.
fn tokenizer_dir(path: &std::path::Path) -> Result<()> {
    let gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if path.is_file() && !gguf {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        bail!(
            "--tokenizer {}: give the directory holding tokenizer.json and its \
             tokenizer_config.json ({}), not the file: alone it loses the BOS and the \
             template's special tokens",
            path.display(),
            parent.display()
        );
    }
    Ok(())
}

/// Fewer resamplings than this leave the interval's 2.5th and 97.5th percentiles to one or
/// two draws, an interval in name only (one draw gave one that missed the estimate).
const MIN_BOOTSTRAP: usize = 100;

fn eval_counseling(a: Box<EvalCounselingArgs>) -> Result<()> {
    trainer::recipe::check_max_length("--max-length", a.max_length).map_err(anyhow::Error::msg)?;
    if a.bootstrap < MIN_BOOTSTRAP {
        bail!(
            "eval counseling: --bootstrap {} is too few resamplings for a 95% interval; use at \
             least {MIN_BOOTSTRAP} (the default is 2000)",
            a.bootstrap
        );
    }
    if a.bootstrap > MAX_BOOTSTRAP {
        bail!(
            "eval counseling: --bootstrap {} is more resamplings than a 95% interval needs; use \
             at most {MAX_BOOTSTRAP} (the default is 2000)",
            a.bootstrap
        );
    }
    let device = trainer::device::parse(&a.device)?;
    let report = trainer::counseling_eval::run(&trainer::counseling_eval::Options {
        model: &a.model,
        adapter: a.adapter.as_deref(),
        against: a.against.as_deref(),
        against_adapter: a.against_adapter.as_deref(),
        reward_model: a.reward_model.as_deref(),
        reward_adapter: a.reward_adapter.as_deref(),
        prompts: a.prompts.as_deref(),
        probes: a.probes.as_deref(),
        choices: a.choices.as_deref(),
        pairs: a.pairs.as_deref(),
        out: &a.out,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
        bootstrap: a.bootstrap,
        seed: a.seed,
        worst: a.worst,
        show_text: a.show_text,
        max_length: a.max_length,
        device: &device,
    })?;
    let json = serde_json::to_value(&report)?;
    emit(trainer::counseling_eval::table::text(&json).trim_end())?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// Standard output was closed by its reader (`hearth data inspect … | head`).
#[derive(Debug)]
struct ClosedPipe;

impl std::fmt::Display for ClosedPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for ClosedPipe {}

/// Writes one line of the command's output. A reader that closed the pipe ends the command
/// quietly, as it ends Unix tools, instead of `println!`'s panic.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => anyhow::Error::new(ClosedPipe),
            _ => anyhow::Error::new(e).context("writing to standard output"),
        })
}

/// The error chain on one line. Library errors already embed their cause in their message,
/// so a cause whose text is already shown is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

fn main() -> ExitCode {
    // Before the first allocation of any size: a step's freed buffers stay for the next.
    trainer::heap::keep_freed_buffers();
    // SAFETY: nothing but this thread runs yet.
    unsafe { trainer::device::pin_default_device_to_cpu() };
    // A panic is a bug in hearth, never the way bad input is reported: say so in one line.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error in hearth (please report): {info}");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // clap's message runs until its usage block; keep it to one line.
            let text = e.render().to_string();
            let head: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("{} (see hearth --help)", head.join(" "));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    // Ctrl-C or a TERM outside training removes the files being written before it ends
    // the process (training stops after its step instead): see trainer::signals.
    trainer::signals::install();
    // The whole command, its MPI finish included (MPI's state belongs to the thread that
    // started it), on a worker of the CPU's thread pool: see kernels::cpu::on_workers.
    kernels::cpu::on_workers(|| outcome(cli))
}

/// Runs the command and turns its result into the exit code, after finishing MPI.
fn outcome(cli: Cli) -> ExitCode {
    match run(cli) {
        Ok(()) => {
            trainer::dist::finish(true, 0);
            ExitCode::SUCCESS
        }
        Err(e) if e.downcast_ref::<ClosedPipe>().is_some() => {
            trainer::dist::finish(true, 0);
            // What a shell reports for a writer stopped by SIGPIPE.
            ExitCode::from(141)
        }
        Err(e) => {
            // A signal stops training cleanly, with the shell's 128 + signal exit code.
            if let Some(trainer::TrainerError::Interrupted { signal, .. }) =
                e.downcast_ref::<trainer::TrainerError>()
            {
                eprintln!("{e}");
                trainer::dist::finish(true, 0);
                return ExitCode::from((128 + signal) as u8);
            }
            eprintln!("error: {}", one_line(&e));
            trainer::dist::finish(false, 1);
            ExitCode::FAILURE
        }
    }
}
