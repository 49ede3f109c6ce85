//! The rotated-attention engine against candle-transformers' qwen2, across keys,
//! variants and cache precisions, on random-weight models written as real
//! Hugging Face directories.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::qwen2::ModelForCausalLM;
use kframe_core::cache::{KvPrecision, RoundTrip};
use kframe_core::keys::MasterSecret;
use kframe_core::rotation::{Frame, Keyring};
use kframe_model::load::{ModelDir, Weights};
use kframe_model::qwen2::Trace;
use kframe_model::rounding::{self, in_quadrature, Reductions, BF16_UNIT, F16_UNIT, F32_UNIT};
use kframe_model::Error;
use kframe_model::{synth, Config, Qwen2, Variant};
use kframe_testkit::TinyModel;
use kframe_testkit::{argmax, assert_clear_margins, max_abs, max_abs_diff, top2_margin};
use std::collections::HashMap;

/// A random model of shape `cfg` (seed 11) written as a directory.
fn model_dir(cfg: &Config) -> TinyModel {
    TinyModel::with_config(cfg, 11)
}

fn keyring(model: &Qwen2, precision: KvPrecision) -> Keyring {
    let ring = Keyring::builder(MasterSecret::from_bytes([5; 32]), model.rotation_shape());
    ring.dtype(model.dtype()).precision(precision).capacity(8).build()
}

const PROMPT: [u32; 12] = [72, 101, 108, 108, 111, 44, 32, 116, 101, 110, 97, 110];

/// candle-transformers' qwen2 over the directory's weights, with `edit` applied
/// to them first (the mutation tests' bugs).
fn candle_reference(dir: &ModelDir, cfg: &Config, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> ModelForCausalLM {
    let Weights::Files(files) = &dir.weights else { panic!("a written model directory") };
    let mut weights = candle_core::safetensors::load(&files[0], &Device::Cpu).unwrap();
    edit(&mut weights);
    ModelForCausalLM::new(&cfg.to_candle(), VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)).unwrap()
}

