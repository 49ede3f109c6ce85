//! The isolation eval at 20 tenants on the embedded model: the published claims
//! it reproduces (matched, wrong key, readout, Procrustes), the attack it finds
//! (norms) and the padding that closes it, and adversary components held to their
//! capabilities and limits.
#![cfg(feature = "embedded-model")]

use candle_core::{DType, Device};
use kframe_eval::attack::{self, AdversarySource, AttackOptions, REFERENCE};
use kframe_eval::lab::Lab;
use kframe_eval::suite::{self, EvalOptions, Experiment, Quiet};
use kframe_model::load::ModelDir;
use kframe_model::ModelBundle;
use kframe_policy::adversary::{Adversary, Capability};
use kframe_policy::{shipped, Failure};
use std::time::Duration;

fn embedded() -> ModelBundle {
    ModelBundle::load(&ModelDir::embedded().unwrap(), DType::F32, &Device::Cpu).unwrap()
}

fn adversary(name: &str, config: &str) -> AdversarySource {
    let path = shipped(name);
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/build-plugins.sh)", path.display()));
    AdversarySource { name: name.into(), bytes, config: config.into() }
}

fn attack_options(adversaries: Vec<AdversarySource>, victims: usize) -> AttackOptions {
    AttackOptions { adversaries, victims, key_victims: 1, deadline: Duration::from_secs(20) }
}

#[test]
fn eval_all_at_twenty_tenants_reproduces_the_claims_finds_the_norm_channel_and_padding_closes_it() {
    let dir = ModelDir::embedded().unwrap();
    let gen = ModelBundle::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let calibration = dir.stored_calibration().unwrap().unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = EvalOptions {
        experiment: Experiment::All,
        tenants: 20,
        records: 4,
        pairs: 20_000,
        seed: 7,
        out: out.path().to_owned(),
        attack: attack_options(REFERENCE.iter().map(|n| adversary(n, "")).collect(), 10),
        padding: Some(kframe_core::layout::Padding { extra: kframe_core::layout::DEFAULT_EXTRA, calibration }),
    };
    let report = suite::run(&gen, "kframe-tiny (embedded)", &opts, &mut Quiet).unwrap();

    let matched = report.matched.as_ref().unwrap();
    assert_eq!((matched.pass_clean, matched.tenants), (20, 20), "{:?}", matched.failures);
    let wrong = report.wrong_key.as_ref().unwrap();
    assert_eq!(wrong.by_tenants.iter().map(|g| g.tenants).collect::<Vec<_>>(), [2, 10, 20]);
    for g in &wrong.by_tenants {
        assert_eq!((g.recovered, g.bleed), (0, 0), "T = {}", g.tenants);
    }
    let readout = report.readout.as_ref().unwrap();
    assert!((readout.std_ratio - 1.0).abs() < 0.1, "std ratio {}", readout.std_ratio);
    assert_eq!(report.spot_check.as_ref().unwrap().recovered, 0);

    let attack = report.attack.as_ref().unwrap();
    let d = report.head_dim;
    for row in &attack.procrustes {
        assert_eq!(row.failures.failed_calls, 0, "{:?}", row.failures.first_error);
        for p in &row.points {
            if p.pairs >= d {
                assert!(p.key_error < 1e-3, "layer {}: error {} at n = {}", row.layer, p.key_error, p.pairs);
            }
            if p.pairs <= d / 2 {
                assert!(p.key_error > 0.5, "layer {}: error {} at n = {}", row.layer, p.key_error, p.pairs);
            }
        }
    }
    // Directions carry nothing across frames...
    let find = |adversary: &str, padded: bool| {
        attack.reconstruction.iter().find(|r| r.adversary == adversary && r.layer == 0 && r.padded == padded).unwrap()
    };
    let cross = find("crossframe-match", false);
    assert!(cross.at_baseline, "crossframe-match {} vs baseline {}", cross.accuracy, cross.baseline);
    // ...but norms survive any rotation: at layer 0 they name the tokens. The
    // attack must keep working, or the report's finding has silently rotted.
    let norm = find("norm-match", false);
    assert!(norm.accuracy > 5.0 * norm.baseline && !norm.at_baseline, "norm-match {norm:?}");
    // With every row padded to one norm, the same attack is at chance.
    let padded = find("norm-match", true);
    assert!(padded.at_baseline, "norm-match with padding {padded:?}");
    let cost = attack.padding.as_ref().unwrap();
    assert_eq!(cost.layer_memory_ratio, (d + cost.extra) as f64 / d as f64);
    // The cache's own byte count agrees: all layers padded costs the layer ratio,
    // layer 0 alone less.
    assert!((cost.cache_memory_ratio_all - cost.layer_memory_ratio).abs() < 1e-12, "{cost:?}");
    assert!(1.0 < cost.cache_memory_ratio_layer0 && cost.cache_memory_ratio_layer0 < cost.cache_memory_ratio_all);
    assert!(cost.decode_ratio > 0.0 && cost.decode_tok_s_padded > 0.0, "{cost:?}");

    // Every shipped adversary answered every call.
    for row in &attack.reconstruction {
        assert_eq!(
            row.failures.failed_calls, 0,
            "{} layer {}: {:?}",
            row.adversary, row.layer, row.failures.first_error
        );
    }
    let adversaries: std::collections::BTreeSet<&str> =
        attack.reconstruction.iter().map(|r| r.adversary.as_str()).collect();
    assert_eq!(adversaries.len(), 6, "{adversaries:?}");
    // Two membership adversaries, every layer, unpadded and padded.
    assert_eq!(attack.membership.len(), 2 * 2 * report.layers);
    assert_eq!(attack.reconstruction.iter().filter(|r| r.padded).count(), 6 * report.layers);

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap()).unwrap();
    for path in [
        "/matched/pass_clean",
        "/matched/tenants",
        "/wrong_key/by_tenants/0/upper95",
        "/readout/std_ratio",
        "/readout/ks",
        "/readout/max_cos",
        "/spot_check/recovered",
        "/attack/reconstruction",
        "/attack/membership",
        "/attack/procrustes",
        "/attack/padding/decode_ratio",
        "/attack/padding/cache_memory_ratio_layer0",
    ] {
        assert!(json.pointer(path).is_some(), "report.json lacks {path}");
    }
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(md.contains("| Matched keys scale") && md.contains("20/20 PASS-CLEAN"), "{md}");
    assert!(md.contains("### Norm padding: recovery without and with"), "{md}");
    for figure in ["readout_cosines", "procrustes", "recall"] {
        for ext in ["svg", "png"] {
            let file = out.path().join(format!("{figure}.{ext}"));
            assert!(std::fs::metadata(&file).map(|m| m.len() > 1000).unwrap_or(false), "{}", file.display());
        }
    }
}

