//! `kframe serve`: the engine behind the OpenAI-compatible HTTP API, until SIGTERM.

use crate::args::ServeArgs;
use crate::model::load;
use kframe_core::keys::{self, MasterSecret};
use kframe_core::layout::Padding;
use kframe_engine::{Engine, EngineConfig, TenantLimits};
use kframe_policy::{Limits, PluginRuntime, PolicySet};
use kframe_registry::Registry;
use kframe_server::{self as server, App, Replica, Served};
use std::io::Write;
use std::sync::Arc;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (dir, bundle) = load(&args.model)?;
    let data_dir = args.data_dir.clone().unwrap_or_else(keys::default_data_dir);
    let secrets_dir = secrets_dir(&args, &data_dir)?;
    let master = MasterSecret::load_or_create(&secrets_dir)?;
    let runtime = PluginRuntime::new(Limits::default(), None)?;
    let policies = Arc::new(PolicySet::new(runtime));
    for (kind, file) in &args.policies {
        let bytes = std::fs::read(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        policies
            .swap(*kind, &file.display().to_string(), &bytes, "")
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    }
    let padding = match args.pad_dims {
        0 => None,
        extra => Some(Padding { extra, calibration: kframe_model::calibrate::calibration_for(&dir, &bundle)? }),
    };
    let engine = EngineConfig {
        variant: args.variant.into(),
        prefix_mode: args.prefix_mode.into(),
        kv_budget: args.kv_budget,
        max_batch: args.max_batch,
        keyring_bytes: args.keyring_bytes,
        max_prompt_tokens: args.max_prompt_tokens,
        padding,
        tenant_limits: TenantLimits { cache_bytes: args.tenant_cache_bytes, requests: args.tenant_requests },
        ..EngineConfig::default()
    };
    let limits = server::Limits {
        max_body_bytes: args.max_body_bytes,
        max_tokens: args.max_tokens,
        max_connections: args.max_connections,
        ..server::Limits::default()
    };
    let cfg = bundle.model.config();
    let served = Served {
        model_id: dir.model_id(),
        tokenizer: bundle.tokenizer.clone(),
        chat_template: dir.chat_template.clone(),
        context_window: cfg.max_position_embeddings,
        max_prompt_tokens: args.max_prompt_tokens,
    };
    // The engine keeps one copy of the master secret (tenant frames, block tags),
    // the server another (api key and admin token hashes).
    let replica = Replica {
        name: args.replica_name.clone().unwrap_or_else(Replica::host_name),
        poll: std::time::Duration::from_millis(args.registry_poll_ms.max(10)),
        listen_retry: std::time::Duration::from_millis(args.registry_listen_retry_ms),
    };
    let engine = Engine::start(bundle, master, policies, engine);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let master = MasterSecret::load_or_create(&secrets_dir)?;
        let registry = match &args.registry {
            None => Registry::open_embedded(&data_dir, &master).await?,
            Some(url) => Registry::open_url(url, &replica.name, &master).await?,
        };
        let app = Arc::new(App::new(engine, served, &master, &secrets_dir, registry, replica, limits)?);
        drop(master);
        app.restore(args.drop_unloadable_policies).await?;
        app.follow_registry();
        let listener = tokio::net::TcpListener::bind(args.addr).await?;
        let addr = listener.local_addr()?;
        let banner = format!(
            "kframe listening on http://{addr} (model {}, {} tenants, registry {}, replica {})\nadmin token: {}\n",
            app.model_id,
            app.registry.len(),
            app.registry.describe(),
            app.replica.name,
            secrets_dir.join(server::ADMIN_TOKEN_FILE).display()
        );
        // One write, and its failure is not fatal: a supervisor that reads the
        // first line and closes the pipe must not take the server down with it
        // (`println!` panics on a closed stdout).
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(banner.as_bytes()).and_then(|()| out.flush()) {
            tracing::warn!("could not print the listening address: {e}");
        }
        drop(out);
        server::serve(app, listener, shutdown_signal()).await;
        anyhow::Ok(())
    })
}

/// Where the master secret and admin token are: `--secrets-dir`, where both must
/// already be (replicas share them, so none may make its own), or the data
/// directory, where a first start creates them.
fn secrets_dir(args: &ServeArgs, data_dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let Some(dir) = &args.secrets_dir else {
        return Ok(data_dir.to_owned());
    };
    for file in [keys::MASTER_SECRET_FILE, server::ADMIN_TOKEN_FILE] {
        let path = dir.join(file);
        if !path.is_file() {
            anyhow::bail!(
                "secrets directory {}: no {file}; replicas share one master secret and admin token, made once (see the README's \"Beyond one machine\")",
                dir.display()
            );
        }
    }
    Ok(dir.clone())
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    eprintln!("kframe: shutting down; finishing in-flight requests");
}
