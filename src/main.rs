//! `hearth`: the command line. It parses, dispatches and reports; the work lives in the
//! library crates.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use checkpoints::{ModelType, SaveOptions, WeightDtype};
use clap::{Args, Parser, Subcommand, ValueEnum};
use data::render::TemplateChoice;
use trainer::logits::LogitsInput;

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Fine-tune and align Llama-family models for counseling work."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a checkpoint on stored token ids and write its logits, to compare with another
    /// implementation.
    Logits(LogitsArgs),
    /// Make a new random model in Hugging Face layout, with a BPE tokenizer trained on
    /// hearth's bundled text.
    InitModel(InitModelArgs),
    /// Re-save a checkpoint with another dtype or sharding.
    Convert(ConvertArgs),
    /// Work with data files.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train from a TOML recipe: SFT, DPO, ORPO, a reward model or GRPO, with LoRA or in
    /// full.
    Train(TrainArgs),
    /// Run a pipeline of recipes (e.g. SFT → reward model → DPO → GRPO) and report.
    Pipeline(PipelineArgs),
    /// Fold a LoRA adapter into its base and write a merged Hugging Face checkpoint.
    Merge(MergeArgs),
    /// Generate a reply with a model (and adapter), through its chat template.
    Generate(GenerateTextArgs),
    /// Use a reward model.
    #[command(subcommand)]
    Reward(RewardCommand),
    /// Evaluate a trained model.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Check every fused op against its reference on a device: outputs and gradients at
    /// Llama-3.2-1B and 8B shapes, one line per case, failing if any is out of tolerance.
    Selftest(SelftestArgs),
}

#[derive(Args)]
struct SelftestArgs {
    /// cpu, cuda[:N] or wgpu (GPU backends need the matching build feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Small shapes of the same structure, to check the plumbing on a CPU in seconds.
    #[arg(long)]
    small: bool,
    /// The dtypes to check; repeat for several.
    #[arg(long = "dtype", value_enum, default_values_t = [TestDtype::F32, TestDtype::Bf16])]
    dtypes: Vec<TestDtype>,
    /// Also write one JSON object per case to this file, each as soon as it is done.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TestDtype {
    F32,
    Bf16,
    F16,
}

#[derive(Subcommand)]
enum RewardCommand {
    /// Score conversations: reads `{"messages": [...]}` lines, writes `{"score": x}` lines.
    Score(RewardScoreArgs),
}

#[derive(Args)]
struct RewardScoreArgs {
    /// A reward model (a *ForSequenceClassification checkpoint), or its base with --adapter.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT SEQ_CLS adapter carrying the score head.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Pairwise accuracy on held-out preference pairs, from a reward model or from an
    /// adapter's implicit DPO reward over its base; broken down by PsychoCounsel's rating
    /// dimensions when those columns are present. Prints one JSON object.
    Preference(EvalPreferenceArgs),
}

#[derive(Args)]
struct EvalPreferenceArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Preference pairs (JSONL, JSON, Parquet or Arrow).
    #[arg(long)]
    data: PathBuf,
    /// Longest pair kept, in tokens (prompt start cut first).
    #[arg(long, default_value_t = 2048)]
    max_length: usize,
}

