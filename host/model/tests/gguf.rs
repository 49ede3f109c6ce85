//! GGUF models: the embedded model written as GGUF (f32, f16, Q8_0, Q4_K_M) and
//! read back runs as from its directory; quantized weights leave rotation alone;
//! a broken or foreign file is an error that names what is wrong; `--quantize`
//! quantizes a directory as it loads.
#![cfg(feature = "embedded-model")]

use candle_core::{DType, Device, Tensor};
use kframe_core::cache::{KvPrecision, RoundTrip};
use kframe_core::keys::MasterSecret;
use kframe_core::rotation::{Frame, Keyring};
use kframe_model::export::{self, FileType};
use kframe_model::load::ModelDir;
use kframe_model::qwen2::Trace;
use kframe_model::weights::Quantization;
use kframe_model::{ModelBundle, Qwen2, Variant};
use kframe_testkit::{argmax, assert_clear_margins, greedy, max_abs_diff, widest_tolerance};

/// The embedded model written as `file_type`, and the folder holding it.
fn written(file_type: FileType) -> (std::path::PathBuf, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(format!("kframe-tiny-{}.gguf", file_type.name()));
    export::write(&ModelDir::embedded().unwrap(), file_type, &path).unwrap();
    (path, tmp)
}

fn keyring(model: &Qwen2, precision: KvPrecision) -> Keyring {
    let ring = Keyring::builder(MasterSecret::from_bytes([9; 32]), model.rotation_shape());
    ring.dtype(model.dtype()).precision(precision).capacity(4).build()
}

/// Retrieval prompts the embedded model answers with a clear margin.
const PROMPTS: [&str; 3] = [
    "user secret of rosa 8493 . query secret of rosa",
    "user secret of alice 4821 . query secret of alice",
    "user note of bob 7310 . user secret of carol 2290 . query secret of carol",
];

fn prompt_ids(bundle: &ModelBundle) -> Vec<Vec<u32>> {
    PROMPTS.iter().map(|p| bundle.encode(p).unwrap()).collect()
}

type Steps = Vec<(Vec<u32>, Vec<Tensor>)>;

/// Greedy tokens and logits of a prefill and `steps` decode steps after each
/// prompt, in `frame`.
fn run_for(steps: usize, model: &Qwen2, frame: &Frame, variant: Variant, prompts: &[Vec<u32>]) -> Steps {
    let mut one = |p: &Vec<u32>| greedy(model, &mut model.new_cache(KvPrecision::Native), frame, variant, p, steps);
    prompts.iter().map(&mut one).collect()
}

fn run(model: &Qwen2, frame: &Frame, variant: Variant, prompts: &[Vec<u32>]) -> Steps {
    run_for(8, model, frame, variant, prompts)
}

#[test]
fn f32_and_f16_gguf_files_give_the_directory_s_greedy_tokens_and_logits_in_identity_and_tenant_frames() {
    let dir = ModelDir::embedded().unwrap();
    for (file_type, dtype) in [(FileType::F32, DType::F32), (FileType::F16, DType::F16)] {
        let (path, _tmp) = written(file_type);
        let from_file = ModelBundle::load(&ModelDir::open(&path).unwrap(), dtype, &Device::Cpu).unwrap();
        let from_dir = ModelBundle::load(&dir, dtype, &Device::Cpu).unwrap();
        let prompts = prompt_ids(&from_dir);
        let alice = keyring(&from_dir.model, KvPrecision::Native).frame("alice", 0).unwrap();
        for frame in [&Frame::Identity, &alice] {
            for variant in [Variant::ProbeTime, Variant::DecodeTime] {
                let (a, b) =
                    (run(&from_file.model, frame, variant, &prompts), run(&from_dir.model, frame, variant, &prompts));
                for ((ta, la), (tb, lb)) in a.iter().zip(&b) {
                    assert_eq!(ta, tb, "{file_type:?} {variant:?}: greedy tokens");
                    for (x, y) in la.iter().zip(lb) {
                        // The same weights through the same kernels: the same numbers.
                        assert_eq!(max_abs_diff(x, y), 0.0, "{file_type:?} {variant:?}: logits");
                    }
                }
            }
        }
        assert_eq!(from_file.model.kv_dtype(), dtype);
    }
}