/// Over a prefill and 20 decode steps (each feeding the f64 run's greedy token):
/// the largest error of kframe in f32 and of `reference` (candle, f32) against
/// kframe in f64, as multiples of the f32 forward pass's rounding bound. candle
/// places each decode step's token `rope_offset` positions after where it
/// belongs (0: correct).
fn errors_against_f64(cfg: &Config, dir: &ModelDir, reference: &mut ModelForCausalLM, rope_offset: usize) -> Errors {
    let ours = dir.load_model(DType::F32, &Device::Cpu).unwrap();
    let exact = dir.load_model(DType::F64, &Device::Cpu).unwrap();
    let (mut ours_cache, mut exact_cache) = (ours.new_cache(KvPrecision::Native), exact.new_cache(KvPrecision::Native));
    let (mut worst_ours, mut worst_theirs, mut worst_between, mut agree) = (0f64, 0f64, 0f64, true);
    let mut tokens = PROMPT.to_vec();
    let mut pos = 0;
    for _ in 0..21 {
        let a = ours.forward(&tokens, &mut ours_cache, &Frame::Identity, Variant::ProbeTime).unwrap();
        let want = exact.forward(&tokens, &mut exact_cache, &Frame::Identity, Variant::ProbeTime).unwrap();
        let ids = Tensor::new(tokens.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let offset = if pos == 0 { 0 } else { rope_offset };
        let b = reference.forward(&ids, pos + offset).unwrap().flatten_all().unwrap();
        pos += tokens.len();
        let bound = Reductions::forward_pass(cfg, pos).bound(F32_UNIT, max_abs(&want));
        worst_ours = worst_ours.max(max_abs_diff(&a, &want) / bound);
        worst_theirs = worst_theirs.max(max_abs_diff(&b, &want) / bound);
        worst_between = worst_between.max(max_abs_diff(&a, &b) / (2.0 * bound));
        // Both f32 runs pick the reference's token wherever its margin is clear.
        if top2_margin(&want) > 2.0 * bound {
            agree &= (argmax(&a), argmax(&b)) == (argmax(&want), argmax(&want));
        }
        tokens = vec![argmax(&want)];
    }
    Errors { ours: worst_ours, theirs: worst_theirs, between: worst_between, greedy_agrees: agree }
}

/// What [`errors_against_f64`] measured.
struct Errors {
    ours: f64,
    theirs: f64,
    /// The largest difference of the two f32 runs, as a multiple of twice the bound.
    between: f64,
    /// Whether both f32 runs chose the f64 run's token at every step with a clear margin.
    greedy_agrees: bool,
}

/// kframe in f32 and candle-transformers' qwen2 in f32 each lie within the f32
/// rounding bound of kframe in f64 (an evaluation whose own rounding is 2^29
/// times smaller), so they lie within twice that bound of each other, whatever
/// order this machine's gemm sums in. candle shares no forward-pass code with
/// kframe: agreement at this level is agreement of the arithmetic.
fn identity_matches_candle(cfg: Config) {
    let tiny = model_dir(&cfg);
    let dir = &tiny.dir;
    let mut reference = candle_reference(dir, &cfg, |_| {});
    let Errors { ours, theirs, between, greedy_agrees } = errors_against_f64(&cfg, dir, &mut reference, 0);
    eprintln!(
        "error / f32 bound against kframe f64: kframe f32 {ours:.4}, candle f32 {theirs:.4}; between {between:.4}"
    );
    assert!(greedy_agrees, "a greedy token with a clear margin differs");
    assert!(between <= 1.0, "kframe and candle in f32 are {between:.3} x twice the rounding bound apart");
    assert!(ours <= 1.0, "kframe f32 is {ours:.3} x the rounding bound away from the f64 run");
    assert!(theirs <= 1.0, "candle's qwen2 is {theirs:.3} x the rounding bound away from kframe's f64 run");
}

#[test]
fn identity_key_logits_match_candle_qwen2_for_prefill_and_20_decode_steps() {
    identity_matches_candle(synth::tiny_config());
}

#[test]
fn identity_key_matches_candle_with_tied_embeddings_and_plain_mha() {
    let cfg = Config { tie_word_embeddings: true, num_key_value_heads: 4, ..synth::tiny_config() };
    identity_matches_candle(cfg);
}

/// The bound is tight enough to catch real bugs by orders of magnitude: candle
/// with RoPE one position off, with one layer's k_proj bias dropped, or with its
/// kv heads swapped (query heads read the wrong kv head) is hundreds of bounds
/// away from kframe's f64 run.
#[test]
fn a_rope_offset_a_dropped_bias_or_swapped_kv_heads_fail_the_candle_comparison_by_orders_of_magnitude() {
    let cfg = synth::tiny_config();
    let tiny = model_dir(&cfg);
    let dir = &tiny.dir;
    let kv_width = cfg.num_key_value_heads * cfg.head_dim;
    type Edit = Box<dyn FnOnce(&mut HashMap<String, Tensor>)>;
    let mutations: [(&str, Edit, usize); 3] = [
        ("RoPE one position off", Box::new(|_| {}), 1),
        (
            "layer 1 k_proj bias dropped",
            Box::new(|w| {
                let b = w.get_mut("model.layers.1.self_attn.k_proj.bias").unwrap();
                *b = b.zeros_like().unwrap();
            }),
            0,
        ),
        (
            "layer 0 kv heads swapped",
            Box::new(move |w| {
                for name in ["k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"] {
                    let t = w.get_mut(&format!("model.layers.0.self_attn.{name}")).unwrap();
                    let half = kv_width / 2;
                    *t = Tensor::cat(&[t.narrow(0, half, half).unwrap(), t.narrow(0, 0, half).unwrap()], 0).unwrap();
                }
            }),
            0,
        ),
    ];
    for (what, edit, rope_offset) in mutations {
        let mut reference = candle_reference(dir, &cfg, edit);
        let theirs = errors_against_f64(&cfg, dir, &mut reference, rope_offset).theirs;
        eprintln!("{what}: {theirs:.0} x the rounding bound");
        assert!(theirs >= 100.0, "{what}: only {theirs:.1} x the rounding bound");
    }
}

/// Greedy tokens and per-step logits of a run that feeds back its own argmax.
fn greedy(
    model: &Qwen2,
    frame: &Frame,
    variant: Variant,
    precision: KvPrecision,
    steps: usize,
) -> (Vec<u32>, Vec<Tensor>) {
    let mut cache = model.new_cache(precision);
    let mut logits = model.forward(&PROMPT, &mut cache, frame, variant).unwrap();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let next = argmax(&logits);
        tokens.push(next);
        all.push(logits);
        logits = model.forward(&[next], &mut cache, frame, variant).unwrap();
    }
    (tokens, all)
}

