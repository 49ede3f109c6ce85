//! Policy plugins as real components loaded by wasmtime: the shipped policies'
//! decisions on scripted scenarios, run-time swaps, hostile guests and the
//! sandbox. The components are built by scripts/build-plugins.sh, which the
//! README's test command runs first.

use kframe_policy::{
    shipped, Admission, DecidedBy, Decision, Entry, Failure, LayerGate, Limits, Load, ModelShape, PluginRuntime,
    PolicyKind, PolicySet, Request, WorldKind,
};
use std::sync::Arc;
use std::time::Duration;

fn bytes(name: &str) -> Vec<u8> {
    let path = shipped(name);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; build the plugins with scripts/build-plugins.sh", path.display()))
}

fn runtime(limits: Limits) -> Arc<PluginRuntime> {
    PluginRuntime::new(limits, None).unwrap()
}

/// Serving's limits with a 2 s deadline: on a loaded 2-core machine a thread can be
/// descheduled past 50 ms, and only the timeout tests should depend on the clock.
fn relaxed() -> Limits {
    Limits { deadline: Duration::from_secs(2), ..Limits::default() }
}

fn set_with(kind: PolicyKind, name: &str, config: &str) -> PolicySet {
    let set = PolicySet::new(runtime(relaxed()));
    set.swap(kind, name, &bytes(name), config).unwrap();
    set
}

fn entry(id: u64, tenant: u64, bytes: u64, inserted: u64) -> Entry {
    Entry { id, tenant, bytes, tokens: (bytes / 64) as u32, pinned: false, inserted }
}

fn plugin_decided<T: std::fmt::Debug>(d: &Decision<T>) {
    assert!(matches!(d.by, DecidedBy::Plugin(_)), "expected the plugin to decide: {d:?}");
}

/// Entries 1..=3 (100 bytes, inserted at t=1..3); entry 1 hit three times at
/// t=4..6, entry 3 once at t=7, entry 2 never.
fn scripted(set: &PolicySet) {
    for id in 1..=3 {
        set.on_insert(entry(id, id, 100, id));
    }
    for now in 4..=6 {
        set.on_hit(1, now);
    }
    set.on_hit(3, 7);
}

#[test]
fn lru_evicts_the_least_recently_used_entry() {
    let set = set_with(PolicyKind::Eviction, "lru", "");
    scripted(&set);
    let d = set.victims(100, 8);
    plugin_decided(&d);
    assert_eq!(d.value, vec![2]);
    set.on_hit(2, 9);
    assert_eq!(set.victims(100, 10).value, vec![1], "after 2 is used, 1 is the oldest");
}

#[test]
fn lfu_evicts_the_least_hit_entry_and_swapping_from_lru_changes_the_decision() {
    let set = set_with(PolicyKind::Eviction, "lru", "");
    for id in 1..=3 {
        set.on_insert(entry(id, id, 100, id));
    }
    // Entry 1: many old hits. Entry 2: one recent hit. Entry 3: one recent hit.
    for now in 4..=8 {
        set.on_hit(1, now);
    }
    set.on_hit(2, 9);
    set.on_hit(3, 10);
    assert_eq!(set.victims(100, 11).value, vec![1], "LRU: entry 1 was used longest ago");
    // Swap at run time: same host, same entries, a different component.
    set.swap(PolicyKind::Eviction, "lfu", &bytes("lfu"), "").unwrap();
    let d = set.victims(100, 11);
    plugin_decided(&d);
    assert_eq!(d.value, vec![2], "LFU: entries 2 and 3 have one hit each, 2 is older");
}

