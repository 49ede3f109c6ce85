//! `kframe check-device`: the engine's guarantees, run on the device to serve from.

use crate::report::print_report;
use candle_core::DType;
use kframe_model::device::{self, DeviceChoice};
use kframe_model::device_check;
use kframe_model::load::ModelDir;
use std::path::Path;

pub fn run(model: Option<&Path>, choice: DeviceChoice, json: bool) -> anyhow::Result<()> {
    let device = device::select(choice)?;
    let dir = ModelDir::open_or_embedded(model)?;
    // f32 for the token checks (their rounding bound is f32's), f16 K and V for
    // the exact round trip (exact mode gives half-precision rows back bit for bit).
    let f32_model = dir.load_model(DType::F32, &device)?;
    let f16_model = dir.load_model(DType::F16, &device)?;
    let report = device_check::run(&f32_model, &f16_model)?;
    print_report(&report, json, report.to_text())?;
    if !report.passed {
        anyhow::bail!("a check failed on {}", report.device);
    }
    Ok(())
}
