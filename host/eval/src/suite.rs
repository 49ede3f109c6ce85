//! Runs the chosen experiments of `kframe eval` on one [`Lab`] and writes
//! DIR/report.json, DIR/report.md and the figures.

use super::attack::{self, AttackOptions};
use super::lab::Lab;
use super::matched;
use super::readout::{self, ReadoutPair};
use super::report;
pub use super::report::Report;
use super::wrong_key;
use crate::error::{Error, Result};
use kframe_model::ModelBundle;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Experiment {
    Matched,
    WrongKey,
    Readout,
    SpotCheck,
    Attack,
    All,
}

#[derive(Clone)]
pub struct EvalOptions {
    pub experiment: Experiment,
    pub tenants: usize,
    pub records: usize,
    /// Readout samples (off-diagonal pairs, each with one real K row).
    pub pairs: usize,
    pub seed: u64,
    pub out: PathBuf,
    pub attack: AttackOptions,
    /// Norm padding for the attack's padded runs; None: no padded runs.
    pub padding: Option<kframe_core::layout::Padding>,
}

/// The pre-registered spot-check list, written by `readout`.
pub const SPOT_CHECK_FILE: &str = "readout-top-pairs.json";

/// What the experiments hand to whoever shows progress.
pub trait Progress {
    fn stage(&mut self, name: &str, total: u64);
    fn advance(&mut self, n: u64);
    fn note(&mut self, msg: &str);
}

/// No progress shown.
pub struct Quiet;

impl Progress for Quiet {
    fn stage(&mut self, _: &str, _: u64) {}
    fn advance(&mut self, _: u64) {}
    fn note(&mut self, _: &str) {}
}

pub fn run(gen: &ModelBundle, model_name: &str, opts: &EvalOptions, progress: &mut dyn Progress) -> Result<Report> {
    std::fs::create_dir_all(&opts.out)?;
    let wants = |e: Experiment| opts.experiment == e || opts.experiment == Experiment::All;
    let started = Instant::now();
    progress.note(&format!("preparing {} tenants", opts.tenants));
    let lab = Lab::new(gen, model_name, opts.tenants, opts.records, opts.seed)?;
    let lab = match &opts.padding {
        Some(p) => lab.with_padding(p.clone()),
        None => lab,
    };
    let cfg = gen.model.config();
    let mut report = Report {
        schema: 1,
        model: model_name.to_owned(),
        machine: kframe_model::device::machine(),
        seed: opts.seed,
        tenants: opts.tenants,
        records: opts.records,
        head_dim: cfg.head_dim,
        layers: cfg.num_hidden_layers,
        kv_heads: cfg.num_key_value_heads,
        prefix_tokens: lab.prefix.tokens.len(),
        seconds: BTreeMap::from([("setup".to_owned(), started.elapsed().as_secs_f64())]),
        matched: None,
        wrong_key: None,
        readout: None,
        spot_check: None,
        attack: None,
        figures: Vec::new(),
    };
    let timed = |name: &str, since: Instant, report: &mut Report| {
        report.seconds.insert(name.to_owned(), since.elapsed().as_secs_f64());
    };

    // wrong-key compares its batch-mates with their matched output, so it needs matched.
    let mut matched_out = None;
    if wants(Experiment::Matched) || wants(Experiment::WrongKey) {
        let t = Instant::now();
        progress.stage("matched", opts.tenants as u64);
        let (m, out) = matched::run(&lab, |n| progress.advance(n as u64))?;
        report.matched = Some(m);
        matched_out = Some(out);
        timed("matched", t, &mut report);
    }
    if wants(Experiment::WrongKey) {
        let t = Instant::now();
        let total: usize = wrong_key::group_sizes(opts.tenants).iter().sum();
        progress.stage("wrong-key", total as u64);
        let out = matched_out.as_deref().expect("matched ran above");
        report.wrong_key = Some(wrong_key::run(&lab, out, |n| progress.advance(n as u64))?);
        timed("wrong-key", t, &mut report);
    }
    let mut cosines = None;
    if wants(Experiment::Readout) {
        let t = Instant::now();
        progress.stage("readout", opts.tenants as u64);
        let mut last = 0;
        let (r, cos, top) = readout::run(&lab, opts.pairs, |n| {
            progress.advance((n - last) as u64);
            last = n;
        })?;
        std::fs::write(opts.out.join(SPOT_CHECK_FILE), serde_json::to_string_pretty(&top).map_err(json_error)?)?;
        report.readout = Some(r);
        cosines = Some(cos);
        timed("readout", t, &mut report);
    }
    if wants(Experiment::SpotCheck) {
        let t = Instant::now();
        let file = opts.out.join(SPOT_CHECK_FILE);
        let text = std::fs::read_to_string(&file).map_err(|e| {
            Error::Eval(format!("{}: {e} (run `kframe eval readout` with the same --out first)", file.display()))
        })?;
        let top: Vec<ReadoutPair> = serde_json::from_str(&text).map_err(json_error)?;
        if let Some(p) = top.iter().find(|p| p.reader.max(p.writer) >= opts.tenants) {
            return Err(Error::Eval(format!(
                "{} names tenant {} of {}",
                file.display(),
                p.reader.max(p.writer),
                opts.tenants
            )));
        }
        progress.stage("spot-check", top.len() as u64);
        let pairs: Vec<(usize, usize)> = top.iter().map(|p| (p.reader, p.writer)).collect();
        report.spot_check = Some(wrong_key::spot_check(&lab, &pairs, SPOT_CHECK_FILE)?);
        progress.advance(top.len() as u64);
        timed("spot-check", t, &mut report);
    }
    if wants(Experiment::Attack) {
        let t = Instant::now();
        progress.stage("attack", 0);
        report.attack = Some(attack::run(&lab, &opts.attack, |m| progress.note(m))?);
        timed("attack", t, &mut report);
    }
    report.seconds.insert("total".to_owned(), started.elapsed().as_secs_f64());
    report.figures = report::figures(&report, &opts.out, cosines.as_deref())?;
    write(&report, &opts.out)?;
    Ok(report)
}

fn json_error(e: serde_json::Error) -> Error {
    Error::Eval(e.to_string())
}

/// Writes report.json and report.md.
pub fn write(report: &Report, dir: &Path) -> Result<()> {
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(report).map_err(json_error)?)?;
    std::fs::write(dir.join("report.md"), report::markdown(report))?;
    Ok(())
}
