//! Norm-equalizing padding on the embedded model with its stored calibration:
//! padded rows all have the calibrated norm, attention is unchanged, recovery
//! drops the pads bit-exactly, and batches mixing layouts decode as alone.

use candle_core::{DType, Device, Tensor};
use kframe_core::cache::{KvCache, KvPrecision, RoundTrip};
use kframe_core::keys::{MasterSecret, Which};
use kframe_core::layout::{Calibration, Layout, Padding};
use kframe_core::rotation::{Frame, Keyring};
use kframe_model::load::ModelDir;
use kframe_model::qwen2::{Chunk, Trace};
use kframe_model::rounding::{self, Reductions, F16_UNIT, F32_UNIT};
use kframe_model::ModelBundle;
use kframe_model::Variant;
use kframe_testkit::{argmax, assert_clear_margins, frame_tolerance, max_abs_diff, widest_tolerance};

const EXTRA: usize = 64;

fn embedded() -> (ModelBundle, Calibration) {
    embedded_in(DType::F32)
}

fn embedded_in(dtype: DType) -> (ModelBundle, Calibration) {
    let dir = ModelDir::embedded().unwrap();
    let gen = ModelBundle::load(&dir, dtype, &Device::Cpu).unwrap();
    let calibration = dir.stored_calibration().unwrap().expect("the embedded model ships a calibration");
    (gen, calibration)
}

fn ring(gen: &ModelBundle, calibration: &Calibration, exact: bool) -> Keyring {
    let shape = gen.model.rotation_shape();
    let precision = if exact { KvPrecision::Exact } else { KvPrecision::Native };
    let padding = Padding { extra: EXTRA, calibration: calibration.clone() };
    Keyring::builder(MasterSecret::from_bytes([21; 32]), shape)
        .precision(precision)
        .capacity(16)
        .padding(padding)
        .build()
}

fn all_padded(gen: &ModelBundle) -> Layout {
    Layout::new(vec![true; gen.model.config().num_hidden_layers], EXTRA)
}

fn prompt(gen: &ModelBundle) -> Vec<u32> {
    // Not one of the calibration's documents (those use another seed).
    let mut corpus = kframe_model::corpus::Corpus::new(4242);
    let text = corpus.records_document(6, 2).text();
    gen.encode(&text).unwrap()
}

fn cache_for(gen: &ModelBundle, frame: &Frame, precision: KvPrecision) -> KvCache {
    let layout = frame.layout().cloned().unwrap_or_else(|| Layout::plain(gen.model.config().num_hidden_layers));
    gen.model.new_cache(precision).with_layout(layout).unwrap()
}

/// Greedy logits of a prefill and `steps` decode steps.
fn greedy(gen: &ModelBundle, frame: &Frame, tokens: &[u32], steps: usize, variant: Variant) -> Vec<Tensor> {
    let mut cache = cache_for(gen, frame, KvPrecision::Native);
    let mut out = vec![gen.model.forward(tokens, &mut cache, frame, variant).unwrap()];
    for _ in 0..steps {
        let next = argmax(out.last().unwrap());
        out.push(gen.model.forward(&[next], &mut cache, frame, variant).unwrap());
    }
    out
}

/// The worst relative distance of any padded K or V row's norm from `want`'s
/// target norm c, for rows padded with `used`'s norms.
fn worst_norm_error(gen: &ModelBundle, used: &Calibration, want: &Calibration) -> f64 {
    let ring = ring(gen, used, false);
    let frame = ring.padded_frame("alice", 0, &all_padded(gen)).unwrap();
    let tokens = prompt(gen);
    let mut cache = cache_for(gen, &frame, KvPrecision::Native);
    gen.model.forward(&tokens, &mut cache, &frame, Variant::ProbeTime).unwrap();
    assert_eq!(cache.take_findings().pad_overflow, 0, "no row of this prompt exceeds the calibration");
    let d = gen.model.config().head_dim;
    let mut worst = 0f64;
    for layer in 0..gen.model.config().num_hidden_layers {
        let (k, v) = cache.stored_rows(layer, cache.len()).unwrap();
        for (rows, which) in [(k, Which::K), (v, Which::V)] {
            assert_eq!(rows.dim(2).unwrap(), d + EXTRA);
            let c = want.norm(layer, 0, which);
            let norms = rows.to_dtype(DType::F64).unwrap().sqr().unwrap().sum(2).unwrap().sqrt().unwrap();
            let norms = norms.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            worst = norms.iter().map(|n| (n - c).abs() / c).fold(worst, f64::max);
        }
    }
    worst
}

