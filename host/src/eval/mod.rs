//! `kframe eval`: measured claims about isolation, on kframe's own engine.

pub mod recall;

/// The rule-of-three 95% upper bound on a rate when `hits` of `n` trials
/// succeeded: 3/n for zero hits, else the normal approximation (Wilson's would be
/// tighter; this one errs high).
pub fn upper95(hits: usize, n: usize) -> f64 {
    if n == 0 {
        return 1.0;
    }
    if hits == 0 {
        return (3.0 / n as f64).min(1.0);
    }
    let p = hits as f64 / n as f64;
    (p + 1.96 * (p * (1.0 - p) / n as f64).sqrt()).min(1.0)
}
