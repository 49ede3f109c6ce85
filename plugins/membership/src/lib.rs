//! Co-tenant membership inference by direction: a candidate secret scores by how
//! closely any victim row points the same way as the attacker's own rows for that
//! candidate (it sent every candidate in its own session). Across two frames the
//! best cosine is a maximum of noise, so the AUC should be 0.5. Norms are the
//! other channel; `norm-match` answers membership from them.
use kframe_policy_sdk::{cosine, register_adversary, About, Adversary, Guess, Task, View};

#[derive(Default)]
struct Membership;

impl Adversary for Membership {
    fn about(&self) -> About {
        About { name: "membership".into(), tasks: vec![Task::Membership] }
    }

    fn attack(&mut self, view: View) -> Result<Guess, String> {
        let scores = view
            .candidates
            .iter()
            .map(|cand| {
                let Some(first) = cand.first() else { return 0.0 };
                view.mine
                    .iter()
                    .filter(|o| o.token == *first)
                    .flat_map(|o| view.victim.iter().map(move |v| cosine(&o.at.k, &v.k)))
                    .fold(-1.0, f32::max)
            })
            .collect();
        Ok(Guess::Scores(scores))
    }
}

register_adversary!(Membership);
