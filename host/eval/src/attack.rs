//! `attack`: adversaries as Wasm components (world `kframe:probe/adversary`)
//! against kframe's caches. Three experiments, each granting capabilities:
//!
//! - co-tenant (grants nothing): the attacker reads a victim's rotated rows and
//!   its own session's (it sent tokens of its choosing, every membership candidate
//!   among them). Tasks: reconstruct the victim's tokens; membership of candidate
//!   secrets.
//! - open-weights (grants `model-oracle`): as co-tenant, plus plaintext K of any
//!   token. Only for adversaries that import the oracle.
//! - known-plaintext (grants `known-pairs`): n pairs (k, R k) of the victim's key,
//!   as a public prefix under `rotate-copy` exposes; n swept from 1 to 2d. Task:
//!   recover R (orthogonal Procrustes).
//!
//! Co-tenant and open-weights run twice when the eval has padding settings: on
//! unpadded caches and on caches norm-padded at every layer (see `kframe_core::layout`),
//! so that each layer's recovery can be read with and without padding.
//!
//! Each adversary runs each task it answers in the least-privileged experiment it
//! loads in. The host scores every guess against ground truth the component never
//! sees. A component that traps, loops or answers nonsense is stopped and
//! reported; the rest of the eval goes on.

use super::lab::{rows_of, Lab};
use super::stats::{auc, tpr_at_fpr, wilson95};
use crate::error::{Error, Result};
use candle_core::{DType, Device};
use kframe_core::rotation::Frame;
use kframe_model::qwen2::Chunk;
use kframe_policy::adversary::{
    Adversary, Capability, Grants, Guess, Oracle, OracleQuery, OwnVector, Pair, Task, Vector, View,
};
use kframe_policy::{Limits, PluginError, PluginRuntime};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// An adversary to run: its component and configuration.
#[derive(Clone)]
pub struct AdversarySource {
    pub name: String,
    pub bytes: Vec<u8>,
    pub config: String,
}

impl AdversarySource {
    pub fn file(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self { name: path.display().to_string(), bytes: std::fs::read(path)?, config: String::new() })
    }
}

/// The shipped reference adversaries.
pub const REFERENCE: [&str; 8] = [
    "crossframe-match",
    "norm-match",
    "gram-match",
    "pca-align",
    "pad-strip",
    "membership",
    "procrustes",
    "norm-oracle",
];