/// Each text's ids from `ours`, checked equal to `reference`'s.
fn same_ids(ours: &tokenizers::Tokenizer, reference: &tokenizers::Tokenizer, texts: &[&str]) -> Vec<Vec<u32>> {
    let ids = |t: &tokenizers::Tokenizer, text: &str| t.encode(text, false).unwrap().get_ids().to_vec();
    let mut all = Vec::with_capacity(texts.len());
    for text in texts {
        let a = ids(ours, text);
        assert_eq!(a, ids(reference, text), "{text:?}");
        all.push(a);
    }
    all
}

#[test]
fn a_gguf_file_s_tokenizer_gives_the_tokenizer_json_ids_and_text() {
    let (path, _tmp) = written(FileType::F16);
    let file = ModelDir::open(&path).unwrap();
    let dir = ModelDir::embedded().unwrap();
    let (ours, reference) = (file.load_tokenizer().unwrap(), dir.load_tokenizer().unwrap());
    let texts = [
        PROMPTS[0],
        PROMPTS[2],
        "  two  spaces, 12 34567 digits; punctuation!? and\nnew lines\n\n",
        "<|im_start|>user\nwhat is the secret of rosa<|im_end|>\n<|im_start|>assistant\n",
        "unicode: café naïve 東京",
    ];
    for (text, ids) in texts.iter().zip(same_ids(&ours, &reference, &texts)) {
        assert_eq!(ours.decode(&ids, true).unwrap(), reference.decode(&ids, true).unwrap(), "{text:?}");
    }
    assert_eq!(file.eos_token_ids.first(), dir.eos_token_ids.first());
    assert_eq!(file.chat_template, dir.chat_template);
    assert_eq!(file.stored_calibration().unwrap(), dir.stored_calibration().unwrap());
    assert!(file.stored_calibration().unwrap().is_some());
    assert_eq!(file.model_id(), "kframe-tiny-f16");
    // GGUF keeps rms_norm_eps as an f32; it reads back as the decimal it was.
    assert_eq!(file.config, dir.config);
}

