//! Co-tenant reconstruction and membership from vector norms alone. Any
//! orthonormal rotation keeps a vector's length, and at the first layer a K (or V)
//! row depends only on its token (rotary position keeps length too), so the pair
//! (|k|, |v|) of a victim row names its token whenever the attacker has sent the
//! same token itself. Deeper layers mix in context, and the match weakens.
//!
//! - reconstruct: each victim row gets the token of the attacker's own row with
//!   the nearest (|k|, |v|).
//! - membership: a candidate scores high when some victim row's norms lie close to
//!   the norms the attacker saw for that candidate in its own session.
use kframe_policy_sdk::{norm, register_adversary, About, Adversary, Guess, Task, View};

#[derive(Default)]
struct NormMatch;

/// Relative distance between two (|k|, |v|) pairs.
fn distance(a: (f32, f32), b: (f32, f32)) -> f32 {
    let rel = |x: f32, y: f32| (x - y).abs() / x.abs().max(y.abs()).max(1e-12);
    rel(a.0, b.0) + rel(a.1, b.1)
}

impl Adversary for NormMatch {
    fn about(&self) -> About {
        About { name: "norm-match".into(), tasks: vec![Task::Reconstruct, Task::Membership] }
    }

    fn attack(&mut self, view: View) -> Result<Guess, String> {
        let own: Vec<((f32, f32), u32)> = view.mine.iter().map(|o| ((norm(&o.at.k), norm(&o.at.v)), o.token)).collect();
        if own.is_empty() {
            return Err("no rows of its own to match against".into());
        }
        let victim: Vec<(u32, (f32, f32))> =
            view.victim.iter().map(|v| (v.position, (norm(&v.k), norm(&v.v)))).collect();
        let nearest = |x: (f32, f32)| {
            own.iter().map(|(n, t)| (distance(x, *n), *t)).min_by(|a, b| a.0.total_cmp(&b.0)).map(|p| p.1).unwrap_or(0)
        };
        match view.task {
            kframe_policy_sdk::Task::Reconstruct => {
                let mut guesses = Vec::with_capacity(view.positions.len());
                for &pos in &view.positions {
                    let x = victim.iter().find(|v| v.0 == pos).ok_or(format!("no victim row at {pos}"))?.1;
                    guesses.push(nearest(x));
                }
                Ok(Guess::Tokens(guesses))
            }
            kframe_policy_sdk::Task::Membership => {
                let scores = view
                    .candidates
                    .iter()
                    .map(|cand| {
                        // The norms the attacker saw for the candidate's first token.
                        let Some(first) = cand.first() else { return 0.0 };
                        let seen: Vec<(f32, f32)> = own.iter().filter(|(_, t)| t == first).map(|(n, _)| *n).collect();
                        let best = seen
                            .iter()
                            .flat_map(|s| victim.iter().map(move |(_, x)| distance(*s, *x)))
                            .fold(f32::INFINITY, f32::min);
                        if best.is_finite() {
                            -best
                        } else {
                            -1e9
                        }
                    })
                    .collect();
                Ok(Guess::Scores(scores))
            }
            other => Err(format!("not asked for {other:?}")),
        }
    }
}

register_adversary!(NormMatch);
