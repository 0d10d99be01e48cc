//! The registry suite: every behaviour the platform relies on, as one generic test per
//! behaviour, run against each `Registry` implementation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellmail_control::leader::run_as_leader;
use cellmail_registry::etcd::EtcdRegistry;
use cellmail_registry::local::LocalRegistry;
use cellmail_registry::{Compare, EventKind, LeaderKey, LeaseId, Op, Registry, RegistryError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

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

/// A prefix holding more than one gRPC response may carry (4 MB by default) is listed whole
/// and in key order, and nothing outside the prefix comes with it.
async fn a_list_larger_than_one_response_is_whole_and_in_order(s: Subject) {
    let under = format!("{}big/", s.prefix);
    let value = |n: usize| format!("{n:06}").repeat(350).into_bytes();
    let mut last = 0;
    for batch in 0..30 {
        let ops = (0..100)
            .map(|i| Op::Put {
                key: format!("{under}{:06}", batch * 100 + i),
                value: value(batch * 100 + i),
                lease: None,
            })
            .collect();
        last = s.registry.txn(Vec::new(), ops).await.unwrap().unwrap();
    }
    // Right after the prefix in key order, and not under it.
    let beside = format!("{}big0", s.prefix);
    s.registry.put(&beside, b"x".to_vec(), None).await.unwrap();
    let snapshot = s.registry.list(&under).await.unwrap();
    assert!(snapshot.revision > last);
    assert_eq!(snapshot.entries.len(), 3000);
    for (n, kv) in snapshot.entries.iter().enumerate() {
        assert_eq!(kv.key, format!("{under}{n:06}"));
        assert_eq!(kv.value, value(n), "value of {}", kv.key);
    }
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

/// Leases of the election tests: far longer than any wait below, so a handover that waited
/// for a lease to expire instead of following a revoke or resign fails the test.
const CANDIDACY_TTL: Duration = Duration::from_secs(30);
/// How long a handover (revoke or resign, then the next campaign resolving) may take.
const HANDOVER: Duration = Duration::from_secs(5);
/// A campaign that has not resolved after this long is taken to be waiting its turn.
const STILL_WAITING: Duration = Duration::from_millis(500);

fn spawn_campaign(
    s: &Subject,
    election: &str,
    value: &str,
    lease: LeaseId,
) -> JoinHandle<Result<LeaderKey, RegistryError>> {
    let (registry, election, value) = (s.registry.clone(), election.to_owned(), value.to_owned());
    tokio::spawn(async move {
        registry
            .campaign(&election, value.into_bytes(), lease)
            .await
    })
}

async fn campaign_at_once(s: &Subject, election: &str, value: &str, lease: LeaseId) -> LeaderKey {
    timeout(
        HANDOVER,
        s.registry
            .campaign(election, value.as_bytes().to_vec(), lease),
    )
    .await
    .expect("the campaign leads at once")
    .unwrap()
}

async fn leader_value(s: &Subject, election: &str) -> Option<String> {
    let value = s.registry.leader(election).await.unwrap();
    value.map(|v| String::from_utf8(v).unwrap())
}

async fn the_first_candidate_leads_and_the_next_takes_over_when_its_lease_ends(s: Subject) {
    let election = format!("{}election/control", s.prefix);
    assert_eq!(leader_value(&s, &election).await, None, "no candidate yet");
    let a = s.registry.grant_lease(CANDIDACY_TTL).await.unwrap();
    let b = s.registry.grant_lease(CANDIDACY_TTL).await.unwrap();
    let first = campaign_at_once(&s, &election, "a", a).await;
    assert_eq!(
        (first.key.as_str(), first.lease),
        (format!("{election}/{a:x}").as_str(), a),
        "etcd's key layout: <election>/<lease in hex>"
    );
    let mut second = spawn_campaign(&s, &election, "b", b);
    assert!(
        timeout(STILL_WAITING, &mut second).await.is_err(),
        "b leads while a still does"
    );
    assert_eq!(leader_value(&s, &election).await.as_deref(), Some("a"));

    s.registry.revoke_lease(a).await.unwrap();
    let second = timeout(HANDOVER, second)
        .await
        .expect("b leads once a's lease ended")
        .unwrap()
        .unwrap();
    assert_eq!(second.key, format!("{election}/{b:x}"));
    assert!(second.create_revision > first.create_revision);
    assert_eq!(leader_value(&s, &election).await.as_deref(), Some("b"));

    s.registry.revoke_lease(b).await.unwrap();
    assert_eq!(leader_value(&s, &election).await, None, "every lease ended");
}

async fn a_resigned_leader_hands_over_at_once(s: Subject) {
    let election = format!("{}election/control", s.prefix);
    let a = s.registry.grant_lease(CANDIDACY_TTL).await.unwrap();
    let b = s.registry.grant_lease(CANDIDACY_TTL).await.unwrap();
    let first = campaign_at_once(&s, &election, "a", a).await;
    let mut second = spawn_campaign(&s, &election, "b", b);
    assert!(
        timeout(STILL_WAITING, &mut second).await.is_err(),
        "b leads while a still does"
    );

    s.registry.resign(&first).await.unwrap();
    timeout(HANDOVER, second)
        .await
        .expect("b leads once a resigned")
        .unwrap()
        .unwrap();
    assert_eq!(leader_value(&s, &election).await.as_deref(), Some("b"));
    assert_eq!(s.registry.get(&first.key).await.unwrap(), None);
    s.registry.resign(&first).await.unwrap();
    assert_eq!(
        leader_value(&s, &election).await.as_deref(),
        Some("b"),
        "resigning an ended candidacy again touches nobody else's"
    );
    // Resigning gave the candidacy up, not the lease.
    s.registry.keep_alive(a).await.unwrap();
    s.registry.revoke_lease(a).await.unwrap();
    s.registry.revoke_lease(b).await.unwrap();
}

async fn campaigning_again_on_the_same_lease_keeps_the_candidacy(s: Subject) {
    let election = format!("{}election/control", s.prefix);
    let a = s.registry.grant_lease(CANDIDACY_TTL).await.unwrap();
    let b = s.registry.grant_lease(CANDIDACY_TTL).await.unwrap();
    let first = campaign_at_once(&s, &election, "a", a).await;
    let mut second = spawn_campaign(&s, &election, "b", b);
    assert!(timeout(STILL_WAITING, &mut second).await.is_err());

    let again = campaign_at_once(&s, &election, "a, again", a).await;
    assert_eq!(again, first, "same key, same place in line");
    assert_eq!(
        leader_value(&s, &election).await.as_deref(),
        Some("a, again")
    );
    assert!(
        timeout(STILL_WAITING, &mut second).await.is_err(),
        "b leads while a still does"
    );
    s.registry.revoke_lease(a).await.unwrap();
    timeout(HANDOVER, second).await.unwrap().unwrap().unwrap();
    s.registry.revoke_lease(b).await.unwrap();
}

async fn campaigning_on_an_ended_lease_is_refused(s: Subject) {
    let election = format!("{}election/control", s.prefix);
    let lease = s.registry.grant_lease(CANDIDACY_TTL).await.unwrap();
    s.registry.revoke_lease(lease).await.unwrap();
    let campaign = timeout(
        HANDOVER,
        s.registry.campaign(&election, b"a".to_vec(), lease),
    )
    .await
    .expect("refused at once");
    assert_eq!(campaign, Err(RegistryError::LeaseNotFound(lease)));
    assert_eq!(leader_value(&s, &election).await, None);
}

/// What the work of `run_as_leader` candidates did, seen from outside.
#[derive(Default)]
struct Works {
    running: Vec<String>,
    most_at_once: usize,
}

struct Contender {
    shutdown: CancellationToken,
    run: JoinHandle<Result<(), RegistryError>>,
}

/// Starts a `run_as_leader` loop whose work records itself in `works`, says on `started`
/// that it runs, and runs until leadership ends.
fn contend(
    s: &Subject,
    election: &str,
    id: &str,
    works: &Arc<Mutex<Works>>,
    started: &mpsc::UnboundedSender<String>,
) -> Contender {
    let shutdown = CancellationToken::new();
    let (works, started, me) = (works.clone(), started.clone(), id.to_owned());
    let work = move |lost: CancellationToken| {
        let (works, started, me) = (works.clone(), started.clone(), me.clone());
        async move {
            {
                let mut works = works.lock().unwrap();
                works.running.push(me.clone());
                works.most_at_once = works.most_at_once.max(works.running.len());
            }
            started.send(me.clone()).unwrap();
            lost.cancelled().await;
            works.lock().unwrap().running.retain(|r| *r != me);
        }
    };
    // Keepalives every second: a revoked leader learns of it within one.
    let ttl = Duration::from_secs(3);
    let run = tokio::spawn(run_as_leader(
        s.registry.clone(),
        election.to_owned(),
        id.to_owned(),
        ttl,
        shutdown.clone(),
        Default::default(),
        work,
    ));
    Contender { shutdown, run }
}

async fn only_the_leader_runs_its_work_and_a_standby_takes_over(s: Subject) {
    let election = format!("{}election/control", s.prefix);
    let works = Arc::new(Mutex::new(Works::default()));
    let (started, mut starts) = mpsc::unbounded_channel();
    let mut contenders = vec![
        ("one", contend(&s, &election, "one", &works, &started)),
        ("two", contend(&s, &election, "two", &works, &started)),
    ];
    let running = |works: &Arc<Mutex<Works>>| works.lock().unwrap().running.clone();

    let first = timeout(HANDOVER, starts.recv()).await.unwrap().unwrap();
    assert!(
        timeout(STILL_WAITING, starts.recv()).await.is_err(),
        "a second leader runs"
    );
    assert_eq!(running(&works), [first.as_str()]);
    assert_eq!(leader_value(&s, &election).await, Some(first.clone()));

    // The registry drops the leader's lease: its keepalive is refused, its work told to stop.
    let candidates = s
        .registry
        .list(&format!("{election}/"))
        .await
        .unwrap()
        .entries;
    let leading = candidates
        .iter()
        .min_by_key(|kv| kv.create_revision)
        .and_then(|kv| kv.lease)
        .expect("the leader's key is bound to a lease");
    s.registry.revoke_lease(leading).await.unwrap();
    let second = timeout(HANDOVER, starts.recv()).await.unwrap().unwrap();
    assert_ne!(second, first, "the standby takes over");
    cellmail_tests::wait_for(HANDOVER, "the revoked leader to stop", || {
        (running(&works) == [second.as_str()]).then_some(())
    })
    .await
    .unwrap();
    // A revoked leader may overlap its successor until its next keepalive; from here on
    // handovers are resignations, which must not overlap at all.
    works.lock().unwrap().most_at_once = 1;

    // The former leader campaigned again, so stopping the current one hands back to it.
    let at = contenders.iter().position(|(id, _)| *id == second).unwrap();
    let (_, stopped) = contenders.remove(at);
    stopped.shutdown.cancel();
    timeout(HANDOVER, stopped.run)
        .await
        .expect("a stopped loop returns")
        .unwrap()
        .unwrap();
    let third = timeout(HANDOVER, starts.recv()).await.unwrap().unwrap();
    assert_eq!(third, first);
    assert_eq!(leader_value(&s, &election).await, Some(first.clone()));
    assert_eq!(
        works.lock().unwrap().most_at_once,
        1,
        "two leaders ran at once"
    );

    for (_, contender) in contenders {
        contender.shutdown.cancel();
        timeout(HANDOVER, contender.run)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    assert!(running(&works).is_empty());
    assert_eq!(leader_value(&s, &election).await, None, "stopping resigned");
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
    a_list_larger_than_one_response_is_whole_and_in_order,
    watch_delivers_every_change_in_revision_order_from_a_revision,
    keys_bound_to_an_expired_lease_disappear,
    the_first_candidate_leads_and_the_next_takes_over_when_its_lease_ends,
    a_resigned_leader_hands_over_at_once,
    campaigning_again_on_the_same_lease_keeps_the_candidacy,
    campaigning_on_an_ended_lease_is_refused,
    only_the_leader_runs_its_work_and_a_standby_takes_over,
);

suite!(etcd:
    cas_conflict_is_refused,
    a_failed_transaction_writes_nothing,
    a_list_larger_than_one_response_is_whole_and_in_order,
    watch_delivers_every_change_in_revision_order_from_a_revision,
    keys_bound_to_an_expired_lease_disappear,
    the_first_candidate_leads_and_the_next_takes_over_when_its_lease_ends,
    a_resigned_leader_hands_over_at_once,
    campaigning_again_on_the_same_lease_keeps_the_candidacy,
    campaigning_on_an_ended_lease_is_refused,
    only_the_leader_runs_its_work_and_a_standby_takes_over,
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
