//! The statistics the eval reports: intervals, AUC, and goodness of fit.

use statrs::distribution::{Beta, ContinuousCDF, Normal};

/// Cosine similarity of two rows, accumulated in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(f64::MIN_POSITIVE)
}

/// Wilson score 95% interval for `hits` of `n`.
pub fn wilson95(hits: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n, p) = (1.96f64, n as f64, hits as f64 / n as f64);
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Area under the ROC curve (Mann-Whitney, ties count half). Its interval is the
/// caller's: scores of one victim are not independent.
pub fn auc(positives: &[f32], negatives: &[f32]) -> f64 {
    let (np, nn) = (positives.len() as f64, negatives.len() as f64);
    if np == 0.0 || nn == 0.0 {
        return 0.5;
    }
    let mut neg: Vec<f32> = negatives.to_vec();
    neg.sort_by(|a, b| a.total_cmp(b));
    let mut wins = 0.0;
    for p in positives {
        let below = neg.partition_point(|x| x < p) as f64;
        let not_above = neg.partition_point(|x| x <= p) as f64;
        wins += below + 0.5 * (not_above - below);
    }
    wins / (np * nn)
}

/// True-positive rate at a false-positive rate of at most `fpr`: the threshold is
/// the smallest score that at most `fpr` of the negatives exceed.
pub fn tpr_at_fpr(positives: &[f32], negatives: &[f32], fpr: f64) -> f64 {
    if positives.is_empty() || negatives.is_empty() {
        return 0.0;
    }
    let mut neg: Vec<f32> = negatives.to_vec();
    neg.sort_by(|a, b| b.total_cmp(a));
    let allowed = (fpr * neg.len() as f64).floor() as usize;
    let threshold = neg[allowed.min(neg.len() - 1)];
    positives.iter().filter(|&&p| p > threshold).count() as f64 / positives.len() as f64
}

/// Kolmogorov-Smirnov statistic of `sorted` samples against a CDF, and its
/// asymptotic p-value.
pub fn ks(sorted: &[f64], cdf: impl Fn(f64) -> f64) -> (f64, f64) {
    let n = sorted.len() as f64;
    let mut d: f64 = 0.0;
    for (i, &x) in sorted.iter().enumerate() {
        let f = cdf(x);
        d = d.max(f - i as f64 / n).max((i + 1) as f64 / n - f);
    }
    let lambda = (n.sqrt() + 0.12 + 0.11 / n.sqrt()) * d;
    let p: f64 = (1..=100).map(|k| 2.0 * (-1f64).powi(k - 1) * (-2.0 * (k * k) as f64 * lambda * lambda).exp()).sum();
    (d, p.clamp(0.0, 1.0))
}

/// The N(0, 1/d) CDF: the concentration law the published claim uses for
/// cross-key readout cosines.
pub fn normal_cdf(d: usize) -> impl Fn(f64) -> f64 {
    let n = Normal::new(0.0, 1.0 / (d as f64).sqrt()).expect("positive scale");
    move |x| n.cdf(x)
}

/// The exact law of the cosine between a fixed vector and a uniformly random
/// direction in d dimensions (what a Haar-random rotation gives):
/// (1 + cos) / 2 ~ Beta((d-1)/2, (d-1)/2).
pub fn sphere_cdf(d: usize) -> impl Fn(f64) -> f64 {
    let a = (d as f64 - 1.0) / 2.0;
    let b = Beta::new(a, a).expect("d >= 2");
    move |x| b.cdf(((1.0 + x) / 2.0).clamp(0.0, 1.0))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_is_one_for_separated_scores_and_a_half_for_equal_ones() {
        assert_eq!(auc(&[2.0, 3.0], &[0.0, 1.0]), 1.0);
        assert_eq!(auc(&[1.0, 1.0], &[1.0, 1.0]), 0.5);
    }

    #[test]
    fn wilson_interval_contains_the_rate() {
        let (lo, hi) = wilson95(5, 100);
        assert!(lo < 0.05 && 0.05 < hi, "{lo} {hi}");
    }

    #[test]
    fn ks_accepts_samples_from_its_own_law_and_rejects_a_shifted_one() {
        let n = 2000;
        let cdf = normal_cdf(128);
        let inv = Normal::new(0.0, 1.0 / 128f64.sqrt()).unwrap();
        let own: Vec<f64> = (0..n).map(|i| inv.inverse_cdf((i as f64 + 0.5) / n as f64)).collect();
        assert!(ks(&own, &cdf).0 < 0.01);
        let shifted: Vec<f64> = own.iter().map(|x| x + 0.05).collect();
        assert!(ks(&shifted, &cdf).1 < 1e-6);
    }
}
