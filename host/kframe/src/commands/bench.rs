//! `kframe bench`: costs, as ratios measured within one run.

use crate::args::BenchCommand;
use crate::report::print_report;
use kframe_bench::{self as bench, RotationBenchOptions};

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let progress = |msg: &str| eprintln!("bench: {msg}");
    match cmd {
        BenchCommand::Rotation { json, layers, rounds } => {
            let opts = RotationBenchOptions { layers, rounds, ..Default::default() };
            let report = bench::rotation(&opts, progress)?;
            print_report(&report, json, report.to_text())
        }
        BenchCommand::Serve { json, tenants } => {
            let opts = bench::ServeBenchOptions { tenants, ..Default::default() };
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
        BenchCommand::Peer { json, llama_cpp, work_dir, pairs } => {
            // kframe's matrix products run on rayon's pool, which reads this too.
            let threads = std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|n| n.parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            anyhow::ensure!(pairs > 0, "--pairs must be at least 1");
            let opts = bench::PeerBenchOptions { llama_cpp, work_dir, pairs, threads };
            let report = bench::peer(&opts, progress)?;
            print_report(&report, json, report.to_text())
        }
    }
}
