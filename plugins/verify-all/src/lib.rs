//! Verifies block tags at every layer: full coverage. Pads the first `pad` layers
//! (default 1: layer 0, where a row's norm names its token) and rotates the first
//! `rotate` layers (default: all). Layers past `rotate` keep their rows in the
//! model's frame, in plaintext; each response's isolation report lists them.
use kframe_policy_sdk::{config_number, register_depth_gate, DepthGatePolicy, LayerGate, ModelShape};

struct VerifyAll {
    pad: u64,
    rotate: u64,
}

impl Default for VerifyAll {
    fn default() -> Self {
        Self { pad: 1, rotate: u64::MAX }
    }
}

impl DepthGatePolicy for VerifyAll {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        self.pad = config_number(config, "pad", 1)?;
        self.rotate = config_number(config, "rotate", u64::MAX)?;
        Ok(())
    }
    fn gates(&mut self, shape: ModelShape, _tenant: u64, _context_len: u32) -> Vec<LayerGate> {
        (0..shape.layers as u64)
            .map(|i| LayerGate { verify: true, rotate: i < self.rotate, pad: i < self.pad })
            .collect()
    }
}

register_depth_gate!(VerifyAll);
