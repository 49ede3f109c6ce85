//! The `kframe` command line.

use crate::bench::{self, RotationBenchOptions};
use crate::cache::KvPrecision;
use crate::corpus::Corpus;
use crate::device::{self, DeviceArg, DtypeArg};
use crate::engine::{EngineConfig, PrefixMode};
use crate::eval::{self, recall::RecallOptions};
use crate::generate::{Generator, SamplingParams};
use crate::keys::{self, MasterSecret};
use crate::model::load::ModelDir;
use crate::model::{synth, Variant};
use crate::plugin::{Limits, PluginRuntime, PolicyKind, PolicySet};
use crate::rotation::{Frame, Keyring};
use crate::server::{self, App};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

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
    /// Measure the norms K and V reach, per layer and kv head (over the whole
    /// vocabulary and the built-in corpus), and write the norm-pad calibration
    /// padded layers use (store it as kframe-pad.json in the model directory).
    Calibrate {
        #[command(flatten)]
        model: ModelArgs,
        /// Target norm = largest measured norm x margin.
        #[arg(long, default_value_t = crate::pad::DEFAULT_MARGIN)]
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
    /// A Hugging Face style Qwen2 directory [default: the embedded model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value_t)]
    pub dtype: DtypeArg,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Run in this tenant's private frame; without it, in the identity frame.
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
    #[arg(long, value_enum, default_value_t)]
    pub variant: Variant,
    #[arg(long, value_enum, default_value_t)]
    pub kv_precision: KvPrecision,
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
    pub variant: Variant,
    #[arg(long, value_enum, default_value_t)]
    pub prefix_mode: PrefixMode,
    /// Most sequences in one forward pass (prompt chunks and decode tokens together).
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
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
    #[arg(long, default_value_t = crate::pad::DEFAULT_EXTRA)]
    pub pad_dims: usize,
}

