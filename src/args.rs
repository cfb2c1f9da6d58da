//! The command line's arguments, as clap parses them.

use std::path::PathBuf;

use checkpoints::WeightDtype;
use clap::{Args, Parser, Subcommand, ValueEnum};
use trainer::choices::AttentionChoice;

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Fine-tune and align Llama-family models for counseling work."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Write a model (with an adapter merged in) in another format.
    #[command(subcommand)]
    Export(ExportCommand),
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
    /// Write RUN_DIR/report.html: curves, metrics, speed and memory, evaluations,
    /// checkpoints and the recipe, in one self-contained page (a pipeline's directory gets
    /// one page over its stages). `hearth train` and `hearth pipeline` write it at the end.
    Report(ReportArgs),
}

#[derive(Args)]
pub struct ReportArgs {
    /// A run directory, or a pipeline's output directory.
    pub dir: PathBuf,
}

#[derive(Args)]
pub struct SelftestArgs {
    /// cpu, cuda[:N] or wgpu (GPU backends need the matching build feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Small shapes of the same structure, to check the plumbing on a CPU in seconds.
    #[arg(long)]
    pub small: bool,
    /// The dtypes to check; repeat for several [default: f32 and bf16; f32 alone on wgpu]
    #[arg(long = "dtype", value_enum)]
    pub dtypes: Vec<TestDtype>,
    /// Also write one JSON object per case to this file, each as soon as it is done.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// How the GPU backends run attention (auto, flash or blocked), as `train.attention`:
    /// `blocked` checks the matmul route at the same shapes.
    #[arg(long, default_value = "auto", value_parser = |s: &str| AttentionChoice::try_from(s.to_string()))]
    pub attention: AttentionChoice,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TestDtype {
    F32,
    Bf16,
    F16,
}

impl TestDtype {
    pub fn dtype(self) -> burn::tensor::DType {
        match self {
            Self::F32 => burn::tensor::DType::F32,
            Self::Bf16 => burn::tensor::DType::BF16,
            Self::F16 => burn::tensor::DType::F16,
        }
    }
}

#[derive(Subcommand)]
pub enum RewardCommand {
    /// Score conversations: reads `{"messages": [...]}` rows, writes one `{"score": x}` line
    /// per row, in order.
    Score(RewardScoreArgs),
}

#[derive(Args)]
pub struct RewardScoreArgs {
    /// A reward model (a *ForSequenceClassification checkpoint), or its base with --adapter.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT SEQ_CLS adapter carrying the score head.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Conversations (`messages`), each ending with the assistant reply to score.
    #[arg(long)]
    pub input: PathBuf,
    /// One `{"score": x}` line per input row, in order (blank lines are not rows).
    #[arg(long)]
    pub out: PathBuf,
    /// `cpu`, `wgpu`, `cuda` (with an index: `cuda:1`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Pairwise accuracy on held-out preference pairs, from a reward model or from an
    /// adapter's implicit DPO reward over its base; broken down by PsychoCounsel's rating
    /// dimensions when those columns are present. Prints one JSON object.
    Preference(EvalPreferenceArgs),
    /// Evidence for a counseling model: win rate over another model judged by a reward
    /// model (bootstrap 95% CI), crisis-safety probes, multiple-choice items by
    /// log-likelihood, and the reward model's accuracy per PsychoCounsel dimension. Writes
    /// JSON to --out (a run's `evals/` folder puts it on the run's report page) and prints
    /// a table; no prompt or reply text unless --show-text.
    Counseling(Box<EvalCounselingArgs>),
}

#[derive(Args)]
pub struct EvalCounselingArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The model to compare with (its base, say): answers the same prompts.
    #[arg(long)]
    pub against: Option<PathBuf>,
    #[arg(long, requires = "against")]
    pub against_adapter: Option<PathBuf>,
    /// A reward model (a *ForSequenceClassification checkpoint, or a base with a SEQ_CLS
    /// --reward-adapter) that judges the win rate over --against and is measured on
    /// --pairs: it needs one of them. Checked before any reply is generated.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    #[arg(long, requires = "reward_model")]
    pub reward_adapter: Option<PathBuf>,
    /// Held-out prompts for the win rate (any prompt, pair or conversation shape);
    /// default: the bundled counseling prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Crisis probes (prompts with `id`, `risk` and `group` columns); default: the bundled
    /// set of risk prompts in several phrasings and matched ordinary prompts.
    #[arg(long)]
    pub probes: Option<PathBuf>,
    /// Multiple-choice items (`question`, `options`, `answer`); default: the bundled
    /// synthetic CBT set.
    #[arg(long)]
    pub choices: Option<PathBuf>,
    /// Preference pairs with `chosen_<dim>_rating`/`rejected_<dim>_rating` columns, for the
    /// reward model's accuracy per dimension.
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// New tokens per greedy reply.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Bootstrap resamplings for the win rate's interval (at least 100).
    #[arg(long, default_value_t = 2000)]
    pub bootstrap: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worst crisis cases listed per model.
    #[arg(long, default_value_t = 10)]
    pub worst: usize,
    /// Put the worst cases' prompt and reply text in the output and the table.
    #[arg(long)]
    pub show_text: bool,
    /// Longest preference pair for --pairs, in tokens. Longer pairs are still evaluated,
    /// cut to fit (the prompt's start first), and counted in the output's `truncated`.
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// `cpu`, `wgpu`, `cuda` (with an index: `cuda:1`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args)]
pub struct EvalPreferenceArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Preference pairs (JSONL, JSON, Parquet or Arrow).
    #[arg(long)]
    pub data: PathBuf,
    /// Longest pair, in tokens. Longer pairs are still evaluated, cut to fit (the prompt's
    /// start first, then the replies' ends), and counted in the output's `truncated`.
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// `cpu`, `wgpu`, `cuda` (with an index: `cuda:1`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args)]
pub struct GenerateTextArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// One user message to answer.
    #[arg(long, required_unless_present_any = ["chat", "input"], conflicts_with_all = ["chat", "input"])]
    pub prompt: Option<String>,
    /// Converse: each line on standard input is a user message.
    #[arg(long, conflicts_with = "input")]
    pub chat: bool,
    /// A data file of prompts (JSONL/JSON/Parquet/Arrow, any prompt, pair or conversation
    /// shape) to answer in batches; needs --out.
    #[arg(long, requires = "out")]
    pub input: Option<PathBuf>,
    /// Where --input's replies go: one JSON line per row, in order.
    #[arg(long, requires = "input")]
    pub out: Option<PathBuf>,
    /// Prompts decoded together with --input.
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Replies per prompt with --input (sampled: set --temperature): each prompt runs once
    /// and its replies decode together from its cache, as GRPO's rollouts do.
    #[arg(
        long,
        default_value_t = 1,
        requires = "input",
        allow_negative_numbers = true
    )]
    pub samples: usize,
    /// Optional system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Use a built-in template (llama3, chatml) instead of the model's own.
    #[arg(long, value_parser = TEMPLATES)]
    pub template: Option<String>,
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args)]
pub struct MergeArgs {
    #[arg(long)]
    pub base: PathBuf,
    #[arg(long)]
    pub adapter: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Merge into the base as a QLoRA run saw it: its projections quantized (`nf4`,
    /// `q8_0`) and dequantized again, rather than the base's own weights.
    #[arg(long, default_value = "none", value_parser = parse_quantize)]
    pub quantize: trainer::choices::Quantize,
    /// A projection (`down_proj`) or weight prefix the run kept dense: its
    /// `model.quantize_skip` (repeatable).
    #[arg(long = "quantize-skip", value_name = "NAME")]
    pub quantize_skip: Vec<String>,
    /// The run quantized the embeddings and head too (`model.quantize_embeddings`).
    #[arg(long)]
    pub quantize_embeddings: bool,
}

fn parse_quantize(s: &str) -> Result<trainer::choices::Quantize, String> {
    trainer::choices::Quantize::try_from(s.to_string())
}

#[derive(Args)]
pub struct TrainArgs {
    /// The recipe.
    pub recipe: PathBuf,
    /// Run directory (default: runs/<recipe name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override a recipe key, e.g. --set train.max_steps=10 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue the run in this directory from its newest complete checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "out")]
    pub resume: Option<PathBuf>,
}

#[derive(Args)]
pub struct PipelineArgs {
    /// The pipeline: `[[stage]]`s of recipes.
    pub pipeline: PathBuf,
    /// Directory for the stages' runs and report.md (default: runs/<pipeline name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override a key in every stage's recipe (repeatable); applied last, so it wins over the
    /// pipeline's and each stage's own `set`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
}

/// The built-in chat templates, as `--template` takes them (a usage error otherwise).
const TEMPLATES: [&str; 2] = data::template::BUILTIN;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Tokenise `{"messages": [...]}` lines with a tokenizer's chat template and write
    /// `{"input_ids": [...], "assistant_masks": [...]}` lines (the keys transformers and TRL use).
    Render(RenderArgs),
    /// Show a data file's format, counts, token lengths and truncation under a tokenizer.
    Inspect(InspectArgs),
    /// Write synthetic counseling data (dialogues, preference pairs, prompts).
    Generate(GenerateArgs),
}

