//! Measuring the norm-pad calibration of a model: the largest K and V norms it
//! produces, per layer and kv head, over its whole vocabulary at layer 0 (where a
//! row's norm depends on its token alone) and over documents of the synthetic
//! corpus at every layer. Padded layers bring every row to these norms times a margin (see
//! `kframe_core::layout`).

use crate::bundle::ModelBundle;
use crate::error::Result;
use crate::load::ModelDir;
use crate::qwen2::{Qwen2, Trace, Variant};
use candle_core::DType;
use kframe_core::cache::KvPrecision;
use kframe_core::layout::{Calibration, CALIBRATION_FILE, DEFAULT_MARGIN};
use kframe_core::rotation::Frame;

/// Documents of the synthetic corpus the calibration runs over (after the vocabulary).
const CALIBRATION_DOCUMENTS: usize = 64;

/// The calibration stored with the model, or one measured now (over the vocabulary
/// and the built-in corpus) when it has none.
pub fn calibration_for(dir: &ModelDir, bundle: &ModelBundle) -> Result<Calibration> {
    if let Some(stored) = dir.stored_calibration()? {
        return Ok(stored);
    }
    // The documents run through the whole model: a second for the embedded
    // model, minutes for a real-size one on CPU; hence the stored file.
    tracing::warn!(
        "no {CALIBRATION_FILE} in {}: measuring the pad calibration now ({} vocabulary tokens through layer 0 and \
         {CALIBRATION_DOCUMENTS} documents through the model); `kframe calibrate --out {}` stores one",
        dir.path.display(),
        bundle.model.config().vocab_size,
        dir.path.join(CALIBRATION_FILE).display()
    );
    measure(dir, bundle, DEFAULT_MARGIN)
}

/// Measures `bundle`'s model over its vocabulary and the built-in corpus.
pub fn measure(dir: &ModelDir, bundle: &ModelBundle, margin: f64) -> Result<Calibration> {
    let mut corpus = crate::corpus::Corpus::new(0x9ad);
    let documents = (0..CALIBRATION_DOCUMENTS)
        .map(|_| bundle.encode(&corpus.training_document().text()))
        .collect::<Result<Vec<_>>>()?;
    measure_over(&bundle.model, &dir.model_id(), &documents, margin)
}

/// Measures `model` over its whole vocabulary at layer 0 (where a row's norm
/// depends on its token alone: [`Qwen2::first_layer_kv`]) and over `documents` at
/// every layer, in the model's own frame.
pub fn measure_over(model: &Qwen2, model_id: &str, documents: &[Vec<u32>], margin: f64) -> Result<Calibration> {
    let cfg = model.config();
    let (layers, kv) = (cfg.num_hidden_layers, cfg.num_key_value_heads);
    let mut max_k = vec![vec![0f64; kv]; layers];
    let mut max_v = vec![vec![0f64; kv]; layers];
    // The largest row norm of each kv head of `rows` (kv, t, d) into `max`.
    let widen = |rows: &candle_core::Tensor, max: &mut Vec<f64>| -> Result<()> {
        let norms = rows.to_dtype(DType::F64)?.sqr()?.sum(2)?.sqrt()?.max(1)?.to_vec1::<f64>()?;
        for (m, n) in max.iter_mut().zip(norms) {
            *m = m.max(n);
        }
        Ok(())
    };
    let vocab: Vec<u32> = (0..cfg.vocab_size as u32).collect();
    for tokens in vocab.chunks(4096) {
        let (k, v) = model.first_layer_kv(tokens)?;
        widen(&k, &mut max_k[0])?;
        widen(&v, &mut max_v[0])?;
    }
    for tokens in documents.iter().flat_map(|d| d.chunks(cfg.max_position_embeddings)).filter(|t| !t.is_empty()) {
        let mut cache = model.new_cache(KvPrecision::Native);
        let mut trace = Trace::default();
        model.forward_traced(tokens, &mut cache, &Frame::Identity, Variant::ProbeTime, Some(&mut trace))?;
        for layer in 0..layers {
            widen(&trace.k[layer], &mut max_k[layer])?;
            widen(&trace.v[layer], &mut max_v[layer])?;
        }
    }
    let corpus = format!("vocabulary ({} tokens, layer 0) + {} documents", cfg.vocab_size, documents.len());
    Ok(Calibration { model: model_id.to_owned(), corpus, margin, max_k, max_v })
}
