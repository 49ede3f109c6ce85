//! `kframe bench`: costs, as ratios measured within one run.

use crate::args::{BenchCommand, PeerPreset};
use crate::report::print_report;
use kframe_bench::{self as bench, RotationBenchOptions, RotationModel};

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let progress = |msg: &str| eprintln!("bench: {msg}");
    match cmd {
        BenchCommand::Rotation { json, layers, device, rounds, preset, quant, work_dir, tokenizer } => {
            let model = match preset {
                PeerPreset::Embedded => RotationModel::LayerSlice { layers, vocab_size: 32_768 },
                PeerPreset::Qwen25_3b => RotationModel::Qwen25_3b { work_dir, tokenizer, quant: quant.into() },
            };
            let device = kframe_model::device::select(device.into())?;
            let opts = RotationBenchOptions { model, device, rounds, ..Default::default() };
            let report = bench::rotation(&opts, progress)?;
            print_report(&report, json, report.to_text())
        }
        BenchCommand::Serve { json, tenants, preset: PeerPreset::Qwen25_3b, work_dir, tokenizer, .. } => {
            let report = bench::residency(&bench::ResidencyOptions { work_dir, tokenizer, tenants }, progress)?;
            print_report(&report, json, report.to_text())
        }
        BenchCommand::Serve { json, tenants, dtype, .. } => {
            let opts = bench::ServeBenchOptions { tenants, dtype: dtype.into(), ..Default::default() };
            let report = bench::serve(&opts, progress)?;
            print_report(&report, json, report.to_text())
        }
        BenchCommand::Http { json, concurrent, max_tokens, load_tenants, requests_per_tenant } => {
            let opts = bench::HttpBenchOptions { concurrent, max_tokens, load_tenants, requests_per_tenant };
            let report = bench::http(&opts, progress)?;
            print_report(&report, json, report.to_text())
        }
        BenchCommand::Plugins { json } => {
            let report = bench::plugins()?;
            print_report(&report, json, report.to_text())
        }
        BenchCommand::Peer { json, llama_cpp, work_dir, pairs, kframe_only, dtype, preset, quant, tokenizer } => {
            // kframe's matrix products run on rayon's pool, which reads this too.
            let threads = std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|n| n.parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            anyhow::ensure!(pairs > 0, "--pairs must be at least 1");
            if preset == PeerPreset::Qwen25_3b {
                anyhow::ensure!(!kframe_only, "--kframe-only times the embedded model");
                let opts =
                    bench::RealSizeOptions { llama_cpp, work_dir, tokenizer, quant: quant.into(), pairs, threads };
                let report = bench::real_size(&opts, progress)?;
                return print_report(&report, json, report.to_text());
            }
            if kframe_only {
                let rounds = bench::peer::kframe_alone(pairs, dtype.into(), progress)?;
                let text = (rounds.iter())
                    .map(|s| {
                        format!(
                            "batch 1 {:.0} tok/s, batch 32 {:.0} tok/s, prefill 256 {:.0} tok/s",
                            s.batch1_tok_s, s.batch32_tok_s, s.prefill256_tok_s
                        )
                    })
                    .map(|line| line + "\n")
                    .collect::<String>();
                return print_report(&rounds, json, text);
            }
            let opts = bench::PeerBenchOptions { llama_cpp, work_dir, pairs, threads };
            let report = bench::peer(&opts, progress)?;
            print_report(&report, json, report.to_text())
        }
    }
}
