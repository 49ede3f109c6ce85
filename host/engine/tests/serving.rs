//! The multi-tenant engine on a random-weight Qwen2: batching across tenants
//! changes no tenant's tokens, sessions reuse their own prefix and nobody
//! else's, the memory budget holds through eviction by real policy components,
//! and key-drop delete removes a tenant's caches.

use candle_core::{DType, Device};
use kframe_core::cache::KvPrecision;
use kframe_core::keys::MasterSecret;
use kframe_core::rotation::Keyring;
use kframe_engine::{Engine, EngineConfig, EngineError, Event, Submit, Tenant, Usage};
use kframe_model::generate::{FinishReason, SamplingParams};
use kframe_model::ModelBundle;
use kframe_model::{synth, Variant};
use kframe_policy::{Limits, PluginRuntime, PolicyKind, PolicySet};
use kframe_testkit::TinyModel;
use std::sync::Arc;
use std::time::Duration;

const MASTER: [u8; 32] = [9; 32];

type Fixture = TinyModel;

fn fixture() -> Fixture {
    TinyModel::new(21)
}

fn policies() -> Arc<PolicySet> {
    let limits = Limits { deadline: Duration::from_secs(2), ..Limits::default() };
    Arc::new(PolicySet::new(PluginRuntime::new(limits, None).unwrap()))
}

fn engine(f: &Fixture, cfg: EngineConfig, policies: Arc<PolicySet>) -> Engine {
    let gen = ModelBundle::load(&f.dir, DType::F32, &Device::Cpu).unwrap();
    Engine::start(gen, MasterSecret::from_bytes(MASTER), policies, cfg)
}

fn tenant(id: u64) -> Tenant {
    Tenant { id, key_id: format!("tenant-{id}"), epoch: 0, tier: 0 }
}

fn prompt(seed: u32, len: u32) -> Vec<u32> {
    (0..len).map(|j| (31 * seed + 7 * j) % 250 + 1).collect()
}

fn params(max_tokens: usize) -> SamplingParams {
    SamplingParams { max_tokens, ..SamplingParams::default() }
}

fn submit(e: &Engine, t: Tenant, session: Option<&str>, prompt: Vec<u32>, max_tokens: usize) -> kframe_engine::Stream {
    e.submit(Submit { tenant: t, session: session.map(str::to_owned), prompt, params: params(max_tokens) })
}

/// What `kframe generate` gives the same tenant for the same prompt. Every step's
/// greedy margin is clear of what the engine's batches may round differently.
fn solo(f: &Fixture, t: &Tenant, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let gen = ModelBundle::load(&f.dir, DType::F32, &Device::Cpu).unwrap();
    let ring = Keyring::builder(MasterSecret::from_bytes(MASTER), gen.model.rotation_shape()).capacity(4).build();
    let frame = ring.frame(&t.key_id, t.epoch).unwrap();
    let tokens = gen
        .generate(prompt, &frame, Variant::ProbeTime, KvPrecision::Native, &params(max_tokens), |_| {})
        .unwrap()
        .tokens;
    // The steps that chose a token: each generated one, and the end of sequence
    // if that is what stopped it short of `max_tokens`.
    let decode = tokens.len().min(max_tokens - 1);
    let mut cache = gen.model.new_cache(KvPrecision::Native);
    let (_, logits) = kframe_testkit::greedy(&gen.model, &mut cache, &frame, Variant::ProbeTime, prompt, decode);
    let cfg = gen.model.config();
    // The engine's caches pad layer 0 by default: the widest rows a step rotates.
    let width = cfg.head_dim + kframe_core::layout::DEFAULT_EXTRA;
    let tolerance = kframe_testkit::widest_tolerance(cfg, prompt.len() + tokens.len(), width, &logits);
    kframe_testkit::assert_clear_margins(&logits, tolerance, &format!("{} alone", t.key_id));
    tokens
}

fn done(ev: &Event) -> Usage {
    match ev {
        Event::Done { usage, .. } => *usage,
        other => panic!("expected Done, got {other:?}"),
    }
}