#[test]
fn gdsf_evicts_large_entries_before_small_ones_of_equal_use() {
    let set = set_with(PolicyKind::Eviction, "gdsf", "");
    set.on_insert(entry(1, 1, 100, 1));
    set.on_insert(entry(2, 1, 1000, 2));
    set.on_insert(entry(3, 1, 100, 3));
    let d = set.victims(50, 4);
    plugin_decided(&d);
    assert_eq!(d.value, vec![2]);
    // A small entry hit often outranks a large one hit once.
    let set = set_with(PolicyKind::Eviction, "gdsf", "");
    set.on_insert(entry(1, 1, 100, 1));
    set.on_insert(entry(2, 1, 150, 2));
    set.on_hit(2, 3);
    assert_eq!(set.victims(50, 4).value, vec![1], "H(1) = 1/100 < H(2) = 2/150");
}

#[test]
fn tenant_quota_takes_from_the_tenant_over_quota_first() {
    let set = set_with(PolicyKind::Eviction, "tenant-quota", "quota=300");
    // Tenant 2's single entry is the oldest, but tenant 1 holds 500 > 300 bytes.
    set.on_insert(entry(100, 2, 100, 1));
    for id in 1..=5 {
        set.on_insert(entry(id, 1, 100, 1 + id));
    }
    let d = set.victims(200, 10);
    plugin_decided(&d);
    assert_eq!(d.value, vec![1, 2], "tenant 1's two least recent entries bring it to its quota");
    for id in d.value {
        set.on_remove(id);
    }
    // Now both are within quota; tenant 1 still holds the most, so it pays again.
    assert_eq!(set.victims(100, 11).value, vec![3]);
}

#[test]
fn slru_protects_a_reused_entry_that_lru_would_evict() {
    for (plugin, want) in [("lru", 1), ("slru", 2)] {
        let set = set_with(PolicyKind::Eviction, plugin, "");
        set.on_insert(entry(1, 1, 100, 1));
        set.on_hit(1, 2);
        set.on_insert(entry(2, 1, 100, 3));
        set.on_insert(entry(3, 1, 100, 4));
        assert_eq!(set.victims(100, 5).value, vec![want], "{plugin}");
    }
}

#[test]
fn pinned_entries_are_never_chosen() {
    let set = set_with(PolicyKind::Eviction, "lru", "");
    scripted(&set);
    set.on_pin(2, true);
    assert_eq!(set.victims(100, 8).value, vec![1], "2 is pinned; 1 is the next least recent");
}

fn load(cache_bytes: u64, queued: u32) -> Load {
    Load { active_sequences: 4, queued, queue_limit: 2, cache_bytes, cache_budget: 1000 }
}

fn request(tier: u8, bytes_needed: u64) -> Request {
    Request {
        tenant: 1,
        tier,
        prompt_tokens: 10,
        max_tokens: 10,
        bytes_needed,
        now: 1,
        tenant_running: 0,
        tenant_queued: 0,
    }
}

#[test]
fn capacity_admits_queues_and_rejects_by_load() {
    let set = set_with(PolicyKind::Admission, "capacity", "max_active=8");
    let d = set.admit(&request(0, 100), &load(500, 0));
    plugin_decided(&d);
    assert_eq!(d.value, Admission::Admit);
    assert_eq!(set.admit(&request(0, 600), &load(500, 0)).value, Admission::Queue);
    assert!(matches!(set.admit(&request(0, 600), &load(500, 2)).value, Admission::Reject(_)));
    assert!(matches!(set.admit(&request(0, 5000), &load(0, 0)).value, Admission::Reject(r) if r.contains("budget")));
}

#[test]
fn tier_priority_pauses_low_tiers_under_pressure_only() {
    let set = set_with(PolicyKind::Admission, "tier-priority", "high=75,min_tier=1");
    assert_eq!(set.admit(&request(0, 100), &load(100, 0)).value, Admission::Admit, "no pressure");
    assert_eq!(set.admit(&request(0, 100), &load(700, 0)).value, Admission::Queue, "low tier under pressure");
    assert_eq!(set.admit(&request(2, 100), &load(700, 0)).value, Admission::Admit, "high tier under pressure");
}