/// A tenant's frame adds four products per layer to the identity frame's
/// arithmetic; the two differ by the rounding of both (see
/// `kframe_model::qwen2::rounding`), and every step's greedy margin clears it.
#[test]
fn tenant_keys_give_identity_greedy_tokens_for_32_steps_in_both_variants() {
    let cfg = synth::tiny_config();
    let tiny = model_dir(&cfg);
    let dir = &tiny.dir;
    let model = dir.load_model(DType::F32, &Device::Cpu).unwrap();
    let (want, want_logits) = greedy(&model, &Frame::Identity, Variant::ProbeTime, KvPrecision::Native, 32);
    let chain = Reductions::forward_pass(&cfg, PROMPT.len() + 32).then(Reductions::rotated_layers(&cfg, cfg.head_dim));
    let tolerance = |logits: &Tensor| chain.bound_between(F32_UNIT, max_abs(logits));
    let widest = want_logits.iter().map(tolerance).fold(0f64, f64::max);
    assert_clear_margins(&want_logits, widest, "identity frame");
    let ring = keyring(&model, KvPrecision::Exact);
    for tenant in ["alice", "bob"] {
        let frame = ring.frame(tenant, 0).unwrap();
        for variant in [Variant::ProbeTime, Variant::DecodeTime] {
            for precision in [KvPrecision::Native, KvPrecision::Exact] {
                let (got, logits) = greedy(&model, &frame, variant, precision, 32);
                assert_eq!(got, want, "{tenant} {variant:?} {precision:?}");
                let worst = (logits.iter().zip(&want_logits))
                    .map(|(a, b)| max_abs_diff(a, b) / tolerance(b))
                    .fold(0f64, f64::max);
                assert!(
                    worst <= 1.0,
                    "{tenant} {variant:?} {precision:?}: logits {worst:.3} x the rounding bound apart"
                );
            }
        }
    }
}

/// The model in f64 with the directory's weight matrices rounded to `dtype`
/// (norms and biases as stored): the arithmetic a model loaded in f16 or bf16 on
/// the CPU carries out, without its rounding.
fn rounded_weights_in_f64(dir: &ModelDir, cfg: &Config, dtype: DType) -> Qwen2 {
    let Weights::Files(files) = &dir.weights else { panic!("a written model directory") };
    let mut weights = candle_core::safetensors::load(&files[0], &Device::Cpu).unwrap();
    for (name, t) in weights.iter_mut() {
        if name.ends_with("_proj.weight") || name.ends_with("embed_tokens.weight") || name == "lm_head.weight" {
            *t = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        }
    }
    Qwen2::new(cfg, VarBuilder::from_tensors(weights, DType::F64, &Device::Cpu)).unwrap()
}

/// On the CPU, f16 and bf16 hold the weights only: the pass computes in f32 and
/// rounds K and V once to the weights' dtype. Over a prefill and 20 decode
/// steps it lies within the f32 chain's bound, plus those roundings, of an f64
/// run of the same rounded weights, and picks its tokens wherever their margin
/// is clear. Its cache stores half-precision rows: half the bytes of f32.
#[test]
fn half_precision_weights_on_the_cpu_compute_in_f32_within_rounding_of_an_f64_run_of_the_same_weights() {
    let cfg = synth::tiny_config();
    let tiny = model_dir(&cfg);
    let f32_bytes = {
        let model = tiny.dir.load_model(DType::F32, &Device::Cpu).unwrap();
        let mut cache = model.new_cache(KvPrecision::Native);
        model.forward(&PROMPT, &mut cache, &Frame::Identity, Variant::ProbeTime).unwrap();
        cache.bytes()
    };
    for (dtype, unit) in [(DType::F16, F16_UNIT), (DType::BF16, BF16_UNIT)] {
        let model = tiny.dir.load_model(dtype, &Device::Cpu).unwrap();
        assert_eq!((model.dtype(), model.weights_dtype(), model.kv_dtype()), (DType::F32, dtype, dtype));
        let exact = rounded_weights_in_f64(&tiny.dir, &cfg, dtype);
        let (mut cache, mut exact_cache) = (model.new_cache(KvPrecision::Native), exact.new_cache(KvPrecision::Native));
        let (mut worst, mut tokens, mut pos) = (0f64, PROMPT.to_vec(), 0);
        for step in 0..21 {
            let got = model.forward(&tokens, &mut cache, &Frame::Identity, Variant::ProbeTime).unwrap();
            let want = exact.forward(&tokens, &mut exact_cache, &Frame::Identity, Variant::ProbeTime).unwrap();
            pos += tokens.len();
            if step == 0 {
                assert_eq!(cache.store_dtype(), dtype);
                assert_eq!(2 * cache.bytes(), f32_bytes, "{dtype:?}: a half-precision cache holds half the bytes");
            }
            let scale = max_abs(&want);
            let bound = in_quadrature([
                Reductions::forward_pass(&cfg, pos).bound(F32_UNIT, scale),
                Reductions::kv_roundings(&cfg).bound(unit, scale),
            ]);
            worst = worst.max(max_abs_diff(&got, &want) / bound);
            if top2_margin(&want) > 2.0 * bound {
                assert_eq!(argmax(&got), argmax(&want), "{dtype:?} step {step}: a greedy token with a clear margin");
            }
            tokens = vec![argmax(&want)];
        }
        eprintln!("{dtype:?} weights: error / bound against the f64 run {worst:.4}");
        assert!(worst <= 1.0, "{dtype:?}: {worst:.3} x the rounding bound away from the f64 run");
    }
}