#[derive(Args)]
struct GenerateTextArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// One user message to answer.
    #[arg(long, required_unless_present = "chat", conflicts_with = "chat")]
    prompt: Option<String>,
    /// Converse: each line on standard input is a user message.
    #[arg(long)]
    chat: bool,
    /// Optional system message.
    #[arg(long)]
    system: Option<String>,
    /// Use a built-in template (llama3, chatml) instead of the model's own.
    #[arg(long)]
    template: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct MergeArgs {
    #[arg(long)]
    base: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct TrainArgs {
    /// The recipe.
    recipe: PathBuf,
    /// Run directory (default: runs/<recipe name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a recipe key, e.g. --set train.max_steps=10 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in this directory from its newest complete checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "out")]
    resume: Option<PathBuf>,
}

#[derive(Args)]
struct PipelineArgs {
    /// The pipeline: `[[stage]]`s of recipes.
    pipeline: PathBuf,
    /// Directory for the stages' runs and report.md (default: runs/<pipeline name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a key in every stage's recipe (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenise `{"messages": [...]}` lines with a tokenizer's chat template and write
    /// `{"input_ids": [...], "assistant_mask": [...]}` lines.
    Render(RenderArgs),
    /// Show a data file's format, counts, token lengths and truncation under a tokenizer.
    Inspect(InspectArgs),
    /// Write synthetic counseling data (dialogues, preference pairs, prompts).
    Generate(GenerateArgs),
}

#[derive(Args)]
struct InspectArgs {
    /// A data file (JSON Lines, JSON, Parquet or Arrow), or a recipe (.toml) whose
    /// `[model]` and `[data]` sections say which data and tokenizer to use.
    file: PathBuf,
    /// Directory with tokenizer.json and its chat template, e.g. a model checkpoint
    /// (default for a recipe: its `[model] path`).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Format, when detection from the columns is not what you want.
    #[arg(long)]
    format: Option<String>,
    /// Rename a column before reading, FROM=TO (repeatable), e.g. question=prompt.
    #[arg(long = "column", value_name = "FROM=TO")]
    columns: Vec<String>,
    #[arg(long, default_value_t = 1024)]
    max_length: usize,
    /// keep_start, keep_end or drop.
    #[arg(long, default_value = "keep_start")]
    truncation: String,
    /// Count bad rows instead of stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Use a built-in template (llama3, chatml) instead of the tokenizer's own.
    #[arg(long)]
    template: Option<String>,
    /// Print the first example, rendered, with its loss-carrying spans marked. Off by
    /// default: counseling data is sensitive.
    #[arg(long)]
    show_example: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// sft (dialogues), preference (pairs) or prompts.
    #[arg(long)]
    kind: String,
    #[arg(long, default_value_t = 1000)]
    rows: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output JSON Lines file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct RenderArgs {
    /// Directory with tokenizer.json and its chat template (tokenizer_config.json or
    /// chat_template.jinja), e.g. a model checkpoint.
    #[arg(long)]
    tokenizer: PathBuf,
    /// JSON Lines (or JSON, Parquet, Arrow) file of conversations in the `messages` format.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the JSON Lines output.
    #[arg(long)]
    out: PathBuf,
    /// Use a built-in template (llama3, chatml) instead of the tokenizer's own.
    #[arg(long)]
    template: Option<String>,
    /// Which of several named templates the tokenizer ships (default: "default").
    #[arg(long, conflicts_with = "template")]
    template_name: Option<String>,
}

#[derive(Args)]
struct LogitsArgs {
    /// Hugging Face checkpoint directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory to apply on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Safetensors file holding `input_ids` and optionally `attention_mask` (integer, [B, T]).
    #[arg(long, required_unless_present = "text", conflicts_with = "text")]
    input: Option<PathBuf>,
    /// Text to tokenise with the checkpoint's tokenizer.json instead; repeat for a batch.
    #[arg(long)]
    text: Vec<String>,
    /// Where to write `logits` (f32, [B, T, V]) with the `input_ids` and `attention_mask`
    /// they were computed from.
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda[:N] or wgpu (GPU backends need the matching build feature).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl From<Dtype> for WeightDtype {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => WeightDtype::F32,
            Dtype::F16 => WeightDtype::F16,
            Dtype::Bf16 => WeightDtype::BF16,
        }
    }
}

#[derive(Args)]
struct InitModelArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "llama")]
    model_type: Arch,
    /// Upper bound on the tokenizer's vocabulary (the model uses the trained size).
    #[arg(long, default_value_t = 512)]
    vocab_size: usize,
    #[arg(long, default_value_t = 64)]
    hidden_size: usize,
    #[arg(long, default_value_t = 176)]
    intermediate_size: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// Share the output head with the token embeddings.
    #[arg(long)]
    tie_embeddings: bool,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Standard deviation of the random weights (transformers' `initializer_range`).
    #[arg(long, default_value_t = 0.02)]
    init_std: f32,
    /// Shard the weights above this size (e.g. 2GB, 500MB, 100KB).
    #[arg(long, value_parser = parse_size, default_value = "5GB")]
    max_shard_size: u64,
}

