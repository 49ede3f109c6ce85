//! report.md and the figures, from a [`Report`].

use super::attack::AttackReport;
use super::matched::MatchedReport;
use super::plot;
use super::readout::ReadoutReport;
use super::wrong_key::{SpotCheckReport, WrongKeyReport};
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// Everything `report.json` holds. Sections not run are absent.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub schema: u32,
    pub model: String,
    pub machine: String,
    pub seed: u64,
    pub tenants: usize,
    pub records: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub kv_heads: usize,
    pub prefix_tokens: usize,
    /// Wall-clock seconds per experiment.
    pub seconds: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<MatchedReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wrong_key: Option<WrongKeyReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readout: Option<ReadoutReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spot_check: Option<SpotCheckReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attack: Option<AttackReport>,
    /// Figure files, relative to the report.
    pub figures: Vec<String>,
}
use std::fmt::Write;
use std::path::Path;

/// Draws every figure the report has data for; returns their file names.
pub fn figures(r: &Report, dir: &Path, cosines: Option<&[f64]>) -> Result<Vec<String>> {
    let caption = |what: &str| format!("{what}: {}, {} tenants, seed {}, {}", r.model, r.tenants, r.seed, r.machine);
    let mut files = Vec::new();
    let fail = |e: Box<dyn std::error::Error + Send + Sync>| Error::Eval(format!("drawing a figure: {e}"));
    if let (Some(cos), Some(readout)) = (cosines, &r.readout) {
        files.extend(plot::readout(dir, &caption("cross-key readout"), cos, readout.head_dim).map_err(fail)?);
    }
    if let Some(attack) = r.attack.as_ref().filter(|a| !a.procrustes.is_empty()) {
        files.extend(plot::procrustes(dir, &caption("known-plaintext Procrustes"), &attack.procrustes).map_err(fail)?);
    }
    if let (Some(m), Some(w)) = (&r.matched, &r.wrong_key) {
        let largest = w.by_tenants.last().expect("at least one group");
        let bars = vec![
            ("matched key".to_owned(), m.recalled, m.tenants),
            (format!("wrong key (T={})", largest.tenants), largest.recovered, largest.tenants),
            ("no context".to_owned(), largest.no_context_recovered, largest.tenants),
        ];
        files.extend(plot::recall(dir, &caption("secret recall"), &bars).map_err(fail)?);
    }
    Ok(files.iter().filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).collect())
}

fn verdict(ok: bool, why_not: impl FnOnce() -> String) -> String {
    if ok {
        "reproduced".into()
    } else {
        format!("**not reproduced**: {}", why_not())
    }
}

