//! The open-weights attacker: with the model (granted as `model-oracle`) it
//! computes the plaintext K of every vocabulary token, and names each victim row by
//! the token whose K has the nearest length. No session of its own is needed. At
//! the first layer, where K depends on the token alone, the length is a
//! fingerprint; deeper layers mix in context the oracle does not see.
use kframe_policy_sdk::{model_oracle, norm, register_adversary, About, Adversary, Guess, Task, View};

#[derive(Default)]
struct NormOracle {
    /// (|k|, token) for the whole vocabulary at the last (layer, head) asked, sorted.
    table: Option<((u32, u32), Vec<(f32, u32)>)>,
}

impl Adversary for NormOracle {
    fn about(&self) -> About {
        About { name: "norm-oracle".into(), tasks: vec![Task::Reconstruct] }
    }

    fn attack(&mut self, view: View) -> Result<Guess, String> {
        let at = (view.layer, view.head);
        if self.table.as_ref().map(|t| t.0) != Some(at) {
            // Rotary position keeps length: position 0 stands for every position.
            let queries: Vec<model_oracle::OracleQuery> = (0..view.vocab_size)
                .map(|token| model_oracle::OracleQuery { token, position: 0, layer: view.layer, head: view.head })
                .collect();
            let ks = model_oracle::plain_k(&queries);
            let mut table: Vec<(f32, u32)> = ks.iter().zip(&queries).map(|(k, q)| (norm(k), q.token)).collect();
            table.sort_by(|a, b| a.0.total_cmp(&b.0));
            self.table = Some((at, table));
        }
        let table = &self.table.as_ref().expect("filled above").1;
        let mut guesses = Vec::with_capacity(view.positions.len());
        for &pos in &view.positions {
            let row = view.victim.iter().find(|v| v.position == pos).ok_or(format!("no victim row at {pos}"))?;
            let n = norm(&row.k);
            let i = table.partition_point(|(x, _)| *x < n);
            let pick = [i.wrapping_sub(1), i]
                .into_iter()
                .filter_map(|j| table.get(j))
                .min_by(|a, b| (a.0 - n).abs().total_cmp(&(b.0 - n).abs()))
                .map(|p| p.1)
                .unwrap_or(0);
            guesses.push(pick);
        }
        Ok(Guess::Tokens(guesses))
    }
}

register_adversary!(NormOracle);
