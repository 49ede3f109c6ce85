//! `kframe`: one shared Qwen2 model, a private attention frame per tenant.
//!
//! The binary is the command line over the library crates: [`args`] declares it,
//! `commands/` holds one file per command, [`model`] loads the model a command
//! names and [`report`] prints what it measured.
//!
//! # Dependencies
//!
//! Every kframe crate, clap and the tracing subscriber; nothing depends on it.
//! Which crate does what is in the workspace README's layout section.

mod args;
mod commands;
mod model;
mod report;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // First, while this is the only thread.
    kframe_model::device::pin_compute_threads();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KFRAME_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match commands::run(args::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