/// The published claims (the source paper's abstract) next to kframe's figures.
fn claims(r: &Report, s: &mut String) {
    let d = r.head_dim;
    s.push_str("## Published claims next to kframe's figures\n\n");
    s.push_str("| Published claim | Published figure | kframe, measured here | Verdict |\n|---|---|---|---|\n");
    let mut row = |claim: &str, published: &str, measured: String, verdict: String| {
        let _ = writeln!(s, "| {claim} | {published} | {measured} | {verdict} |");
    };
    if let Some(m) = &r.matched {
        row(
            "Matched keys scale on the shared-prefill pipeline, bit-exact K recovery",
            "1000/1000 PASS-CLEAN",
            format!(
                "{}/{} PASS-CLEAN ({} bit-exact, {} identical to the unrotated run, {} recalled while the unrotated run recalled {}, {} isolation events); {}/{} with recall equal to the unrotated run's",
                m.pass_clean, m.tenants, m.bit_exact, m.identical_to_identity, m.recalled, m.identity_recalled, m.isolation_events, m.pass_clean_vs_identity, m.tenants
            ),
            verdict(m.pass_clean == m.tenants, || m.failures.join("; ")),
        );
    }
    if let Some(w) = &r.wrong_key {
        let text: Vec<String> = w
            .by_tenants
            .iter()
            .map(|g| {
                format!(
                    "T={}: {}/{} (95% upper {:.4}; no context {})",
                    g.tenants, g.recovered, g.tenants, g.upper95, g.no_context_recovered
                )
            })
            .collect();
        let bleed: usize = w.by_tenants.iter().map(|g| g.bleed).sum();
        let clean = w.by_tenants.iter().all(|g| g.recovered == 0) && bleed == 0;
        row(
            "Wrong-key isolation: zero content recovery, no bleed to neighbours",
            "0 recovered, T = 2 to 1000",
            format!("{}; bleed {bleed}", text.join("; ")),
            verdict(clean, || {
                format!("{} recovered, {bleed} bleed", w.by_tenants.iter().map(|g| g.recovered).sum::<usize>())
            }),
        );
    }
    if let Some(x) = &r.readout {
        row(
            "Cross-tenant readout matches the 1/sqrt(d) concentration scale",
            "20,000 pairs at T=1000",
            format!(
                "{} pairs: mean {:+.5}, std ratio {:.4}, max {:.4}; KS vs N(0,1/d) {:.5} (p {:.3}) over all samples, {:.5} (p {:.3}) over one per distinct pair",
                x.pairs, x.mean, x.std_ratio, x.max_cos, x.ks, x.ks_p, x.ks_distinct, x.ks_distinct_p
            ),
            verdict((x.std_ratio - 1.0).abs() < 0.05, || format!("std ratio {:.3}", x.std_ratio)),
        );
    }
    if let Some(sc) = &r.spot_check {
        row(
            "Behavioural spot-check of the highest-cosine pairs (the maximum included): zero recovery",
            "40 pairs, 0 recovered",
            format!("{} pairs, {} recovered (95% upper {:.3})", sc.pairs, sc.recovered, sc.upper95),
            verdict(sc.recovered == 0, || format!("{} recovered", sc.recovered)),
        );
    }
    if let Some(a) = &r.attack {
        // Adversaries that answered nothing are listed in the attack section, not judged here.
        let co: Vec<_> =
            a.reconstruction.iter().filter(|x| x.experiment == "co-tenant" && !x.padded && x.positions > 0).collect();
        if !co.is_empty() {
            let text: Vec<String> = co
                .iter()
                .map(|x| format!("{} layer {}: {:.4} vs baseline {:.4}", x.adversary, x.layer, x.accuracy, x.baseline))
                .collect();
            let beaten: Vec<String> = co
                .iter()
                .filter(|x| !x.at_baseline && x.accuracy > x.baseline)
                .map(|x| {
                    format!(
                        "{} recovers {:.1}% of tokens at layer {} (baseline {:.1}%)",
                        x.adversary,
                        100.0 * x.accuracy,
                        x.layer,
                        100.0 * x.baseline
                    )
                })
                .collect();
            row(
                "Co-tenant reconstruction (no weights, no pairs) sits at the random baseline",
                "at baseline",
                text.join("; "),
                verdict(beaten.is_empty(), || beaten.join("; ")),
            );
        }
        let mem: Vec<_> =
            a.membership.iter().filter(|x| x.experiment == "co-tenant" && !x.padded && x.positives > 0).collect();
        if !mem.is_empty() {
            let text: Vec<String> = mem
                .iter()
                .map(|x| {
                    format!(
                        "{} layer {}: AUC {:.3} [{:.3}, {:.3}]",
                        x.adversary, x.layer, x.auc, x.auc_ci95.0, x.auc_ci95.1
                    )
                })
                .collect();
            let beaten: Vec<String> = mem
                .iter()
                .filter(|x| x.auc_ci95.0 > 0.5)
                .map(|x| format!("{} reaches AUC {:.3} at layer {}", x.adversary, x.auc, x.layer))
                .collect();
            row(
                "Membership inference is at chance",
                "AUC 0.5",
                text.join("; "),
                verdict(beaten.is_empty(), || beaten.join("; ")),
            );
        }
        let padded: Vec<_> = a.reconstruction.iter().filter(|x| x.padded && x.positions > 0).collect();
        if let (false, Some(cost)) = (padded.is_empty(), &a.padding) {
            let beaten: Vec<String> = padded
                .iter()
                .filter(|x| !x.at_baseline && x.accuracy > x.baseline)
                .map(|x| {
                    format!(
                        "{} ({}) {:.1}% at layer {} (baseline {:.1}%)",
                        x.adversary,
                        x.experiment,
                        100.0 * x.accuracy,
                        x.layer,
                        100.0 * x.baseline
                    )
                })
                .collect();
            row(
                "kframe: with norm padding, no co-tenant or open-weights adversary beats the baseline",
                "(not in the paper)",
                format!(
                    "{} adversary-layer rows, {} above baseline; cost: memory x{:.2} per padded layer, decode x{:.2}",
                    padded.len(),
                    beaten.len(),
                    cost.layer_memory_ratio,
                    cost.decode_ratio
                ),
                verdict(beaten.is_empty(), || beaten.join("; ")),
            );
        }
        if !a.procrustes.is_empty() {
            let found: Vec<(usize, Option<usize>)> = a
                .procrustes
                .iter()
                .map(|p| (p.layer, p.points.iter().find(|q| q.key_error < 1e-3).map(|q| q.pairs)))
                .collect();
            let text: Vec<String> = found
                .iter()
                .map(|(l, n)| match n {
                    Some(n) => format!("layer {l}: error < 1e-3 from n = {n}"),
                    None => format!("layer {l}: never below 1e-3"),
                })
                .collect();
            let near_d = found.iter().all(|(_, n)| n.is_some_and(|n| n + 8 >= d && n <= d + 8));
            row(
                "A known-plaintext attacker recovers the key by orthogonal Procrustes",
                "about d (128) pairs",
                format!("d = {d}; {}", text.join("; ")),
                verdict(near_d, || text.join("; ")),
            );
        }
    }
    s.push('\n');
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# kframe isolation eval\n");
    let _ = writeln!(
        s,
        "- model: {}\n- machine: {}\n- tenants: {}, records each: {}, seed: {}\n- head_dim d = {}, layers {}, kv heads {}; shared public prefix of {} tokens (`shared-plain`)\n- wall clock: {}\n",
        r.model,
        r.machine,
        r.tenants,
        r.records,
        r.seed,
        r.head_dim,
        r.layers,
        r.kv_heads,
        r.prefix_tokens,
        r.seconds.iter().map(|(k, v)| format!("{k} {v:.1} s")).collect::<Vec<_>>().join(", ")
    );
    claims(r, &mut s);
    if let Some(m) = &r.matched {
        let _ = writeln!(s, "## matched\n\nPASS-CLEAN = K and V of every layer recovered bit-exact with the tenant's key, greedy output identical to the identity-frame run, secret recalled, no isolation event (every block verified: {} block checks).\n", m.blocks_verified);
        let _ = writeln!(s, "| tenants | PASS-CLEAN | bit-exact tenants | identical to identity | recalled | identity recalled | bit-exact elements | max abs err |\n|---|---|---|---|---|---|---|---|");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} of {} | {:e} |\n",
            m.tenants,
            m.pass_clean,
            m.bit_exact,
            m.identical_to_identity,
            m.recalled,
            m.identity_recalled,
            m.round_trip_bit_exact_elements,
            m.round_trip_elements,
            m.round_trip_max_abs_err
        );
        for f in &m.failures {
            let _ = writeln!(s, "- failed: {f}");
        }
        if !m.failures.is_empty() {
            s.push('\n');
        }
    }
    if let Some(w) = &r.wrong_key {
        let _ = writeln!(s, "## wrong-key\n\nTenant i asks tenant i+1's question over tenant i+1's cache with its own key (the rotation alone: verification off). Each read decodes in one batch with matched sequences, which must not change (bleed).\n");
        let _ = writeln!(s, "| T | recovered | 95% upper bound | no-context baseline | bleed |\n|---|---|---|---|---|");
        for g in &w.by_tenants {
            let _ = writeln!(
                s,
                "| {} | {} | {:.4} | {} | {} |",
                g.tenants, g.recovered, g.upper95, g.no_context_recovered, g.bleed
            );
        }
        s.push('\n');
    }
    if let Some(x) = &r.readout {
        let _ = writeln!(s, "## readout\n\ncos(k, R_a^T R_b k) for {} sampled off-diagonal (reader a, writer b) pairs, each with a real K row, at layers {:?}.\n", x.pairs, x.layers);
        let _ = writeln!(s, "| mean | std | 1/sqrt(d) | std ratio | max | max pair (reader, writer, layer, head) | KS vs N(0,1/d) | KS vs exact law | distinct pairs | KS, one sample per pair |\n|---|---|---|---|---|---|---|---|---|---|");
        let p = &x.max_pair;
        let _ = writeln!(
            s,
            "| {:+.6} | {:.6} | {:.6} | {:.4} | {:.4} | ({}, {}, {}, {}) | {:.5} (p {:.3}) | {:.5} (p {:.3}) | {} | {:.5} (p {:.3}) |\n",
            x.mean,
            x.std,
            1.0 / (x.head_dim as f64).sqrt(),
            x.std_ratio,
            x.max_cos,
            p.reader,
            p.writer,
            p.layer,
            p.head,
            x.ks,
            x.ks_p,
            x.ks_exact,
            x.ks_exact_p,
            x.distinct_pairs,
            x.ks_distinct,
            x.ks_distinct_p
        );
        let _ = writeln!(s, "The exact law of a cosine to a uniformly random direction is (1 + cos)/2 ~ Beta((d-1)/2, (d-1)/2): variance exactly 1/d, tails slightly lighter than the normal's. With very many pairs the KS test can tell the two apart; the exact-law column is the sharper test of \"the readout is a random direction\". Samples that share a (reader, writer) pair share one key pair, and real K rows share directions, so they are correlated: with few tenants the all-sample KS rejects for that reason alone, and the last column (one sample per distinct pair) is the test with independent samples.\n");
    }
    if let Some(sc) = &r.spot_check {
        let _ = writeln!(s, "## spot-check\n\nThe {} highest-cosine distinct pairs of the readout, the maximum first, written to `{}` before any was run, each run as a wrong-key read: {} recovered (95% upper bound {:.3}).\n", sc.pairs, sc.source, sc.recovered, sc.upper95);
    }
    if let Some(a) = &r.attack {
        let _ = writeln!(s, "## attack\n\nAdversaries are Wasm components (`kframe:probe/adversary`); the host scores their guesses. {} victims; each victim's attacker is its neighbour tenant, whose session holds its own records and one record per membership candidate (the victim's real secrets among four times as many others), so \"secrets recovered\" counts secrets the attacker had itself sent among decoys. The baseline is the adversary's own guesses shuffled among each victim's positions. Rows and candidates of one victim share its key, so victims are the independent units: reconstruction intervals are clustered by victim, AUC intervals bootstrap the victims.\n", a.victims);
        let _ = writeln!(s, "### Reconstruction\n\n| adversary | experiment | layer | accuracy [95% CI] | chance baseline | at baseline | secrets recovered | failed calls |\n|---|---|---|---|---|---|---|---|");
        for x in &a.reconstruction {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.4} [{:.4}, {:.4}] | {:.4} | {} | {}/{} | {} |",
                x.adversary,
                x.experiment,
                x.layer,
                x.accuracy,
                x.ci95.0,
                x.ci95.1,
                x.baseline,
                match (x.at_baseline, x.accuracy > x.baseline) {
                    (true, _) => "yes",
                    (false, true) => "**above**",
                    (false, false) => "below",
                },
                x.secret_correct,
                x.secret_positions,
                x.failures
            );
        }
        let _ = writeln!(s, "\n### Membership\n\n| adversary | experiment | layer | positives / negatives | AUC [95% CI] | TPR at 0.1% FPR [95% CI] | failed calls |\n|---|---|---|---|---|---|---|");
        for x in &a.membership {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} / {} | {:.3} [{:.3}, {:.3}] | {:.3} [{:.3}, {:.3}] | {} |",
                x.adversary,
                x.experiment,
                x.layer,
                x.positives,
                x.negatives,
                x.auc,
                x.auc_ci95.0,
                x.auc_ci95.1,
                x.tpr_at_fpr_0_001,
                x.tpr_ci95.0,
                x.tpr_ci95.1,
                x.failures
            );
        }
        if let Some(cost) = &a.padding {
            padding_section(&mut s, a, cost);
        }
        for p in &a.procrustes {
            let _ = writeln!(s, "\n### Known-plaintext: {} at layer {} (d = {}, {} victims)\n\n| pairs n | key error (mean) | key error (max) | rows decrypted |\n|---|---|---|---|", p.adversary, p.layer, p.head_dim, p.victims);
            for q in &p.points {
                let _ = writeln!(
                    s,
                    "| {} | {:.3e} | {:.3e} | {:.3} |",
                    q.pairs, q.key_error, q.key_error_max, q.decrypt_accuracy
                );
            }
            if let Some(e) = &p.failures.first_error {
                let _ = writeln!(s, "\n{} failed calls: {e}", p.failures.failed_calls);
            }
        }
        if !a.refused.is_empty() {
            let _ = writeln!(s, "\n### Adversaries not run\n");
            for x in &a.refused {
                let _ = writeln!(s, "- {} ({}): {}", x.adversary, x.task, x.reason);
            }
        }
        s.push('\n');
    }
    if !r.figures.is_empty() {
        let _ = writeln!(s, "## Figures\n");
        for f in r.figures.iter().filter(|f| f.ends_with(".svg")) {
            let _ = writeln!(s, "![{f}]({f})");
        }
    }
    s
}

