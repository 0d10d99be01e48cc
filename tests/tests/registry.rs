//! The registry suite: every behaviour the platform relies on, as one generic test per
//! behaviour, run against each `Registry` implementation.

use std::sync::Arc;
use std::time::Duration;

use cellmail_control::registry::etcd::EtcdRegistry;
use cellmail_control::registry::local::LocalRegistry;
use cellmail_control::registry::{Compare, EventKind, Op, Registry, RegistryError};

struct Subject {
    registry: Arc<dyn Registry>,
    /// Every test works under its own prefix.
    prefix: String,
    _dir: tempfile::TempDir,
}

async fn local() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::open(&dir.path().join("registry.redb"))
        .await
        .unwrap();
    Subject {
        registry: Arc::new(registry),
        prefix: "/suite/".into(),
        _dir: dir,
    }
}

async fn etcd() -> Subject {
    let registry = EtcdRegistry::connect(&[cellmail_tests::services::etcd_endpoint()])
        .await
        .unwrap();
    let prefix = cellmail_tests::services::unique_prefix("registry");
    Subject {
        registry: Arc::new(registry),
        prefix,
        _dir: tempfile::tempdir().unwrap(),
    }
}

async fn cas_conflict_is_refused(s: Subject) {
    let key = format!("{}placements/acme", s.prefix);
    let created = s
        .registry
        .compare_and_swap(&key, 0, b"v1".to_vec())
        .await
        .unwrap()
        .expect("create");
    assert_eq!(
        s.registry
            .compare_and_swap(&key, 0, b"again".to_vec())
            .await
            .unwrap(),
        None,
        "create over existing"
    );
    let updated = s
        .registry
        .compare_and_swap(&key, created, b"v2".to_vec())
        .await
        .unwrap()
        .expect("update at current");
    assert!(updated > created);
    assert_eq!(
        s.registry
            .compare_and_swap(&key, created, b"stale".to_vec())
            .await
            .unwrap(),
        None,
        "stale revision"
    );
    let current = s.registry.get(&key).await.unwrap().unwrap();
    assert_eq!(current.value, b"v2");
    assert_eq!(current.mod_revision, updated);
    assert_eq!(current.create_revision, created);
}

async fn a_failed_transaction_writes_nothing(s: Subject) {
    let (a, b) = (format!("{}a", s.prefix), format!("{}b", s.prefix));
    s.registry.put(&a, b"1".to_vec(), None).await.unwrap();
    let ops = vec![
        Op::Put {
            key: a.clone(),
            value: b"2".to_vec(),
            lease: None,
        },
        Op::Put {
            key: b.clone(),
            value: b"2".to_vec(),
            lease: None,
        },
    ];
    let compares = vec![Compare {
        key: a.clone(),
        mod_revision: 0,
    }];
    assert_eq!(s.registry.txn(compares, ops).await.unwrap(), None);
    assert_eq!(s.registry.get(&a).await.unwrap().unwrap().value, b"1");
    assert_eq!(s.registry.get(&b).await.unwrap(), None);
}

async fn watch_delivers_every_change_in_revision_order_from_a_revision(s: Subject) {
    let key = |n: u32| format!("{}k{n}", s.prefix);
    let first = s.registry.put(&key(0), b"0".to_vec(), None).await.unwrap();
    for n in 1..20 {
        s.registry
            .put(&key(n % 3), n.to_string().into_bytes(), None)
            .await
            .unwrap();
    }
    s.registry.delete(&key(1)).await.unwrap();
    s.registry
        .put("/elsewhere/k", b"x".to_vec(), None)
        .await
        .unwrap();
    // Starting at the first revision replays the past, then follows live changes.
    let mut watcher = s.registry.watch(&s.prefix, first).await.unwrap();
    s.registry
        .put(&key(7), b"live".to_vec(), None)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 22 {
        let event = tokio::time::timeout(Duration::from_secs(5), watcher.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            event.key.starts_with(&s.prefix),
            "foreign key {}",
            event.key
        );
        seen.push(event);
    }
    assert!(
        seen.windows(2)
            .all(|w| w[0].mod_revision < w[1].mod_revision),
        "revision order"
    );
    assert_eq!(seen[0].mod_revision, first);
    assert_eq!(seen[20].kind, EventKind::Delete);
    assert_eq!(
        (seen[21].key.as_str(), seen[21].value.as_slice()),
        (key(7).as_str(), b"live".as_slice())
    );
}