#[test]
fn depth_gates_verify_every_layer_or_a_sample() {
    let shape = ModelShape { layers: 6, kv_heads: 2, head_dim: 128 };
    let all = set_with(PolicyKind::DepthGate, "verify-all", "").gates(&shape, 1, 10);
    plugin_decided(&all);
    assert!(all.value.iter().all(|g| g.verify && g.rotate) && all.value.len() == 6);
    let sampled = set_with(PolicyKind::DepthGate, "verify-sampled", "every=2").gates(&shape, 1, 10);
    let verified: Vec<bool> = sampled.value.iter().map(|g: &LayerGate| g.verify).collect();
    assert_eq!(verified, [true, false, true, false, true, true]);
    let err = PolicySet::new(runtime(relaxed()))
        .swap(PolicyKind::DepthGate, "verify-sampled", &bytes("verify-sampled"), "every=0")
        .unwrap_err();
    assert!(matches!(err.failure, Failure::Config(_)), "{err}");
}

#[test]
fn depth_gates_pad_layer_zero_by_default_and_pad_all_or_none_pad_every_or_no_layer() {
    let shape = ModelShape { layers: 4, kv_heads: 2, head_dim: 128 };
    let pads = |name: &str, config: &str| -> Vec<bool> {
        let d = set_with(PolicyKind::DepthGate, name, config).gates(&shape, 1, 10);
        plugin_decided(&d);
        d.value.iter().map(|g| g.pad).collect()
    };
    assert_eq!(pads("verify-all", ""), [true, false, false, false]);
    assert_eq!(pads("verify-sampled", ""), [true, false, false, false]);
    assert_eq!(pads("verify-all", "pad=3"), [true, true, true, false]);
    assert_eq!(pads("verify-sampled", "pad=0"), [false; 4]);
    assert_eq!(pads("pad-all", ""), [true; 4]);
    assert_eq!(pads("pad-none", ""), [false; 4]);
    let rotated = set_with(PolicyKind::DepthGate, "verify-all", "rotate=1").gates(&shape, 1, 10);
    assert_eq!(rotated.value.iter().map(|g| g.rotate).collect::<Vec<_>>(), [true, false, false, false]);
    // Without a component, the native fallback pads layer 0 too.
    let fallback = PolicySet::new(runtime(relaxed())).gates(&shape, 1, 10);
    assert_eq!(fallback.value.iter().map(|g| g.pad).collect::<Vec<_>>(), [true, false, false, false]);
}

/// Loads the hostile plugin in `mode`, asks for victims, and returns the failure;
/// checks that the LRU fallback decided and that a good plugin works afterwards.
fn hostile(mode: &str, limits: Limits) -> Failure {
    let set = PolicySet::new(runtime(limits));
    scripted(&set);
    set.on_pin(3, true);
    set.swap(PolicyKind::Eviction, "hostile", &bytes("hostile"), mode).unwrap();
    let d = set.victims(100, 8);
    let DecidedBy::Fallback(Some(err)) = d.by else { panic!("{mode}: the hostile plugin decided: {:?}", d.value) };
    assert_eq!(d.value, vec![2], "{mode}: the native LRU decides instead");
    set.swap(PolicyKind::Eviction, "lru", &bytes("lru"), "").unwrap();
    let after = set.victims(100, 8);
    plugin_decided(&after);
    assert_eq!(after.value, vec![2]);
    err.failure
}

#[test]
fn an_infinite_loop_times_out() {
    assert!(matches!(hostile("loop", Limits::default()), Failure::Timeout { .. }));
}

#[test]
fn an_infinite_loop_runs_out_of_fuel_under_a_small_budget() {
    let limits = Limits { fuel: 1_000_000, deadline: Duration::from_secs(10), ..Limits::default() };
    assert_eq!(hostile("loop", limits), Failure::OutOfFuel);
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    // A generous deadline, so the limit and not the clock stops it on a busy machine.
    let limits = Limits { deadline: Duration::from_secs(5), ..Limits::default() };
    assert!(matches!(hostile("membomb", limits), Failure::OutOfMemory { .. }));
}