#[derive(Args)]
struct ConvertArgs {
    /// Source checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// Output directory (must differ from the source).
    #[arg(long)]
    out: PathBuf,
    /// Storage dtype of the output (default: the source's).
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
    /// Shard the weights above this size (e.g. 2GB, 500MB, 100KB).
    #[arg(long, value_parser = parse_size, default_value = "5GB")]
    max_shard_size: u64,
}

/// Sizes as transformers writes them: decimal units, `5GB` = 5·10⁹ bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let upper = s.trim().to_ascii_uppercase();
    let split = upper
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(upper.len());
    let (digits, unit) = upper.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 5GB or 200MB"))?;
    let scale = match unit {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use B, KB, MB or GB)"
            ));
        }
    };
    if n == 0 {
        return Err("the shard size must be positive".into());
    }
    Ok(n * scale)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Selftest(a) => selftest(a)?,
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
        Command::InitModel(a) => {
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
        }
        Command::Convert(a) => {
            let save = SaveOptions {
                max_shard_bytes: a.max_shard_size,
            };
            trainer::model::convert(&a.model, &a.out, a.dtype.map(Into::into), save)
                .with_context(|| format!("converting {}", a.model.display()))?;
            eprintln!("wrote {}", a.out.display());
        }
        Command::Data(DataCommand::Render(a)) => {
            let choice = match &a.template {
                Some(name) => TemplateChoice::Builtin(name),
                None => TemplateChoice::Shipped(a.template_name.as_deref()),
            };
            checkpoints::guard::check_output_file(&a.out, &[&a.input, &a.tokenizer])?;
            let n = data::render::render_jsonl(&a.tokenizer, choice, &a.input, &a.out)?;
            eprintln!("rendered {n} conversations to {}", a.out.display());
        }
        Command::Data(DataCommand::Inspect(a)) => inspect(a)?,
        Command::Generate(a) => generate(a)?,
        Command::Merge(a) => {
            trainer::model::lora::merge_to_dir(&a.base, &a.adapter, &a.out)?;
            eprintln!("wrote merged model to {}", a.out.display());
        }
        Command::Reward(RewardCommand::Score(a)) => {
            let n =
                trainer::evaluate::score_file(&a.model, a.adapter.as_deref(), &a.input, &a.out)?;
            eprintln!("scored {n} conversations into {}", a.out.display());
        }
        Command::Eval(EvalCommand::Preference(a)) => {
            let report = trainer::evaluate::preference_accuracy(
                &a.model,
                a.adapter.as_deref(),
                &a.data,
                a.max_length,
            )?;
            emit(&serde_json::to_string(&report)?)?;
        }
        Command::Pipeline(a) => {
            let out = a.out.unwrap_or_else(|| {
                let name = a
                    .pipeline
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned());
                PathBuf::from("runs").join(name.unwrap_or_else(|| "pipeline".into()))
            });
            let report = trainer::pipeline::run(&a.pipeline, &out, &a.set, true)?;
            if trainer::dist::is_main_process() {
                emit(&report.text)?;
            }
            eprintln!("report written to {}", out.join("report.md").display());
        }
        Command::Train(a) => {
            let recipe = trainer::recipe::load(&a.recipe, &a.set)?;
            let resume = a.resume.is_some();
            let out = a.resume.or(a.out).unwrap_or_else(|| {
                let name = a
                    .recipe
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned());
                PathBuf::from("runs").join(name.unwrap_or_else(|| "run".into()))
            });
            let outcome = trainer::train::train(&recipe, &out, resume, true)?;
            eprintln!(
                "trained {} steps: loss {:.4} -> {:.4}{}; final weights in {}",
                outcome.steps,
                outcome.first_loss,
                outcome.last_loss,
                outcome
                    .eval_loss
                    .map(|l| format!(", eval_loss {l:.4}"))
                    .unwrap_or_default(),
                out.join("final").display()
            );
        }
        Command::Data(DataCommand::Generate(a)) => {
            let kind: data::synth::Kind = a.kind.parse().map_err(anyhow::Error::msg)?;
            checkpoints::guard::check_output_file(&a.out, &[])?;
            let text = data::synth::generate(kind, a.rows, a.seed);
            let tmp = a.out.with_extension("jsonl.tmp");
            std::fs::write(&tmp, text).with_context(|| tmp.display().to_string())?;
            std::fs::rename(&tmp, &a.out).with_context(|| a.out.display().to_string())?;
            eprintln!("wrote {} {} rows to {}", a.rows, a.kind, a.out.display());
        }
    }
    Ok(())
}

