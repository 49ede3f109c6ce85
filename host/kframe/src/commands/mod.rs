//! One file per command; [`run`] dispatches.

mod bench;
mod calibrate;
mod check_device;
mod corpus;
mod eval;
mod export_gguf;
mod generate;
mod plugin;
mod serve;
mod synth_model;

use crate::args::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Plugin(cmd) => plugin::run(cmd),
        Command::Eval(cmd) => eval::run(cmd),
        Command::SynthModel(args) => synth_model::run(args),
        Command::ExportGguf { model, file_type, out } => export_gguf::run(model.as_deref(), file_type.into(), &out),
        Command::CheckDevice { model, device, json } => check_device::run(model.as_deref(), device.into(), json),
        Command::Calibrate { model, margin, out } => calibrate::run(&model, margin, &out),
        Command::Corpus { seed, docs, recall } => corpus::run(seed, docs, recall),
    }
}
