//! The corrective layer end to end, through the forward pass: blocks whose bytes
//! changed, moved from another tenant's cache or outlived a re-key are masked out
//! of attention, reported once and never attended to, alone and in a batch.

use candle_core::DType;
use candle_core::Tensor;
use kframe_core::integrity::{IsolationEvent, Reason};
use kframe_model::qwen2::Chunk;
use kframe_model::Variant;
use kframe_testkit::sealed::{prefilled, rounding_bound, setup, setup_in, step, tampered_pair, Setup};

#[test]
fn a_corrupted_block_is_masked_reported_once_and_never_attended_to() {
    corrupted_block_is_masked(&setup());
}

/// The same with f16 weights and an f16 cache: the seals cover the f16 bytes.
#[test]
fn a_corrupted_block_of_an_f16_cache_is_masked_reported_once_and_never_attended_to() {
    let s = setup_in(DType::F16);
    assert_eq!(s.model.new_cache(kframe_core::cache::KvPrecision::Native).store_dtype(), DType::F16);
    corrupted_block_is_masked(&s);
}

fn corrupted_block_is_masked(s: &Setup) {
    let alice = s.ring.frame("alice", 0).unwrap();
    let clean = step(s, &mut prefilled(s, &alice), &alice);
    // The same block of layer 1 corrupted two different ways.
    let (mut a, mut b) = tampered_pair(s, &alice, 40);
    let (la, lb) = (step(s, &mut a, &alice), step(s, &mut b, &alice));
    // Masked: the corrupted bytes never reach the output, whatever they are.
    assert_eq!(la, lb);
    assert_ne!(la, clean, "masking a block changes attention");
    let f = a.take_findings();
    assert_eq!(f.events.len(), 2, "one event per kv head: {f:?}");
    for (head, e) in f.events.iter().enumerate() {
        let want = IsolationEvent {
            tenant: "alice".into(),
            epoch: 0,
            layer: 1,
            head,
            positions: (32, 64),
            reason: Reason::Tampered,
        };
        assert_eq!(e, &want);
    }
    assert_eq!(f.blocks_masked, 2);
    // Masked again on the next step, but reported once.
    step(s, &mut a, &alice);
    let f = a.take_findings();
    assert!(f.events.is_empty());
    assert_eq!(f.blocks_masked, 2);
}

#[test]
fn changed_bytes_in_the_block_being_written_are_caught_before_the_write_seals_it_and_stay_masked() {
    let s = setup();
    let alice = s.ring.frame("alice", 0).unwrap();
    // Row 66 lies in the last, open block (64..70): the next step writes
    // row 70 into it and seals the block again.
    let (mut a, mut b) = tampered_pair(&s, &alice, 66);
    for step_no in 0..3 {
        assert_eq!(step(&s, &mut a, &alice), step(&s, &mut b, &alice), "step {step_no}: the bytes are masked");
        let f = a.take_findings();
        assert_eq!(f.blocks_masked, 2, "step {step_no}: one block per kv head, every step: {f:?}");
        let want: Vec<(usize, (usize, usize), Reason)> =
            if step_no == 0 { vec![(1, (64, 70), Reason::Tampered); 2] } else { vec![] };
        let got: Vec<_> = f.events.iter().map(|e| (e.layer, e.positions, e.reason)).collect();
        assert_eq!(got, want, "step {step_no}: reported once");
    }
}

#[test]
fn cutting_a_cache_back_checks_the_block_it_seals_again_and_keeps_it_failed() {
    let s = setup();
    let alice = s.ring.frame("alice", 0).unwrap();
    // Reuse of a shorter prefix: 68 of the 70 rows stay, so block 64..70 is
    // cut to 64..68 and sealed again; row 66 was changed before that.
    let (mut a, mut b) = tampered_pair(&s, &alice, 66);
    for c in [&mut a, &mut b] {
        c.truncate(68).unwrap();
    }
    let f = a.take_findings();
    let got: Vec<_> = f.events.iter().map(|e| (e.layer, e.positions, e.reason)).collect();
    assert_eq!(got, vec![(1, (64, 70), Reason::Tampered); 2], "{f:?}");
    // Still masked when decoding goes on from the shorter context.
    assert_eq!(step(&s, &mut a, &alice), step(&s, &mut b, &alice));
    let f = a.take_findings();
    assert!(f.events.is_empty() && f.blocks_masked == 2, "{f:?}");
}

