//! A server that restarts over a registry whose stored policy component no longer
//! loads (built for another WIT version) refuses to start and names it, unless told
//! to serve without it; it never drops the component silently.

use kframe_core::keys::MasterSecret;
use kframe_engine::{Engine, EngineConfig};
use kframe_policy::{Limits, PluginRuntime, PolicyKind, PolicySet};
use kframe_registry::{PolicyRecord, Registry};
use kframe_server::{App, Served, ServerError};
use kframe_testkit::TinyModel;
use std::path::Path;
use std::sync::Arc;

const MASTER: [u8; 32] = [3; 32];

async fn app(model: &TinyModel, data: &Path) -> App {
    let bundle = model.bundle();
    let served = Served {
        model_id: "tiny".into(),
        tokenizer: bundle.tokenizer.clone(),
        chat_template: None,
        context_window: bundle.model.config().max_position_embeddings,
        max_prompt_tokens: usize::MAX,
    };
    let policies = Arc::new(PolicySet::new(PluginRuntime::new(Limits::default(), None).unwrap()));
    let engine = Engine::start(bundle, MasterSecret::from_bytes(MASTER), policies, EngineConfig::default());
    let master = MasterSecret::from_bytes(MASTER);
    let registry = Registry::open_embedded(data, &master).await.unwrap();
    App::new(engine, served, &master, data, registry, Default::default(), Default::default()).unwrap()
}

#[tokio::test]
async fn a_stored_component_that_no_longer_loads_stops_the_start_by_name_unless_dropped() {
    let (model, data) = (TinyModel::new(5), tempfile::tempdir().unwrap());
    {
        let registry = Registry::open_embedded(data.path(), &MasterSecret::from_bytes(MASTER)).await.unwrap();
        let fixture = "../policy/tests/fixtures/other-version/target/wasm32-wasip2/release/kframe_other_version.wasm";
        let wasm = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(fixture))
            .expect("built by scripts/build-plugins.sh");
        let record = PolicyRecord { name: "old-lru".into(), config: String::new(), wasm };
        registry.set_policy(PolicyKind::Eviction.world(), Some(&record)).await.unwrap();
    }
    let server = app(&model, data.path()).await;
    let err = server.restore(false).await.unwrap_err();
    assert!(
        matches!(&err, ServerError::StoredPolicy { kind: PolicyKind::Eviction, name, .. } if name == "old-lru"),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("old-lru") && text.contains("0.1.0") && text.contains("--drop-unloadable-policies"),
        "{text}"
    );
    assert_eq!(server.registry.policies().len(), 1, "refusing to start keeps the record");
    server.restore(true).await.unwrap();
    assert!(server.registry.policies().is_empty(), "dropped, and said so in the log");
    assert_eq!(server.engine.policies().stats().eviction.plugin, None, "the native policy decides");
}
