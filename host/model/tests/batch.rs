//! Batched decode: many sequences, each in its own frame and at its own length,
//! step together through one forward pass and get what they get alone.

use candle_core::Tensor;
use kframe_core::cache::{KvCache, KvPrecision};
use kframe_core::keys::MasterSecret;
use kframe_core::rotation::{Frame, Keyring};
use kframe_model::qwen2::Chunk;
use kframe_model::{Qwen2, Variant};
use kframe_testkit::TinyModel;
use kframe_testkit::{argmax, assert_clear_margins, frame_tolerance, greedy, max_abs_diff, widest_tolerance};

fn tiny_model() -> (TinyModel, Qwen2) {
    let tiny = TinyModel::new(3);
    let model = tiny.load();
    (tiny, model)
}

/// Six sequences: the identity frame and five tenants, prompts of 3 to 23 tokens.
fn sequences(model: &Qwen2, precision: KvPrecision) -> (Vec<Frame>, Vec<Vec<u32>>) {
    let ring = Keyring::builder(MasterSecret::from_bytes([2; 32]), model.rotation_shape())
        .precision(precision)
        .capacity(8)
        .build();
    let mut frames = vec![Frame::Identity];
    frames.extend(["ana", "ben", "cy", "dee", "eli"].iter().map(|t| ring.frame(t, 0).unwrap()));
    let prompts =
        (0..frames.len()).map(|i| (0..3 + 4 * i as u32).map(|j| (17 * i as u32 + 5 * j) % 250 + 1).collect()).collect();
    (frames, prompts)
}

fn batched_matches_alone(variant: Variant, precision: KvPrecision) {
    let (_tmp, model) = tiny_model();
    let (frames, prompts) = sequences(&model, precision);
    let prefill = |i: usize| -> (KvCache, u32) {
        let mut cache = model.new_cache(precision);
        let logits = model.forward(&prompts[i], &mut cache, &frames[i], variant).unwrap();
        (cache, argmax(&logits))
    };
    // Alone: each sequence decodes by itself, with a clear greedy margin at every
    // step (a batch rounds differently, by at most the tolerance).
    let cfg = model.config();
    let alone: Vec<Vec<u32>> = (0..frames.len())
        .map(|i| {
            let mut cache = model.new_cache(precision);
            let (tokens, logits) = greedy(&model, &mut cache, &frames[i], variant, &prompts[i], 12);
            let tolerance = widest_tolerance(cfg, prompts[i].len() + 12, cfg.head_dim, &logits);
            assert_clear_margins(&logits, tolerance, &format!("sequence {i} alone"));
            tokens
        })
        .collect();
    // Together: one batched step per token.
    let (mut caches, mut next): (Vec<KvCache>, Vec<u32>) = (0..frames.len()).map(prefill).unzip();
    let mut together: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
    for _ in 0..12 {
        let mut seqs: Vec<Chunk> = caches
            .iter_mut()
            .zip(&frames)
            .zip(&next)
            .map(|((cache, frame), token)| Chunk::new(std::slice::from_ref(token), cache, frame))
            .collect();
        let logits = model.forward_batch(&mut seqs, variant).unwrap();
        assert_eq!(logits.dims(), &[frames.len(), model.config().vocab_size]);
        for (i, t) in next.iter_mut().enumerate() {
            *t = argmax(&logits.get(i).unwrap());
            together[i].push(*t);
        }
    }
    assert_eq!(together, alone);
    for (cache, prompt) in caches.iter().zip(&prompts) {
        assert_eq!(cache.len(), prompt.len() + 12);
    }
}

#[test]
fn batched_decode_gives_each_sequence_its_solo_tokens_probe_time() {
    batched_matches_alone(Variant::ProbeTime, KvPrecision::Native);
}

#[test]
fn batched_decode_gives_each_sequence_its_solo_tokens_decode_time() {
    batched_matches_alone(Variant::DecodeTime, KvPrecision::Native);
}

#[test]
fn batched_decode_gives_each_sequence_its_solo_tokens_with_exact_caches() {
    batched_matches_alone(Variant::ProbeTime, KvPrecision::Exact);
}

