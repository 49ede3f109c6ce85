//! `kframe generate`: one completion, streamed to stdout, in a tenant's frame or
//! the identity frame.

use crate::args::GenerateArgs;
use crate::model::load;
use kframe_core::keys::{self, MasterSecret};
use kframe_core::rotation::{Frame, Keyring};
use kframe_model::generate::SamplingParams;
use std::io::Write;

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let (_, bundle) = load(&args.model)?;
    let (dtype, device) = (bundle.model.dtype(), bundle.model.device().clone());
    let frame = match &args.tenant {
        None => Frame::Identity,
        Some(tenant) => {
            let data_dir = args.data_dir.clone().unwrap_or_else(keys::default_data_dir);
            let master = MasterSecret::load_or_create(&data_dir)?;
            let ring = Keyring::builder(master, bundle.model.rotation_shape())
                .dtype(dtype)
                .precision(args.kv_precision.into())
                .device(device.clone())
                .capacity(1)
                .build();
            ring.frame(tenant, args.epoch)?
        }
    };
    let prompt = bundle.encode(&args.prompt)?;
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut out = std::io::stdout().lock();
    let (variant, precision) = (args.variant.into(), args.kv_precision.into());
    let result = bundle.generate(&prompt, &frame, variant, precision, &params, |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    writeln!(out)?;
    tracing::info!(
        frame = frame.describe(),
        prompt_tokens = result.prompt_tokens,
        completion_tokens = result.tokens.len(),
        finish = ?result.finish,
        "done"
    );
    Ok(())
}
