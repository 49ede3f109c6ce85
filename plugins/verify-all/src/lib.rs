//! Verifies block tags at every layer, rotation on everywhere: full coverage.
use kframe_policy_sdk::{register_depth_gate, DepthGatePolicy, LayerGate, ModelShape};

#[derive(Default)]
struct VerifyAll;

impl DepthGatePolicy for VerifyAll {
    fn gates(&mut self, shape: ModelShape, _tenant: u64, _context_len: u32) -> Vec<LayerGate> {
        (0..shape.layers).map(|_| LayerGate { verify: true, rotate: true }).collect()
    }
}

register_depth_gate!(VerifyAll);