#[test]
fn a_block_moved_from_another_tenants_cache_is_masked_as_foreign_in_a_batch() {
    let s = setup();
    let (alice, bob) = (s.ring.frame("alice", 0).unwrap(), s.ring.frame("bob", 0).unwrap());
    let (mut a, b, mut other) = (prefilled(&s, &alice), prefilled(&s, &bob), prefilled(&s, &bob));
    let mut solo = prefilled(&s, &bob);
    a.put_block(0, 1, b.block_copy(0, 1));
    let mut batch = [Chunk::new(&[7], &mut a, &alice), Chunk::new(&[7], &mut other, &bob)];
    let logits = s.model.forward_batch(&mut batch, Variant::ProbeTime).unwrap();
    let f = a.take_findings();
    assert_eq!(f.events.len(), 2, "{f:?}");
    assert!(f.events.iter().all(|e| e.reason == Reason::ForeignTenant && e.layer == 0 && e.positions == (32, 64)));
    // The neighbour in the batch is untouched.
    assert!(other.take_findings().events.is_empty());
    let mut alone = [Chunk::new(&[7], &mut solo, &bob)];
    let solo_logits = s.model.forward_batch(&mut alone, Variant::ProbeTime).unwrap();
    let row = |l: &Tensor, i: usize| l.get(i).unwrap().to_vec1::<f32>().unwrap();
    // (Batched matmuls may round differently with another batch size.)
    let (got, alone) = (row(&logits, 1), row(&solo_logits, 0));
    let diff = got.iter().zip(&alone).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let bound = rounding_bound(&s, &alone);
    assert!(diff as f64 <= bound, "the neighbour's logits moved by {diff} (bound {bound:e})");
}

#[test]
fn a_block_kept_from_before_a_rekey_is_masked_as_stale() {
    let s = setup();
    let (old, new) = (s.ring.frame("alice", 0).unwrap(), s.ring.frame("alice", 1).unwrap());
    let mut a = prefilled(&s, &old);
    let before = a.block_copy(1, 0);
    a.rekey(&old, &new).unwrap();
    step(&s, &mut a, &new);
    assert!(a.take_findings().events.is_empty(), "a re-key seals the cache for the new epoch");
    a.put_block(1, 0, before);
    step(&s, &mut a, &new);
    let f = a.take_findings();
    assert_eq!(f.events.len(), 2, "{f:?}");
    assert!(f.events.iter().all(|e| e.reason == Reason::StaleEpoch && e.layer == 1 && e.positions == (0, 32)));
    assert!(f.events.iter().all(|e| e.tenant == "alice" && e.epoch == 1));
}

#[test]
fn reading_a_tenants_cache_with_another_key_flags_every_block() {
    let s = setup();
    let (alice, bob) = (s.ring.frame("alice", 0).unwrap(), s.ring.frame("bob", 0).unwrap());
    let mut a = prefilled(&s, &alice);
    // Bob's key over Alice's cache: every block of hers is foreign to him,
    // except the row his own step writes (sealed for Alice too, since the
    // cache is hers): nothing of Alice's is left to attend to.
    let err = s.model.forward(&[7], &mut a, &bob, Variant::ProbeTime).unwrap_err();
    assert!(err.to_string().contains("failed verification"), "{err}");
}

/// In a batch, the sequence whose every block fails verification fails
/// alone: its neighbour gets its solo logits and its cache moves on.
#[test]
fn a_sequence_with_nothing_left_to_attend_to_fails_alone_in_a_batch() {
    let s = setup();
    let (alice, bob) = (s.ring.frame("alice", 0).unwrap(), s.ring.frame("bob", 0).unwrap());
    let (mut a, mut other, mut solo) = (prefilled(&s, &alice), prefilled(&s, &bob), prefilled(&s, &bob));
    let token = [7];
    let mut batch = [Chunk::new(&token, &mut a, &bob), Chunk::new(&token, &mut other, &bob)];
    let stepped = s.model.forward_chunks(&mut batch, Variant::ProbeTime).unwrap();
    let err = stepped.failed[0].as_ref().expect("bob's key over alice's cache fails");
    assert!(err.to_string().contains("failed verification"), "{err}");
    assert!(stepped.failed[1].is_none());
    assert_eq!((a.len(), other.len()), (s.prompt.len(), s.prompt.len() + 1));
    let alone = s.model.forward(&token, &mut solo, &bob, Variant::ProbeTime).unwrap();
    let (row, alone) = (stepped.logits.get(1).unwrap().to_vec1::<f32>().unwrap(), alone.to_vec1::<f32>().unwrap());
    let diff = row.iter().zip(&alone).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let bound = rounding_bound(&s, &alone);
    assert!(diff as f64 <= bound, "the neighbour's logits moved by {diff} (bound {bound:e})");
    // `forward_batch` reports the failure as its error.
    let mut again = [Chunk::new(&[7], &mut a, &bob)];
    assert!(s.model.forward_batch(&mut again, Variant::ProbeTime).is_err());
}