/// Logits of a run fed `tokens` after the prompt (not its own choices): the
/// logits before each token is fed, as [`greedy`] returns them.
fn forced(model: &Qwen2, frame: &Frame, variant: Variant, precision: KvPrecision, tokens: &[u32]) -> Vec<Tensor> {
    let mut cache = model.new_cache(precision);
    let mut logits = model.forward(&PROMPT, &mut cache, frame, variant).unwrap();
    let mut all = Vec::with_capacity(tokens.len());
    for &next in tokens {
        all.push(logits);
        logits = model.forward(&[next], &mut cache, frame, variant).unwrap();
    }
    all
}

/// With half-precision caches a tenant's frame stays within rounding of the
/// identity frame, in both variants and both precisions: the frame adds the f32
/// rotations and, in a native cache, one more half-precision rounding of each
/// rotated row (and the plaintext rows of either run may round to neighbouring
/// values). Fed the identity run's 32 greedy tokens, the tenant's run has logits
/// within that bound at every step, and picks the same token wherever the
/// margin clears it: on the test model 28 of 32 steps in f16, and 6 in bf16,
/// whose 8 significant bits make the bound 8 times wider (the logits sit at 2%
/// of either bound).
#[test]
fn tenant_keys_in_half_precision_caches_stay_within_rounding_of_the_identity_frame() {
    let cfg = synth::tiny_config();
    let tiny = model_dir(&cfg);
    for (dtype, unit, clear_steps) in [(DType::F16, F16_UNIT, 24), (DType::BF16, BF16_UNIT, 4)] {
        let model = tiny.dir.load_model(dtype, &Device::Cpu).unwrap();
        let (want, want_logits) = greedy(&model, &Frame::Identity, Variant::ProbeTime, KvPrecision::Native, 32);
        let chain =
            Reductions::forward_pass(&cfg, PROMPT.len() + 32).then(Reductions::rotated_layers(&cfg, cfg.head_dim));
        let tolerance = |logits: &Tensor| {
            let scale = max_abs(logits);
            in_quadrature([
                chain.bound_between(F32_UNIT, scale),
                Reductions::kv_roundings(&cfg).times(2).bound_between(unit, scale),
            ])
        };
        let clear: Vec<usize> =
            (0..want.len()).filter(|&i| top2_margin(&want_logits[i]) > 2.0 * tolerance(&want_logits[i])).collect();
        eprintln!("{dtype:?}: {} of {} steps with clear margins", clear.len(), want.len());
        assert!(clear.len() >= clear_steps, "{dtype:?}: only {} steps' margins clear the bound", clear.len());
        let ring = keyring(&model, KvPrecision::Exact);
        let frame = ring.frame("alice", 0).unwrap();
        for variant in [Variant::ProbeTime, Variant::DecodeTime] {
            for precision in [KvPrecision::Native, KvPrecision::Exact] {
                let logits = forced(&model, &frame, variant, precision, &want);
                for &step in &clear {
                    assert_eq!(argmax(&logits[step]), want[step], "{dtype:?} {variant:?} {precision:?} step {step}");
                }
                let worst = (logits.iter().zip(&want_logits))
                    .map(|(a, b)| max_abs_diff(a, b) / tolerance(b))
                    .fold(0f64, f64::max);
                eprintln!("{dtype:?} {variant:?} {precision:?}: logits {worst:.4} x the bound apart");
                assert!(worst <= 1.0, "{dtype:?} {variant:?} {precision:?}: logits {worst:.3} x the bound apart");
            }
        }
    }
}