#[test]
fn a_probe_importing_the_model_oracle_is_refused_where_no_capability_is_granted() {
    let runtime = attack::runtime(Duration::from_secs(5)).unwrap();
    let oracle = adversary("norm-oracle", "");
    let refused = Adversary::load(&runtime, &oracle.name, &oracle.bytes, "", &[]).err().expect("refused");
    assert!(matches!(&refused.failure, Failure::Denied(why) if why.contains("model-oracle")), "{}", refused.failure);
    let loaded = Adversary::load(&runtime, &oracle.name, &oracle.bytes, "", &[Capability::ModelOracle]).unwrap();
    assert_eq!(loaded.needs, [Capability::ModelOracle]);
    // A adversary that imports nothing loads with nothing granted.
    let plain = adversary("crossframe-match", "");
    assert!(Adversary::load(&runtime, &plain.name, &plain.bytes, "", &[]).unwrap().needs.is_empty());
}

#[test]
fn looping_trapping_and_lying_probes_are_stopped_and_reported_while_the_eval_goes_on() {
    let gen = embedded();
    let lab = Lab::new(&gen, "kframe-tiny (embedded)", 4, 4, 3).unwrap();
    let adversaries = vec![
        adversary("probe-hostile", "loop"),
        adversary("probe-hostile", "trap"),
        adversary("probe-hostile", "garbage"),
        adversary("probe-hostile", "read-file"),
        adversary("crossframe-match", ""),
    ];
    let opts = AttackOptions { deadline: Duration::from_millis(300), ..attack_options(adversaries, 4) };
    let report = attack::run(&lab, &opts, |_| {}).unwrap();
    let errors: Vec<String> = report
        .reconstruction
        .iter()
        .filter(|r| r.layer == 0 && r.adversary.starts_with("probe-hostile"))
        .map(|r| r.failures.first_error.clone().unwrap_or_default())
        .collect();
    assert_eq!(errors.len(), 4, "{:?}", report.reconstruction);
    assert!(errors[0].contains("timed out"), "{}", errors[0]);
    assert!(errors[1].contains("trapped"), "{}", errors[1]);
    assert!(errors[2].contains("invalid answer"), "{}", errors[2]);
    assert!(errors[3].contains("not granted") || errors[3].contains("gave up"), "{}", errors[3]);
    // After three consecutive failures a adversary is not entered again.
    let looping = &report.reconstruction[0];
    assert_eq!(looping.failures.failed_calls, 4);
    let honest = report.reconstruction.iter().find(|r| r.adversary == "crossframe-match").unwrap();
    assert_eq!(honest.failures.failed_calls, 0);
    assert_eq!(honest.positions, lab.cases.iter().map(|c| c.context.len()).sum::<usize>());
}
