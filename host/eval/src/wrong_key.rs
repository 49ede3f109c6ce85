//! `wrong-key`: tenant i asks tenant j's question over j's cache with i's own key.
//! Content recovery = the answer is j's secret. Verification is off on these
//! caches, so this measures the rotation alone (with the corrective layer on,
//! every foreign block would be masked before attention and nothing could leak).
//! Each wrong-key sequence decodes in one batch with the matched sequences of the
//! same tenants, whose output must equal their solo output (no bleed).
//!
//! `spot-check` runs the same reads for chosen (reader, writer) pairs: the
//! highest-cosine pairs of the readout experiment.

use super::lab::{Lab, Run};
use super::matched::CHUNK;
use crate::error::Result;
use kframe_core::rotation::Frame;

#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupReport {
    pub tenants: usize,
    /// Wrong-key reads that produced the writer's secret.
    pub recovered: usize,
    /// Rule-of-three / normal 95% upper bound on the recovery rate.
    pub upper95: f64,
    /// The same tenants' questions with no records at all: the chance baseline.
    pub no_context_recovered: usize,
    /// Matched sequences in the same batches whose output changed.
    pub bleed: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WrongKeyReport {
    pub by_tenants: Vec<GroupReport>,
}

/// Whether reader `r`, decoding over writer `w`'s cache with its own key, gets
/// `w`'s secret; for many pairs at once.
fn reads(lab: &Lab, pairs: &[(usize, usize)], matched: Option<&[Vec<u32>]>) -> Result<(Vec<bool>, usize)> {
    let mut recovered = Vec::with_capacity(pairs.len());
    let mut bleed = 0;
    for chunk in pairs.chunks(CHUNK) {
        let readers: Vec<Frame> = chunk.iter().map(|&(r, _)| lab.frame(r)).collect::<Result<_>>()?;
        let mut runs = Vec::with_capacity(2 * chunk.len());
        for (&(_, w), reader) in chunk.iter().zip(&readers) {
            let mut cache = lab.private_cache(w, &lab.frame(w)?, None)?;
            cache.set_verify(Vec::new());
            runs.push(Run { cache, frame: reader, question: &lab.cases[w].question, tokens: lab.gen_tokens(w) });
        }
        if matched.is_some() {
            for (&(r, _), reader) in chunk.iter().zip(&readers) {
                let cache = lab.private_cache(r, reader, None)?;
                runs.push(Run { cache, frame: reader, question: &lab.cases[r].question, tokens: lab.gen_tokens(r) });
            }
        }
        let (tokens, _) = lab.answer_batch(&mut runs)?;
        for (slot, &(r, w)) in chunk.iter().enumerate() {
            recovered.push(lab.recalls(w, &tokens[slot]));
            if let Some(matched) = matched {
                bleed += (tokens[chunk.len() + slot] != matched[r]) as usize;
            }
        }
    }
    Ok((recovered, bleed))
}

/// Whether each tenant's question alone (after the public prefix, no records)
/// gets its secret.
pub fn no_context(lab: &Lab, n: usize) -> Result<Vec<bool>> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(CHUNK) {
        let frames: Vec<Frame> = chunk.iter().map(|&i| lab.frame(i)).collect::<Result<_>>()?;
        let mut runs = Vec::with_capacity(chunk.len());
        for (&i, frame) in chunk.iter().zip(&frames) {
            let cache = lab.empty_cache(frame)?;
            runs.push(Run { cache, frame, question: &lab.cases[i].question, tokens: lab.gen_tokens(i) });
        }
        let (tokens, _) = lab.answer_batch(&mut runs)?;
        out.extend(chunk.iter().zip(&tokens).map(|(&i, t)| lab.recalls(i, t)));
    }
    Ok(out)
}

/// Group sizes {2, 10, 100, 1000, ...} up to the population, and the population itself.
pub fn group_sizes(tenants: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = [2, 10, 100, 1000, 10_000].into_iter().filter(|&s| s < tenants).collect();
    sizes.push(tenants);
    sizes
}

pub fn run(lab: &Lab, matched: &[Vec<u32>], mut progress: impl FnMut(usize)) -> Result<WrongKeyReport> {
    let baseline = no_context(lab, lab.tenants())?;
    let mut by_tenants = Vec::new();
    for n in group_sizes(lab.tenants()) {
        let pairs: Vec<(usize, usize)> = (0..n).map(|i| (i, (i + 1) % n)).collect();
        let (recovered, bleed) = reads(lab, &pairs, Some(matched))?;
        let hits = recovered.iter().filter(|&&r| r).count();
        by_tenants.push(GroupReport {
            tenants: n,
            recovered: hits,
            upper95: crate::stats::upper95(hits, n),
            no_context_recovered: baseline[..n].iter().filter(|&&r| r).count(),
            bleed,
        });
        progress(n);
    }
    Ok(WrongKeyReport { by_tenants })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SpotCheckReport {
    pub pairs: usize,
    pub recovered: usize,
    pub upper95: f64,
    /// Where the pairs came from (the readout's pre-registered list).
    pub source: String,
}

/// Runs each (reader, writer) pair as a wrong-key read.
pub fn spot_check(lab: &Lab, pairs: &[(usize, usize)], source: &str) -> Result<SpotCheckReport> {
    let (recovered, _) = reads(lab, pairs, None)?;
    let hits = recovered.iter().filter(|&&r| r).count();
    Ok(SpotCheckReport {
        pairs: pairs.len(),
        recovered: hits,
        upper95: crate::stats::upper95(hits, pairs.len()),
        source: source.to_owned(),
    })
}
