//! Ciphertext-only alignment by principal axes. The victim's rows are R_v x and the
//! attacker's own rows R_a y; if both come from the same language their covariance
//! matrices share eigenvalues, and the eigenvectors line up as U_v = R_v E S_v and
//! U_a = R_a E S_a (signs S unknown). So U_a U_v^T maps the victim's frame into the
//! attacker's, up to the signs, which this adversary fixes by the sign of each axis'
//! third moment. Victim rows are then matched to the attacker's own by cosine. It
//! needs many rows per frame and distinct eigenvalues; a short context gives a
//! rank-deficient covariance, and the alignment (and the attack) fail.
use kframe_policy_sdk::{cosine, register_adversary, About, Adversary, Guess, Task, View};
use nalgebra::{DMatrix, DVector, SymmetricEigen};

#[derive(Default)]
struct PcaAlign;

/// Principal axes of the rows (columns of the result, by decreasing variance), each
/// signed so that the rows' projections on it have a positive third moment.
fn axes(rows: &[&[f32]], d: usize) -> DMatrix<f64> {
    let n = rows.len().max(1) as f64;
    let mut mean = DVector::<f64>::zeros(d);
    for r in rows {
        for j in 0..d {
            mean[j] += r[j] as f64 / n;
        }
    }
    let mut cov = DMatrix::<f64>::zeros(d, d);
    for r in rows {
        let x = DVector::from_iterator(d, r.iter().map(|v| *v as f64)) - &mean;
        cov += &x * x.transpose() / n;
    }
    let eig = SymmetricEigen::new(cov);
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let mut out = DMatrix::<f64>::zeros(d, d);
    for (col, &i) in order.iter().enumerate() {
        let mut axis = eig.eigenvectors.column(i).into_owned();
        let skew: f64 = rows
            .iter()
            .map(|r| {
                let p: f64 = (0..d).map(|j| (r[j] as f64 - mean[j]) * axis[j]).sum();
                p * p * p
            })
            .sum();
        if skew < 0.0 {
            axis = -axis;
        }
        out.set_column(col, &axis);
    }
    out
}

impl Adversary for PcaAlign {
    fn about(&self) -> About {
        About { name: "pca-align".into(), tasks: vec![Task::Reconstruct] }
    }

    fn attack(&mut self, view: View) -> Result<Guess, String> {
        let d = view.head_dim as usize;
        if view.mine.is_empty() || view.victim.is_empty() {
            return Err("nothing to align".into());
        }
        let theirs: Vec<&[f32]> = view.victim.iter().map(|v| v.k.as_slice()).collect();
        let ours: Vec<&[f32]> = view.mine.iter().map(|o| o.at.k.as_slice()).collect();
        // Victim frame -> attacker frame.
        let map = axes(&ours, d) * axes(&theirs, d).transpose();
        let mut guesses = Vec::with_capacity(view.positions.len());
        for &pos in &view.positions {
            let row = view.victim.iter().find(|v| v.position == pos).ok_or(format!("no victim row at {pos}"))?;
            let x = DVector::from_iterator(d, row.k.iter().map(|v| *v as f64));
            let y: Vec<f32> = (&map * x).iter().map(|v| *v as f32).collect();
            let best = view
                .mine
                .iter()
                .map(|o| (cosine(&y, &o.at.k), o.token))
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|p| p.1)
                .unwrap_or(0);
            guesses.push(best);
        }
        Ok(Guess::Tokens(guesses))
    }
}

register_adversary!(PcaAlign);
