//! What one request's attention checked, as its response reports it.

use kframe_core::integrity::Findings;
use kframe_core::layout::Layout;

/// What one request's attention checked, for its response and the isolation
/// report: the layers verified, the layers the depth-gate left unchecked.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct IsolationReport {
    pub checked_layers: Vec<usize>,
    pub unchecked_layers: Vec<usize>,
    pub blocks_verified: u64,
    pub blocks_masked: u64,
    pub events: usize,
    /// Layers whose rows are norm-padded (see `kframe_core::layout`).
    pub padded_layers: Vec<usize>,
    /// Layers the depth gate left in the model's frame: their rows are plaintext.
    pub unrotated_layers: Vec<usize>,
    /// Rows left unpadded there because their norm exceeded the calibration.
    pub pad_overflow: u64,
}

impl IsolationReport {
    pub fn new(verify: &[bool]) -> Self {
        let (checked, unchecked): (Vec<usize>, Vec<usize>) = (0..verify.len()).partition(|&l| verify[l]);
        Self { checked_layers: checked, unchecked_layers: unchecked, ..Self::default() }
    }

    /// The report of a cache of `layout`: its padded and unrotated layers.
    pub fn laid_out(mut self, layout: &Layout) -> Self {
        self.padded_layers = layout.padded_layers();
        self.unrotated_layers = layout.unrotated_layers();
        self
    }

    pub fn add(&mut self, f: &Findings) {
        self.blocks_verified += f.blocks_verified;
        self.blocks_masked += f.blocks_masked;
        self.events += f.events.len();
        self.pad_overflow += f.pad_overflow;
    }
}