#[test]
fn batched_logits_match_solo_logits_within_the_rounding_bound() {
    let (_tmp, model) = tiny_model();
    let (frames, prompts) = sequences(&model, KvPrecision::Native);
    let mut solo = Vec::new();
    let mut caches = Vec::new();
    for (frame, prompt) in frames.iter().zip(&prompts) {
        let mut a = model.new_cache(KvPrecision::Native);
        model.forward(prompt, &mut a, frame, Variant::ProbeTime).unwrap();
        let mut b = model.new_cache(KvPrecision::Native);
        model.forward(prompt, &mut b, frame, Variant::ProbeTime).unwrap();
        solo.push(model.forward(&[7], &mut a, frame, Variant::ProbeTime).unwrap());
        caches.push(b);
    }
    let mut seqs: Vec<Chunk> =
        caches.iter_mut().zip(&frames).map(|(cache, frame)| Chunk::new(&[7], cache, frame)).collect();
    let batched = model.forward_batch(&mut seqs, Variant::ProbeTime).unwrap();
    let cfg = model.config();
    for (i, s) in solo.iter().enumerate() {
        let diff = max_abs_diff(s, &batched.get(i).unwrap());
        let tolerance = frame_tolerance(cfg, prompts[i].len() + 1, cfg.head_dim, s);
        assert!(diff <= tolerance, "sequence {i}: max |batched - solo| = {diff:e}, bound {tolerance:e}");
    }
}

/// A public prefix prefilled once in the model's frame.
fn shared_prefix(model: &Qwen2, tokens: Vec<u32>) -> std::sync::Arc<kframe_core::cache::SharedPrefix> {
    let mut plain = model.new_cache(KvPrecision::Native);
    model.forward(&tokens, &mut plain, &Frame::Identity, Variant::ProbeTime).unwrap();
    std::sync::Arc::new(kframe_core::cache::SharedPrefix { id: [0; 32], tokens, cache: plain })
}

/// One step in which some sequences prefill the second half of their prompts
/// while the others decode (feed their prompt's last token), some of either kind
/// after a shared prefix: each gets the logits it gets alone.
#[test]
fn a_step_mixing_prompt_chunks_and_decode_tokens_gives_each_sequence_its_solo_logits() {
    let (_tmp, model) = tiny_model();
    let (frames, prompts) = sequences(&model, KvPrecision::Native);
    let prefix = shared_prefix(&model, (0..20).map(|j| (7 * j) % 250 + 1).collect());
    // Sequences 0 (prefilling) and 3 (decoding) run after the shared prefix.
    let fresh = |i: usize| match i % 3 {
        0 => KvCache::after_prefix(prefix.clone(), KvPrecision::Native),
        _ => model.new_cache(KvPrecision::Native),
    };
    let solo: Vec<(Tensor, KvCache)> = (0..frames.len())
        .map(|i| {
            let mut cache = fresh(i);
            let logits = model.forward(&prompts[i], &mut cache, &frames[i], Variant::ProbeTime).unwrap();
            (logits, cache)
        })
        .collect();
    let mut caches: Vec<KvCache> = (0..frames.len()).map(fresh).collect();
    let split = |i: usize| prompts[i].len() / 2;
    // Decoders have their whole prompt but its last token; prefillers its first half.
    for i in 0..frames.len() {
        let head = if i % 2 == 1 { prompts[i].len() - 1 } else { split(i) };
        model.forward(&prompts[i][..head], &mut caches[i], &frames[i], Variant::ProbeTime).unwrap();
    }
    let feeds: Vec<&[u32]> = (0..frames.len())
        .map(|i| if i % 2 == 1 { &prompts[i][prompts[i].len() - 1..] } else { &prompts[i][split(i)..] })
        .collect();
    let mut chunks: Vec<Chunk> = (caches.iter_mut().zip(&frames).zip(&feeds))
        .map(|((cache, frame), &tokens)| Chunk::new(tokens, cache, frame))
        .collect();
    let stepped = model.forward_chunks(&mut chunks, Variant::ProbeTime).unwrap();
    assert!(stepped.failed.iter().all(Option::is_none));
    let logits = stepped.logits;
    assert!(feeds.iter().any(|f| f.len() > 1) && feeds.iter().any(|f| f.len() == 1));
    let cfg = model.config();
    for (i, (alone, solo_cache)) in solo.iter().enumerate() {
        let diff = max_abs_diff(alone, &logits.get(i).unwrap());
        let tolerance = frame_tolerance(cfg, solo_cache.len(), cfg.head_dim, alone);
        assert!(diff <= tolerance, "sequence {i}: max |mixed step - solo| = {diff:e}, bound {tolerance:e}");
        assert_eq!(caches[i].len(), solo_cache.len(), "sequence {i}");
    }
}