#[test]
fn a_trap_is_reported_as_a_trap() {
    assert!(matches!(hostile("trap", relaxed()), Failure::Trap(_)));
}

#[test]
fn invalid_answers_are_rejected_with_their_reason() {
    for (mode, reason) in [
        ("huge", "victims named"),
        ("unknown", "unknown entry"),
        ("duplicate", "named twice"),
        ("pinned", "pinned"),
        ("too-few", "frees 0 bytes"),
    ] {
        // A generous deadline: a million ids take a while to build and to lift on a
        // busy machine, and the answer's validity is what this checks.
        let limits = Limits { deadline: Duration::from_secs(5), ..Limits::default() };
        match hostile(mode, limits) {
            Failure::InvalidAnswer(detail) => assert!(detail.contains(reason), "{mode}: {detail}"),
            other => panic!("{mode}: {other:?}"),
        }
    }
}

#[test]
fn no_capability_leaks_reading_a_file_or_the_clock_is_denied() {
    for mode in ["read-file", "read-clock"] {
        let failure = hostile(mode, relaxed());
        assert!(matches!(failure, Failure::Denied(_) | Failure::Trap(_)), "{mode}: {failure:?}");
    }
}

#[test]
fn a_plugin_that_keeps_failing_is_quarantined() {
    let set = PolicySet::new(runtime(relaxed()));
    scripted(&set);
    set.swap(PolicyKind::Eviction, "hostile", &bytes("hostile"), "trap").unwrap();
    let failures: Vec<Failure> = (0..4)
        .map(|_| match set.victims(100, 8).by {
            DecidedBy::Fallback(Some(e)) => e.failure,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(matches!(failures[2], Failure::Trap(_)));
    assert_eq!(failures[3], Failure::Quarantined { failures: 3 });
}

#[test]
fn malformed_and_wrong_world_components_are_refused_and_the_current_policy_stays() {
    let set = set_with(PolicyKind::Eviction, "lru", "");
    scripted(&set);
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let random: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    for (name, bytes) in [("core", core_module), ("random", random)] {
        let err = set.swap(PolicyKind::Eviction, name, &bytes, "").unwrap_err();
        assert!(matches!(err.failure, Failure::Malformed(_)), "{name}: {err}");
    }
    let err = set.swap(PolicyKind::Admission, "lru", &bytes("lru"), "").unwrap_err();
    let (expected, found) = (WorldKind::Policy(PolicyKind::Admission), Some(WorldKind::Policy(PolicyKind::Eviction)));
    assert_eq!(err.failure, Failure::WrongWorld { expected, found });
    let d = set.victims(100, 8);
    plugin_decided(&d);
    assert_eq!(d.value, vec![2]);
}

#[test]
fn every_shipped_plugin_is_identified_by_its_world() {
    let rt = runtime(relaxed());
    for (name, kind) in [
        ("lru", PolicyKind::Eviction),
        ("lfu", PolicyKind::Eviction),
        ("slru", PolicyKind::Eviction),
        ("gdsf", PolicyKind::Eviction),
        ("tenant-quota", PolicyKind::Eviction),
        ("hostile", PolicyKind::Eviction),
        ("capacity", PolicyKind::Admission),
        ("tier-priority", PolicyKind::Admission),
        ("verify-all", PolicyKind::DepthGate),
        ("verify-sampled", PolicyKind::DepthGate),
        ("pad-all", PolicyKind::DepthGate),
        ("pad-none", PolicyKind::DepthGate),
    ] {
        assert_eq!(rt.check(name, &bytes(name)).unwrap(), WorldKind::Policy(kind), "{name}");
    }
}

#[test]
fn the_third_party_example_policy_loads_and_evicts_first_in_first_out() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/fifo-eviction/target/wasm32-wasip2/release/fifo_eviction.wasm");
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}; run scripts/build-plugins.sh", path.display()));
    let set = PolicySet::new(runtime(relaxed()));
    scripted(&set);
    set.swap(PolicyKind::Eviction, "fifo", &bytes, "").unwrap();
    let d = set.victims(100, 8);
    plugin_decided(&d);
    assert_eq!(d.value, vec![1], "entry 1 came first, however often it was used");
}

