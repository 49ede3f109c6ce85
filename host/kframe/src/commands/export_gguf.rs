//! `kframe export-gguf`: a model directory (or the embedded model) as one GGUF file.

use kframe_model::export::{self, FileType};
use kframe_model::load::ModelDir;
use std::path::Path;

pub fn run(model: Option<&Path>, file_type: FileType, out: &Path) -> anyhow::Result<()> {
    let dir = ModelDir::open_or_embedded(model)?;
    export::write(&dir, file_type, out)?;
    let bytes = std::fs::metadata(out)?.len();
    eprintln!("wrote {} ({}, {:.1} MB)", out.display(), file_type.name(), bytes as f64 / 1e6);
    Ok(())
}