fn parse_policy(s: &str) -> Result<(PolicyKind, PathBuf), String> {
    let (kind, file) = s.split_once('=').ok_or("expected KIND=FILE.wasm")?;
    let kind = PolicyKind::from_str(kind, true).map_err(|_| format!("unknown policy kind `{kind}`"))?;
    Ok((kind, PathBuf::from(file)))
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Decode tok/s: identity vs probe-time vs decode-time rotation, and kframe vs
    /// candle-transformers' qwen2, on the Qwen2.5-3B layer shape.
    Rotation {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 2)]
        layers: usize,
        #[arg(long, default_value_t = 30)]
        rounds: usize,
    },
    /// Shared prefill, batched decode, per-tenant memory and policy cost of the
    /// serving engine, as ratios measured in one run.
    Serve {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 1000)]
        tenants: usize,
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
        variant: Variant,
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
    /// shipped ones; repeatable.
    #[arg(long = "probe", value_name = "FILE.wasm")]
    pub probes: Vec<PathBuf>,
    /// Run only the --probe components, not the shipped reference adversaries.
    #[arg(long)]
    pub no_reference: bool,
    /// Victims the co-tenant adversaries attack [default: all tenants, at most 250].
    #[arg(long)]
    pub victims: Option<usize>,
    /// Victims whose key the Procrustes sweep recovers.
    #[arg(long, default_value_t = 4)]
    pub key_victims: usize,
    /// Wall-clock limit of one adversary call.
    #[arg(long, default_value_t = 20_000)]
    pub probe_deadline_ms: u64,
    /// Extra dimensions m of the attack's norm-padded runs; 0 skips them.
    #[arg(long, default_value_t = crate::pad::DEFAULT_EXTRA)]
    pub pad_dims: usize,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Preset {
    /// 2 layers, hidden 512, 4 heads / 2 kv heads, head_dim 128, vocab 512.
    Tiny,
    /// The layer shape of Qwen2.5-3B with `--layers` layers and a 32k vocabulary.
    Qwen25_3bLayers,
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
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Generate(args) => generate(args),
        Command::Bench(BenchCommand::Rotation { json, layers, rounds }) => {
            let opts = RotationBenchOptions { layers, rounds, ..Default::default() };
            let report = bench::rotation(&opts, |msg| eprintln!("bench: {msg}"))?;
            print_report(&report, json, report.to_text())
        }
        Command::Bench(BenchCommand::Serve { json, tenants }) => {
            let opts = bench::ServeBenchOptions { tenants, ..Default::default() };
            let report = bench::serve(&opts, |msg| eprintln!("bench: {msg}"))?;
            print_report(&report, json, report.to_text())
        }
        Command::Bench(BenchCommand::Http { json, concurrent, max_tokens, load_tenants, requests_per_tenant }) => {
            let opts = bench::HttpBenchOptions { concurrent, max_tokens, load_tenants, requests_per_tenant };
            let report = bench::http(&opts, |msg| eprintln!("bench: {msg}"))?;
            print_report(&report, json, report.to_text())
        }
        Command::Bench(BenchCommand::Plugins { json }) => {
            let report = bench::plugins()?;
            print_report(&report, json, report.to_text())
        }
        Command::Plugin(PluginCommand::Check { files, config, deadline_ms }) => {
            let limits = Limits { deadline: std::time::Duration::from_millis(deadline_ms), ..Limits::default() };
            let runtime = PluginRuntime::new(limits, None)?;
            let mut rejected = 0;
            for file in &files {
                let name = file.display().to_string();
                let outcome = std::fs::read(file)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| runtime.validate(&name, &bytes, &config).map_err(|e| e.failure.to_string()));
                match outcome {
                    Ok(kind) => println!("{name}: ok, implements {kind} ({})", kind.package()),
                    Err(reason) => {
                        rejected += 1;
                        println!("{name}: rejected: {reason}");
                    }
                }
            }
            if rejected > 0 {
                anyhow::bail!("{rejected} of {} components rejected", files.len());
            }
            Ok(())
        }
        Command::Eval(EvalCommand::Recall { model, tenants, records, seed, variant, json }) => {
            let (dir, generator) = load(&model)?;
            let ring = Keyring::new(
                MasterSecret::random(),
                generator.model.rotation_shape(),
                generator.model.dtype(),
                false,
                generator.model.device().clone(),
                16,
            );
            let opts = RecallOptions { tenants, records, seed, variant };
            let bar = indicatif::ProgressBar::new(tenants as u64);
            let mut report = eval::recall::recall(&generator, &ring, &opts, |done| bar.set_position(done as u64))?;
            bar.finish_and_clear();
            report.model = dir.path.display().to_string();
            print_report(&report, json, report.to_text())
        }
        Command::Eval(EvalCommand::Matched(args)) => suite(eval::suite::Experiment::Matched, args),
        Command::Eval(EvalCommand::WrongKey(args)) => suite(eval::suite::Experiment::WrongKey, args),
        Command::Eval(EvalCommand::Readout(args)) => suite(eval::suite::Experiment::Readout, args),
        Command::Eval(EvalCommand::SpotCheck(args)) => suite(eval::suite::Experiment::SpotCheck, args),
        Command::Eval(EvalCommand::Attack(args)) => suite(eval::suite::Experiment::Attack, args),
        Command::Eval(EvalCommand::All(args)) => suite(eval::suite::Experiment::All, args),
        Command::Corpus { seed, docs, recall } => {
            let mut corpus = Corpus::new(seed);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for _ in 0..docs {
                let line = match recall {
                    Some(k) => serde_json::to_string(&corpus.recall_item(k.max(1)))?,
                    None => serde_json::to_string(&corpus.training_document())?,
                };
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
        Command::Calibrate { model, margin, out } => {
            let (dir, generator) = load(&model)?;
            let calibration = crate::pad::measure(&dir, &generator, margin)?;
            std::fs::write(&out, serde_json::to_string_pretty(&calibration)? + "\n")?;
            eprintln!(
                "wrote the pad calibration of {} ({}) to {}",
                calibration.model,
                calibration.corpus,
                out.display()
            );
            Ok(())
        }
        Command::SynthModel(args) => {
            let cfg = match args.preset {
                Preset::Tiny => synth::tiny_config(),
                Preset::Qwen25_3bLayers => synth::qwen25_3b_layer_config(args.layers, 32_768),
            };
            synth::write_model_dir(&args.out, &cfg, args.seed)?;
            eprintln!("wrote a random-weight Qwen2 model to {}", args.out.display());
            Ok(())
        }
    }
}

/// One JSON object with `--json`, else the report's text.
fn print_report(report: &impl serde::Serialize, json: bool, text: String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{text}");
    }
    Ok(())
}

/// Progress of the eval on stderr: one bar per experiment.
struct Bars {
    bar: Option<indicatif::ProgressBar>,
}

impl eval::suite::Progress for Bars {
    fn stage(&mut self, name: &str, total: u64) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let bar = if total == 0 { indicatif::ProgressBar::new_spinner() } else { indicatif::ProgressBar::new(total) };
        let style = indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed} {msg}")
            .expect("a valid template");
        bar.set_style(if total == 0 { indicatif::ProgressStyle::default_spinner() } else { style });
        bar.set_prefix(name.to_owned());
        bar.enable_steady_tick(std::time::Duration::from_millis(500));
        self.bar = Some(bar);
    }
    fn advance(&mut self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }
    fn note(&mut self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(msg.to_owned()),
            None => eprintln!("eval: {msg}"),
        }
    }
}

