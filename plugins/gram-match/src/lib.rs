//! Co-tenant reconstruction from inner products. A rotation keeps every inner
//! product between two rows of one frame, and with rotary position the product of
//! neighbouring rows depends only on their two tokens (their distance is fixed),
//! so the Gram entries of adjacent rows, (|k_i|, |k_i+1|, k_i . k_i+1) and the same
//! for V, fingerprint a bigram. Each victim bigram votes for the tokens of the
//! attacker's own bigram nearest to it; where norms alone collide, the neighbour
//! disambiguates.
use kframe_policy_sdk::{register_adversary, About, Adversary, Guess, Task, Vector, View};

#[derive(Default)]
struct GramMatch;

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// The rotation-invariant fingerprint of two adjacent rows.
fn fingerprint(a: &Vector, b: &Vector) -> [f64; 6] {
    [dot(&a.k, &a.k), dot(&b.k, &b.k), dot(&a.k, &b.k), dot(&a.v, &a.v), dot(&b.v, &b.v), dot(&a.v, &b.v)]
}

fn distance(x: &[f64; 6], y: &[f64; 6]) -> f64 {
    x.iter().zip(y).map(|(a, b)| (a - b).abs() / a.abs().max(b.abs()).max(1e-12)).sum()
}

impl Adversary for GramMatch {
    fn about(&self) -> About {
        About { name: "gram-match".into(), tasks: vec![Task::Reconstruct] }
    }

    fn attack(&mut self, view: View) -> Result<Guess, String> {
        let mut mine = view.mine.clone();
        mine.sort_by_key(|o| o.at.position);
        let own: Vec<([f64; 6], u32, u32)> = mine
            .windows(2)
            .filter(|w| w[1].at.position == w[0].at.position + 1)
            .map(|w| (fingerprint(&w[0].at, &w[1].at), w[0].token, w[1].token))
            .collect();
        if own.is_empty() {
            return Err("no adjacent rows of its own".into());
        }
        let mut victim = view.victim.clone();
        victim.sort_by_key(|v| v.position);
        // Best (distance, token) per victim position.
        let mut best: Vec<(f64, u32)> = vec![(f64::INFINITY, 0); victim.len()];
        for i in 0..victim.len().saturating_sub(1) {
            if victim[i + 1].position != victim[i].position + 1 {
                continue;
            }
            let f = fingerprint(&victim[i], &victim[i + 1]);
            let (d, first, second) = own
                .iter()
                .map(|(g, a, b)| (distance(&f, g), *a, *b))
                .min_by(|x, y| x.0.total_cmp(&y.0))
                .expect("own is not empty");
            if d < best[i].0 {
                best[i] = (d, first);
            }
            if d < best[i + 1].0 {
                best[i + 1] = (d, second);
            }
        }
        let token_at = |pos: u32| {
            victim.iter().position(|v| v.position == pos).map(|i| best[i].1).ok_or(format!("no victim row at {pos}"))
        };
        Ok(Guess::Tokens(view.positions.iter().map(|&p| token_at(p)).collect::<Result<_, _>>()?))
    }
}

register_adversary!(GramMatch);
