//! One suite, both stores: every test here runs on the embedded redb store and on
//! a real PostgreSQL (started by the test in a temporary directory), and must
//! give the same answers. Tests of what only a shared store can do (several
//! registries on one database) are in `shared.rs`.

use kframe_core::keys::MasterSecret;
use kframe_registry::{Change, EmbeddedStore, PolicyRecord, PostgresStore, Registry, RegistryError, Store};
use kframe_testkit::postgres::Postgres;
use std::sync::Arc;

enum Backend {
    Embedded(tempfile::TempDir),
    Postgres(Postgres),
}

impl Backend {
    async fn store(&self) -> Box<dyn Store> {
        match self {
            Backend::Embedded(dir) => Box::new(EmbeddedStore::open(dir.path()).unwrap()),
            Backend::Postgres(pg) => Box::new(PostgresStore::connect(&pg.url(), "test").await.unwrap()),
        }
    }

    async fn open_with(&self, master: u8) -> Registry {
        Registry::open(self.store().await, &MasterSecret::from_bytes([master; 32])).await.unwrap()
    }

    async fn open(&self) -> Registry {
        self.open_with(3).await
    }

    /// Every byte the store holds, as far as a test can read it.
    fn raw(&self) -> Vec<u8> {
        match self {
            Backend::Embedded(dir) => std::fs::read(dir.path().join(kframe_registry::DATABASE_FILE)).unwrap(),
            Backend::Postgres(pg) => pg.sql("SELECT t::text FROM tenants t").into_bytes(),
        }
    }
}

macro_rules! both_stores {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Backend::Embedded(tempfile::tempdir().unwrap())).await
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Backend::Postgres(kframe_testkit::postgres::Postgres::start())).await
            })*
        }
    };
}

both_stores!(
    tenants_keys_and_epochs_survive_reopening,
    the_store_holds_no_api_key_and_another_master_secret_matches_nothing,
    bad_names_duplicates_and_unknown_tenants_are_clear_errors,
    a_name_created_again_gets_a_new_key_id_and_id_and_the_old_id_finds_nothing,
    dot_names_are_refused_as_a_url_path_would_not_carry_them,
    api_keys_carry_the_tenant_id_and_a_wrong_id_or_secret_is_refused,
    every_write_bumps_the_version_and_reports_its_change,
    concurrent_rekeys_each_get_their_own_epoch,
    policies_keep_their_bytes_and_sha256_and_prefixes_are_kept_once,
);

async fn tenants_keys_and_epochs_survive_reopening(b: Backend) {
    let (alice, key) = {
        let r = b.open().await;
        let (alice, key) = r.create("alice", 1).await.unwrap().value;
        r.create("bob", 0).await.unwrap();
        r.bump_epoch("alice").await.unwrap();
        r.delete("bob").await.unwrap();
        (alice, key)
    };
    let r = b.open().await;
    let found = r.authenticate(&key).unwrap();
    assert_eq!((found.id, found.epoch, found.tier), (alice.id, 1, 1));
    assert!(r.get("bob").is_none());
    // Ids are never reused, even after a delete.
    assert!(r.create("carol", 0).await.unwrap().value.0.id > alice.id + 1);
}

async fn the_store_holds_no_api_key_and_another_master_secret_matches_nothing(b: Backend) {
    let key = b.open().await.create("alice", 0).await.unwrap().value.1;
    let secret = key.rsplit('_').next().unwrap().as_bytes().to_vec();
    assert_eq!(secret.len(), 64);
    let raw = b.raw();
    assert!(raw.len() > 64, "the store holds the tenant");
    assert!(!raw.windows(secret.len()).any(|w| w == secret));
    assert!(b.open_with(4).await.authenticate(&key).is_none());
}

async fn bad_names_duplicates_and_unknown_tenants_are_clear_errors(b: Backend) {
    let r = b.open().await;
    assert!(matches!(r.create("", 0).await, Err(RegistryError::InvalidName(_))));
    assert!(matches!(r.create("a b", 0).await, Err(RegistryError::InvalidName(_))));
    r.create("a", 0).await.unwrap();
    assert!(matches!(r.create("a", 0).await, Err(RegistryError::Exists(_))));
    assert!(matches!(r.delete("zed").await, Err(RegistryError::NotFound(_))));
    assert!(matches!(r.bump_epoch("zed").await, Err(RegistryError::NotFound(_))));
    assert!(r.authenticate("kf-00").is_none());
    assert!(r.authenticate("kf_1_00").is_none());
    assert_eq!(r.len(), 1, "a refused create wrote nothing");
}

