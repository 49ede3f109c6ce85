//! The command line's shape: every command, argument and default. The command-line
//! spellings of the libraries' choices (devices, variants, precisions) live here
//! too, as clap value enums that convert into the library types.

use clap::{Args, Parser, Subcommand, ValueEnum};
use kframe_core::cache::KvPrecision;
use kframe_core::layout::{DEFAULT_EXTRA, DEFAULT_MARGIN};
use kframe_engine::PrefixMode;
use kframe_eval::suite::Experiment;
use kframe_model::device::{DeviceChoice, DtypeChoice};
use kframe_model::export::FileType;
use kframe_model::weights::Quantization;
use kframe_model::Variant;
use kframe_policy::PolicyKind;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "kframe", version, about = "One shared Qwen2 model, a private attention frame per tenant")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible HTTP API (tenants, sessions, admin) on the engine.
    Serve(ServeArgs),
    /// Generate a completion for one prompt, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Measure costs; ratios are taken within one run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Inspect policy plugin components.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Measure isolation claims on the engine.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Write a random-weight Qwen2 model directory (config.json, model.safetensors,
    /// tokenizer.json) for tests and benchmarks.
    SynthModel(SynthArgs),
    /// Write a model (a directory, or the embedded model) as one GGUF file, in
    /// llama.cpp's names and formats; `kframe serve --model FILE.gguf` and
    /// llama.cpp both load it.
    ExportGguf {
        /// A Hugging Face style Qwen2 directory [default: the embedded model].
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long = "type", value_enum, default_value = "f16")]
        file_type: GgufTypeArg,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the engine's rotation and batching guarantees on a device (the tests
    /// prove them on the CPU): tenant frames choose the identity frame's tokens,
    /// a batch chooses each sequence's solo tokens, an exact cache round-trips bit
    /// for bit, a wrong key recovers noise. Exits 1 if one fails.
    CheckDevice {
        /// A Hugging Face style Qwen2 directory, or a Qwen2 GGUF file [default: the
        /// embedded model].
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t)]
        device: DeviceArg,
        #[arg(long)]
        json: bool,
    },
    /// Measure the norms K and V reach, per layer and kv head (over the whole
    /// vocabulary and the built-in corpus), and write the norm-pad calibration
    /// padded layers use (store it as kframe-pad.json in the model directory).
    Calibrate {
        #[command(flatten)]
        model: ModelArgs,
        /// Target norm = largest measured norm x margin.
        #[arg(long, default_value_t = DEFAULT_MARGIN)]
        margin: f64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the synthetic retrieval corpus as JSON lines: training documents, or
    /// recall questions with `--recall K` (K records each).
    Corpus {
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 1000)]
        docs: usize,
        #[arg(long)]
        recall: Option<usize>,
    },
}

#[derive(Args)]
pub struct ModelArgs {
    /// A Hugging Face style Qwen2 directory, or a Qwen2 GGUF file [default: the
    /// embedded model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    pub device: DeviceArg,
    /// Dense weights' dtype and the K/V cache's (a GGUF file's weights keep their
    /// own formats; the cache is still this).
    #[arg(long, value_enum, default_value_t)]
    pub dtype: DtypeArg,
    /// Quantize a safetensors model's matrices as it loads, to serve from the
    /// same quantized kernels as a GGUF file.
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
}

/// `export-gguf --type`: the matrices' format in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GgufTypeArg {
    F32,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    /// llama.cpp's Q4_K_M mix.
    #[value(name = "q4_k_m")]
    Q4KM,
}

impl From<GgufTypeArg> for FileType {
    fn from(a: GgufTypeArg) -> Self {
        match a {
            GgufTypeArg::F32 => FileType::F32,
            GgufTypeArg::F16 => FileType::F16,
            GgufTypeArg::Q8_0 => FileType::Q8_0,
            GgufTypeArg::Q4KM => FileType::Q4KM,
        }
    }
}

/// `--quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    /// Every matrix in Q8_0.
    #[value(name = "q8_0")]
    Q8_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the vocabulary and half the
    /// layers' attn_v and ffn_down.
    #[value(name = "q4k")]
    Q4k,
}