/// Weight quantization changes the numbers the frames rotate, never the
/// rotation: identity and tenant frames pick the same greedy tokens in both
/// variants.
///
/// The frames' logits are not within the f32 frame bound of each other here: a
/// frame perturbs activations by f32 rounding, and where an activation lies at a
/// boundary of its own 8-bit quantization (candle quantizes the activations of
/// every quantized product, as llama.cpp does) that moves it by a whole step. So
/// the prompts' margins are checked against what the frames did move the logits
/// (or the f32 bound, if more), and that is reported beside what quantization
/// itself moved them from the f32 model. (In
/// probe-time the two frames' logits come out identical: the activations'
/// quantization absorbs the rotation's rounding. Un-rotating a whole cache moves
/// an activation across a step now and then.)
#[test]
fn quantized_models_pick_the_same_greedy_tokens_in_identity_and_tenant_frames() {
    let dense = ModelBundle::load(&ModelDir::embedded().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let prompts = prompt_ids(&dense);
    // Four steps: the answer and what follows it, where the margins are wide.
    let run = |model: &Qwen2, frame: &Frame, variant| run_for(4, model, frame, variant, &prompts);
    let reference = run(&dense.model, &Frame::Identity, Variant::ProbeTime);
    for file_type in [FileType::Q8_0, FileType::Q4KM] {
        let (path, _tmp) = written(file_type);
        let model = ModelDir::open(&path).unwrap().load_model(DType::F32, &Device::Cpu).unwrap();
        let alice = keyring(&model, KvPrecision::Native).frame("alice", 0).unwrap();
        let identity = run(&model, &Frame::Identity, Variant::ProbeTime);
        let mut quantization_moved = 0f64;
        for ((_, q), (_, f)) in identity.iter().zip(&reference) {
            quantization_moved = quantization_moved.max(max_abs_diff(&q[0], &f[0]));
        }
        for variant in [Variant::ProbeTime, Variant::DecodeTime] {
            let tenant = run(&model, &alice, variant);
            for (((ti, li), (tt, lt)), p) in identity.iter().zip(&tenant).zip(&prompts) {
                assert_eq!(ti, tt, "{file_type:?} {variant:?}: greedy tokens");
                let frames_moved = li.iter().zip(lt).map(|(a, b)| max_abs_diff(a, b)).fold(0f64, f64::max);
                eprintln!(
                    "{file_type:?} {variant:?}: frames moved the logits by {frames_moved:.3e}, \
                     quantization by {quantization_moved:.3e}"
                );
                // The tokens agree with room: no step's margin is within twice
                // what the frames moved (or what f32 rounding alone may move).
                let f32_bound = widest_tolerance(model.config(), p.len() + 4, model.config().head_dim, li);
                assert_clear_margins(li, frames_moved.max(f32_bound), &format!("{file_type:?} {variant:?}"));
            }
        }
        // And the quantized model still reads the secret back.
        for ((tokens, _), (want, _)) in identity.iter().zip(&reference) {
            assert_eq!(tokens[0], want[0], "{file_type:?}: the first answer token");
        }
    }
}

#[test]
fn exact_mode_round_trip_stays_bit_exact_on_a_quantized_model() {
    let (path, _tmp) = written(FileType::Q4KM);
    for dtype in [DType::F32, DType::F16] {
        let model = ModelDir::open(&path).unwrap().load_model(dtype, &Device::Cpu).unwrap();
        let ring = keyring(&model, KvPrecision::Exact);
        let frame = ring.frame("alice", 1).unwrap();
        let mut cache = model.new_cache(KvPrecision::Exact);
        let mut trace = Trace::default();
        let prompt = [5u32, 77, 301, 12, 9, 1000, 42, 7];
        let logits = model.forward_traced(&prompt, &mut cache, &frame, Variant::ProbeTime, Some(&mut trace)).unwrap();
        assert!(argmax(&logits) < model.config().vocab_size as u32);
        for layer in 0..model.config().num_hidden_layers {
            let (k, v) = cache.recover(layer, &frame).unwrap();
            let rt = RoundTrip::compare(&trace.k[layer], &k)
                .unwrap()
                .merge(RoundTrip::compare(&trace.v[layer], &v).unwrap());
            assert!(rt.elements > 0 && rt.is_bit_exact(), "{dtype:?} layer {layer}: {rt:?}");
        }
    }
}

#[test]
fn in_situ_quantization_gives_the_same_model_as_the_gguf_file_of_that_quantization() {
    let dir = ModelDir::embedded().unwrap();
    let prompts = prompt_ids(&ModelBundle::load(&dir, DType::F32, &Device::Cpu).unwrap());
    for (quantize, file_type) in [(Quantization::Q8_0, FileType::Q8_0), (Quantization::Q4K, FileType::Q4KM)] {
        let isq = dir.load_model_quantized(DType::F32, &Device::Cpu, Some(quantize)).unwrap();
        let (path, _tmp) = written(file_type);
        let file = ModelDir::open(&path).unwrap().load_model(DType::F32, &Device::Cpu).unwrap();
        let (a, b) = (
            run(&isq, &Frame::Identity, Variant::ProbeTime, &prompts),
            run(&file, &Frame::Identity, Variant::ProbeTime, &prompts),
        );
        for ((ta, la), (tb, lb)) in a.iter().zip(&b) {
            assert_eq!(ta, tb, "{quantize:?}");
            assert_eq!(max_abs_diff(&la[0], &lb[0]), 0.0, "{quantize:?}: the same blocks give the same logits");
        }
        assert_eq!(dir.weights_format(DType::F32, Some(quantize)), quantize.name());
    }
    let (path, _tmp) = written(FileType::Q4KM);
    let file = ModelDir::open(&path).unwrap();
    assert_eq!(file.weights_format(DType::F16, None), "q4_k+q6_k");
    let err = file.load_model_quantized(DType::F32, &Device::Cpu, Some(Quantization::Q8_0)).err().unwrap();
    assert!(err.to_string().contains("--quantize q8_0 applies to safetensors"), "{err}");
}

/// A GGUF file with `metadata` and one f32 tensor `name` of `len` values whose
/// type field reads `type_id`, written byte by byte (the header layout of GGUF v3).
fn handmade_gguf(metadata: &[(&str, &str)], name: &str, len: u64, type_id: u32) -> Vec<u8> {
    let mut b = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut b, k);
        b.extend(8u32.to_le_bytes()); // a string value
        string(&mut b, v);
    }
    string(&mut b, name);
    b.extend(1u32.to_le_bytes()); // one dimension
    b.extend(len.to_le_bytes());
    b.extend(type_id.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // offset
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(std::iter::repeat_n(0u8, 4 * len as usize));
    b
}