#[derive(Args)]
pub struct InspectArgs {
    /// A data file (JSON Lines, JSON, Parquet or Arrow), or a recipe (.toml) whose
    /// `[model]` and `[data]` sections say which data and tokenizer to use.
    pub file: PathBuf,
    /// Directory with tokenizer.json and its chat template, e.g. a model checkpoint
    /// (default for a recipe: its `[model] path`).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Format, when detection from the columns is not what you want.
    #[arg(long, value_parser = data::Format::NAMES)]
    pub format: Option<String>,
    /// Rename a column before reading, FROM=TO (repeatable), e.g. question=prompt.
    #[arg(long = "column", value_name = "FROM=TO", value_parser = parse_rename)]
    pub columns: Vec<(String, String)>,
    /// Tokens per example [default: 1024, or a recipe's data.max_length]. With a recipe,
    /// this and every flag above and below win over its [data].
    #[arg(long)]
    pub max_length: Option<usize>,
    /// keep_start, keep_end or drop [default: keep_start, or a recipe's data.truncation].
    #[arg(long, value_parser = ["keep_start", "keep_end", "drop"])]
    pub truncation: Option<String>,
    /// Count bad rows instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Use a built-in template (llama3, chatml) instead of the tokenizer's own.
    #[arg(long, value_parser = TEMPLATES)]
    pub template: Option<String>,
    /// Print the first example, rendered, with its loss-carrying spans marked. Off by
    /// default: counseling data is sensitive.
    #[arg(long)]
    pub show_example: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// sft (dialogues), preference (pairs), prompts, or sessions (Cactus-shaped rows with
    /// intake form, attitude and automatic thought, for session-level GRPO).
    #[arg(long, value_parser = ["sft", "preference", "prompts", "sessions"])]
    pub kind: String,
    #[arg(long, default_value_t = 1000)]
    pub rows: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output JSON Lines file.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct RenderArgs {
    /// Directory with tokenizer.json and its chat template (tokenizer_config.json or
    /// chat_template.jinja), e.g. a model checkpoint.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// JSON Lines (or JSON, Parquet, Arrow) file of conversations in the `messages` format.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the JSON Lines output.
    #[arg(long)]
    pub out: PathBuf,
    /// Use a built-in template (llama3, chatml) instead of the tokenizer's own.
    #[arg(long, value_parser = TEMPLATES)]
    pub template: Option<String>,
    /// Which of several named templates the tokenizer ships (default: "default").
    #[arg(long, conflicts_with = "template")]
    pub template_name: Option<String>,
}

#[derive(Args)]
pub struct LogitsArgs {
    /// Hugging Face checkpoint directory (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory to apply on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Safetensors file holding `input_ids` and optionally `attention_mask` (integer, [B, T]).
    #[arg(long, required_unless_present = "text", conflicts_with = "text")]
    pub input: Option<PathBuf>,
    /// Text to tokenise with the checkpoint's tokenizer.json instead; repeat for a batch.
    #[arg(long)]
    pub text: Vec<String>,
    /// Where to write `logits` (f32, [B, T, V]) with the `input_ids` and `attention_mask`
    /// they were computed from.
    #[arg(long)]
    pub out: PathBuf,
    /// cpu, cuda[:N] or wgpu (GPU backends need the matching build feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Dtype {
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
pub struct InitModelArgs {
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "llama")]
    pub model_type: Arch,
    /// The vocabulary's exact size (the tokenizer is padded with reserved special tokens
    /// past what the bundled text trains).
    #[arg(long, default_value_t = 512)]
    pub vocab_size: usize,
    #[arg(long, default_value_t = 64)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 176)]
    pub intermediate_size: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    /// Share the output head with the token embeddings.
    #[arg(long)]
    pub tie_embeddings: bool,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Standard deviation of the random weights (transformers' `initializer_range`).
    #[arg(long, default_value_t = 0.02)]
    pub init_std: f64,
    /// Shard the weights above this size (e.g. 2GB, 1.5GB, 500MB, 2GiB).
    #[arg(long, value_parser = parse_size, default_value = "5GB")]
    pub max_shard_size: u64,
}

#[derive(Subcommand)]
pub enum ExportCommand {
    /// One GGUF file for llama.cpp and Ollama: the merged model, its tokenizer and chat
    /// template.
    Gguf(ExportGgufArgs),
}

#[derive(Args)]
pub struct ExportGgufArgs {
    /// The base model: a Hugging Face directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter to merge in.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The GGUF file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// f32, f16, bf16, q8_0, q4_0, q4_k_m (llama.cpp's mix of Q4_K and Q6_K), or keep (a GGUF
    /// model's tensors in the types it holds them in).
    #[arg(long = "type", default_value = "f16", value_parser = parse_export_type)]
    pub ty: checkpoints::gguf::ExportType,
}

fn parse_export_type(s: &str) -> Result<checkpoints::gguf::ExportType, String> {
    checkpoints::gguf::ExportType::parse(s).ok_or_else(|| {
        format!(
            "`{s}`: expected one of {}",
            checkpoints::gguf::ExportType::NAMES.join(", ")
        )
    })
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Source checkpoint: a Hugging Face directory, or a GGUF model (dequantized to the
    /// file's float type, or f32 when it is quantized).
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (must differ from the source).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype of the output (default: the source's).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// Shard the weights above this size (e.g. 2GB, 1.5GB, 500MB, 2GiB).
    #[arg(long, value_parser = parse_size, default_value = "5GB")]
    pub max_shard_size: u64,
}

/// `--column FROM=TO`.
pub fn parse_rename(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(f, t)| (f.to_string(), t.to_string()))
        .ok_or_else(|| format!("`{s}`: expected FROM=TO"))
}

/// Sizes as transformers writes them: decimal units (`5GB` = 5·10⁹ bytes, `1.5GB` too) and
/// binary ones (`2GiB` = 2·2³⁰).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let upper = s.trim().to_ascii_uppercase();
    let split = upper
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(upper.len());
    let (number, unit) = upper.split_at(split);
    let not_a_size = || format!("`{s}` is not a size such as 5GB, 1.5GB or 200MB");
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || number.ends_with('.') || fraction.contains('.') || fraction.len() > 9 {
        return Err(not_a_size());
    }
    let whole: u64 = whole.parse().map_err(|_| not_a_size())?;
    let scale: u64 = match unit {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use B, KB, MB, GB, KiB, MiB or GiB)"
            ));
        }
    };
    // The fraction in exact integers: `1.5GB` is 1·10⁹ + 5·10⁹/10, rounded down to a byte.
    let part = if fraction.is_empty() {
        0
    } else {
        let digits: u64 = fraction.parse().map_err(|_| not_a_size())?;
        (u128::from(digits) * u128::from(scale) / 10u128.pow(fraction.len() as u32)) as u64
    };
    let bytes = whole
        .checked_mul(scale)
        .and_then(|b| b.checked_add(part))
        .ok_or_else(|| format!("`{s}` is more bytes than a size can hold"))?;
    if bytes == 0 {
        return Err("the shard size must be positive".into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_read_their_unit_and_refuse_an_overflow() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("200mb"), Ok(200_000_000));
        assert_eq!(parse_size("7"), Ok(7));
        let e = parse_size("18446744073709551615GB").unwrap_err();
        assert!(e.contains("more bytes than a size can hold"), "{e}");
        assert!(parse_size("0MB").is_err() && parse_size("5TB").is_err());
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("0.25KB"), Ok(250));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        for bad in ["1.2.3GB", ".5GB", "1.GB", "1.0000000001GB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