impl From<QuantizeArg> for Quantization {
    fn from(a: QuantizeArg) -> Self {
        match a {
            QuantizeArg::Q8_0 => Quantization::Q8_0,
            QuantizeArg::Q4k => Quantization::Q4K,
        }
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Run in the private frame of this frame identity (a served tenant's `key_id`
    /// in the admin tenant list; frames derive from it, never from a name);
    /// without it, in the identity frame.
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
    #[arg(long, value_enum, default_value_t)]
    pub variant: VariantArg,
    #[arg(long, value_enum, default_value_t)]
    pub kv_precision: PrecisionArg,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the master secret lives [default: $KFRAME_DATA_DIR or ~/.local/share/kframe].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,
    /// Master secret, admin token and tenant database [default: $KFRAME_DATA_DIR or ~/.local/share/kframe].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Bytes of K/V cache the engine may hold over all tenants.
    #[arg(long, default_value_t = 1 << 30)]
    pub kv_budget: u64,
    /// A policy component to start with, as KIND=FILE.wasm (kind: admission,
    /// eviction, depth-gate); repeatable. Components put over the admin API
    /// replace these and are remembered across restarts.
    #[arg(long = "policy", value_parser = parse_policy)]
    pub policies: Vec<(PolicyKind, PathBuf)>,
    #[arg(long, value_enum, default_value_t)]
    pub variant: VariantArg,
    #[arg(long, value_enum, default_value_t)]
    pub prefix_mode: PrefixModeArg,
    /// Most sequences in one forward pass (prompt chunks and decode tokens together).
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// Bytes of tenants' rotation matrices kept derived between requests; a
    /// tenant dropped past it derives its frame again at its next admission.
    #[arg(long, default_value_t = kframe_engine::DEFAULT_KEYRING_BYTES)]
    pub keyring_bytes: usize,
    /// Largest request body; bigger ones get 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Most prompt tokens in one request (after the chat template); more get 400.
    #[arg(long, default_value_t = 8192)]
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Open connections served at once; more wait in the listen backlog.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Extra dimensions m of a norm-padded row, on the layers the depth-gate policy
    /// pads (layer 0 by default); 0 turns padding off.
    #[arg(long, default_value_t = DEFAULT_EXTRA)]
    pub pad_dims: usize,
    /// Start even if a policy component the registry kept no longer loads (built
    /// for another WIT version, say): it is dropped, and the native policy decides.
    #[arg(long)]
    pub drop_unloadable_policies: bool,
    /// Requests one tenant may have running and waiting at once; more get 429.
    #[arg(long, default_value_t = 32)]
    pub tenant_requests: u32,
    /// Cache bytes one tenant's sessions and requests may hold together (its own
    /// least recently used sessions make room first) [default: half of --kv-budget].
    #[arg(long)]
    pub tenant_cache_bytes: Option<u64>,
    /// The tenant registry: the embedded redb file in the data directory (the
    /// default), or a PostgreSQL every replica shares, as
    /// postgres://user:password@host:port/database (migrations are applied at start).
    #[arg(long, env = "KFRAME_REGISTRY", hide_env_values = true)]
    pub registry: Option<String>,
    /// Where the master secret (master.key) and admin token (admin.token) are
    /// read from, for replicas that share them (a Kubernetes Secret mounted
    /// read-only): both must exist, and neither may be readable by others
    /// [default: the data directory, where they are created on first start].
    #[arg(long, env = "KFRAME_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// This replica's name, sent with every response as x-kframe-replica
    /// [default: the host name].
    #[arg(long, env = "KFRAME_REPLICA")]
    pub replica_name: Option<String>,
    /// How often a shared registry's version is polled, in milliseconds: the
    /// bound on how late a change reaches this replica when its notification
    /// connection is down.
    #[arg(long, default_value_t = 1000)]
    pub registry_poll_ms: u64,
    /// How long a lost notification connection waits before reconnecting, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub registry_listen_retry_ms: u64,
}

fn parse_policy(s: &str) -> Result<(PolicyKind, PathBuf), String> {
    let (kind, file) = s.split_once('=').ok_or("expected KIND=FILE.wasm")?;
    let kind = PolicyKind::from_name(&kind.to_ascii_lowercase())
        .ok_or_else(|| format!("unknown policy kind `{kind}`: use admission, eviction or depth-gate"))?;
    Ok((kind, PathBuf::from(file)))
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Decode tok/s: identity vs probe-time vs decode-time rotation, and kframe vs
    /// candle-transformers' qwen2, on the Qwen2.5-3B layer shape.
    Rotation {
        #[arg(long)]
        json: bool,
        /// Layers of the f32 slice (the embedded preset).
        #[arg(long, default_value_t = 2)]
        layers: usize,
        /// Where the f32 slice runs (the embedded preset; the whole shape runs on
        /// the CPU).
        #[arg(long, value_enum, default_value_t)]
        device: DeviceArg,
        #[arg(long, default_value_t = 30)]
        rounds: usize,
        /// `embedded`: a slice of Qwen2.5-3B's layers in f32, and the embedded
        /// model. `qwen25-3b`: the whole shape from a GGUF file (random weights).
        #[arg(long, value_enum, default_value = "embedded")]
        preset: PeerPreset,
        /// With `--preset qwen25-3b`: the GGUF file type.
        #[arg(long, value_enum, default_value = "q4_k_m")]
        quant: GgufTypeArg,
        /// With `--preset qwen25-3b`: where the model is written (and found again).
        #[arg(long, default_value = "target/peer")]
        work_dir: PathBuf,
        /// With `--preset qwen25-3b`: Qwen's tokenizer (scripts/qwen-tokenizer.sh).
        #[arg(long, default_value = "target/qwen-tokenizer")]
        tokenizer: PathBuf,
    },
    /// Shared prefill, batched decode, per-tenant memory and policy cost of the
    /// serving engine, as ratios measured in one run.
    Serve {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 1000)]
        tenants: usize,
        /// The weights' dtype on the CPU (f16 and bf16 store K and V in it too).
        #[arg(long, value_enum, default_value_t)]
        dtype: DtypeArg,
        /// The model: the embedded one, or Qwen2.5-3B's whole shape (random
        /// weights, Q4_K_M), where the bench measures keys at real depth and
        /// `--tenants` tenants resident.
        #[arg(long, value_enum, default_value = "embedded")]
        preset: PeerPreset,
        /// With `--preset qwen25-3b`: where the model is written (and found again).
        #[arg(long, default_value = "target/peer")]
        work_dir: PathBuf,
        /// With `--preset qwen25-3b`: Qwen's tokenizer (scripts/qwen-tokenizer.sh).
        #[arg(long, default_value = "target/qwen-tokenizer")]
        tokenizer: PathBuf,
    },
    /// HTTP over the in-process engine: aggregate decode tok/s with many
    /// concurrent streaming tenants, time to first token, and a many-tenant load
    /// checked for errors and cross-tenant leaks (server in a child process).
    Http {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 256)]
        concurrent: usize,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        #[arg(long, default_value_t = 1000)]
        load_tenants: usize,
        #[arg(long, default_value_t = 10)]
        requests_per_tenant: usize,
    },
    /// Median cost of one eviction decision over 1000 entries and of one admission
    /// decision through Wasm policy components (the shipped lru and capacity).
    Plugins {
        #[arg(long)]
        json: bool,
    },
    /// kframe against llama.cpp on the embedded model, same machine, alternating
    /// pairs: batch 1, 32 sequences and a 256-token prefill, after a greedy-token
    /// check. scripts/bench-peer.sh builds llama.cpp and runs this. Both engines
    /// use RAYON_NUM_THREADS threads when it is set, else one per CPU.
    Peer {
        #[arg(long)]
        json: bool,
        /// The folder with llama.cpp's llama-batched-bench and llama-server.
        #[arg(long, default_value = "target/peer/llama.cpp/build/bin")]
        llama_cpp: PathBuf,
        /// Where the GGUF files are written.
        #[arg(long, default_value = "target/peer")]
        work_dir: PathBuf,
        #[arg(long, default_value_t = 5)]
        pairs: usize,
        /// Time kframe alone, `--pairs` rounds, without llama.cpp (for profiling).
        #[arg(long)]
        kframe_only: bool,
        /// With `--kframe-only`: the weights' dtype (the comparison runs both).
        #[arg(long, value_enum, default_value_t)]
        dtype: DtypeArg,
        /// The model: the embedded one (as f32 and f16 GGUF), or Qwen2.5-3B's
        /// whole shape with random weights (written into --work-dir once).
        #[arg(long, value_enum, default_value = "embedded")]
        preset: PeerPreset,
        /// With `--preset qwen25-3b`: the GGUF file type both engines read.
        #[arg(long, value_enum, default_value = "q4_k_m")]
        quant: GgufTypeArg,
        /// With `--preset qwen25-3b`: Qwen's tokenizer (scripts/qwen-tokenizer.sh).
        #[arg(long, default_value = "target/qwen-tokenizer")]
        tokenizer: PathBuf,
    },
}