/// The parts of a recipe `data inspect` reads: `[model] path` and `[data]`. Other sections
/// belong to training and are left to it.
#[derive(serde::Deserialize)]
struct InspectRecipe {
    model: Option<ModelSection>,
    data: data::config::DataConfig,
}

#[derive(serde::Deserialize)]
struct ModelSection {
    path: PathBuf,
}

fn inspect(a: InspectArgs) -> Result<()> {
    let is_recipe = a.file.extension().is_some_and(|e| e == "toml");
    let (config, tokenizer_dir) = if is_recipe {
        let text =
            std::fs::read_to_string(&a.file).with_context(|| a.file.display().to_string())?;
        let recipe: InspectRecipe = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map_or(0, |s| text[..s.start].matches('\n').count() + 1);
            anyhow::anyhow!("{}: line {line}: {}", a.file.display(), e.message())
        })?;
        let dir = match (a.tokenizer, recipe.model) {
            (Some(dir), _) => dir,
            (None, Some(model)) => model.path,
            (None, None) => bail!(
                "{}: no [model] path; pass --tokenizer DIR",
                a.file.display()
            ),
        };
        (recipe.data, dir)
    } else {
        let dir = a
            .tokenizer
            .context("--tokenizer DIR is needed when inspecting a data file")?;
        let config = data::config::DataConfig {
            train: a.file.clone(),
            eval: None,
            format: a.format,
            columns: a
                .columns
                .iter()
                .map(|c| {
                    c.split_once('=')
                        .map(|(f, t)| (f.to_string(), t.to_string()))
                        .with_context(|| format!("--column `{c}`: expected FROM=TO"))
                })
                .collect::<Result<_>>()?,
            skip_bad_rows: a.skip_bad_rows,
            max_length: a.max_length,
            truncation: a.truncation,
            template: a.template,
            eval_fraction: 0.0,
            seed: 0,
            packing: false,
        };
        (config, dir)
    };
    let choice = match &config.template {
        Some(name) => TemplateChoice::Builtin(name),
        None => TemplateChoice::Shipped(None),
    };
    let template = data::render::template_for(&tokenizer_dir, choice)?;
    // A tokenizer that belongs to a model must fit its vocabulary, or training would fail
    // on the first out-of-range id while this report said all was well.
    let tokenizer = if tokenizer_dir.join("config.json").is_file() {
        let config = checkpoints::ModelConfig::from_path(&tokenizer_dir)?;
        trainer::model::load_tokenizer(&tokenizer_dir, config.vocab_size)?
    } else {
        data::tokenizer::load(&tokenizer_dir)?
    };
    let load = config.load_options().map_err(anyhow::Error::msg)?;
    let truncation = config.truncation().map_err(anyhow::Error::msg)?;
    let report = data::inspect::inspect(
        &config.train,
        &load,
        &template,
        &tokenizer,
        config.max_length,
        truncation,
        a.show_example,
    )?;
    emit(&report.to_string())?;
    Ok(())
}

