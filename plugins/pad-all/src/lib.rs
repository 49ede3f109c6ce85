//! Pads every layer to one norm (and verifies every layer): the norm channel
//! closed at every depth, at m extra dimensions per row everywhere.
use kframe_policy_sdk::{register_depth_gate, DepthGatePolicy, LayerGate, ModelShape};

#[derive(Default)]
struct Gate;

impl DepthGatePolicy for Gate {
    fn gates(&mut self, shape: ModelShape, _tenant: u64, _context_len: u32) -> Vec<LayerGate> {
        (0..shape.layers).map(|_| LayerGate { verify: true, rotate: true, pad: true }).collect()
    }
}

register_depth_gate!(Gate);