/// `bench peer --preset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PeerPreset {
    Embedded,
    #[value(name = "qwen25-3b")]
    Qwen25_3b,
}

#[derive(Subcommand)]
pub enum PluginCommand {
    /// Report which kframe:policy world each component implements, or why it is
    /// rejected (exit status 1 if any is).
    Check {
        files: Vec<PathBuf>,
        /// The configuration string passed to each component's `configure`.
        #[arg(long, default_value = "")]
        config: String,
        /// Deadline of each call, as serving sets it.
        #[arg(long, default_value_t = 50)]
        deadline_ms: u64,
    },
}

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Recall of each tenant's secrets with its own key, a wrong key, and no context.
    Recall {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 100)]
        tenants: usize,
        #[arg(long, default_value_t = 4)]
        records: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long, value_enum, default_value_t)]
        variant: VariantArg,
        #[arg(long)]
        json: bool,
    },
    /// Every tenant with its own key behind a shared prefix: PASS-CLEAN count.
    Matched(SuiteArgs),
    /// Each tenant reads a neighbour's cache with its own key (T = 2 .. N).
    WrongKey(SuiteArgs),
    /// Cosine between real K rows and their cross-key readouts; writes the
    /// spot-check's pre-registered pairs.
    Readout(SuiteArgs),
    /// Runs the readout's highest-cosine pairs as wrong-key reads.
    SpotCheck(SuiteArgs),
    /// Adversary components: reconstruction, membership, known-plaintext Procrustes.
    Attack(SuiteArgs),
    /// Every experiment above, in order, into one report.
    All(SuiteArgs),
}