#[tokio::test]
async fn sixteen_tenants_decoding_in_one_batch_each_get_their_solo_tokens_and_text() {
    let f = fixture();
    let e = engine(&f, EngineConfig::default(), policies());
    let streams: Vec<_> = (0..16).map(|i| submit(&e, tenant(i), None, prompt(i as u32, 5 + i as u32), 10)).collect();
    let decoder = ModelBundle::load(&f.dir, DType::F32, &Device::Cpu).unwrap();
    let mut outs = Vec::new();
    for s in streams {
        let (tokens, text, last) = s.collect().await;
        assert!(matches!(last, Event::Done { finish: FinishReason::Length, .. }), "{last:?}");
        assert_eq!(text, decoder.decode(&tokens).unwrap(), "streamed text differs from the tokens' text");
        outs.push(tokens);
    }
    let m = e.metrics();
    assert!(m.decode_steps < 16 * 9, "{} decode steps for 16 x 9 tokens: not batched", m.decode_steps);
    for (i, tokens) in outs.iter().enumerate() {
        assert_eq!(tokens, &solo(&f, &tenant(i as u64), &prompt(i as u32, 5 + i as u32), 10), "tenant {i}");
    }
}

#[tokio::test]
async fn a_session_reuses_its_own_prefix_and_gives_the_same_tokens_as_a_fresh_run() {
    let f = fixture();
    let e = engine(&f, EngineConfig::default(), policies());
    let first = prompt(3, 20);
    let (gen1, _, last) = submit(&e, tenant(1), Some("chat"), first.clone(), 6).collect().await;
    assert_eq!(done(&last).cached_tokens, 0);
    let mut second = first.clone();
    second.extend(&gen1);
    second.extend(prompt(4, 5));
    let (gen2, _, last) = submit(&e, tenant(1), Some("chat"), second.clone(), 6).collect().await;
    // The cache holds the first prompt and all but the last generated token.
    assert_eq!(done(&last).cached_tokens, first.len() + gen1.len() - 1);
    assert_eq!(gen2, solo(&f, &tenant(1), &second, 6));
}

#[tokio::test]
async fn the_same_session_name_under_another_tenant_is_another_session() {
    let f = fixture();
    let e = engine(&f, EngineConfig::default(), policies());
    let p = prompt(5, 16);
    let (_, _, last) = submit(&e, tenant(1), Some("shared-name"), p.clone(), 4).collect().await;
    done(&last);
    let (tokens, _, last) = submit(&e, tenant(2), Some("shared-name"), p.clone(), 4).collect().await;
    assert_eq!(done(&last).cached_tokens, 0, "tenant 2 hit tenant 1's cache");
    assert_eq!(tokens, solo(&f, &tenant(2), &p, 4));
}

/// Bytes one session of `tokens` tokens holds in the tiny model (f32).
fn session_bytes(tokens: usize) -> u64 {
    let c = synth::tiny_config();
    (2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * tokens * 4) as u64
}

async fn run_budget_trace(e: &Engine, tenants: u64) {
    for round in 0..2 {
        for i in 0..tenants {
            let (_, _, last) = submit(e, tenant(i), Some("s"), prompt(i as u32, 24), 8).collect().await;
            done(&last);
            let m = e.metrics();
            assert!(
                m.cache_bytes <= budget(),
                "round {round} tenant {i}: {} bytes held, budget {}",
                m.cache_bytes,
                budget()
            );
        }
    }
}

fn budget() -> u64 {
    // Room for about ten 32-token sessions.
    10 * session_bytes(32)
}

#[tokio::test]
async fn with_a_budget_for_ten_sessions_thirty_tenants_are_served_within_it() {
    let f = fixture();
    let cfg = EngineConfig { kv_budget: budget(), ..EngineConfig::default() };
    let e = engine(&f, cfg, policies());
    run_budget_trace(&e, 30).await;
    let m = e.metrics();
    assert!(m.evictions >= 20, "{} evictions", m.evictions);
    assert!(m.cache_bytes <= budget());
    assert_eq!(m.requests_failed, 0);
}

fn shipped(name: &str) -> Vec<u8> {
    std::fs::read(kframe_policy::shipped(name))
        .unwrap_or_else(|e| panic!("{name} plugin (run scripts/build-plugins.sh): {e}"))
}