fn generate(a: GenerateTextArgs) -> Result<()> {
    use std::io::BufRead;
    let sampling = trainer::generate::Sampling {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate().context("generate")?;
    let device = trainer::device::parse(&a.device)?;
    let (config, model) = trainer::model::load_model(&a.model, &device)?;
    let model = match &a.adapter {
        Some(dir) => trainer::model::lora::load_adapter(dir, model, &device)?.0,
        None => model,
    };
    let choice = match &a.template {
        Some(name) => TemplateChoice::Builtin(name),
        None => TemplateChoice::Shipped(None),
    };
    let template = data::render::template_for(&a.model, choice)?;
    let tokenizer = trainer::model::load_tokenizer(&a.model, config.vocab_size)?;
    let stop = trainer::generate::stop_tokens(&a.model, &config, &tokenizer);
    let mut messages: Vec<data::Message> = a
        .system
        .iter()
        .map(|s| data::Message::new("system", s.clone()))
        .collect();
    let reply = |messages: &mut Vec<data::Message>, text: String| -> Result<String> {
        messages.push(data::Message::new("user", text));
        let prompt = data::chat::encode(&tokenizer, &template.render(messages, true)?)?;
        let ids = trainer::generate::generate(&model, &prompt, &stop, &sampling, &device)?;
        let answer = tokenizer
            .decode(&ids, true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
        messages.push(data::Message::new("assistant", answer.clone()));
        Ok(answer)
    };
    match a.prompt {
        Some(text) => emit(&reply(&mut messages, text)?)?,
        None => {
            for line in std::io::stdin().lock().lines() {
                let line = line.context("reading standard input")?;
                if line.trim().is_empty() {
                    continue;
                }
                emit(&reply(&mut messages, line)?)?;
            }
        }
    }
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
/// Runs every case in every dtype, printing each as it finishes. A case that panics (a
/// kernel that fails to compile for a dtype, say) is recorded as failed and the rest go on.
fn selftest(a: SelftestArgs) -> Result<()> {
    use burn::tensor::DType;
    use kernels::selftest::model_cases;
    use std::io::Write;

    let device = trainer::device::parse(&a.device)?.autodiff();
    if let Some(out) = &a.out {
        checkpoints::guard::check_output_file(out, &[])?;
    }
    let mut log = match &a.out {
        Some(out) => Some(
            std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
        ),
        None => None,
    };
    let (mut failed, mut total) = (Vec::new(), 0);
    for dtype in &a.dtypes {
        let dtype = match dtype {
            TestDtype::F32 => DType::F32,
            TestDtype::Bf16 => DType::BF16,
            TestDtype::F16 => DType::F16,
        };
        for case in model_cases(a.small) {
            total += 1;
            let label = format!("{} {dtype:?}", case.label());
            let run =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case.run(&device, dtype)));
            let line = match run {
                Ok(report) => {
                    let worst = report
                        .outputs
                        .iter()
                        .map(|c| c.max_rel)
                        .fold(0.0f32, f32::max);
                    let kernels: Vec<String> = report
                        .kernels
                        .iter()
                        .map(|(k, n)| format!("{k:?}×{n}"))
                        .collect();
                    emit(&format!(
                        "{} {label}: worst rel {worst:.2e}, {:.1} s, kernels [{}]",
                        if report.pass() { "pass" } else { "FAIL" },
                        report.seconds,
                        kernels.join(" ")
                    ))?;
                    if !report.pass() {
                        emit(&format!("{report}"))?;
                        failed.push(label.clone());
                    }
                    serde_json::json!({
                        "case": case.label(),
                        "op": case.op(),
                        "dtype": format!("{dtype:?}"),
                        "pass": report.pass(),
                        "seconds": report.seconds,
                        "kernels": report.kernels.iter().map(|(k, n)| (format!("{k:?}"), *n)).collect::<std::collections::BTreeMap<_, _>>(),
                        "outputs": report.outputs.iter().map(|c| serde_json::json!({
                            "name": c.name,
                            "max_abs": c.max_abs,
                            "max_rel": c.max_rel,
                            "bad": c.bad,
                            "of": c.len,
                            "tol_abs": c.tolerance.abs,
                            "tol_rel": c.tolerance.rel,
                        })).collect::<Vec<_>>(),
                    })
                }
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a panic".into());
                    emit(&format!("FAIL {label}: {why}"))?;
                    failed.push(label.clone());
                    serde_json::json!({"case": case.label(), "op": case.op(),
                        "dtype": format!("{dtype:?}"), "pass": false, "panic": why})
                }
            };
            if let (Some(file), Some(out)) = (log.as_mut(), &a.out) {
                writeln!(file, "{line}")
                    .and_then(|()| file.flush())
                    .with_context(|| format!("writing {}", out.display()))?;
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "selftest: {} of {total} cases failed on {}: {}",
            failed.len(),
            a.device,
            failed.join(", ")
        );
    }
    emit(&format!("selftest: all {total} cases pass on {}", a.device))
}

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