#[derive(Clone)]
pub struct AttackOptions {
    pub adversaries: Vec<AdversarySource>,
    /// Victims attacked in the co-tenant experiments.
    pub victims: usize,
    /// Victims whose key the Procrustes sweep recovers.
    pub key_victims: usize,
    /// Wall-clock budget of one `attack` call.
    pub deadline: Duration,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Failures {
    pub failed_calls: usize,
    pub first_error: Option<String>,
    /// Stopped after consecutive failures; later calls were not made.
    pub quarantined: bool,
}

impl std::fmt::Display for Failures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.failed_calls)?;
        match &self.first_error {
            Some(e) => write!(f, " ({e})"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReconstructionRow {
    /// The adversary's name (`probe` in report.json, its name there since the first reports).
    #[serde(rename = "probe")]
    pub adversary: String,
    pub experiment: &'static str,
    pub layer: usize,
    /// The victim's and attacker's caches were norm-padded at this layer.
    pub padded: bool,
    pub positions: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub ci95: (f64, f64),
    /// The same guesses shuffled among each victim's positions (chance).
    pub baseline: f64,
    /// The 95% interval of accuracy minus baseline (clustered by victim) holds 0.
    pub at_baseline: bool,
    /// The victim's secrets alone.
    pub secret_positions: usize,
    pub secret_correct: usize,
    #[serde(flatten)]
    pub failures: Failures,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MembershipRow {
    /// The adversary's name (`probe` in report.json, its name there since the first reports).
    #[serde(rename = "probe")]
    pub adversary: String,
    pub experiment: &'static str,
    pub layer: usize,
    pub padded: bool,
    pub positives: usize,
    pub negatives: usize,
    pub auc: f64,
    /// Bootstrap over victims.
    pub auc_ci95: (f64, f64),
    pub tpr_at_fpr_0_001: f64,
    pub tpr_ci95: (f64, f64),
    #[serde(flatten)]
    pub failures: Failures,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcrustesPoint {
    pub pairs: usize,
    /// |R_est - R|_F / |R|_F, mean over victims.
    pub key_error: f64,
    pub key_error_max: f64,
    /// Share of the victims' private K rows decrypted with R_est to cosine >= 0.99.
    pub decrypt_accuracy: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcrustesRow {
    /// The adversary's name (`probe` in report.json, its name there since the first reports).
    #[serde(rename = "probe")]
    pub adversary: String,
    pub layer: usize,
    pub head_dim: usize,
    pub victims: usize,
    pub points: Vec<ProcrustesPoint>,
    #[serde(flatten)]
    pub failures: Failures,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Refusal {
    /// The adversary's name (`probe` in report.json, its name there since the first reports).
    #[serde(rename = "probe")]
    pub adversary: String,
    pub task: String,
    pub reason: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AttackReport {
    pub victims: usize,
    pub reconstruction: Vec<ReconstructionRow>,
    pub membership: Vec<MembershipRow>,
    pub procrustes: Vec<ProcrustesRow>,
    /// Adversaries (or tasks) that could not run, and why.
    pub refused: Vec<Refusal>,
    /// What padding costs, when the padded runs were made.
    pub padding: Option<super::padcost::PadCost>,
}

/// What each experiment grants, least privileged first.
fn experiments(task: Task) -> &'static [(&'static str, &'static [Capability])] {
    match task {
        Task::Reconstruct | Task::Membership => &[("co-tenant", &[]), ("open-weights", &[Capability::ModelOracle])],
        Task::KeyRecovery => &[("known-plaintext", &[Capability::KnownPairs])],
    }
}

/// The runtime adversaries run in: policy sandbox, attack-sized budgets.
pub fn runtime(deadline: Duration) -> Result<Arc<PluginRuntime>> {
    let limits = Limits { deadline, fuel: u64::MAX / 4, memory_bytes: 512 << 20, max_failures: 3 };
    PluginRuntime::new(limits, None).map_err(|e| Error::Eval(format!("the adversary runtime: {e:#}")))
}

/// One victim's observed rows and ground truth at every layer, and its attacker's
/// session.
pub(super) struct Scene {
    /// Rows on every layer are norm-padded (victim's and attacker's).
    padded: bool,
    /// Rows left unpadded because their norm exceeded the calibration.
    pub(super) overflow: u64,
    /// Per layer, per kv head: the victim's rotated rows.
    rows: Vec<Vec<Vec<Vector>>>,
    tokens: Vec<u32>,
    positions: Vec<u32>,
    /// Per layer, per kv head: the attacker's own rows.
    mine: Vec<Vec<Vec<OwnVector>>>,
    candidates: Vec<Vec<u32>>,
    present: Vec<bool>,
    secret_tokens: Vec<u32>,
}

fn scene(lab: &Lab, victim: usize, padded: bool) -> Result<Scene> {
    use rand::Rng;
    // The same candidates with and without padding.
    let rng = &mut rand_chacha::ChaCha8Rng::seed_from_u64(lab.seed ^ 0xa77a ^ (victim as u64) << 8);
    let t = lab.tenants();
    let attacker = (victim + 1) % t;
    let case = &lab.cases[victim];
    let frame = lab.frame_padded(victim, padded)?;
    let mut cache = lab.private_cache(victim, &frame, None)?;
    let mut overflow = cache.take_findings().pad_overflow;
    let offset = lab.prefix.tokens.len();
    let positions: Vec<u32> = (0..case.context.len()).map(|i| (offset + i) as u32).collect();
    let mut rows = Vec::new();
    for layer in 0..lab.layers() {
        let (k, v) = cache.stored_rows(layer, case.context.len())?;
        let (k, v) = (rows_of(&k)?, rows_of(&v)?);
        rows.push(
            k.into_iter()
                .zip(v)
                .map(|(kh, vh)| {
                    kh.into_iter()
                        .zip(vh)
                        .zip(&positions)
                        .map(|((k, v), &position)| Vector { position, k, v })
                        .collect()
                })
                .collect(),
        );
    }

    // Candidates: the victim's own secrets, and four times as many absent ones.
    let present_codes = case.secrets.clone();
    let absent = lab.absent_secrets(4 * present_codes.len().max(1), rng);
    let mut codes: Vec<(String, bool)> =
        present_codes.into_iter().map(|c| (c, true)).chain(absent.into_iter().map(|c| (c, false))).collect();
    codes.shuffle(rng);
    let names = kframe_model::corpus::names();
    let mut session_text = String::new();
    let mut candidates = Vec::new();
    for (code, _) in &codes {
        let name = names[rng.random_range(0..names.len())];
        session_text += &format!(" user secret of {name} {code} .");
        candidates.push(lab.gen.encode(&format!(" {code}"))?);
    }
    // The attacker's session: its own records, then every candidate in a record.
    let mut sent = lab.cases[attacker].context.clone();
    sent.extend(lab.gen.encode(&session_text)?);
    let own_frame = lab.frame_padded(attacker, padded)?;
    let mut own = lab.empty_cache(&own_frame)?;
    lab.gen.model.forward(&sent, &mut own, &own_frame, lab.variant)?;
    overflow += own.take_findings().pad_overflow;
    let mut mine = Vec::new();
    for layer in 0..lab.layers() {
        let (k, v) = own.stored_rows(layer, sent.len())?;
        let (k, v) = (rows_of(&k)?, rows_of(&v)?);
        mine.push(
            k.into_iter()
                .zip(v)
                .map(|(kh, vh)| {
                    kh.into_iter()
                        .zip(vh)
                        .enumerate()
                        .map(|(i, (k, v))| OwnVector {
                            token: sent[i],
                            at: Vector { position: (offset + i) as u32, k, v },
                        })
                        .collect()
                })
                .collect(),
        );
    }
    let secret_tokens: Vec<u32> =
        case.secrets.iter().filter_map(|s| lab.gen.encode(&format!(" {s}")).ok()).flatten().collect();
    Ok(Scene {
        padded,
        overflow,
        rows,
        tokens: case.context.clone(),
        positions,
        mine,
        candidates,
        present: codes.iter().map(|c| c.1).collect(),
        secret_tokens,
    })
}

fn view(lab: &Lab, s: &Scene, task: Task, layer: usize, head: usize) -> View {
    View {
        task,
        // The rows' length: d, or d + m on a padded layer.
        head_dim: s.rows[layer][head].first().map_or(lab.head_dim(), |r| r.k.len()) as u32,
        vocab_size: lab.gen.model.config().vocab_size as u32,
        layer: layer as u32,
        head: head as u32,
        victim: s.rows[layer][head].clone(),
        positions: s.positions.clone(),
        mine: s.mine[layer][head].clone(),
        candidates: s.candidates.clone(),
    }
}

/// What an attacker with the weights computes: the K of every vocabulary token
/// alone, per layer and head, before rotary position (for a lone token it does not
/// depend on position: attention has one key), with rotary position applied per
/// query. One batched decode step per chunk of tokens, at position 0 (where rotary
/// position is the identity).
struct OracleTable {
    /// [layer][head][token] -> K row.
    rows: Vec<Vec<Vec<Vec<f32>>>>,
    inv_freq: Vec<f32>,
}

impl OracleTable {
    fn new(lab: &Lab) -> Result<Self> {
        let model = &lab.gen.model;
        let cfg = model.config();
        let mut rows = vec![vec![Vec::with_capacity(cfg.vocab_size); lab.kv_heads()]; lab.layers()];
        let tokens: Vec<u32> = (0..cfg.vocab_size as u32).collect();
        for chunk in tokens.chunks(512) {
            let mut caches: Vec<_> = chunk.iter().map(|_| model.new_cache(Default::default())).collect();
            let mut seqs: Vec<_> = chunk
                .iter()
                .zip(caches.iter_mut())
                .map(|(token, cache)| Chunk::new(std::slice::from_ref(token), cache, &Frame::Identity))
                .collect();
            model.forward_batch(&mut seqs, lab.variant)?;
            for cache in &caches {
                for (layer, per_layer) in rows.iter_mut().enumerate() {
                    for (head, k) in rows_of(&cache.stored_rows(layer, 1)?.0)?.into_iter().enumerate() {
                        per_layer[head].extend(k);
                    }
                }
            }
        }
        let d = cfg.head_dim;
        // As the model computes its rotary tables: f32 frequencies, f64 angles.
        let inv_freq = (0..d).step_by(2).map(|i| 1f32 / cfg.rope_theta.powf(i as f64 / d as f64) as f32).collect();
        Ok(Self { rows, inv_freq })
    }

    /// K of `q.token` at `q.position` (rotary position applied as the model does:
    /// the two halves of the row rotate together).
    fn query(&self, q: &OracleQuery) -> Vec<f32> {
        let Some(k) =
            self.rows.get(q.layer as usize).and_then(|l| l.get(q.head as usize)).and_then(|h| h.get(q.token as usize))
        else {
            return Vec::new();
        };
        let half = k.len() / 2;
        let mut out = k.clone();
        for i in 0..half {
            let (sin, cos) = (q.position as f64 * self.inv_freq[i] as f64).sin_cos();
            let (sin, cos) = (sin as f32, cos as f32);
            let (a, b) = (k[i], k[i + half]);
            out[i] = a * cos - b * sin;
            out[i + half] = b * cos + a * sin;
        }
        out
    }
}

/// Runs `attack` and keeps count of failures; a quarantined adversary is not called again.
fn call(
    adversary: &mut Adversary,
    view: &View,
    grants: Grants,
    fails: &mut Failures,
    check: impl FnOnce(&Guess) -> std::result::Result<(), String>,
) -> Option<Guess> {
    if fails.quarantined {
        fails.failed_calls += 1;
        return None;
    }
    match adversary.attack(view, grants, check) {
        Ok(g) => Some(g),
        Err(PluginError { failure, .. }) => {
            fails.failed_calls += 1;
            fails.quarantined |= matches!(failure, kframe_policy::Failure::Quarantined { .. });
            fails.first_error.get_or_insert(failure.to_string());
            None
        }
    }
}

pub fn run(lab: &Lab, opts: &AttackOptions, mut progress: impl FnMut(&str)) -> Result<AttackReport> {
    let runtime = runtime(opts.deadline).map_err(|e| crate::error::Error::Eval(format!("{e:#}")))?;
    let victims = opts.victims.clamp(1, lab.tenants());
    progress("building the victims' and attackers' caches");
    let plain: Vec<Scene> = (0..victims).map(|v| scene(lab, v, false)).collect::<Result<_>>()?;
    let padded: Vec<Scene> = match lab.has_padding() {
        true => (0..victims).map(|v| scene(lab, v, true)).collect::<Result<_>>()?,
        false => Vec::new(),
    };
    let runs: Vec<&[Scene]> = [plain.as_slice(), padded.as_slice()].into_iter().filter(|s| !s.is_empty()).collect();
    let mut oracle: Option<Arc<OracleTable>> = None;
    let mut report = AttackReport {
        victims,
        reconstruction: Vec::new(),
        membership: Vec::new(),
        procrustes: Vec::new(),
        refused: Vec::new(),
        padding: None,
    };

    for source in &opts.adversaries {
        // Which tasks it answers: ask with every capability linked.
        // What it answers and what it imports: loaded once with everything linked.
        let first = match Adversary::load(&runtime, &source.name, &source.bytes, &source.config, &Capability::ALL) {
            Ok(p) => p,
            Err(e) => {
                report.refused.push(Refusal {
                    adversary: source.name.clone(),
                    task: "any".into(),
                    reason: e.failure.to_string(),
                });
                continue;
            }
        };
        let about = first.about.clone();
        for task in about.tasks.clone() {
            // The least-privileged experiment whose grants cover its imports.
            let fits = experiments(task).iter().find(|(_, grants)| first.needs.iter().all(|c| grants.contains(c)));
            let Some((experiment, grants)) = fits else {
                // Loading it where the least is granted gives the refusal, worded once.
                let (_, least) = experiments(task)[0];
                let reason = match Adversary::load(&runtime, &source.name, &source.bytes, &source.config, least) {
                    Err(e) => e.failure.to_string(),
                    Ok(_) => "no experiment grants what it imports".into(),
                };
                report.refused.push(Refusal { adversary: about.name.clone(), task: format!("{task:?}"), reason });
                continue;
            };
            let experiment = *experiment;
            let mut adversary = match Adversary::load(&runtime, &source.name, &source.bytes, &source.config, grants) {
                Ok(p) => p,
                Err(e) => {
                    let reason = e.failure.to_string();
                    report.refused.push(Refusal { adversary: about.name.clone(), task: format!("{task:?}"), reason });
                    continue;
                }
            };
            progress(&format!("{} ({experiment}): {task:?}", about.name));
            if adversary.needs.contains(&Capability::ModelOracle) && oracle.is_none() {
                progress("computing the model oracle (K of every token)");
                oracle = Some(Arc::new(OracleTable::new(lab)?));
            }
            let granted_oracle: Option<Oracle> =
                oracle.clone().filter(|_| adversary.needs.contains(&Capability::ModelOracle)).map(|table| {
                    Arc::new(move |queries: &[OracleQuery]| queries.iter().map(|q| table.query(q)).collect()) as Oracle
                });
            let grants = Grants { pairs: Vec::new(), oracle: granted_oracle };
            match task {
                Task::Reconstruct => {
                    for (scenes, layer) in runs.iter().flat_map(|s| (0..lab.layers()).map(move |l| (*s, l))) {
                        let row = reconstruction(lab, scenes, &mut adversary, &grants, layer);
                        report.reconstruction.push(ReconstructionRow {
                            adversary: about.name.clone(),
                            experiment,
                            ..row
                        });
                    }
                }
                Task::Membership => {
                    for (scenes, layer) in runs.iter().flat_map(|s| (0..lab.layers()).map(move |l| (*s, l))) {
                        let row = membership(lab, scenes, &mut adversary, &grants, layer);
                        report.membership.push(MembershipRow { adversary: about.name.clone(), experiment, ..row });
                    }
                }
                Task::KeyRecovery => {
                    report.procrustes.extend(procrustes(lab, &mut adversary, &about.name, opts.key_victims)?);
                }
            }
        }
    }
    if lab.has_padding() {
        progress("measuring what padding costs");
        report.padding = Some(super::padcost::measure(lab, padded.iter().map(|s| s.overflow).sum())?);
    }
    Ok(report)
}

/// Scores one layer of reconstruction over every victim. Guesses about one
/// victim are not independent (its rows share one key, and a token's rows are
/// alike), so the intervals are clustered by victim, and the baseline is the
/// adversary's own guesses shuffled among that victim's positions: what the same
/// guesses would score if they carried no information.
fn reconstruction(
    lab: &Lab,
    scenes: &[Scene],
    adversary: &mut Adversary,
    grants: &Grants,
    layer: usize,
) -> ReconstructionRow {
    let mut fails = Failures::default();
    let (mut correct, mut chance, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sn, mut sc) = (0, 0);
    for s in scenes {
        for head in 0..lab.kv_heads() {
            let v = view(lab, s, Task::Reconstruct, layer, head);
            let want = v.positions.len();
            let check = |g: &Guess| match g {
                Guess::Tokens(t) if t.len() == want => Ok(()),
                Guess::Tokens(t) => Err(format!("{} tokens for {want} positions", t.len())),
                _ => Err("not a token guess".into()),
            };
            let Some(Guess::Tokens(g)) = call(adversary, &v, grants.clone(), &mut fails, check) else { continue };
            let is_secret = |t: &u32| s.secret_tokens.contains(t);
            let mut freq: HashMap<u32, f64> = HashMap::new();
            for t in &g {
                *freq.entry(*t).or_default() += 1.0 / want as f64;
            }
            let mut c = 0.0;
            for (guess, truth) in g.iter().zip(&s.tokens) {
                sn += is_secret(truth) as usize;
                if guess == truth {
                    c += 1.0;
                    sc += is_secret(truth) as usize;
                }
            }
            correct.push(c);
            chance.push(s.tokens.iter().map(|t| freq.get(t).copied().unwrap_or(0.0)).sum::<f64>());
            sizes.push(want as f64);
        }
    }
    let n: f64 = sizes.iter().sum();
    let (accuracy, (lo, hi)) = clustered_rate(&correct, &sizes);
    let ci95 = (lo.max(0.0), hi.min(1.0));
    let excess: Vec<f64> = correct.iter().zip(&chance).map(|(c, b)| c - b).collect();
    let (_, excess_ci) = clustered_rate(&excess, &sizes);
    ReconstructionRow {
        adversary: String::new(),
        experiment: "",
        layer,
        padded: scenes.first().is_some_and(|s| s.padded),
        positions: n as usize,
        correct: correct.iter().sum::<f64>() as usize,
        accuracy,
        ci95,
        baseline: (chance.iter().sum::<f64>() / n.max(1.0)).max(0.0),
        // No answer at all is a failure, not a result at baseline.
        // (Within rounding: guesses that ignore the rows score exactly the baseline.)
        at_baseline: n > 0.0 && excess_ci.0 <= 1e-9 && -1e-9 <= excess_ci.1,
        secret_positions: sn,
        secret_correct: sc,
        failures: fails,
    }
}

/// sum(num) / sum(den) with a 95% interval clustered by unit (the ratio
/// estimator's variance over units).
fn clustered_rate(num: &[f64], den: &[f64]) -> (f64, (f64, f64)) {
    let (total, units) = (den.iter().sum::<f64>(), num.len() as f64);
    if total == 0.0 {
        return (0.0, (0.0, 0.0));
    }
    let rate = num.iter().sum::<f64>() / total;
    if units < 2.0 {
        return (rate, (f64::NEG_INFINITY, f64::INFINITY));
    }
    let ss: f64 = num.iter().zip(den).map(|(x, n)| (x - rate * n).powi(2)).sum();
    let half = 1.96 * (units / (units - 1.0) * ss).sqrt() / total;
    (rate, (rate - half, rate + half))
}

/// Scores one layer of membership over every victim.
fn membership(lab: &Lab, scenes: &[Scene], adversary: &mut Adversary, grants: &Grants, layer: usize) -> MembershipRow {
    let mut fails = Failures::default();
    // Per victim: (scores of present candidates, scores of absent ones).
    let mut by_victim: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    for s in scenes {
        for head in 0..lab.kv_heads() {
            let v = view(lab, s, Task::Membership, layer, head);
            let want = v.candidates.len();
            let check = |g: &Guess| match g {
                Guess::Scores(x) if x.len() == want && x.iter().all(|f| !f.is_nan()) => Ok(()),
                Guess::Scores(x) => Err(format!("{} scores (or NaN) for {want} candidates", x.len())),
                _ => Err("not a score list".into()),
            };
            if let Some(Guess::Scores(x)) = call(adversary, &v, grants.clone(), &mut fails, check) {
                let (pos, neg): (Vec<_>, Vec<_>) = x.iter().zip(&s.present).partition(|(_, &present)| present);
                by_victim.push((pos.into_iter().map(|p| *p.0).collect(), neg.into_iter().map(|n| *n.0).collect()));
            }
        }
    }
    let pool = |victims: &mut dyn Iterator<Item = usize>| {
        let (mut pos, mut neg) = (Vec::new(), Vec::new());
        for i in victims {
            pos.extend_from_slice(&by_victim[i].0);
            neg.extend_from_slice(&by_victim[i].1);
        }
        (pos, neg)
    };
    let (pos, neg) = pool(&mut (0..by_victim.len()));
    let a = auc(&pos, &neg);
    let tpr = tpr_at_fpr(&pos, &neg, 0.001);
    let hits = (tpr * pos.len() as f64).round() as usize;
    MembershipRow {
        adversary: String::new(),
        experiment: "",
        layer,
        padded: scenes.first().is_some_and(|s| s.padded),
        positives: pos.len(),
        negatives: neg.len(),
        auc: a,
        auc_ci95: bootstrap_auc(by_victim.len(), lab.seed, |idx| {
            let (p, n) = pool(&mut idx.iter().copied());
            auc(&p, &n)
        }),
        tpr_at_fpr_0_001: tpr,
        tpr_ci95: wilson95(hits, pos.len()),
        failures: fails,
    }
}

/// 95% percentile interval of a statistic over victims resampled with
/// replacement (candidates of one victim share its key, so victims, not
/// candidates, are the independent units).
fn bootstrap_auc(victims: usize, seed: u64, stat: impl Fn(&[usize]) -> f64) -> (f64, f64) {
    if victims < 2 {
        return (0.0, 1.0);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xb007);
    let mut values: Vec<f64> = (0..400)
        .map(|_| {
            let idx: Vec<usize> = (0..victims).map(|_| rand::Rng::random_range(&mut rng, 0..victims)).collect();
            stat(&idx)
        })
        .collect();
    values.sort_by(|a, b| a.total_cmp(b));
    (values[10], values[389])
}

/// The pair counts of the Procrustes sweep: dense around d, up to 2d.
pub fn sweep(d: usize, max: usize) -> Vec<usize> {
    let mut n: Vec<usize> = [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        d / 2 + d / 4,
        d - 8,
        d - 4,
        d - 2,
        d - 1,
        d,
        d + 1,
        d + 2,
        d + 4,
        d + 8,
        d + d / 4,
        d + d / 2,
        2 * d,
    ]
    .into_iter()
    .filter(|&x| x >= 1 && x <= max.min(2 * d))
    .collect();
    n.sort_unstable();
    n.dedup();
    n
}

fn procrustes(lab: &Lab, adversary: &mut Adversary, name: &str, victims: usize) -> Result<Vec<ProcrustesRow>> {
    let d = lab.head_dim();
    let victims = victims.clamp(1, lab.tenants());
    let prefix = &lab.prefix.cache;
    let mut rows = Vec::new();
    for layer in super::readout::layers(lab.layers()) {
        let head = 0;
        let plain_prefix = rows_of(&prefix.stored_rows(layer, prefix.len())?.0)?.swap_remove(head);
        let grid = sweep(d, plain_prefix.len());
        let mut fails = Failures::default();
        let mut err_sum = vec![0f64; grid.len()];
        let mut err_max = vec![0f64; grid.len()];
        let mut dec_ok = vec![0usize; grid.len()];
        let mut dec_n = 0usize;
        for v in 0..victims {
            let frame = lab.frame(v)?;
            let r = frame
                .layer(layer)
                .expect("tenant frame")
                .matrices()?
                .0
                .get(head)?
                .to_dtype(DType::F64)?
                .to_device(&Device::Cpu)?;
            let r_rows = r.to_vec2::<f64>()?;
            let rotate = |k: &[f32]| -> Vec<f32> {
                r_rows.iter().map(|row| row.iter().zip(k).map(|(a, b)| a * *b as f64).sum::<f64>() as f32).collect()
            };
            // The victim's private rows: rotated (what the attacker decrypts) and plain (truth).
            let mut trace = kframe_model::qwen2::Trace::default();
            let cache = lab.private_cache(v, &frame, Some(&mut trace))?;
            let secret_rot = rows_of(&cache.stored_rows(layer, lab.cases[v].context.len())?.0)?.swap_remove(head);
            let secret_plain = rows_of(&trace.k[layer])?.swap_remove(head);
            dec_n += secret_plain.len();
            for (gi, &n) in grid.iter().enumerate() {
                let pairs: Vec<Pair> =
                    plain_prefix[..n].iter().map(|k| Pair { plain: k.clone(), rotated: rotate(k) }).collect();
                let view = View {
                    task: Task::KeyRecovery,
                    head_dim: d as u32,
                    vocab_size: lab.gen.model.config().vocab_size as u32,
                    layer: layer as u32,
                    head: head as u32,
                    victim: Vec::new(),
                    positions: Vec::new(),
                    mine: Vec::new(),
                    candidates: Vec::new(),
                };
                let check = |g: &Guess| match g {
                    Guess::Rotation(m) if m.len() == d * d && m.iter().all(|x| x.is_finite()) => Ok(()),
                    Guess::Rotation(m) => Err(format!("{} entries (or non-finite) for a {d} x {d} matrix", m.len())),
                    _ => Err("not a rotation".into()),
                };
                let grants = Grants { pairs, oracle: None };
                let Some(Guess::Rotation(est)) = call(adversary, &view, grants, &mut fails, check) else {
                    err_sum[gi] += 1.0;
                    continue;
                };
                let mut diff = 0f64;
                for i in 0..d {
                    for j in 0..d {
                        diff += (est[i * d + j] as f64 - r_rows[i][j]).powi(2);
                    }
                }
                let err = (diff / d as f64).sqrt();
                err_sum[gi] += err;
                err_max[gi] = err_max[gi].max(err);
                // Decrypt: k = R_est^T k'.
                for (rot, plain) in secret_rot.iter().zip(&secret_plain) {
                    let k: Vec<f32> = (0..d).map(|j| (0..d).map(|i| est[i * d + j] * rot[i]).sum()).collect();
                    dec_ok[gi] += (super::stats::cosine(&k, plain) >= 0.99) as usize;
                }
            }
        }
        let points = grid
            .iter()
            .enumerate()
            .map(|(gi, &n)| ProcrustesPoint {
                pairs: n,
                key_error: err_sum[gi] / victims as f64,
                key_error_max: err_max[gi],
                decrypt_accuracy: dec_ok[gi] as f64 / dec_n.max(1) as f64,
            })
            .collect();
        rows.push(ProcrustesRow { adversary: name.to_owned(), layer, head_dim: d, victims, points, failures: fails });
    }
    Ok(rows)
}

#[cfg(all(test, feature = "embedded-model"))]
mod tests {
    use super::*;
    use kframe_model::load::ModelDir;
    use kframe_model::qwen2::Trace;
    use kframe_model::rounding::{Reductions, F32_UNIT};
    use kframe_model::ModelBundle;

    #[test]
    fn the_oracle_gives_the_layer_zero_k_a_token_has_at_any_position() {
        let gen = ModelBundle::load(&ModelDir::embedded().unwrap(), DType::F32, &Device::Cpu).unwrap();
        let lab = Lab::new(&gen, "embedded", 2, 4, 1).unwrap();
        let table = OracleTable::new(&lab).unwrap();
        let mut trace = Trace::default();
        lab.private_cache(0, &Frame::Identity, Some(&mut trace)).unwrap();
        let rows = rows_of(&trace.k[0]).unwrap().swap_remove(0);
        let offset = lab.prefix.tokens.len();
        // The oracle's row comes from a batch of single tokens, the model's from a
        // prefill: two f32 evaluations of layer 0's norm and k projection, then
        // RoPE's two-term rotation, each in its own summation order.
        let cfg = gen.model.config();
        let chain = Reductions::to_kv_rows(cfg, 0, 1).then(Reductions::of(2));
        for (i, row) in rows.iter().enumerate() {
            let q = OracleQuery { token: lab.cases[0].context[i], position: (offset + i) as u32, layer: 0, head: 0 };
            let k = table.query(&q);
            let worst = k.iter().zip(row).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) as f64;
            let norm = row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let bound = chain.bound_between(F32_UNIT, norm);
            assert!(worst <= bound, "position {}: max |oracle - model| = {worst:e}, bound {bound:e}", offset + i);
        }
        let outside = OracleQuery { token: u32::MAX, position: 0, layer: 0, head: 0 };
        assert!(table.query(&outside).is_empty());
    }
}