/// Tenants 0, 1, 2 hold sessions; tenant 0 is used three times, first. A fourth
/// session needs room: LRU evicts tenant 0 (least recently used), LFU evicts
/// tenant 1 (fewest hits, then least recent).
async fn victim_under(plugin: &str) -> Vec<u64> {
    let f = fixture();
    let set = policies();
    set.swap(PolicyKind::Eviction, plugin, &shipped(plugin), "").unwrap();
    let cfg = EngineConfig { kv_budget: 3 * session_bytes(24) + session_bytes(24) / 2, ..EngineConfig::default() };
    let e = engine(&f, cfg, set);
    let ask = |t: u64, len: u32| {
        let e = e.clone();
        async move {
            let (_, _, last) = submit(&e, tenant(t), Some("s"), prompt(t as u32, len), 0).collect().await;
            done(&last);
        }
    };
    for t in [0, 0, 0, 1, 2] {
        ask(t, 23).await;
    }
    let before = e.metrics().cache_bytes_by_tenant;
    ask(3, 23).await;
    let after = e.metrics().cache_bytes_by_tenant;
    before.keys().filter(|t| !after.contains_key(t)).copied().collect()
}

#[tokio::test]
async fn lru_and_lfu_components_evict_different_sessions_on_the_same_trace() {
    assert_eq!(victim_under("lru").await, vec![0]);
    assert_eq!(victim_under("lfu").await, vec![1]);
}

#[tokio::test]
async fn a_hostile_eviction_component_falls_back_and_serving_continues() {
    let f = fixture();
    let set = policies();
    set.swap(PolicyKind::Eviction, "hostile", &shipped("hostile"), "unknown").unwrap();
    let cfg = EngineConfig { kv_budget: budget(), ..EngineConfig::default() };
    let e = engine(&f, cfg, set);
    run_budget_trace(&e, 15).await;
    let m = e.metrics();
    assert!(m.plugin_failures > 0, "the hostile plugin never failed");
    assert!(m.evictions > 0);
    assert_eq!(m.requests_failed, 0);
}

#[tokio::test]
async fn a_request_bigger_than_the_whole_budget_is_refused_with_a_clear_error() {
    let f = fixture();
    let cfg = EngineConfig { kv_budget: session_bytes(16), ..EngineConfig::default() };
    let e = engine(&f, cfg, policies());
    let (_, _, last) = submit(&e, tenant(1), None, prompt(1, 30), 10).collect().await;
    assert!(matches!(last, Event::Failed(EngineError::OverBudget { .. })), "{last:?}");
}

