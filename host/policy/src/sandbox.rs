//! The store data every plugin instance runs with: its memory limiter, and for an
//! adversary the data behind the capabilities its experiment grants.

use crate::bindings::{known_pairs, model_oracle};
use known_pairs::Pair;
use model_oracle::OracleQuery;
use std::sync::Arc;
use wasmtime::ResourceLimiter;

/// Plaintext K rows for (token, position, layer, head) queries.
pub type Oracle = Arc<dyn Fn(&[OracleQuery]) -> Vec<Vec<f32>> + Send + Sync>;

/// The data behind an adversary's granted capabilities, for one call.
#[derive(Default, Clone)]
pub struct Grants {
    pub pairs: Vec<Pair>,
    pub oracle: Option<Oracle>,
}

pub struct Sandbox {
    pub(crate) memory_limit: usize,
    /// Set when the instance asked for memory beyond its limit.
    pub(crate) denied_growth: bool,
    pub grants: Grants,
}

impl Sandbox {
    pub(crate) fn new(memory_limit: usize) -> Self {
        Self { memory_limit, denied_growth: false, grants: Grants::default() }
    }
}

impl ResourceLimiter for Sandbox {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory_limit;
        self.denied_growth |= !ok;
        Ok(ok)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 65_536)
    }
}

impl known_pairs::Host for Sandbox {
    fn pairs(&mut self) -> Vec<Pair> {
        self.grants.pairs.clone()
    }
}

impl model_oracle::Host for Sandbox {
    fn plain_k(&mut self, queries: Vec<OracleQuery>) -> Vec<Vec<f32>> {
        match &self.grants.oracle {
            Some(oracle) => oracle(&queries),
            // Unreachable: a component importing the oracle is linked to it only
            // where it is granted.
            None => Vec::new(),
        }
    }
}