/// The options every experiment of the isolation eval shares.
#[derive(Args)]
pub struct SuiteArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 100)]
    pub tenants: usize,
    /// Private records (name and secret) per tenant.
    #[arg(long, default_value_t = 4)]
    pub records: usize,
    /// Readout samples: (reader, writer) pairs, each with one real K row
    /// [default: 1000 per tenant, at most 1,000,000].
    #[arg(long)]
    pub pairs: Option<usize>,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Where report.json, report.md and the figures go.
    #[arg(long, default_value = "eval-report")]
    pub out: PathBuf,
    /// An adversary component (world kframe:probe/adversary) to run beside the
    /// shipped ones; repeatable. (`--probe` is the older spelling.)
    #[arg(long = "adversary", alias = "probe", value_name = "FILE.wasm")]
    pub adversaries: Vec<PathBuf>,
    /// Run only the --adversary components, not the shipped reference adversaries.
    #[arg(long)]
    pub no_reference: bool,
    /// Victims the co-tenant adversaries attack [default: all tenants, at most 250].
    #[arg(long)]
    pub victims: Option<usize>,
    /// Victims whose key the Procrustes sweep recovers.
    #[arg(long, default_value_t = 4)]
    pub key_victims: usize,
    /// Wall-clock limit of one adversary call.
    #[arg(long, alias = "probe-deadline-ms", default_value_t = 20_000)]
    pub adversary_deadline_ms: u64,
    /// Extra dimensions m of the attack's norm-padded runs; 0 skips them.
    #[arg(long, default_value_t = DEFAULT_EXTRA)]
    pub pad_dims: usize,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Preset {
    /// 2 layers, hidden 512, 4 heads / 2 kv heads, head_dim 128, vocab 512.
    Tiny,
    /// The layer shape of Qwen2.5-3B with `--layers` layers and a 32k vocabulary.
    Qwen25_3bLayers,
    /// Qwen2.5-3B's whole config (36 layers, vocabulary 151,936, tied
    /// embeddings), its weights in bf16 (6.2 GB).
    #[value(name = "qwen25-3b")]
    Qwen25_3b,
}