/// A native half-precision cache rotates in f32 and rounds each rotated row
/// once; the matched-key round trip then rounds the recovered row once more. Per
/// element that is within two half-precision units of the row's norm each (a
/// rounding's error vector has at most the row's norm times the unit, and the
/// orthonormal R^T keeps its norm), plus the f32 products. A wrong key's
/// recovery is noise at the size of the rows.
#[test]
fn native_half_precision_round_trip_is_within_its_rounding_and_a_wrong_key_sees_noise() {
    for (dtype, unit) in [(DType::F16, F16_UNIT), (DType::BF16, BF16_UNIT)] {
        let (rt, norm) = round_trip_read_by(dtype, KvPrecision::Native, "alice");
        let d = synth::tiny_config().head_dim;
        let bound = (4.0 * unit + rounding::round_trip(d, 2, F32_UNIT)) * norm;
        eprintln!("{dtype:?} native round trip: {rt:?}, error / bound {:.4}", rt.max_abs_err / bound);
        assert!(rt.max_abs_err <= bound, "{dtype:?} {rt:?}: the bound is {bound:e} (rows of norm up to {norm})");
        let (wrong, _) = round_trip_read_by(dtype, KvPrecision::Native, "mallory");
        assert!(wrong.max_abs_err >= 10.0 * bound, "{dtype:?}: a wrong key recovered within {:e}", wrong.max_abs_err);
    }
}

/// Runs a prompt and 4 decode steps, keeping the plaintext K and V each layer wrote.
fn traced_run(
    model: &Qwen2,
    frame: &Frame,
    precision: KvPrecision,
) -> (kframe_core::cache::KvCache, Vec<Tensor>, Vec<Tensor>) {
    let mut cache = model.new_cache(precision);
    let layers = model.config().num_hidden_layers;
    let (mut ks, mut vs) = (vec![Vec::new(); layers], vec![Vec::new(); layers]);
    let mut tokens = PROMPT.to_vec();
    for _ in 0..5 {
        let mut trace = Trace::default();
        let logits = model.forward_traced(&tokens, &mut cache, frame, Variant::ProbeTime, Some(&mut trace)).unwrap();
        for l in 0..layers {
            ks[l].push(trace.k[l].clone());
            vs[l].push(trace.v[l].clone());
        }
        tokens = vec![argmax(&logits)];
    }
    let cat = |parts: Vec<Vec<Tensor>>| parts.into_iter().map(|p| Tensor::cat(&p, 1).unwrap()).collect::<Vec<_>>();
    (cache, cat(ks), cat(vs))
}

