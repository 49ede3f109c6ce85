//! kframe-eval: measured claims about isolation, on kframe's own forward pass
//! (`kframe eval`).
//!
//! # Layout
//!
//! - [`lab`]: the population every experiment runs on.
//! - [`matched`], [`wrong_key`] (and the spot-check), [`readout`], [`attack`]: the
//!   experiments; [`recall`]: the simpler recall table.
//! - [`suite`]: runs the chosen experiments and writes the report.
//! - [`stats`]: intervals, AUC, goodness of fit. [`report`]: report.md and the
//!   figures (drawn in `plot`). [`padcost`]: what norm padding costs.
//!
//! # Dependencies
//!
//! kframe-core, kframe-model, kframe-policy (adversaries), plotters and resvg for
//! the figures, statrs. Not the engine or the server: experiments drive the model
//! directly, frame by frame.

pub mod attack;
pub mod error;
pub mod lab;
pub mod matched;
pub mod padcost;
mod plot;
pub mod readout;
pub mod recall;
pub mod report;
pub mod stats;
pub mod suite;
pub mod wrong_key;

pub use error::{Error, Result};

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