#[test]
fn batched_decode_rejects_a_bad_token_without_touching_any_cache() {
    let (_tmp, model) = tiny_model();
    let (frames, prompts) = sequences(&model, KvPrecision::Native);
    let mut caches: Vec<KvCache> = frames
        .iter()
        .zip(&prompts)
        .map(|(f, p)| {
            let mut c = model.new_cache(KvPrecision::Native);
            model.forward(p, &mut c, f, Variant::ProbeTime).unwrap();
            c
        })
        .collect();
    let bad = [model.config().vocab_size as u32];
    let mut seqs: Vec<Chunk> = caches
        .iter_mut()
        .zip(&frames)
        .enumerate()
        .map(|(i, (cache, frame))| Chunk::new(if i == 3 { &bad } else { &[1] }, cache, frame))
        .collect();
    let err = model.forward_batch(&mut seqs, Variant::ProbeTime).unwrap_err();
    assert!(matches!(err, kframe_model::Error::UnknownToken { .. }), "{err}");
    for (cache, prompt) in caches.iter().zip(&prompts) {
        assert_eq!(cache.len(), prompt.len());
    }
}

/// 16 tenants decode together; tenant 5 reads its cache with tenant 6's key. The
/// other 15 get exactly the tokens they get alone, and tenant 5's garbage stays
/// its own.
#[test]
fn a_wrong_key_in_a_batch_of_16_changes_no_other_tenants_tokens() {
    let (_tmp, model) = tiny_model();
    let ring = Keyring::builder(MasterSecret::from_bytes([4; 32]), model.rotation_shape()).capacity(32).build();
    let frames: Vec<Frame> = (0..16).map(|i| ring.frame(&format!("t{i}"), 0).unwrap()).collect();
    // Prompts whose greedy runs alone have a clear top-two margin at every step
    // (checked below), so that batching's other rounding cannot flip a token.
    let prompts: Vec<Vec<u32>> =
        (0..16u32).map(|i| (0..6 + i).map(|j| (13 * i + 3 * j + 1) % 250 + 1).collect()).collect();
    let cfg = model.config();
    let run = |i: usize| -> Vec<u32> {
        let mut cache = model.new_cache(KvPrecision::Native);
        let (tokens, logits) = greedy(&model, &mut cache, &frames[i], Variant::ProbeTime, &prompts[i], 10);
        let tolerance = widest_tolerance(cfg, prompts[i].len() + 10, cfg.head_dim, &logits);
        assert_clear_margins(&logits, tolerance, &format!("tenant {i} alone"));
        tokens
    };
    let alone: Vec<Vec<u32>> = (0..16).map(run).collect();

    let mut caches: Vec<KvCache> = Vec::new();
    let mut next: Vec<u32> = Vec::new();
    for i in 0..16 {
        let mut cache = model.new_cache(KvPrecision::Native);
        next.push(argmax(&model.forward(&prompts[i], &mut cache, &frames[i], Variant::ProbeTime).unwrap()));
        caches.push(cache);
    }
    // From here on tenant 5 attends with the wrong key.
    let mut used: Vec<&Frame> = frames.iter().collect();
    used[5] = &frames[6];
    let mut together: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
    for _ in 0..10 {
        let mut seqs: Vec<Chunk> = caches
            .iter_mut()
            .zip(&used)
            .zip(&next)
            .map(|((cache, frame), token)| Chunk::new(std::slice::from_ref(token), cache, frame))
            .collect();
        let logits = model.forward_batch(&mut seqs, Variant::ProbeTime).unwrap();
        for (i, t) in next.iter_mut().enumerate() {
            *t = argmax(&logits.get(i).unwrap());
            together[i].push(*t);
        }
    }
    for i in (0..16).filter(|&i| i != 5) {
        assert_eq!(together[i], alone[i], "tenant {i} changed by tenant 5's wrong key");
    }
    assert_ne!(together[5], alone[5], "a wrong key decoded like the right one");
}