/// A padded row [x; r] has norm c exactly in f64; its one rounded product with
/// the rotation and its storage rounding move the norm by at most
/// `rounding::round_trip(d + m, 1)` of c (see there). Norms off by 0.1% (a
/// miscalibrated c) miss that bound by two orders of magnitude.
#[test]
fn every_padded_k_and_v_row_has_the_calibrated_norm_within_one_products_rounding() {
    let (gen, calibration) = embedded();
    let bound = rounding::round_trip(gen.model.config().head_dim + EXTRA, 1, F32_UNIT);
    assert_calibrated_norms(&gen, &calibration, bound, 1.001, 100.0);
}

/// In an f16 cache (the CPU default) a padded row is rotated in f32 and rounded
/// once to f16, which moves each element by at most one f16 unit of itself and so
/// the row's norm by at most one unit: the bound is one f32 product's rounding
/// plus that. Norms 5% off miss it by more than fifty times.
#[test]
fn every_padded_row_of_an_f16_cache_has_the_calibrated_norm_within_its_rounding() {
    let (gen, calibration) = embedded_in(DType::F16);
    assert_eq!(gen.model.kv_dtype(), DType::F16);
    let bound = rounding::round_trip(gen.model.config().head_dim + EXTRA, 1, F32_UNIT) + F16_UNIT;
    assert_calibrated_norms(&gen, &calibration, bound, 1.05, 50.0);
}

/// Padded norms lie within `bound` of the calibration, and a calibration whose
/// margin is `off` times too large misses it by at least `misses` bounds.
fn assert_calibrated_norms(gen: &ModelBundle, calibration: &Calibration, bound: f64, off: f64, misses: f64) {
    let worst = worst_norm_error(gen, calibration, calibration);
    eprintln!("worst relative norm error {worst:e}: {:.4} x the bound", worst / bound);
    assert!(worst <= bound, "worst relative norm error {worst:e}, bound {bound:e}");
    let wrong = Calibration { margin: calibration.margin * off, ..calibration.clone() };
    let miscalibrated = worst_norm_error(gen, &wrong, calibration);
    assert!(miscalibrated >= misses * bound, "norms {off}x off are only {:.1} bounds off", miscalibrated / bound);
}

#[test]
fn padding_keeps_greedy_tokens_identical_and_logits_within_the_rounding_bound_in_both_variants() {
    let (gen, calibration) = embedded();
    let ring = ring(&gen, &calibration, false);
    let plain = ring.frame("alice", 0).unwrap();
    let padded = ring.padded_frame("alice", 0, &all_padded(&gen)).unwrap();
    let tokens = prompt(&gen);
    let cfg = gen.model.config();
    for variant in [Variant::ProbeTime, Variant::DecodeTime] {
        let (a, b) = (greedy(&gen, &plain, &tokens, 12, variant), greedy(&gen, &padded, &tokens, 12, variant));
        let context = tokens.len() + 12;
        assert_clear_margins(&a, widest_tolerance(cfg, context, cfg.head_dim + EXTRA, &a), "unpadded");
        for (step, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(argmax(x), argmax(y), "{variant:?}: greedy token differs at step {step}");
            let (diff, tolerance) = (max_abs_diff(x, y), frame_tolerance(cfg, context, cfg.head_dim + EXTRA, x));
            assert!(diff <= tolerance, "{variant:?} step {step}: max logit difference {diff:e}, bound {tolerance:e}");
        }
    }
}

