//! Verifies block tags at every `every`-th layer (default 4) and at the last one,
//! rotation on everywhere: a cheaper, partial check. Pads the first `pad` layers
//! (default 1).
use kframe_policy_sdk::{config_number, register_depth_gate, DepthGatePolicy, LayerGate, ModelShape};

struct VerifySampled {
    every: u32,
    pad: u64,
}

impl Default for VerifySampled {
    fn default() -> Self {
        Self { every: 4, pad: 1 }
    }
}

impl DepthGatePolicy for VerifySampled {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        let every = config_number(config, "every", 4)?;
        if every == 0 || every > u32::MAX as u64 {
            return Err(format!("every={every} must be at least 1"));
        }
        self.every = every as u32;
        self.pad = config_number(config, "pad", 1)?;
        Ok(())
    }
    fn gates(&mut self, shape: ModelShape, _tenant: u64, _context_len: u32) -> Vec<LayerGate> {
        (0..shape.layers)
            .map(|i| LayerGate {
                verify: i % self.every == 0 || i + 1 == shape.layers,
                rotate: true,
                pad: (i as u64) < self.pad,
            })
            .collect()
    }
}

register_depth_gate!(VerifySampled);