/// A shared plaintext prefix plus a tenant's rotated suffix attends exactly like
/// the whole context in the tenant's frame, alone and batched, in both variants;
/// so does a rotated copy of the prefix.
#[test]
fn shared_plain_prefix_and_rotated_copy_match_a_single_frame_run() {
    let (_tmp, model) = tiny_model();
    let (frames, prompts) = sequences(&model, KvPrecision::Native);
    let prefix_tokens: Vec<u32> = (0..40).map(|j| (11 * j) % 250 + 1).collect();
    let prefix = shared_prefix(&model, prefix_tokens.clone());
    let cfg = model.config();
    for variant in [Variant::ProbeTime, Variant::DecodeTime] {
        let greedy = |cache: &mut KvCache, frame: &Frame, suffix: &[u32]| -> (Vec<u32>, Vec<Tensor>) {
            greedy(&model, cache, frame, variant, suffix, 8)
        };
        let mut shared_caches = Vec::new();
        let mut firsts = Vec::new();
        for (frame, suffix) in frames.iter().zip(&prompts) {
            let mut whole: Vec<u32> = prefix_tokens.clone();
            whole.extend(suffix);
            let (reference, logits) = greedy(&mut model.new_cache(KvPrecision::Native), frame, &whole);
            let tolerance = widest_tolerance(cfg, whole.len() + 8, cfg.head_dim, &logits);
            assert_clear_margins(&logits, tolerance, &format!("whole context, {variant:?}"));
            let mut shared = KvCache::after_prefix(prefix.clone(), KvPrecision::Native);
            assert_eq!(greedy(&mut shared, frame, suffix).0, reference, "shared-plain, {variant:?}");
            let mut copy = KvCache::rotated_copy(&prefix, frame, KvPrecision::Native).unwrap();
            assert_eq!(greedy(&mut copy, frame, suffix).0, reference, "rotate-copy, {variant:?}");
            // Batched: the same sequences, after the prefix, decoding together.
            let mut c = KvCache::after_prefix(prefix.clone(), KvPrecision::Native);
            firsts.push(argmax(&model.forward(suffix, &mut c, frame, variant).unwrap()));
            shared_caches.push((c, reference));
        }
        let mut next = firsts;
        let mut got: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        for _ in 0..8 {
            let mut seqs: Vec<Chunk> = shared_caches
                .iter_mut()
                .zip(&frames)
                .zip(&next)
                .map(|(((cache, _), frame), token)| Chunk::new(std::slice::from_ref(token), cache, frame))
                .collect();
            let logits = model.forward_batch(&mut seqs, variant).unwrap();
            for (i, t) in next.iter_mut().enumerate() {
                *t = argmax(&logits.get(i).unwrap());
                got[i].push(*t);
            }
        }
        for (i, (_, reference)) in shared_caches.iter().enumerate() {
            assert_eq!(&got[i], reference, "batched shared-plain, sequence {i}, {variant:?}");
        }
        // The prefix's rows are stored once: a sequence's cache holds only its own.
        assert_eq!(shared_caches[0].0.len(), prefix_tokens.len() + prompts[0].len() + 8);
        let own_rows = prompts[0].len() + 8;
        let row_bytes = shared_caches[0].0.bytes() / own_rows;
        assert_eq!(shared_caches[0].0.bytes(), own_rows * row_bytes);
    }
}
