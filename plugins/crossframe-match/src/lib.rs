//! Co-tenant reconstruction without weights or known pairs: guesses each victim
//! token as the token of the attacker's own row that points the most the same way
//! (highest cosine of K, then V). Rows in two different frames point in unrelated
//! directions, so this adversary should sit at the random baseline; if it does
//! not, the frames leak direction.
use kframe_policy_sdk::{cosine, register_adversary, About, Adversary, Guess, Task, View};

#[derive(Default)]
struct CrossframeMatch;

impl Adversary for CrossframeMatch {
    fn about(&self) -> About {
        About { name: "crossframe-match".into(), tasks: vec![Task::Reconstruct] }
    }

    fn attack(&mut self, view: View) -> Result<Guess, String> {
        if view.mine.is_empty() {
            return Err("no rows of its own to match against".into());
        }
        let mut guesses = Vec::with_capacity(view.positions.len());
        for &pos in &view.positions {
            let victim = view.victim.iter().find(|v| v.position == pos).ok_or(format!("no victim row at {pos}"))?;
            let best = view
                .mine
                .iter()
                .map(|o| (cosine(&victim.k, &o.at.k) + cosine(&victim.v, &o.at.v), o.token))
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, token)| token)
                .unwrap_or(0);
            guesses.push(best);
        }
        Ok(Guess::Tokens(guesses))
    }
}

register_adversary!(CrossframeMatch);
