use candle_core::{DType, Device};
use kframe::engine::{Engine, EngineConfig, Event, Submit, Tenant};
use kframe::generate::{Generator, SamplingParams};
use kframe::keys::MasterSecret;
use kframe::model::load::ModelDir;
use kframe::plugin::{Limits, PluginRuntime, PolicySet};
use std::sync::Arc;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    kframe::device::pin_compute_threads();
    let dir = ModelDir::embedded()?;
    let policies = Arc::new(PolicySet::new(PluginRuntime::new(Limits::default(), None)?));
    let gen = Generator::load(&dir, DType::F32, &Device::Cpu)?;
    let engine = Engine::start(gen, MasterSecret::from_bytes([3; 32]), policies, EngineConfig::default());
    let vocab = 11630u32;
    let token = |i: usize| (i as u32 * 7919 + 13) % (vocab - 1) + 1;
    let decode = |n: usize| -> anyhow::Result<f64> {
        let start = Instant::now();
        let streams: Vec<_> = (0..n)
            .map(|t| {
                let prompt: Vec<u32> = (0..16).map(|i| token(t * 31 + i)).collect();
                let tenant = Tenant { id: t as u64 + 1, name: format!("bench-{t}"), epoch: 0, tier: 0 };
                let params = SamplingParams { max_tokens: 64, ..Default::default() };
                engine.submit(Submit { tenant, session: None, prompt, params })
            })
            .collect();
        let mut tokens = 0usize;
        for mut s in streams {
            while let Some(ev) = s.next_blocking() {
                match ev {
                    Event::Token { .. } => tokens += 1,
                    Event::Done { .. } => break,
                    Event::Failed(e) => anyhow::bail!("{e}"),
                    _ => {}
                }
            }
        }
        Ok(tokens as f64 / start.elapsed().as_secs_f64())
    };
    decode(32)?;
    let n: usize = std::env::args().nth(1).map_or(32, |a| a.parse().unwrap());
    let rounds: usize = std::env::args().nth(2).map_or(5, |a| a.parse().unwrap());
    for _ in 0..rounds {
        println!("n={n}: {:.1} tok/s", decode(n)?);
    }
    Ok(())
}
