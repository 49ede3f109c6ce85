//! The model a command names with `--model`, `--device` and `--dtype`.

use crate::args::ModelArgs;
use kframe_model::device;
use kframe_model::load::ModelDir;
use kframe_model::ModelBundle;

/// The model `--model`, `--device` and `--dtype` name: its directory and the
/// loaded model with its tokenizer.
pub fn load(args: &ModelArgs) -> anyhow::Result<(ModelDir, ModelBundle)> {
    let device = device::select(args.device.into())?;
    let dtype = device::dtype(args.dtype.into(), &device);
    let dir = ModelDir::open_or_embedded(args.model.as_deref())?;
    let bundle = ModelBundle::load(&dir, dtype, &device)?;
    Ok((dir, bundle))
}