#[test]
fn broken_and_foreign_gguf_files_are_errors_that_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let at = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let err = |p: &std::path::Path| ModelDir::open(p).err().expect("refused").to_string();

    let llama = at("llama.gguf", &handmade_gguf(&[("general.architecture", "llama")], "x.weight", 32, 0));
    let e = err(&llama);
    assert!(e.contains("not a Qwen2 model (llama)") && e.contains("llama.gguf"), "{e}");

    let unknown = at("unknown.gguf", &handmade_gguf(&[("general.architecture", "qwen2")], "x.weight", 32, 99));
    let e = err(&unknown);
    assert!(e.contains("unknown.gguf") && e.contains("unknown") && e.contains("99"), "{e}");

    let (path, _keep) = written(FileType::Q8_0);
    let whole = std::fs::read(&path).unwrap();
    let truncated = at("truncated.gguf", &whole[..whole.len() * 2 / 3]);
    let e = err(&truncated);
    assert!(e.contains("truncated.gguf") && e.contains("truncated: tensor"), "{e}");
    let header_only = at("header.gguf", &whole[..64]);
    assert!(err(&header_only).contains("not a readable GGUF header"), "{}", err(&header_only));

    let text = at("notes.txt", b"not a model");
    assert!(err(&text).contains("neither a model directory nor a GGUF file"), "{}", err(&text));
}

/// The folder scripts/qwen-tokenizer.sh fills with a real Qwen tokenizer.
fn qwen_tokenizer() -> std::path::PathBuf {
    let dir = match std::env::var_os("KFRAME_QWEN_TOKENIZER") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/qwen-tokenizer"),
    };
    assert!(
        dir.join("tokenizer.json").is_file(),
        "no Qwen tokenizer in {}: run scripts/qwen-tokenizer.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// Qwen's own tokenizer (151,643 BPE tokens, its special tokens, its digit-by-digit
/// split) written into a GGUF file and read back gives the ids and text of its
/// tokenizer.json, with the `qwen2` pre-tokenizer declared as llama.cpp expects.
#[test]
fn a_qwen_tokenizer_survives_a_gguf_file_with_the_qwen2_pre_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = kframe_model::Config {
        vocab_size: 151_936,
        hidden_size: 64,
        intermediate_size: 256,
        num_attention_heads: 1,
        num_key_value_heads: 1,
        head_dim: 64,
        ..kframe_model::synth::tiny_config()
    };
    let dir_path = tmp.path().join("qwen-shaped");
    kframe_model::synth::write_model_dir_with(&dir_path, &cfg, 3, DType::F16, Some(&qwen_tokenizer())).unwrap();
    let dir = ModelDir::open(&dir_path).unwrap();
    let gguf = tmp.path().join("qwen-shaped.gguf");
    export::write(&dir, FileType::Q8_0, &gguf).unwrap();
    let mut f = std::fs::File::open(&gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(content.metadata["tokenizer.ggml.pre"].to_string().unwrap(), "qwen2");
    let file = ModelDir::open(&gguf).unwrap();
    let (ours, reference) = (file.load_tokenizer().unwrap(), dir.load_tokenizer().unwrap());
    let texts = [
        "Hello world, it's 2026-12-02 and 1234567 apples cost $3.50!",
        "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n你好，世界<|im_end|>\n",
        "  indented\n\n\tcode(x) => x ** 2; // café",
    ];
    for (text, ids) in texts.iter().zip(same_ids(&ours, &reference, &texts)) {
        assert_eq!(ours.decode(&ids, false).unwrap(), *text, "{text:?}");
    }
    let im_end = reference.token_to_id("<|im_end|>").unwrap();
    assert!(file.eos_token_ids.contains(&im_end), "{:?}", file.eos_token_ids);
    assert!(file.chat_template.as_deref().unwrap_or_default().contains("<|im_start|>"));
    // And the quantized model runs on it.
    let bundle = ModelBundle::load(&file, DType::F16, &Device::Cpu).unwrap();
    let ids = bundle.encode("Hello world").unwrap();
    let logits = bundle
        .model
        .forward(&ids, &mut bundle.model.new_cache(KvPrecision::Native), &Frame::Identity, Variant::ProbeTime)
        .unwrap();
    assert_eq!(logits.dims(), &[151_936]);
}
