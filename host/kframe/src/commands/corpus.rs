//! `kframe corpus`: the synthetic retrieval corpus as JSON lines.

use kframe_model::corpus::Corpus;
use std::io::Write;

pub fn run(seed: u64, docs: usize, recall: Option<usize>) -> anyhow::Result<()> {
    let mut corpus = Corpus::new(seed);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for _ in 0..docs {
        let line = match recall {
            Some(k) => serde_json::to_string(&corpus.recall_item(k.max(1)))?,
            None => serde_json::to_string(&corpus.training_document())?,
        };
        writeln!(out, "{line}")?;
    }
    Ok(())
}
