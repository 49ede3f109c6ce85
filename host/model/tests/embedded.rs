//! The embedded model: loads from host/model/embedded and from the compiled-in copy
//! alike, and matches Hugging Face transformers' reference logits. (Its recall with
//! matched and wrong keys is checked in kframe-eval's tests.)
#![cfg(feature = "embedded-model")]

use candle_core::{DType, Device, Tensor};
use kframe_core::cache::KvPrecision;
use kframe_core::rotation::Frame;
use kframe_model::load::{embedded_model_source_dir, ModelDir};
use kframe_model::qwen2::Variant;
use kframe_model::rounding::{Reductions, F32_UNIT};
use kframe_model::ModelBundle;
use kframe_testkit::{argmax, max_abs, max_abs_diff, top2_margin};

fn embedded() -> ModelBundle {
    ModelBundle::load(&ModelDir::embedded().unwrap(), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn embedded_copy_and_model_directory_give_identical_logits() {
    let from_dir =
        ModelBundle::load(&ModelDir::open(&embedded_model_source_dir()).unwrap(), DType::F32, &Device::Cpu).unwrap();
    let compiled = embedded();
    let text = "user secret of alice 4821 . query secret of alice";
    let ids = compiled.encode(text).unwrap();
    assert_eq!(ids, from_dir.encode(text).unwrap());
    let run = |g: &ModelBundle| {
        g.model
            .forward(&ids, &mut g.model.new_cache(KvPrecision::Native), &Frame::Identity, Variant::ProbeTime)
            .unwrap()
    };
    assert_eq!(max_abs_diff(&run(&compiled), &run(&from_dir)), 0.0);
}

#[derive(serde::Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    greedy: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

/// host/model/tests/fixtures/hf_reference.json is written by host/model/train/reference_fixture.py
/// with Hugging Face transformers (PyTorch, f32): an implementation kframe shares no
/// code with. Its logits, like kframe's in f32, lie within the f32 forward pass's
/// rounding bound of kframe's f64 run (see `kframe_model::qwen2::rounding`); its greedy
/// tokens are kframe's, at every step, each with a margin that no rounding closes.
#[test]
fn logits_and_greedy_tokens_match_the_hugging_face_reference() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hf_reference.json")).unwrap();
    let fixture: Fixture = serde_json::from_str(&text).unwrap();
    let g = embedded();
    let exact = ModelDir::embedded().unwrap().load_model(DType::F64, &Device::Cpu).unwrap();
    let cfg = g.model.config();
    let (mut worst_hf, mut worst_ours) = (0f64, 0f64);
    for case in &fixture.cases {
        assert_eq!(g.encode(&case.text).unwrap(), case.ids, "tokenizer disagrees on {:?}", case.text);
        let (mut cache, mut exact_cache) =
            (g.model.new_cache(KvPrecision::Native), exact.new_cache(KvPrecision::Native));
        let mut feed = case.ids.clone();
        let mut greedy = Vec::new();
        for step in 0..case.greedy.len() {
            let logits = g.model.forward(&feed, &mut cache, &Frame::Identity, Variant::ProbeTime).unwrap();
            let want = exact.forward(&feed, &mut exact_cache, &Frame::Identity, Variant::ProbeTime).unwrap();
            let bound = Reductions::forward_pass(cfg, cache.len()).bound(F32_UNIT, max_abs(&want));
            worst_ours = worst_ours.max(max_abs_diff(&logits, &want) / bound);
            // The fixture holds full logits for the first steps, greedy tokens for all.
            if let Some(hf) = case.logits.get(step) {
                let hf = Tensor::new(hf.as_slice(), &Device::Cpu).unwrap();
                worst_hf = worst_hf.max(max_abs_diff(&hf, &want) / bound);
            }
            let margin = top2_margin(&want);
            assert!(margin > 2.0 * bound, "{:?} step {step}: top-two margin {margin:e} is within rounding", case.text);
            let next = argmax(&logits);
            greedy.push(next);
            feed = vec![next];
        }
        assert_eq!(greedy, case.greedy, "greedy tokens for {:?}", case.text);
    }
    eprintln!("error / f32 bound against kframe f64: transformers {worst_hf:.4}, kframe f32 {worst_ours:.4}");
    assert!(worst_hf <= 1.0, "transformers' logits are {worst_hf:.3} x the rounding bound from kframe's f64 run");
    assert!(worst_ours <= 1.0, "kframe's f32 logits are {worst_ours:.3} x the rounding bound from its f64 run");
}