/// A component built for another version of the policy WIT is refused before it
/// serves, and the error names both versions; a shipped one declares this host's.
#[test]
fn a_component_built_for_another_wit_version_is_refused_naming_both_versions() {
    let set = PolicySet::new(runtime(relaxed()));
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/other-version/target/wasm32-wasip2/release/kframe_other_version.wasm");
    let other =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}; run scripts/build-plugins.sh", path.display()));
    let err = set.swap(PolicyKind::Eviction, "other-version", &other, "").unwrap_err();
    let want = Failure::UnsupportedVersion {
        package: "kframe:policy".into(),
        found: "0.1.0".into(),
        supported: "kframe:policy@0.3.0 or kframe:policy@0.2.0".into(),
    };
    assert_eq!(err.failure, want);
    assert!(err.to_string().contains("0.1.0") && err.to_string().contains("kframe:policy@0.3.0"), "{err}");
    let rt = runtime(relaxed());
    let lru = wasmtime::component::Component::new(rt.engine(), bytes("lru")).unwrap();
    let declared = kframe_policy::versions::declared(rt.engine(), &lru);
    assert_eq!(declared, vec![("kframe:policy".to_owned(), "0.3.0".to_owned())]);
}

/// A component built for kframe:policy@0.2.0 (whose `request` has no per-tenant
/// counts) still loads and decides: the host converts the newest records for it.
#[test]
fn a_component_built_for_the_previous_wit_version_still_loads_and_decides() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/policy-v0-2-0/target/wasm32-wasip2/release/kframe_policy_v0_2_0.wasm");
    let old = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}; run scripts/build-plugins.sh", path.display()));
    let rt = runtime(relaxed());
    let component = wasmtime::component::Component::new(rt.engine(), &old).unwrap();
    assert_eq!(
        kframe_policy::versions::declared(rt.engine(), &component),
        vec![("kframe:policy".into(), "0.2.0".into())]
    );
    assert_eq!(rt.check("old", &old).unwrap(), WorldKind::Policy(PolicyKind::Admission));
    let set = PolicySet::new(runtime(relaxed()));
    set.swap(PolicyKind::Admission, "old", &old, "").unwrap();
    let load = Load { active_sequences: 0, queued: 0, queue_limit: 8, cache_bytes: 0, cache_budget: 1 << 30 };
    let short = Request { prompt_tokens: 10, tenant_running: 3, tenant_queued: 2, ..request(0, 1) };
    let d = set.admit(&short, &load);
    plugin_decided(&d);
    assert_eq!(d.value, Admission::Admit);
    let long = Request { prompt_tokens: 200, ..short };
    assert_eq!(set.admit(&long, &load).value, Admission::Reject("200 prompt tokens, built for 0.2.0".into()));
}

/// The newest world carries each tenant's running and queued counts, so a
/// component can give each tenant its share: `capacity per_tenant=2`.
#[test]
fn the_admission_world_sees_the_tenants_own_counts_and_capacity_queues_past_its_share() {
    let set = set_with(PolicyKind::Admission, "capacity", "per_tenant=2");
    let load = Load { active_sequences: 3, queued: 0, queue_limit: 8, cache_bytes: 0, cache_budget: 1 << 30 };
    let mine = |running| Request { tenant_running: running, ..request(0, 1) };
    assert_eq!(set.admit(&mine(1), &load).value, Admission::Admit);
    assert_eq!(set.admit(&mine(2), &load).value, Admission::Queue, "two of its own already run");
}