/// The largest norm of a (kv, t, d) tensor's rows.
fn max_row_norm(rows: &Tensor) -> f64 {
    let rows = rows.to_dtype(DType::F64).unwrap();
    rows.sqr().unwrap().sum(2).unwrap().sqrt().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

/// The round trip of every layer's K and V, recovered with `reader`'s key
/// ("alice" epoch 3 wrote them), and the largest norm of the rows compared.
fn round_trip_read_by(dtype: DType, precision: KvPrecision, reader: &str) -> (RoundTrip, f64) {
    let tiny = model_dir(&synth::tiny_config());
    let dir = &tiny.dir;
    let model = dir.load_model(dtype, &Device::Cpu).unwrap();
    let ring = keyring(&model, precision);
    let (frame, read_with) = (ring.frame("alice", 3).unwrap(), ring.frame(reader, 3).unwrap());
    let (cache, plain_k, plain_v) = traced_run(&model, &frame, precision);
    assert_eq!(cache.len(), PROMPT.len() + 4);
    let mut total: Option<RoundTrip> = None;
    let mut norm = 0f64;
    for layer in 0..model.config().num_hidden_layers {
        let (k, v) = cache.recover(layer, &read_with).unwrap();
        let rt =
            RoundTrip::compare(&plain_k[layer], &k).unwrap().merge(RoundTrip::compare(&plain_v[layer], &v).unwrap());
        total = Some(total.map_or(rt, |t| t.merge(rt)));
        norm = norm.max(max_row_norm(&plain_k[layer])).max(max_row_norm(&plain_v[layer]));
    }
    (total.unwrap(), norm)
}

fn round_trip(dtype: DType, precision: KvPrecision) -> RoundTrip {
    round_trip_read_by(dtype, precision, "alice").0
}

#[test]
fn round_trip_is_bit_exact_for_f16_and_bf16_caches_over_every_layer_and_head() {
    for dtype in [DType::F16, DType::BF16] {
        let rt = round_trip(dtype, KvPrecision::Exact);
        assert!(rt.elements > 0);
        assert!(rt.is_bit_exact(), "{dtype:?}: {rt:?}");
    }
}

/// `R^T (R k)` in f32 is two rounded products: within
/// `rounding::round_trip(d, 2)` of each row's norm, on any machine; a wrong key's
/// "round trip" is hundreds of thousands of times that.
#[test]
fn native_f32_round_trip_error_is_within_a_few_ulp() {
    let (rt, norm) = round_trip_read_by(DType::F32, KvPrecision::Native, "alice");
    eprintln!("f32 native round trip: {rt:?}, bit-exact share {:.4}", rt.bit_exact as f64 / rt.elements as f64);
    let bound = rounding::round_trip(synth::tiny_config().head_dim, 2, F32_UNIT) * norm;
    eprintln!("error / bound: {:.4}", rt.max_abs_err / bound);
    assert!(rt.max_abs_err <= bound, "{rt:?}: the bound is {bound:e} (rows of norm up to {norm})");
    let (wrong, _) = round_trip_read_by(DType::F32, KvPrecision::Native, "mallory");
    assert!(wrong.max_abs_err >= 1e4 * bound, "a wrong key recovered within {:e}", wrong.max_abs_err);
    let exact = round_trip(DType::F32, KvPrecision::Exact);
    eprintln!("f32 exact round trip: {exact:?}");
    assert!(exact.max_abs_err <= rt.max_abs_err);
}

/// What sits in a tenant's cache is not the plaintext: each cached row's cosine
/// with its plaintext row is at the 1/sqrt(d) noise level.
#[test]
fn tenant_cache_holds_no_plaintext_rows_in_f32_or_half_precision() {
    let tiny = model_dir(&synth::tiny_config());
    let dir = &tiny.dir;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let model = dir.load_model(dtype, &Device::Cpu).unwrap();
        let frame = keyring(&model, KvPrecision::Native).frame("alice", 0).unwrap();
        let (cache, plain_k, _) = traced_run(&model, &frame, KvPrecision::Native);
        for (layer, plain) in plain_k.iter().enumerate() {
            let (stored, _) = cache.stored_rows(layer, cache.len()).unwrap();
            assert_eq!(stored.dtype(), dtype);
            let (stored, plain) = (stored.to_dtype(DType::F32).unwrap(), plain.to_dtype(DType::F32).unwrap());
            let dot = (stored.contiguous().unwrap() * &plain).unwrap().sum(2).unwrap();
            let norms =
                (stored.sqr().unwrap().sum(2).unwrap() * plain.sqr().unwrap().sum(2).unwrap()).unwrap().sqrt().unwrap();
            let worst = (dot / norms).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(worst < 0.5, "{dtype:?} layer {layer}: a cached row has cosine {worst} with its plaintext");
        }
    }
}

#[test]
fn bad_token_input_is_a_clear_error() {
    let cfg = synth::tiny_config();
    let tiny = model_dir(&cfg);
    let dir = &tiny.dir;
    let model = dir.load_model(DType::F32, &Device::Cpu).unwrap();
    let mut cache = model.new_cache(KvPrecision::Native);
    let f = &Frame::Identity;
    let err = model.forward(&[], &mut cache, f, Variant::ProbeTime).unwrap_err();
    assert!(matches!(err, Error::EmptyPrompt), "{err}");
    let err = model.forward(&[1, 512], &mut cache, f, Variant::ProbeTime).unwrap_err();
    assert!(matches!(err, Error::UnknownToken { id: 512, vocab_size: 512 }), "{err}");
    let long = vec![1u32; cfg.max_position_embeddings + 1];
    let err = model.forward(&long, &mut cache, f, Variant::ProbeTime).unwrap_err();
    assert!(matches!(err, Error::ContextTooLong { .. }), "{err}");
    assert_eq!(cache.len(), 0, "a rejected input must leave the cache untouched");
}