#[derive(Args)]
pub struct SynthArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A folder with a real tokenizer.json (and tokenizer_config.json) to use
    /// instead of the byte-level stand-in, such as Qwen's from
    /// `scripts/qwen-tokenizer.sh`.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum DeviceArg {
    /// CUDA if built with it and a GPU is present, else Metal likewise, else CPU.
    #[default]
    Auto,
    Cpu,
    Metal,
    Cuda,
}

impl From<DeviceArg> for DeviceChoice {
    fn from(a: DeviceArg) -> Self {
        match a {
            DeviceArg::Auto => DeviceChoice::Auto,
            DeviceArg::Cpu => DeviceChoice::Cpu,
            DeviceArg::Metal => DeviceChoice::Metal,
            DeviceArg::Cuda => DeviceChoice::Cuda,
        }
    }
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum DtypeArg {
    /// f16 on CPU, bf16 on CUDA, f16 on Metal. On the CPU, f16 and bf16 hold
    /// the weights and the K/V cache while the arithmetic stays f32.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for DtypeChoice {
    fn from(a: DtypeArg) -> Self {
        match a {
            DtypeArg::Auto => DtypeChoice::Auto,
            DtypeArg::F32 => DtypeChoice::F32,
            DtypeArg::F16 => DtypeChoice::F16,
            DtypeArg::Bf16 => DtypeChoice::Bf16,
        }
    }
}

/// `--variant`: where attention applies a tenant's rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum VariantArg {
    /// Rotate the queries and un-rotate the output: O(heads * d^2) a step.
    #[default]
    ProbeTime,
    /// Un-rotate the whole cache for a standard kernel: O(context * d^2) a step.
    DecodeTime,
}

impl From<VariantArg> for Variant {
    fn from(a: VariantArg) -> Self {
        match a {
            VariantArg::ProbeTime => Variant::ProbeTime,
            VariantArg::DecodeTime => Variant::DecodeTime,
        }
    }
}

/// `--kv-precision`: how rotated values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum PrecisionArg {
    /// In the model's dtype: smallest; the round trip within a few ulp.
    #[default]
    Native,
    /// In f64: the round trip is bit-exact in f16/bf16.
    Exact,
}

impl From<PrecisionArg> for KvPrecision {
    fn from(a: PrecisionArg) -> Self {
        match a {
            PrecisionArg::Native => KvPrecision::Native,
            PrecisionArg::Exact => KvPrecision::Exact,
        }
    }
}

/// `--prefix-mode`: how a shared prefix reaches a tenant's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum PrefixModeArg {
    /// One plaintext copy, referenced by every tenant.
    #[default]
    SharedPlain,
    /// Each tenant gets its own copy rotated into its frame.
    RotateCopy,
}

impl From<PrefixModeArg> for PrefixMode {
    fn from(a: PrefixModeArg) -> Self {
        match a {
            PrefixModeArg::SharedPlain => PrefixMode::SharedPlain,
            PrefixModeArg::RotateCopy => PrefixMode::RotateCopy,
        }
    }
}

/// An experiment of `kframe eval`, as the suite runs it.
pub fn experiment(cmd: &EvalCommand) -> Option<Experiment> {
    Some(match cmd {
        EvalCommand::Recall { .. } => return None,
        EvalCommand::Matched(_) => Experiment::Matched,
        EvalCommand::WrongKey(_) => Experiment::WrongKey,
        EvalCommand::Readout(_) => Experiment::Readout,
        EvalCommand::SpotCheck(_) => Experiment::SpotCheck,
        EvalCommand::Attack(_) => Experiment::Attack,
        EvalCommand::All(_) => Experiment::All,
    })
}
