//! Verifies block tags at every layer, rotation on everywhere: full coverage.
//! Pads the first `pad` layers (default 1: layer 0, where a row's norm names its
//! token).
use kframe_policy_sdk::{config_number, register_depth_gate, DepthGatePolicy, LayerGate, ModelShape};

struct VerifyAll {
    pad: u64,
}

impl Default for VerifyAll {
    fn default() -> Self {
        Self { pad: 1 }
    }
}

impl DepthGatePolicy for VerifyAll {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        self.pad = config_number(config, "pad", 1)?;
        Ok(())
    }
    fn gates(&mut self, shape: ModelShape, _tenant: u64, _context_len: u32) -> Vec<LayerGate> {
        (0..shape.layers).map(|i| LayerGate { verify: true, rotate: true, pad: (i as u64) < self.pad }).collect()
    }
}

register_depth_gate!(VerifyAll);
