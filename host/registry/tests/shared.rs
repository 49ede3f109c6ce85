//! What only a shared store does: several registries (replicas) on one real
//! PostgreSQL, started by the test.

use kframe_core::keys::MasterSecret;
use kframe_registry::{Change, PostgresStore, Registry, RegistryError};
use kframe_testkit::postgres::Postgres;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

async fn replica(pg: &Postgres, name: &str) -> Registry {
    let store = PostgresStore::connect(&pg.url(), name).await.unwrap();
    Registry::open(Box::new(store), &MasterSecret::from_bytes([7; 32])).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_reaches_another_by_notification_then_sync() {
    let pg = Postgres::start();
    let (a, b) = (replica(&pg, "a").await, replica(&pg, "b").await);
    let listening = b.listen(Duration::from_millis(200)).expect("postgres notifies");
    // The first wake-up is the connect itself.
    tokio::time::timeout(Duration::from_secs(10), listening.changed.notified()).await.unwrap();
    assert!(listening.connected.load(Ordering::SeqCst));
    b.sync().await.unwrap();

    let (alice, key) = a.create("alice", 2).await.unwrap().value;
    tokio::time::timeout(Duration::from_secs(10), listening.changed.notified()).await.expect("notified");
    assert_eq!(b.sync().await.unwrap(), vec![Change::Created(alice.clone())]);
    assert_eq!(b.authenticate(&key).unwrap().id, alice.id, "a key made on A works on B");

    let after = a.bump_epoch("alice").await.unwrap().value;
    tokio::time::timeout(Duration::from_secs(10), listening.changed.notified()).await.expect("notified");
    assert_eq!(b.sync().await.unwrap(), vec![Change::Rekeyed { before: alice.clone(), after: after.clone() }]);

    a.delete("alice").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), listening.changed.notified()).await.expect("notified");
    assert_eq!(b.sync().await.unwrap(), vec![Change::Deleted(after)]);
    assert!(b.authenticate(&key).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekeys_that_a_replica_missed_arrive_as_one_jump_of_epochs() {
    let pg = Postgres::start();
    let (a, b) = (replica(&pg, "a").await, replica(&pg, "b").await);
    let alice = a.create("alice", 0).await.unwrap().value.0;
    b.sync().await.unwrap();
    for _ in 0..3 {
        a.bump_epoch("alice").await.unwrap();
    }
    let changes = b.sync().await.unwrap();
    let [Change::Rekeyed { before, after }] = changes.as_slice() else { panic!("{changes:?}") };
    assert_eq!((before.epoch, after.epoch, after.id), (0, 3, alice.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rekeys_through_three_replicas_lose_and_repeat_no_epoch() {
    let pg = Postgres::start();
    let replicas = Arc::new([replica(&pg, "a").await, replica(&pg, "b").await, replica(&pg, "c").await]);
    let alice = replicas[0].create("alice", 0).await.unwrap().value.0;
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let replicas = replicas.clone();
            tokio::spawn(async move { replicas[i % 3].bump_epoch("alice").await.unwrap().value.epoch })
        })
        .collect();
    let mut epochs = Vec::new();
    for t in tasks {
        epochs.push(t.await.unwrap());
    }
    epochs.sort();
    assert_eq!(epochs, (1..=30).collect::<Vec<_>>());
    let stored = pg.sql(&format!(
        "SELECT string_agg(epoch::text, ',' ORDER BY epoch) FROM key_epochs WHERE tenant_id = {}",
        alice.id
    ));
    assert_eq!(stored, (0..=30).map(|e| e.to_string()).collect::<Vec<_>>().join(","), "every epoch once");
    for r in replicas.iter() {
        r.sync().await.unwrap();
        assert_eq!(r.get("alice").unwrap().epoch, 30);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_database_keeps_known_tenants_and_refuses_writes_until_it_is_back() {
    let pg = Postgres::start();
    let r = replica(&pg, "a").await;
    let (alice, key) = r.create("alice", 0).await.unwrap().value;
    pg.stop();
    assert_eq!(r.authenticate(&key).unwrap().id, alice.id, "served from the mirror");
    let started = std::time::Instant::now();
    let refused = r.create("bob", 0).await;
    assert!(matches!(refused, Err(RegistryError::Unavailable { .. })), "{refused:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "refused promptly: {:?}", started.elapsed());
    assert!(matches!(r.bump_epoch("alice").await, Err(RegistryError::Unavailable { .. })));
    assert!(matches!(r.sync().await, Err(RegistryError::Unavailable { .. })));
    pg.start_again();
    let mut created = None;
    for _ in 0..50 {
        match r.create("bob", 0).await {
            Ok(c) => {
                created = Some(c);
                break;
            }
            Err(RegistryError::Unavailable { .. }) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(created.is_some(), "writes resume");
    // Nothing half-written: alice is still at epoch 0, bob exists once.
    assert_eq!(pg.sql("SELECT name || ':' || epoch FROM tenants ORDER BY id"), "alice:0\nbob:0");
    assert_eq!(pg.sql("SELECT count(*) FROM key_epochs"), "2");
}
