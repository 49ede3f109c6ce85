//! Known-plaintext key recovery by orthogonal Procrustes: given pairs (k, R k),
//! the orthonormal R minimising sum |R k - k'|^2 is U V^T, where U S V^T is the SVD
//! of sum k' k^T. Once the pairs span the head dimension (about d of them), the
//! estimate is the key; with fewer, the unseen directions are a guess.
use kframe_policy_sdk::{known_pairs, register_adversary, About, Adversary, Guess, Task, View};
use nalgebra::DMatrix;

#[derive(Default)]
struct Procrustes;

impl Adversary for Procrustes {
    fn about(&self) -> About {
        About { name: "procrustes".into(), tasks: vec![Task::KeyRecovery] }
    }

    fn attack(&mut self, view: View) -> Result<Guess, String> {
        let d = view.head_dim as usize;
        let pairs = known_pairs::pairs();
        let mut c = DMatrix::<f64>::zeros(d, d);
        for p in &pairs {
            if p.plain.len() != d || p.rotated.len() != d {
                return Err("a pair of the wrong length".into());
            }
            for i in 0..d {
                let r = p.rotated[i] as f64;
                for j in 0..d {
                    c[(i, j)] += r * p.plain[j] as f64;
                }
            }
        }
        let svd = c.svd(true, true);
        let (u, v_t) = (svd.u.ok_or("svd without U")?, svd.v_t.ok_or("svd without V")?);
        let r = u * v_t;
        Ok(Guess::Rotation((0..d * d).map(|x| r[(x / d, x % d)] as f32).collect()))
    }
}

register_adversary!(Procrustes);