async fn a_name_created_again_gets_a_new_key_id_and_id_and_the_old_id_finds_nothing(b: Backend) {
    let r = b.open().await;
    let (old, _) = r.create("carol", 0).await.unwrap().value;
    r.delete("carol").await.unwrap();
    let (new, _) = r.create("carol", 0).await.unwrap().value;
    assert!(old.key_id.starts_with("t:") && old.key_id.len() == 34, "{}", old.key_id);
    assert_ne!(old.key_id, new.key_id);
    assert_ne!(old.id, new.id);
    assert!(r.get_by_id(old.id).is_none());
    assert_eq!(r.get_by_id(new.id).unwrap().key_id, new.key_id);
}

async fn dot_names_are_refused_as_a_url_path_would_not_carry_them(b: Backend) {
    let r = b.open().await;
    for name in [".", ".."] {
        assert!(matches!(r.create(name, 0).await, Err(RegistryError::InvalidName(_))), "{name}");
    }
    r.create("a.b", 0).await.unwrap();
}

async fn api_keys_carry_the_tenant_id_and_a_wrong_id_or_secret_is_refused(b: Backend) {
    let r = b.open().await;
    let (alice, key) = r.create("alice", 0).await.unwrap().value;
    let (bob, _) = r.create("bob", 0).await.unwrap().value;
    let secret = key.strip_prefix(&format!("kf_{}_", alice.id)).expect("the key names its tenant");
    assert_eq!(r.authenticate(&key).unwrap().id, alice.id);
    // Alice's secret under Bob's id: a router would send it to Bob's replica; refused.
    assert!(r.authenticate(&format!("kf_{}_{secret}", bob.id)).is_none());
    assert!(r.authenticate(&format!("kf_x_{secret}")).is_none());
    let mut wrong = secret.to_owned();
    wrong.replace_range(0..1, if secret.starts_with('0') { "1" } else { "0" });
    assert!(r.authenticate(&format!("kf_{}_{wrong}", alice.id)).is_none());
}

async fn every_write_bumps_the_version_and_reports_its_change(b: Backend) {
    let r = b.open().await;
    let v0 = r.version();
    let created = r.create("alice", 0).await.unwrap();
    let alice = created.value.0.clone();
    assert_eq!(created.changes, vec![Change::Created(alice.clone())]);
    let rekeyed = r.bump_epoch("alice").await.unwrap();
    assert_eq!(rekeyed.value.epoch, 1);
    assert_eq!(rekeyed.changes, vec![Change::Rekeyed { before: alice.clone(), after: rekeyed.value.clone() }]);
    let deleted = r.delete("alice").await.unwrap();
    assert_eq!(deleted.changes, vec![Change::Deleted(rekeyed.value.clone())]);
    assert_eq!(r.version(), v0 + 3);
    assert_eq!(r.store_version().await.unwrap(), v0 + 3);
    assert!(r.sync().await.unwrap().is_empty(), "nothing new");
}

async fn concurrent_rekeys_each_get_their_own_epoch(b: Backend) {
    let r = Arc::new(b.open().await);
    r.create("alice", 0).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let r = r.clone();
            tokio::spawn(async move { r.bump_epoch("alice").await.unwrap().value.epoch })
        })
        .collect();
    let mut epochs = Vec::new();
    for t in tasks {
        epochs.push(t.await.unwrap());
    }
    epochs.sort();
    assert_eq!(epochs, (1..=16).collect::<Vec<_>>(), "none lost, none repeated");
    r.sync().await.unwrap();
    assert_eq!(r.get("alice").unwrap().epoch, 16);
}

async fn policies_keep_their_bytes_and_sha256_and_prefixes_are_kept_once(b: Backend) {
    let wasm = b"\0asm not really a component".to_vec();
    let policy = PolicyRecord { name: "fair".into(), config: "k=v".into(), wasm: wasm.clone() };
    {
        let r = b.open().await;
        let set = r.set_policy("admission-policy", Some(&policy)).await.unwrap();
        assert_eq!(set.changes, vec![Change::Policy { kind: "admission-policy".into(), now: Some(policy.clone()) }]);
        r.set_policy("eviction-policy", Some(&policy)).await.unwrap();
        let cleared = r.set_policy("eviction-policy", None).await.unwrap();
        assert_eq!(cleared.changes, vec![Change::Policy { kind: "eviction-policy".into(), now: None }]);
        assert_eq!(
            r.add_prefix("system: be brief").await.unwrap().changes,
            vec![Change::Prefix("system: be brief".into())]
        );
        assert!(r.add_prefix("system: be brief").await.unwrap().changes.is_empty());
        r.add_prefix("second").await.unwrap();
    }
    let r = b.open().await;
    assert_eq!(r.policies(), vec![("admission-policy".to_owned(), policy.clone())]);
    // sha256 of the bytes, as `sha256sum` prints it.
    assert_eq!(policy.sha256().len(), 64);
    assert_ne!(policy.sha256(), PolicyRecord { wasm: b"other".to_vec(), ..policy.clone() }.sha256());
    assert_eq!(r.prefixes(), vec!["system: be brief".to_owned(), "second".to_owned()]);
}