#[test]
fn padded_round_trip_is_bit_exact_in_exact_mode_and_survives_a_rekey() {
    let (gen, calibration) = embedded();
    let ring = ring(&gen, &calibration, true);
    let layout = all_padded(&gen);
    let frame = ring.padded_frame("alice", 0, &layout).unwrap();
    let tokens = prompt(&gen);
    let mut cache = cache_for(&gen, &frame, KvPrecision::Exact);
    let mut trace = Trace::default();
    gen.model.forward_traced(&tokens, &mut cache, &frame, Variant::ProbeTime, Some(&mut trace)).unwrap();
    let check = |cache: &KvCache, frame: &Frame| {
        for layer in 0..gen.model.config().num_hidden_layers {
            let (k, v) = cache.recover(layer, frame).unwrap();
            let rt = RoundTrip::compare(&trace.k[layer], &k)
                .unwrap()
                .merge(RoundTrip::compare(&trace.v[layer], &v).unwrap());
            assert!(rt.elements > 0 && rt.is_bit_exact(), "layer {layer}: {rt:?}");
        }
    };
    check(&cache, &frame);
    let next = ring.padded_frame("alice", 1, &layout).unwrap();
    let before = cache.stored_rows(0, cache.len()).unwrap().0.copy().unwrap();
    cache.rekey(&frame, &next).unwrap();
    let after = cache.stored_rows(0, cache.len()).unwrap().0;
    assert!((before - after).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() > 0.1);
    check(&cache, &next);
}

#[test]
fn a_batch_mixing_padded_unpadded_and_identity_sequences_decodes_each_as_alone() {
    let (gen, calibration) = embedded();
    let ring = ring(&gen, &calibration, false);
    let mut layer0 = vec![false; gen.model.config().num_hidden_layers];
    layer0[0] = true;
    let frames = [
        ring.padded_frame("ana", 0, &all_padded(&gen)).unwrap(),
        ring.frame("ben", 0).unwrap(),
        Frame::Identity,
        ring.padded_frame("cy", 0, &Layout::new(layer0, EXTRA)).unwrap(),
        ring.padded_frame("dee", 0, &all_padded(&gen)).unwrap(),
    ];
    let tokens = prompt(&gen);
    let steps = 6;
    // Alone: one sequence at a time through the batched step, each step's greedy
    // margin clear of what rounding in a larger batch may move.
    let cfg = gen.model.config();
    let alone: Vec<Vec<u32>> = frames
        .iter()
        .map(|f| {
            let mut cache = cache_for(&gen, f, KvPrecision::Native);
            let mut next =
                argmax(&gen.model.forward(&tokens[..tokens.len() - 3], &mut cache, f, Variant::ProbeTime).unwrap());
            let (mut out, mut logits) = (vec![], vec![]);
            for _ in 0..steps {
                let feed = [next];
                let mut one = [Chunk::new(&feed, &mut cache, f)];
                let l = gen.model.forward_batch(&mut one, Variant::ProbeTime).unwrap().get(0).unwrap();
                next = argmax(&l);
                out.push(next);
                logits.push(l);
            }
            let tolerance = widest_tolerance(cfg, tokens.len() + steps, cfg.head_dim + EXTRA, &logits);
            assert_clear_margins(&logits, tolerance, &f.describe());
            out
        })
        .collect();
    let mut caches: Vec<KvCache> = frames.iter().map(|f| cache_for(&gen, f, KvPrecision::Native)).collect();
    let mut next: Vec<u32> = frames
        .iter()
        .zip(caches.iter_mut())
        .map(|(f, c)| argmax(&gen.model.forward(&tokens[..tokens.len() - 3], c, f, Variant::ProbeTime).unwrap()))
        .collect();
    let mut together = vec![vec![]; frames.len()];
    for _ in 0..steps {
        let mut batch: Vec<Chunk> = caches
            .iter_mut()
            .zip(&frames)
            .zip(&next)
            .map(|((cache, frame), token)| Chunk::new(std::slice::from_ref(token), cache, frame))
            .collect();
        let logits = gen.model.forward_batch(&mut batch, Variant::ProbeTime).unwrap();
        for (i, n) in next.iter_mut().enumerate() {
            *n = argmax(&logits.get(i).unwrap());
            together[i].push(*n);
        }
    }
    assert_eq!(together, alone);
}