async fn keys_bound_to_an_expired_lease_disappear(s: Subject) {
    let (bound, kept) = (
        format!("{}alive/c1", s.prefix),
        format!("{}alive/c2", s.prefix),
    );
    let lease = s
        .registry
        .grant_lease(Duration::from_secs(1))
        .await
        .unwrap();
    s.registry
        .put(&bound, Vec::new(), Some(lease))
        .await
        .unwrap();
    let held = s
        .registry
        .grant_lease(Duration::from_secs(1))
        .await
        .unwrap();
    s.registry.put(&kept, Vec::new(), Some(held)).await.unwrap();
    let registry = s.registry.clone();
    let keepalive = tokio::spawn(async move {
        loop {
            registry.keep_alive(held).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut gone = false;
    // etcd may round a short TTL up to its minimum (a few seconds).
    for _ in 0..150 {
        if s.registry.get(&bound).await.unwrap().is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    keepalive.abort();
    assert!(gone, "key of the expired lease is still there");
    assert!(
        s.registry.get(&kept).await.unwrap().is_some(),
        "key of the kept-alive lease vanished"
    );
    let put = s.registry.put(&bound, Vec::new(), Some(lease)).await;
    assert_eq!(put, Err(RegistryError::LeaseNotFound(lease)));
}

macro_rules! suite {
    ($implementation:ident: $($behaviour:ident),* $(,)?) => {
        mod $implementation {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $behaviour() {
                    super::$behaviour(super::$implementation().await).await;
                }
            )*
        }
    };
}

suite!(local:
    cas_conflict_is_refused,
    a_failed_transaction_writes_nothing,
    watch_delivers_every_change_in_revision_order_from_a_revision,
    keys_bound_to_an_expired_lease_disappear,
);

suite!(etcd:
    cas_conflict_is_refused,
    a_failed_transaction_writes_nothing,
    watch_delivers_every_change_in_revision_order_from_a_revision,
    keys_bound_to_an_expired_lease_disappear,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_state_survives_a_restart_and_old_revisions_are_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let (revision, leased) = {
        let registry = LocalRegistry::open(&path).await.unwrap();
        registry
            .put("/p/tenants/a", b"A".to_vec(), None)
            .await
            .unwrap();
        let lease = registry.grant_lease(Duration::from_secs(60)).await.unwrap();
        registry
            .put("/p/alive/c1", Vec::new(), Some(lease))
            .await
            .unwrap();
        (
            registry
                .put("/p/placements/a", b"P".to_vec(), None)
                .await
                .unwrap(),
            "/p/alive/c1",
        )
    };
    let registry = LocalRegistry::open(&path).await.unwrap();
    let kv = registry
        .get("/p/placements/a")
        .await
        .unwrap()
        .expect("placement survived");
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (b"P".as_slice(), revision)
    );
    assert_eq!(
        registry.get("/p/tenants/a").await.unwrap().unwrap().value,
        b"A"
    );
    assert_eq!(
        registry.get(leased).await.unwrap(),
        None,
        "a lease does not outlive its process"
    );
    let next = registry
        .put("/p/tenants/b", b"B".to_vec(), None)
        .await
        .unwrap();
    assert!(next > revision, "revisions keep growing across restarts");
    match registry.watch("/p/", revision).await {
        Err(RegistryError::Compacted { requested, .. }) => assert_eq!(requested, revision),
        other => panic!("expected Compacted, got {:?}", other.map(|_| ())),
    }
    let snapshot = registry.list("/p/").await.unwrap();
    assert_eq!(snapshot.entries.len(), 3);
    assert_eq!(snapshot.revision, next);
}