/// Recovery per adversary and layer without and with norm padding, then its cost.
fn padding_section(s: &mut String, a: &super::attack::AttackReport, cost: &super::padcost::PadCost) {
    let _ = writeln!(s, "\n### Norm padding: recovery without and with\n\nThe same victims, attackers and candidates, once on unpadded caches and once with every layer norm-padded (m = {} extra dimensions, every row brought to its layer's calibrated norm). Chance is the adversary's own guesses shuffled within each victim; \"at chance\" means the 95% interval of accuracy minus chance holds 0.\n\n| adversary | experiment | layer | unpadded [95% CI] (chance) | padded [95% CI] (chance) | padded at chance |\n|---|---|---|---|---|---|", cost.extra);
    let cell = |x: &super::attack::ReconstructionRow| {
        format!("{:.4} [{:.4}, {:.4}] ({:.4})", x.accuracy, x.ci95.0, x.ci95.1, x.baseline)
    };
    for x in a.reconstruction.iter().filter(|x| !x.padded) {
        let with = a
            .reconstruction
            .iter()
            .find(|y| y.padded && y.adversary == x.adversary && y.experiment == x.experiment && y.layer == x.layer);
        let Some(y) = with else { continue };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            x.adversary,
            x.experiment,
            x.layer,
            cell(x),
            cell(y),
            if y.at_baseline { "yes" } else { "**no**" }
        );
    }
    let _ = writeln!(s, "\n| membership adversary | experiment | layer | unpadded AUC [95% CI] | padded AUC [95% CI] |\n|---|---|---|---|---|");
    for x in a.membership.iter().filter(|x| !x.padded) {
        let with = a
            .membership
            .iter()
            .find(|y| y.padded && y.adversary == x.adversary && y.experiment == x.experiment && y.layer == x.layer);
        let Some(y) = with else { continue };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} [{:.3}, {:.3}] | {:.3} [{:.3}, {:.3}] |",
            x.adversary, x.experiment, x.layer, x.auc, x.auc_ci95.0, x.auc_ci95.1, y.auc, y.auc_ci95.0, y.auc_ci95.1
        );
    }
    let _ = writeln!(
        s,
        "\nCost: a padded layer stores (d + m) / d = {:.3}x the bytes (d = {}); the whole cache {:.3}x with layer 0 padded (the default depth gate) and {:.3}x with every layer padded. Decode, {} tenants in one batch, every layer padded vs none: {:.1} vs {:.1} tok/s, ratio {:.3} (fastest of 5 alternating timings each). Rows over the calibrated norm (left unpadded, reported, never clipped): {}.",
        cost.layer_memory_ratio,
        cost.head_dim,
        cost.cache_memory_ratio_layer0,
        cost.cache_memory_ratio_all,
        cost.batch,
        cost.decode_tok_s_padded,
        cost.decode_tok_s_unpadded,
        cost.decode_ratio,
        cost.overflow
    );
}
