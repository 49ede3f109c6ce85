//! One file per command; [`run`] dispatches.

mod bench;
mod calibrate;
mod corpus;
mod eval;
mod generate;
mod plugin;
mod serve;
mod synth_model;

use crate::args::{Cli, Command, ModelArgs};
use kframe_model::device;
use kframe_model::load::ModelDir;
use kframe_model::ModelBundle;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Plugin(cmd) => plugin::run(cmd),
        Command::Eval(cmd) => eval::run(cmd),
        Command::SynthModel(args) => synth_model::run(args),
        Command::Calibrate { model, margin, out } => calibrate::run(&model, margin, &out),
        Command::Corpus { seed, docs, recall } => corpus::run(seed, docs, recall),
    }
}

/// The model `--model`, `--device` and `--dtype` name: its directory and the
/// loaded model with its tokenizer.
fn load(args: &ModelArgs) -> anyhow::Result<(ModelDir, ModelBundle)> {
    let device = device::select(args.device.into())?;
    let dtype = device::dtype(args.dtype.into(), &device);
    let dir = ModelDir::open_or_embedded(args.model.as_deref())?;
    let bundle = ModelBundle::load(&dir, dtype, &device)?;
    Ok((dir, bundle))
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