fn suite(experiment: eval::suite::Experiment, args: SuiteArgs) -> anyhow::Result<()> {
    use eval::attack::{AttackOptions, ProbeSource, REFERENCE};
    let (dir, generator) = load(&args.model)?;
    let name = match args.model.model {
        None => crate::model::load::EMBEDDED_MODEL_NAME.to_owned(),
        Some(_) => dir.path.display().to_string(),
    };
    let mut probes = Vec::new();
    if !args.no_reference {
        for probe in REFERENCE {
            let path = crate::plugin::shipped(probe);
            let source = ProbeSource::file(&path).map_err(|e| {
                anyhow::anyhow!("{}: {e} (build the shipped plugins: scripts/build-plugins.sh)", path.display())
            })?;
            probes.push(source);
        }
    }
    for path in &args.probes {
        probes.push(ProbeSource::file(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?);
    }
    let opts = eval::suite::EvalOptions {
        experiment,
        tenants: args.tenants,
        records: args.records,
        pairs: args.pairs.unwrap_or((1000 * args.tenants).min(1_000_000)),
        seed: args.seed,
        out: args.out.clone(),
        attack: AttackOptions {
            probes,
            victims: args.victims.unwrap_or(args.tenants.min(250)),
            key_victims: args.key_victims,
            deadline: std::time::Duration::from_millis(args.probe_deadline_ms),
        },
        padding: match args.pad_dims {
            0 => None,
            extra => Some(crate::pad::Padding { extra, calibration: crate::pad::calibration_for(&dir, &generator)? }),
        },
    };
    let mut bars = Bars { bar: None };
    let report = eval::suite::run(&generator, &name, &opts, &mut bars)?;
    if let Some(bar) = bars.bar.take() {
        bar.finish_and_clear();
    }
    print!("{}", eval::report::markdown(&report));
    eprintln!("wrote {}", args.out.join("report.md").display());
    Ok(())
}

fn load(args: &ModelArgs) -> anyhow::Result<(ModelDir, Generator)> {
    let device = device::select(args.device)?;
    let dtype = device::dtype(args.dtype, &device);
    let dir = ModelDir::open_or_embedded(args.model.as_deref())?;
    let generator = Generator::load(&dir, dtype, &device)?;
    Ok((dir, generator))
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (dir, generator) = load(&args.model)?;
    let data_dir = args.data_dir.clone().unwrap_or_else(keys::default_data_dir);
    let master = MasterSecret::load_or_create(&data_dir)?;
    let runtime = PluginRuntime::new(Limits::default(), None)?;
    let policies = Arc::new(PolicySet::new(runtime));
    for (kind, file) in &args.policies {
        let bytes = std::fs::read(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        policies
            .swap(*kind, &file.display().to_string(), &bytes, "")
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    }
    let padding = match args.pad_dims {
        0 => None,
        extra => Some(crate::pad::Padding { extra, calibration: crate::pad::calibration_for(&dir, &generator)? }),
    };
    let engine = EngineConfig {
        variant: args.variant,
        prefix_mode: args.prefix_mode,
        kv_budget: args.kv_budget,
        max_batch: args.max_batch,
        padding,
        ..EngineConfig::default()
    };
    let limits = server::Limits {
        max_body_bytes: args.max_body_bytes,
        max_prompt_tokens: args.max_prompt_tokens,
        max_tokens: args.max_tokens,
        max_connections: args.max_connections,
        ..server::Limits::default()
    };
    let model_id = dir.model_id();
    let template = dir.chat_template.clone();
    let app = App::new(generator, master, &data_dir, policies, engine, limits, model_id, template.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let app = Arc::new(app);
        app.restore().await?;
        let listener = tokio::net::TcpListener::bind(args.addr).await?;
        let addr = listener.local_addr()?;
        let banner = format!(
            "kframe listening on http://{addr} (model {}, {} tenants)\nadmin token: {}\n",
            app.model_id,
            app.registry.len(),
            data_dir.join(server::ADMIN_TOKEN_FILE).display()
        );
        // One write, and its failure is not fatal: a supervisor that reads the
        // first line and closes the pipe must not take the server down with it
        // (`println!` panics on a closed stdout).
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(banner.as_bytes()).and_then(|()| out.flush()) {
            tracing::warn!("could not print the listening address: {e}");
        }
        drop(out);
        server::serve(app, listener, shutdown_signal()).await;
        anyhow::Ok(())
    })
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    eprintln!("kframe: shutting down; finishing in-flight requests");
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let (_, generator) = load(&args.model)?;
    let (dtype, device) = (generator.model.dtype(), generator.model.device().clone());
    let frame = match &args.tenant {
        None => Frame::Identity,
        Some(tenant) => {
            let data_dir = args.data_dir.clone().unwrap_or_else(keys::default_data_dir);
            let master = MasterSecret::load_or_create(&data_dir)?;
            let exact = args.kv_precision == KvPrecision::Exact;
            let ring = Keyring::new(master, generator.model.rotation_shape(), dtype, exact, device.clone(), 1);
            ring.frame(tenant, args.epoch)?
        }
    };
    let prompt = generator.encode(&args.prompt)?;
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut out = std::io::stdout().lock();
    let result = generator.generate(&prompt, &frame, args.variant, args.kv_precision, &params, |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    writeln!(out)?;
    tracing::info!(
        frame = frame.describe(),
        prompt_tokens = result.prompt_tokens,
        completion_tokens = result.tokens.len(),
        finish = ?result.finish,
        "done"
    );
    Ok(())
}
