//! An adaptive co-tenant attack on norm padding. A padded row is R [x; r]: the pad
//! r lives in an m-dimensional subspace of the rotated frame, the same for every
//! row of one (tenant, layer, head), and it carries most of the rows' variance when
//! m is small (its length makes up the difference between |x| and the common norm
//! c). So the top-m principal axes of a frame's rows approximate the pad subspace;
//! projecting them out leaves about |x|, and the norm channel is open again. The
//! attacker strips its own rows the same way (its frame is padded too) and matches
//! victim rows to its own by stripped (|k|, |v|), as `norm-match` does.
//!
//! Config `d=N`: the served model's head_dim (public; default 128). Rows of width
//! w > d are taken to carry m = w - d pad dimensions; with w = d nothing is
//! stripped and the attack is `norm-match`.
use kframe_policy_sdk::{config_number, register_adversary, About, Adversary, Guess, Task, View};
use nalgebra::{DMatrix, DVector, SymmetricEigen};

struct PadStrip {
    d: usize,
}

impl Default for PadStrip {
    fn default() -> Self {
        Self { d: 128 }
    }
}

/// Each row's length after projecting out the `m` principal axes of the rows.
fn stripped_norms(rows: &[&[f32]], m: usize) -> Vec<f32> {
    let w = rows.first().map_or(0, |r| r.len());
    let norms = |keep: &dyn Fn(&DVector<f64>) -> f64| rows.iter().map(|r| keep(&to_vec(r)) as f32).collect();
    if m == 0 || rows.len() < 2 {
        return norms(&|x: &DVector<f64>| x.norm());
    }
    let n = rows.len() as f64;
    let mean = rows.iter().fold(DVector::<f64>::zeros(w), |acc, r| acc + to_vec(r)) / n;
    let mut cov = DMatrix::<f64>::zeros(w, w);
    for r in rows {
        let x = to_vec(r) - &mean;
        cov += &x * x.transpose() / n;
    }
    let eig = SymmetricEigen::new(cov);
    let mut order: Vec<usize> = (0..w).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let axes: Vec<DVector<f64>> = order[..m.min(w)].iter().map(|&i| eig.eigenvectors.column(i).into_owned()).collect();
    norms(&|x: &DVector<f64>| {
        let along: f64 = axes.iter().map(|a| a.dot(x).powi(2)).sum();
        (x.norm_squared() - along).max(0.0).sqrt()
    })
}

fn to_vec(r: &[f32]) -> DVector<f64> {
    DVector::from_iterator(r.len(), r.iter().map(|v| *v as f64))
}

fn distance(a: (f32, f32), b: (f32, f32)) -> f32 {
    let rel = |x: f32, y: f32| (x - y).abs() / x.abs().max(y.abs()).max(1e-12);
    rel(a.0, b.0) + rel(a.1, b.1)
}

impl Adversary for PadStrip {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        self.d = config_number(config, "d", 128)? as usize;
        Ok(())
    }

    fn about(&self) -> About {
        About { name: "pad-strip".into(), tasks: vec![Task::Reconstruct] }
    }

    fn attack(&mut self, view: View) -> Result<Guess, String> {
        if view.mine.is_empty() {
            return Err("no rows of its own to match against".into());
        }
        let m = (view.head_dim as usize).saturating_sub(self.d);
        let strip = |k: Vec<&[f32]>, v: Vec<&[f32]>| -> Vec<(f32, f32)> {
            stripped_norms(&k, m).into_iter().zip(stripped_norms(&v, m)).collect()
        };
        let own = strip(
            view.mine.iter().map(|o| o.at.k.as_slice()).collect(),
            view.mine.iter().map(|o| o.at.v.as_slice()).collect(),
        );
        let theirs = strip(
            view.victim.iter().map(|x| x.k.as_slice()).collect(),
            view.victim.iter().map(|x| x.v.as_slice()).collect(),
        );
        let mut guesses = Vec::with_capacity(view.positions.len());
        for &pos in &view.positions {
            let i = view.victim.iter().position(|v| v.position == pos).ok_or(format!("no victim row at {pos}"))?;
            let best = own
                .iter()
                .zip(&view.mine)
                .map(|(n, o)| (distance(theirs[i], *n), o.token))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map_or(0, |p| p.1);
            guesses.push(best);
        }
        Ok(Guess::Tokens(guesses))
    }
}

register_adversary!(PadStrip);
