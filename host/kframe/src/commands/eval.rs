//! `kframe eval`: measured isolation claims, with progress on stderr.

use crate::args::{experiment, EvalCommand, SuiteArgs};
use crate::model::load;
use crate::report::print_report;
use kframe_core::keys::MasterSecret;
use kframe_core::layout::Padding;
use kframe_core::rotation::Keyring;
use kframe_eval::attack::{AdversarySource, AttackOptions, REFERENCE};
use kframe_eval::recall::RecallOptions;
use kframe_eval::suite::{EvalOptions, Experiment};

pub fn run(cmd: EvalCommand) -> anyhow::Result<()> {
    let experiment = experiment(&cmd);
    match cmd {
        EvalCommand::Recall { model, tenants, records, seed, variant, json } => {
            let (dir, bundle) = load(&model)?;
            let ring = Keyring::builder(MasterSecret::random(), bundle.model.rotation_shape())
                .dtype(bundle.model.dtype())
                .device(bundle.model.device().clone())
                .capacity(16)
                .build();
            let opts = RecallOptions { tenants, records, seed, variant: variant.into() };
            let bar = indicatif::ProgressBar::new(tenants as u64);
            let mut report = kframe_eval::recall::recall(&bundle, &ring, &opts, |done| bar.set_position(done as u64))?;
            bar.finish_and_clear();
            report.model = dir.path.display().to_string();
            print_report(&report, json, report.to_text())
        }
        EvalCommand::Matched(args)
        | EvalCommand::WrongKey(args)
        | EvalCommand::Readout(args)
        | EvalCommand::SpotCheck(args)
        | EvalCommand::Attack(args)
        | EvalCommand::All(args) => suite(experiment.expect("a suite experiment"), args),
    }
}

/// Progress of the eval on stderr: one bar per experiment.
struct Bars {
    bar: Option<indicatif::ProgressBar>,
}

impl kframe_eval::suite::Progress for Bars {
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

fn suite(experiment: Experiment, args: SuiteArgs) -> anyhow::Result<()> {
    let (dir, bundle) = load(&args.model)?;
    let name = match args.model.model {
        None => kframe_model::load::EMBEDDED_MODEL_NAME.to_owned(),
        Some(_) => dir.path.display().to_string(),
    };
    let mut adversaries = Vec::new();
    if !args.no_reference {
        for adversary in REFERENCE {
            let path = kframe_policy::shipped(adversary);
            let source = AdversarySource::file(&path).map_err(|e| {
                anyhow::anyhow!("{}: {e} (build the shipped plugins: scripts/build-plugins.sh)", path.display())
            })?;
            adversaries.push(source);
        }
    }
    for path in &args.adversaries {
        adversaries.push(AdversarySource::file(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?);
    }
    let opts = EvalOptions {
        experiment,
        tenants: args.tenants,
        records: args.records,
        pairs: args.pairs.unwrap_or((1000 * args.tenants).min(1_000_000)),
        seed: args.seed,
        out: args.out.clone(),
        attack: AttackOptions {
            adversaries,
            victims: args.victims.unwrap_or(args.tenants.min(250)),
            key_victims: args.key_victims,
            deadline: std::time::Duration::from_millis(args.adversary_deadline_ms),
        },
        padding: match args.pad_dims {
            0 => None,
            extra => Some(Padding { extra, calibration: kframe_model::calibrate::calibration_for(&dir, &bundle)? }),
        },
    };
    let mut bars = Bars { bar: None };
    let report = kframe_eval::suite::run(&bundle, &name, &opts, &mut bars)?;
    if let Some(bar) = bars.bar.take() {
        bar.finish_and_clear();
    }
    print!("{}", kframe_eval::report::markdown(&report));
    eprintln!("wrote {}", args.out.join("report.md").display());
    Ok(())
}
