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
pub use stats::upper95;