#[test]
fn missing_or_malformed_model_files_are_clear_errors() {
    let cfg = synth::tiny_config();
    let tiny = model_dir(&cfg);
    let p = tiny.path();

    std::fs::rename(p.join("config.json"), p.join("config.bak")).unwrap();
    let err = ModelDir::open(p).err().unwrap();
    assert!(matches!(err, Error::MissingFile { file: "config.json", .. }), "{err}");
    std::fs::write(p.join("config.json"), "{\"vocab_size\": ").unwrap();
    let err = ModelDir::open(p).err().unwrap().to_string();
    assert!(err.contains("config.json") && err.contains("malformed"), "{err}");
    std::fs::rename(p.join("config.bak"), p.join("config.json")).unwrap();

    std::fs::rename(p.join("tokenizer.json"), p.join("tokenizer.bak")).unwrap();
    let err = ModelDir::open(p).err().unwrap();
    assert!(matches!(err, Error::MissingFile { file: "tokenizer.json", .. }), "{err}");
    std::fs::rename(p.join("tokenizer.bak"), p.join("tokenizer.json")).unwrap();

    // Weights of the wrong shape: a config that claims a larger hidden size.
    let wrong = Config { intermediate_size: 2048, ..cfg.clone() };
    std::fs::write(p.join("config.json"), serde_json::to_string(&wrong.to_json()).unwrap()).unwrap();
    let err = ModelDir::open(p).unwrap().load_model(DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("shape") && err.contains("mlp"), "{err}");

    // Garbage where the safetensors should be.
    std::fs::write(p.join("config.json"), serde_json::to_string(&cfg.to_json()).unwrap()).unwrap();
    std::fs::write(p.join("model.safetensors"), b"not safetensors").unwrap();
    let err = ModelDir::open(p).unwrap().load_model(DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("loading weights"), "{err}");
}

