//! `kframe calibrate`: measure the norm-pad calibration and write it as JSON.

use crate::args::ModelArgs;
use std::path::Path;

pub fn run(model: &ModelArgs, margin: f64, out: &Path) -> anyhow::Result<()> {
    let (dir, bundle) = crate::model::load(model)?;
    let calibration = kframe_model::calibrate::measure(&dir, &bundle, margin)?;
    std::fs::write(out, serde_json::to_string_pretty(&calibration)? + "\n")?;
    eprintln!("wrote the pad calibration of {} ({}) to {}", calibration.model, calibration.corpus, out.display());
    Ok(())
}