#[test]
fn a_padded_frame_cannot_write_into_a_cache_of_another_layout() {
    let (gen, calibration) = embedded();
    let ring = ring(&gen, &calibration, false);
    let frame = ring.padded_frame("alice", 0, &all_padded(&gen)).unwrap();
    let mut plain = gen.model.new_cache(KvPrecision::Native);
    let err = gen.model.forward(&[1, 2, 3], &mut plain, &frame, Variant::ProbeTime).unwrap_err().to_string();
    assert!(err.contains("width"), "{err}");
    let mut cache = cache_for(&gen, &frame, KvPrecision::Native);
    gen.model.forward(&[1, 2, 3], &mut cache, &frame, Variant::ProbeTime).unwrap();
    assert!(cache.with_layout(Layout::plain(2)).is_err(), "a cache holding rows keeps its layout");
}

#[test]
fn a_layer_left_unrotated_holds_plaintext_while_the_others_stay_rotated() {
    let (gen, calibration) = embedded();
    let ring = ring(&gen, &calibration, true);
    let layout = Layout::new(vec![true, false], EXTRA).with_unrotated(vec![false, true]);
    let frame = ring.padded_frame("alice", 0, &layout).unwrap();
    let tokens = prompt(&gen);
    let mut cache = cache_for(&gen, &frame, KvPrecision::Exact);
    let mut trace = Trace::default();
    gen.model.forward_traced(&tokens, &mut cache, &frame, Variant::ProbeTime, Some(&mut trace)).unwrap();
    let stored = |layer: usize| cache.stored_rows(layer, cache.len()).unwrap().0.to_dtype(DType::F32).unwrap();
    assert_eq!(stored(1).to_vec3::<f32>().unwrap(), trace.k[1].to_vec3::<f32>().unwrap(), "layer 1 is plaintext");
    assert_eq!(stored(0).dim(2).unwrap(), gen.model.config().head_dim + EXTRA, "layer 0 is padded and rotated");
    // The same logits as every layer rotated.
    let all = ring.frame("alice", 0).unwrap();
    let mut other = cache_for(&gen, &all, KvPrecision::Exact);
    let a = gen.model.forward(&tokens, &mut other, &all, Variant::ProbeTime).unwrap();
    let mut again = cache_for(&gen, &frame, KvPrecision::Exact);
    let b = gen.model.forward(&tokens, &mut again, &frame, Variant::ProbeTime).unwrap();
    let cfg = gen.model.config();
    assert!(max_abs_diff(&a, &b) <= frame_tolerance(cfg, tokens.len(), cfg.head_dim + EXTRA, &a));
}

#[test]
fn the_stored_calibration_matches_a_fresh_measurement() {
    let dir = ModelDir::embedded().unwrap();
    let gen = ModelBundle::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let stored = dir.stored_calibration().unwrap().unwrap();
    let fresh = kframe_model::calibrate::measure(&dir, &gen, stored.margin).unwrap();
    // Each norm is a K or V row's, as far into the model as its layer: the f32
    // rounding of the pass to there, on the machine that stored it and on this one.
    let cfg = gen.model.config();
    let window = cfg.max_position_embeddings.min(512);
    let relative = Reductions::to_kv_rows(cfg, cfg.num_hidden_layers - 1, window).bound_between(F32_UNIT, 1.0);
    for (a, b) in stored
        .max_k
        .iter()
        .flatten()
        .chain(stored.max_v.iter().flatten())
        .zip(fresh.max_k.iter().flatten().chain(fresh.max_v.iter().flatten()))
    {
        assert!(
            (a - b).abs() / b <= relative,
            "stored {a} vs measured {b} (bound {relative:e}): run `kframe calibrate --out host/model/embedded/kframe-pad.json`"
        );
    }
}