#[test]
fn sharded_safetensors_load_through_the_index() {
    let cfg = synth::tiny_config();
    let tmp = tempfile::tempdir().unwrap();
    synth::write_model_dir(tmp.path(), &cfg, 11).unwrap();
    let single = ModelDir::open(tmp.path()).unwrap().load_model(DType::F32, &Device::Cpu).unwrap();
    // Split the one file in two shards plus an index, as transformers does.
    let all = candle_core::safetensors::load(tmp.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut a, mut b) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in all.into_iter().enumerate() {
        let shard = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        map.insert(name.clone(), shard.into());
        if i % 2 == 0 {
            a.insert(name, t)
        } else {
            b.insert(name, t)
        };
    }
    candle_core::safetensors::save(&a, tmp.path().join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let dir = ModelDir::open(tmp.path()).unwrap();
    assert!(matches!(&dir.weights, kframe_model::load::Weights::Files(f) if f.len() == 2));
    let sharded = dir.load_model(DType::F32, &Device::Cpu).unwrap();
    let run = |m: &Qwen2| {
        m.forward(&PROMPT, &mut m.new_cache(KvPrecision::Native), &Frame::Identity, Variant::ProbeTime).unwrap()
    };
    assert_eq!(max_abs_diff(&run(&single), &run(&sharded)), 0.0);
}

#[test]
fn rekey_in_place_recovers_the_plaintext_under_the_new_key() {
    let cfg = synth::tiny_config();
    let tiny = model_dir(&cfg);
    let dir = &tiny.dir;
    let model = dir.load_model(DType::F32, &Device::Cpu).unwrap();
    let ring = keyring(&model, KvPrecision::Native);
    let (old, new) = (ring.frame("alice", 0).unwrap(), ring.frame("alice", 1).unwrap());
    let mut cache = model.new_cache(KvPrecision::Native);
    let mut trace = Trace::default();
    model.forward_traced(&PROMPT, &mut cache, &old, Variant::ProbeTime, Some(&mut trace)).unwrap();
    let before = cache.stored_rows(0, PROMPT.len()).unwrap().0.contiguous().unwrap();
    cache.rekey(&old, &new).unwrap();
    let after = cache.stored_rows(0, PROMPT.len()).unwrap().0.contiguous().unwrap();
    assert!(max_abs_diff(&before, &after) > 1e-2, "re-key left the rows as they were");
    // Out of the old frame, into the new one, recovered: four rounded products.
    let per_norm = rounding::round_trip(cfg.head_dim, 4, F32_UNIT);
    for layer in 0..cfg.num_hidden_layers {
        let (k, v) = cache.recover(layer, &new).unwrap();
        assert!(max_abs_diff(&k, &trace.k[layer]) <= per_norm * max_row_norm(&trace.k[layer]));
        assert!(max_abs_diff(&v, &trace.v[layer]) <= per_norm * max_row_norm(&trace.v[layer]));
    }
}

fn all_zero(t: &Tensor) -> bool {
    t.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap() == 0.0
}

/// A cache zeroes what it releases: views of its buffers taken beforehand read
/// zeros after a truncate (the cut rows), a shrink (the old buffers) and a drop
/// (everything). Key-drop delete and eviction rely on this.
#[test]
fn truncated_shrunk_and_dropped_caches_leave_only_zeros_behind() {
    let tiny = model_dir(&synth::tiny_config());
    let dir = &tiny.dir;
    let model = dir.load_model(DType::F32, &Device::Cpu).unwrap();
    let frame = keyring(&model, KvPrecision::Native).frame("alice", 0).unwrap();
    let (mut cache, _, _) = traced_run(&model, &frame, KvPrecision::Native);
    let layers = model.config().num_hidden_layers;
    let len = cache.len();
    let views: Vec<(Tensor, Tensor)> = (0..layers).map(|l| cache.stored_rows(l, len).unwrap()).collect();
    cache.truncate(4).unwrap();
    for (k, v) in &views {
        assert!(!all_zero(&k.narrow(1, 0, 4).unwrap()), "kept rows were zeroed");
        assert!(all_zero(&k.narrow(1, 4, len - 4).unwrap()) && all_zero(&v.narrow(1, 4, len - 4).unwrap()));
    }
    cache.shrink_to_fit().unwrap();
    for (k, v) in &views {
        assert!(all_zero(k) && all_zero(v), "the buffers a shrink released still hold data");
    }
    let views: Vec<(Tensor, Tensor)> = (0..layers).map(|l| cache.stored_rows(l, 4).unwrap()).collect();
    assert!(!all_zero(&views[0].0));
    drop(cache);
    for (k, v) in &views {
        assert!(all_zero(k) && all_zero(v), "a dropped cache left data behind");
    }
}

/// Calibration sweeps the vocabulary through layer 0 alone: its V rows are the
/// forward pass's exactly (the same ops, no RoPE), and its K rows have the norms
/// of the forward pass's RoPE'd ones within RoPE's own rounding (a rotation of
/// coordinate pairs by f32 cos/sin: a few units of f32 per row).
#[test]
fn the_first_layer_kv_sweep_gives_layer_0_of_a_forward_pass_up_to_rope() {
    let cfg = synth::tiny_config();
    let tiny = model_dir(&cfg);
    for dtype in [DType::F32, DType::F16] {
        let model = tiny.dir.load_model(dtype, &Device::Cpu).unwrap();
        let mut trace = Trace::default();
        let mut cache = model.new_cache(KvPrecision::Native);
        model.forward_traced(&PROMPT, &mut cache, &Frame::Identity, Variant::ProbeTime, Some(&mut trace)).unwrap();
        let (k, v) = model.first_layer_kv(&PROMPT).unwrap();
        assert_eq!(max_abs_diff(&v, &trace.v[0]), 0.0, "{dtype:?}: V");
        let norms = |t: &Tensor| t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum(2).unwrap().sqrt().unwrap();
        let unit = if dtype == DType::F16 { F16_UNIT } else { F32_UNIT };
        let bound = (4.0 * F32_UNIT + 2.0 * unit) * max_row_norm(&k);
        assert!(max_abs_diff(&norms(&k), &norms(&trace.k[0])) <= bound, "{dtype:?}: K norms");
        assert!(model.first_layer_kv(&[cfg.vocab_size as u32]).is_err());
    }
}