#[tokio::test]
async fn bad_requests_fail_clearly_and_the_engine_keeps_serving() {
    let f = fixture();
    let e = engine(&f, EngineConfig::default(), policies());
    let vocab = synth::tiny_config().vocab_size as u32;
    for bad in [vec![], vec![1, vocab, 2], vec![1; 100_000]] {
        let (_, _, last) = submit(&e, tenant(1), None, bad, 4).collect().await;
        assert!(matches!(last, Event::Failed(EngineError::Invalid(_))), "{last:?}");
    }
    let (tokens, _, last) = submit(&e, tenant(1), None, prompt(1, 8), 4).collect().await;
    done(&last);
    assert_eq!(tokens.len(), 4);
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_request() {
    let f = fixture();
    let e = engine(&f, EngineConfig::default(), policies());
    let s = submit(&e, tenant(1), None, prompt(1, 8), 200);
    drop(s);
    let (_, _, last) = submit(&e, tenant(2), None, prompt(2, 8), 3).collect().await;
    done(&last);
    let m = e.metrics();
    assert!(m.tokens_generated < 200, "the cancelled request ran to the end");
    assert_eq!(m.sequences, 0);
}

#[tokio::test]
async fn key_drop_delete_frees_the_tenants_sessions_and_nobody_elses() {
    let f = fixture();
    let e = engine(&f, EngineConfig::default(), policies());
    for t in [1, 2] {
        for s in ["a", "b"] {
            let (_, _, last) = submit(&e, tenant(t), Some(s), prompt(t as u32, 12), 2).collect().await;
            done(&last);
        }
    }
    assert_eq!(e.drop_tenant(tenant(1)).await.unwrap(), 2);
    let m = e.metrics();
    assert!(!m.cache_bytes_by_tenant.contains_key(&1), "{:?}", m.cache_bytes_by_tenant);
    assert!(m.cache_bytes_by_tenant.contains_key(&2));
    let (_, _, last) = submit(&e, tenant(1), Some("a"), prompt(1, 12), 2).collect().await;
    assert_eq!(done(&last).cached_tokens, 0, "a deleted tenant's session survived");
    let (_, _, last) = submit(&e, tenant(2), Some("a"), prompt(2, 12), 2).collect().await;
    assert_eq!(done(&last).cached_tokens, 11);
}

#[tokio::test]
async fn rekey_moves_a_live_session_to_the_new_epoch_without_changing_its_output() {
    let f = fixture();
    let e = engine(&f, EngineConfig::default(), policies());
    let first = prompt(8, 18);
    let (gen1, _, last) = submit(&e, tenant(1), Some("s"), first.clone(), 5).collect().await;
    done(&last);
    assert_eq!(e.rekey(tenant(1), 1).await.unwrap(), 1);
    let mut second = first.clone();
    second.extend(&gen1);
    second.extend(prompt(9, 4));
    // The old epoch no longer opens the session.
    let (_, _, last) = submit(&e, tenant(1), Some("s"), second.clone(), 5).collect().await;
    assert!(matches!(last, Event::Failed(EngineError::StaleEpoch { session: 1, request: 0 })), "{last:?}");
    let new = Tenant { epoch: 1, ..tenant(1) };
    let (gen2, _, last) = submit(&e, new.clone(), Some("s"), second.clone(), 5).collect().await;
    assert_eq!(done(&last).cached_tokens, first.len() + gen1.len() - 1, "the re-keyed cache was not reused");
    assert_eq!(gen2, solo(&f, &new, &second, 5));
}

async fn behind_a_shared_prefix(mode: kframe_engine::PrefixMode) -> (Vec<Vec<u32>>, u64, u64) {
    let f = fixture();
    let e = engine(&f, EngineConfig { prefix_mode: mode, ..EngineConfig::default() }, policies());
    let prefix = prompt(99, 256);
    let info = e.register_prefix(prefix.clone()).await.unwrap();
    assert_eq!(info.tokens, 256);
    assert_eq!(e.register_prefix(prefix.clone()).await.unwrap(), info, "the same tokens are the same prefix");
    let mut outs = Vec::new();
    for t in 0..50u64 {
        let mut p = prefix.clone();
        p.extend(prompt(t as u32, 6));
        let (tokens, _, last) = submit(&e, tenant(t), Some("s"), p, 4).collect().await;
        assert_eq!(done(&last).cached_tokens, 256, "tenant {t} prefilled the prefix");
        outs.push(tokens);
    }
    (outs, e.metrics().cache_bytes, info.bytes)
}

#[tokio::test]
async fn fifty_tenants_behind_a_shared_prefix_match_single_frame_runs_and_store_it_once() {
    use kframe_engine::PrefixMode;
    let (plain, plain_bytes, prefix_bytes) = behind_a_shared_prefix(PrefixMode::SharedPlain).await;
    let (copied, copy_bytes, _) = behind_a_shared_prefix(PrefixMode::RotateCopy).await;
    let f = fixture();
    // Every tenant's greedy steps alone have clear margins (checked in `solo`), so
    // neither mode's arithmetic can flip a token by rounding.
    for t in 0..50u64 {
        let mut p = prompt(99, 256);
        p.extend(prompt(t as u32, 6));
        assert_eq!(plain[t as usize], solo(&f, &tenant(t), &p, 4), "shared-plain, tenant {t}");
    }
    assert_eq!(plain, copied, "rotate-copy gives other tokens than shared-plain");
    // Each session holds its 6 prompt tokens and 3 fed generated tokens; the
    // prefix is counted once (shared-plain) or once per tenant as well (rotate-copy).
    assert_eq!(prefix_bytes, session_bytes(256));
    assert_eq!(plain_bytes, prefix_bytes + 50 * session_bytes(9));
    assert_eq!(copy_bytes, prefix_bytes + 50 * session_bytes(265));
}

fn isolation(ev: &Event) -> kframe_engine::isolation::IsolationReport {
    match ev {
        Event::Done { isolation, .. } => isolation.clone(),
        other => panic!("expected Done, got {other:?}"),
    }
}

#[tokio::test]
async fn every_request_reports_the_layers_it_verified_and_a_sampled_gate_leaves_the_others_unchecked() {
    // Four layers, so that a sampled gate skips one.
    let cfg = kframe_model::Config { num_hidden_layers: 4, ..synth::tiny_config() };
    let f = TinyModel::with_config(&cfg, 21);

    // No depth-gate component: the fallback verifies every layer.
    let e = engine(&f, EngineConfig::default(), policies());
    let (_, _, last) = submit(&e, tenant(1), None, prompt(1, 40), 3).collect().await;
    let report = isolation(&last);
    assert_eq!((report.checked_layers, report.unchecked_layers), (vec![0, 1, 2, 3], vec![]));
    // The prefill writes into a new cache: nothing to check yet. Each of the two
    // decode steps (three tokens: the third is never fed) checks the 40 or 41 rows
    // already there, 2 blocks x 2 kv heads per layer.
    assert_eq!(report.blocks_verified, 2 * 4 * 2 * 2, "{last:?}");
    assert_eq!((report.blocks_masked, report.events), (0, 0));
    assert!(e.isolation_events().is_empty());
    assert_eq!(e.metrics().blocks_verified, report.blocks_verified);

    // verify-sampled every=2: layers 0 and 2, and always the last.
    let set = policies();
    set.swap(PolicyKind::DepthGate, "verify-sampled", &shipped("verify-sampled"), "every=2").unwrap();
    let e = engine(&f, EngineConfig::default(), set);
    let (_, _, last) = submit(&e, tenant(1), None, prompt(1, 40), 3).collect().await;
    let report = isolation(&last);
    assert_eq!((report.checked_layers, report.unchecked_layers), (vec![0, 2, 3], vec![1]));
    assert_eq!(report.blocks_verified, 2 * 3 * 2 * 2);
}

#[tokio::test]
async fn the_depth_gate_decides_which_layers_are_padded_and_a_session_keeps_its_layout() {
    let f = fixture();
    let gen = ModelBundle::load(&f.dir, DType::F32, &Device::Cpu).unwrap();
    let calibration = kframe_model::calibrate::measure(&f.dir, &gen, kframe_core::layout::DEFAULT_MARGIN).unwrap();
    let cfg = || EngineConfig {
        padding: Some(kframe_core::layout::Padding { extra: 32, calibration: calibration.clone() }),
        ..EngineConfig::default()
    };
    let run = |gate: Option<&'static str>| {
        let set = policies();
        if let Some(name) = gate {
            set.swap(PolicyKind::DepthGate, name, &shipped(name), "").unwrap();
        }
        (engine(&f, cfg(), set.clone()), set)
    };
    let mut outputs = Vec::new();
    for (gate, padded) in [(None, vec![0]), (Some("pad-all"), vec![0, 1]), (Some("pad-none"), vec![])] {
        let (e, _) = run(gate);
        let (tokens, _, last) = submit(&e, tenant(1), None, prompt(1, 30), 8).collect().await;
        let report = isolation(&last);
        assert_eq!(report.padded_layers, padded, "{gate:?}");
        assert_eq!(report.pad_overflow, 0);
        outputs.push(tokens);
    }
    // Padding changes no token.
    assert!(outputs.iter().all(|t| t == &outputs[0]), "{outputs:?}");
    assert_eq!(outputs[0], solo(&f, &tenant(1), &prompt(1, 30), 8));

    // A session started unpadded stays unpadded when the gate changes mid-way:
    // its rows' width is fixed; a new session follows the new gate.
    let (e, set) = run(Some("pad-none"));
    let first = prompt(2, 20);
    let (tokens, _, last) = submit(&e, tenant(2), Some("s"), first.clone(), 4).collect().await;
    assert!(isolation(&last).padded_layers.is_empty());
    let bytes_plain = e.metrics().cache_bytes;
    set.swap(PolicyKind::DepthGate, "pad-all", &shipped("pad-all"), "").unwrap();
    let mut more = first.clone();
    more.extend(&tokens);
    more.extend(prompt(3, 5));
    let (_, _, last) = submit(&e, tenant(2), Some("s"), more, 4).collect().await;
    assert!(done(&last).cached_tokens >= first.len());
    assert!(isolation(&last).padded_layers.is_empty());
    let (_, _, last) = submit(&e, tenant(3), Some("s"), prompt(2, 20), 4).collect().await;
    assert_eq!(isolation(&last).padded_layers, [0, 1]);
    // The padded session holds m / d more bytes per padded layer than the plain one.
    assert!(e.metrics().cache_bytes > 2 * bytes_plain, "{} vs {bytes_plain}", e.metrics().cache_bytes);
}

