//! The simplest adversary worth writing: it ignores the victim's vectors and
//! guesses, at every position, the token it sent most often itself. It answers
//! `reconstruct` with no capability at all, so kframe runs it as a co-tenant; its
//! score is what "knowing the language, not the victim" is worth.
//!
//! Copy this crate to start your own: implement `Adversary`, list the tasks you
//! answer in `about`, and import a capability (`known_pairs::pairs()` or
//! `model_oracle::plain_k(..)`) only if your attack needs it; kframe runs it only
//! in experiments that grant what it imports.
use kframe_policy_sdk::{register_adversary, About, Adversary, Guess, Task, View};
// A BTreeMap, not a HashMap: std's HashMap seeds itself from the host's randomness,
// which kframe's sandbox does not grant (the call would trap).
use std::collections::BTreeMap;

#[derive(Default)]
struct MostFrequent;

impl Adversary for MostFrequent {
    fn about(&self) -> About {
        About { name: "most-frequent".into(), tasks: vec![Task::Reconstruct] }
    }

    fn attack(&mut self, view: View) -> Result<Guess, String> {
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for row in &view.mine {
            *counts.entry(row.token).or_default() += 1;
        }
        let (&token, _) =
            counts.iter().max_by_key(|(t, n)| (**n, std::cmp::Reverse(**t))).ok_or("no session of its own")?;
        Ok(Guess::Tokens(vec![token; view.positions.len()]))
    }
}

register_adversary!(MostFrequent);