#[tokio::test]
async fn a_layer_the_depth_gate_leaves_unrotated_is_reported_and_changes_no_token() {
    let f = fixture();
    let set = policies();
    set.swap(PolicyKind::DepthGate, "verify-all", &shipped("verify-all"), "rotate=1").unwrap();
    let e = engine(&f, EngineConfig::default(), set);
    let (tokens, _, last) = submit(&e, tenant(1), None, prompt(1, 30), 8).collect().await;
    let report = isolation(&last);
    assert_eq!((report.unrotated_layers, report.checked_layers), (vec![1], vec![0, 1]));
    assert_eq!(report.events, 0, "blocks sealed and verified in the model's frame");
    assert_eq!(tokens, solo(&f, &tenant(1), &prompt(1, 30), 8));
}

#[tokio::test]
async fn an_unused_shared_prefix_is_evicted_for_room_and_prefilled_again_when_asked_for() {
    let f = fixture();
    let prefix = prompt(77, 64);
    // Room for the prefix and a session and a half (of 24 tokens).
    let cfg = EngineConfig { kv_budget: session_bytes(64) + session_bytes(36), ..EngineConfig::default() };
    let set = policies();
    set.swap(PolicyKind::Eviction, "lru", &shipped("lru"), "").unwrap();
    let e = engine(&f, cfg, set);
    let info = e.register_prefix(prefix.clone()).await.unwrap();
    assert_eq!(info.bytes, session_bytes(64));

    // While a session's cache continues the prefix, the prefix is in use: the
    // oldest entry (LRU's pick) is passed over for the session itself.
    let mut on_prefix = prefix.clone();
    on_prefix.extend(prompt(1, 20));
    let (_, _, last) = submit(&e, tenant(1), Some("s"), on_prefix.clone(), 1).collect().await;
    assert_eq!(done(&last).cached_tokens, 64);
    let (_, _, last) = submit(&e, tenant(2), Some("s"), prompt(2, 23), 1).collect().await;
    done(&last);
    assert_eq!(e.metrics().evictions, 1);
    assert!(!e.metrics().cache_bytes_by_tenant.contains_key(&1), "tenant 1's session was the victim");
    assert!(e.metrics().cache_bytes >= info.bytes, "the prefix stayed");

    // Now nothing uses it: it is the least recently used entry and goes first.
    let (_, _, last) = submit(&e, tenant(3), Some("s"), prompt(3, 23), 1).collect().await;
    done(&last);
    let m = e.metrics();
    assert_eq!(m.evictions, 2);
    assert!(m.cache_bytes < info.bytes, "the prefix was evicted: {} bytes held", m.cache_bytes);
    assert!(m.cache_bytes_by_tenant.contains_key(&2) && m.cache_bytes_by_tenant.contains_key(&3));

    // The next request that starts with it prefills it once more, as shared.
    let (tokens, _, last) = submit(&e, tenant(4), None, on_prefix.clone(), 3).collect().await;
    assert_eq!(done(&last).cached_tokens, 64, "the prefix was not loaded again");
    assert_eq!(tokens, solo(&f, &tenant(4), &on_prefix, 3));
    assert!(e.metrics().cache_bytes <= session_bytes(64) + session_bytes(36));
}
