//! The store through its own methods: each domain's writes and reads, a tenant's state
//! moving between two stores, and what survives reopening the file.

use std::time::Duration;

use cellmail_proto::clock::HOUR_MS;
use cellmail_proto::{MessageClass, SuppressionReason, now_ms, suppression_key};

use super::*;
use crate::message::{EventKind, MessageEvent, RecipientOutcome};

fn accepted(id: MessageId) -> Accepted {
    Accepted {
        message_id: id,
        recipients: vec![RecipientOutcome {
            address: "a@example.com".into(),
            suppressed: None,
        }],
    }
}

fn record(id: MessageId, tenant: &TenantId) -> MessageRecord {
    MessageRecord {
        id,
        tenant: tenant.clone(),
        class: MessageClass::Transactional,
        state: MessageState::Queued,
        recipients: accepted(id).recipients,
        events: Vec::new(),
        accepted_at_ms: 1,
        tags: [("campaign".to_owned(), "fall".to_owned())].into(),
    }
}

#[tokio::test]
async fn each_step_of_a_message_is_logged_once_for_its_tenant_and_read_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store.redb")).unwrap();
    let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
    let id = MessageId::generate();
    let mut first = record(id, &a);
    first.recipients.push(RecipientOutcome {
        address: "gone@example.com".into(),
        suppressed: Some((
            SuppressionReason::Bounce,
            cellmail_proto::SuppressionScope::Tenant,
        )),
    });
    store
        .accepted(None, accepted(id), first, None, 1)
        .await
        .unwrap();
    store
        .record_outcome(
            record(id, &a),
            MessageState::Sent,
            event(EventKind::Sent, 2, ""),
        )
        .await
        .unwrap();
    let bounce = MessageEvent {
        recipient: Some("a@example.com".into()),
        ..event(EventKind::Bounce, 3, "Permanent/General: 550 5.1.1")
    };
    for _ in 0..2 {
        store
            .record_feedback(&a, Some(id), vec![bounce.clone()], None)
            .await
            .unwrap();
    }
    // Another tenant's feedback on a's message is not a's event, nor b's.
    store
        .record_feedback(&b, Some(id), vec![event(EventKind::Complaint, 4, "")], None)
        .await
        .unwrap();
    let all = EventFilter::default();
    let (events, next) = store.events(&a, &all, None, 10).unwrap();
    assert_eq!(next, None);
    let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["accepted", "suppressed", "sent", "bounced"]);
    assert!(events.iter().all(|e| e.message_id == id.to_string()));
    assert!(events.iter().all(|e| e.tags["campaign"] == "fall"));
    assert_eq!(events[1].recipient.as_deref(), Some("gone@example.com"));
    assert_eq!(events[3].detail, "Permanent/General: 550 5.1.1");
    assert!(store.events(&b, &all, None, 10).unwrap().0.is_empty());

    // Pages of one go on where the last stopped; filters pick by type and recipient.
    let mut after = None;
    let mut paged = Vec::new();
    loop {
        let (page, next) = store.events(&a, &all, after.as_ref(), 1).unwrap();
        paged.extend(page);
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, events);
    let bounced = EventFilter {
        types: vec![EventType::Bounced, EventType::Suppressed],
        recipient: Some("A@EXAMPLE.COM".into()),
        ..EventFilter::default()
    };
    let (found, _) = store.events(&a, &bounced, None, 10).unwrap();
    assert_eq!(found, events[3..].to_vec());
    let later = EventFilter {
        from_ms: 3,
        ..EventFilter::default()
    };
    assert_eq!(store.events(&a, &later, None, 10).unwrap().0.len(), 1);

    // Opens repeat without end: the record keeps the first 20, the log every one.
    for at in 10..35 {
        store
            .record_feedback(&a, Some(id), vec![event(EventKind::Open, at, "")], None)
            .await
            .unwrap();
    }
    let opens =
        |events: &[MessageEvent]| events.iter().filter(|e| e.kind == EventKind::Open).count();
    assert_eq!(opens(&store.message(&a, id).unwrap().unwrap().events), 20);
    let opened = EventFilter {
        types: vec![EventType::Opened],
        ..EventFilter::default()
    };
    assert_eq!(store.events(&a, &opened, None, 100).unwrap().0.len(), 25);
    let events: Vec<_> = (store.events(&a, &all, None, 100).unwrap().0.into_iter())
        .filter(|e| e.kind != EventType::Opened)
        .collect();

    // A copy of the log imports once however often it comes; erasing drops it.
    let other = Store::open(&dir.path().join("other.redb")).unwrap();
    for _ in 0..2 {
        let written = store.written_events(&a, 0).unwrap();
        other.import_events(&a, written).await.unwrap();
    }
    let copied: Vec<_> = (other.events(&a, &all, None, 100).unwrap().0.into_iter())
        .filter(|e| e.kind != EventType::Opened)
        .collect();
    assert_eq!(copied, events);
    store.erase(&a).await.unwrap();
    assert!(store.events(&a, &all, None, 10).unwrap().0.is_empty());
}

#[tokio::test]
async fn a_key_is_new_then_pending_then_done_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let tenant = TenantId::new("t").unwrap();
    let (first, second) = (MessageId::generate(), MessageId::generate());
    {
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.reserve(&tenant, "k", first, 1_000).await.unwrap(),
            Reservation::New
        );
        assert_eq!(
            store.reserve(&tenant, "k", second, 1_001).await.unwrap(),
            Reservation::Pending(first)
        );
        store
            .accepted(
                Some("k"),
                accepted(first),
                record(first, &tenant),
                None,
                1_002,
            )
            .await
            .unwrap();
        // A durable write after the lazy one makes both durable.
        store
            .suppress(
                &tenant,
                Suppressed {
                    address: "x@example.com".into(),
                    reason: SuppressionReason::Manual,
                    at_ms: 0,
                    message_id: None,
                },
            )
            .await
            .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.reserve(&tenant, "k", second, 1_003).await.unwrap(),
        Reservation::Done(accepted(first))
    );
    let other = TenantId::new("other").unwrap();
    assert_eq!(
        store.reserve(&other, "k", second, 1_004).await.unwrap(),
        Reservation::New,
        "keys are per tenant"
    );
}

#[tokio::test]
async fn an_accept_queues_its_message_with_its_key_and_record_or_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let tenant = TenantId::new("t").unwrap();
    let (first, second) = (MessageId::generate(), MessageId::generate());
    let slot = |seq| Slot { lane: 0, seq };
    {
        let store = Store::open(&path).unwrap();
        let accept = |key: &'static str, id: MessageId, seq| {
            let staged = Staged {
                slot: slot(seq),
                body: id.to_string().into_bytes(),
            };
            let record = record(id, &tenant);
            store.accepted(Some(key), accepted(id), record, Some(staged), 1_000)
        };
        assert_eq!(accept("k", first, 1).await.unwrap(), Reservation::New);
        assert_eq!(
            accept("k", second, 2).await.unwrap(),
            Reservation::Done(accepted(first)),
            "a key already answered"
        );
        assert_eq!(
            store.held(&tenant, "k", 1_001).unwrap(),
            Some(Reservation::Done(accepted(first)))
        );
        store.reserve(&tenant, "p", first, 1_000).await.unwrap();
        assert_eq!(
            accept("p", second, 3).await.unwrap(),
            Reservation::Pending(first),
            "a key another attempt reserved"
        );
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.queued().unwrap(),
        [(slot(1), 0)],
        "only the new accept queued"
    );
    assert_eq!(
        store.queued_bodies(&[slot(1), slot(2)]).unwrap(),
        [Some(first.to_string().into_bytes()), None]
    );
    assert!(store.message(&tenant, first).unwrap().is_some());
    assert!(store.message(&tenant, second).unwrap().is_none());
}

#[tokio::test]
async fn a_key_past_the_window_is_new_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store.redb")).unwrap();
    let tenant = TenantId::new("t").unwrap();
    let id = MessageId::generate();
    store.reserve(&tenant, "k", id, 0).await.unwrap();
    store
        .accepted(Some("k"), accepted(id), record(id, &tenant), None, 0)
        .await
        .unwrap();
    let later = IDEMPOTENCY_WINDOW.as_millis() as u64 + 1;
    assert_eq!(
        store
            .reserve(&tenant, "k", MessageId::generate(), later)
            .await
            .unwrap(),
        Reservation::New
    );
}

#[tokio::test]
async fn messages_answer_only_their_tenant_and_collect_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store.redb")).unwrap();
    let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
    let id = MessageId::generate();
    store
        .accepted(None, accepted(id), record(id, &a), None, 1)
        .await
        .unwrap();
    assert!(!store.settled(id).unwrap());
    store
        .record_outcome(
            record(id, &a),
            MessageState::Sent,
            event(EventKind::Sent, 2, ""),
        )
        .await
        .unwrap();
    assert!(store.settled(id).unwrap());
    let delivered = async |tenant: &TenantId| {
        let counts = Counts {
            delivered: 1,
            ..Counts::default()
        };
        let events = vec![event(EventKind::Delivery, 3, "")];
        let counts = Some((MessageClass::Transactional, 3, counts));
        store
            .record_feedback(tenant, Some(id), events, counts)
            .await
    };
    assert_eq!(
        delivered(&b).await.unwrap(),
        Recorded::NoMessage,
        "b cannot touch a's message"
    );
    assert_eq!(delivered(&a).await.unwrap(), Recorded::New);
    assert_eq!(
        delivered(&a).await.unwrap(),
        Recorded::Duplicate,
        "the same record delivered again"
    );
    let figures = |tenant| {
        store
            .stats(tenant, MessageClass::Transactional, Figures::Own, 3, 1)
            .unwrap()
    };
    assert_eq!(
        (figures(&a).delivered, figures(&b).delivered),
        (1, 1),
        "counted once for a; b's figures count what b was told, not a's message"
    );
    assert_eq!(store.message(&b, id).unwrap(), None);
    let mine = store.message(&a, id).unwrap().unwrap();
    assert_eq!(mine.state, MessageState::Sent);
    assert_eq!(
        mine.events.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [EventKind::Sent, EventKind::Delivery]
    );
}

/// Counts `delta` in `tenant`'s figures the way feedback for no message here does.
async fn count(store: &Store, tenant: &TenantId, class: MessageClass, at_ms: u64, delta: Counts) {
    let counts = Some((class, at_ms, delta));
    let recorded = store
        .record_feedback(tenant, None, Vec::new(), counts)
        .await;
    assert_eq!(recorded.unwrap(), Recorded::NoMessage);
}

#[tokio::test]
async fn figures_add_up_per_tenant_class_and_hour_window() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store.redb")).unwrap();
    let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
    let class = MessageClass::Transactional;
    let hour = HOUR_MS;
    let now = 1_000 * hour + 5;
    for (tenant, class, at_ms, delta) in [
        (
            &a,
            class,
            now,
            Counts {
                sent: 2,
                bounced: 1,
                ..Counts::default()
            },
        ),
        (
            &a,
            class,
            now - hour,
            Counts {
                sent: 3,
                ..Counts::default()
            },
        ),
        (
            &a,
            class,
            now - 5 * hour,
            Counts {
                sent: 100,
                ..Counts::default()
            },
        ),
        (
            &a,
            MessageClass::Marketing,
            now,
            Counts {
                complained: 1,
                ..Counts::default()
            },
        ),
        (
            &b,
            class,
            now,
            Counts {
                sent: 7,
                ..Counts::default()
            },
        ),
    ] {
        count(&store, tenant, class, at_ms, delta).await;
    }
    assert_eq!(
        store.stats(&a, class, Figures::Own, now, 1).unwrap(),
        Counts {
            sent: 2,
            bounced: 1,
            ..Counts::default()
        }
    );
    assert_eq!(
        store.stats(&a, class, Figures::Own, now, 2).unwrap().sent,
        5
    );
    assert_eq!(
        store.stats(&a, class, Figures::Own, now, 24).unwrap().sent,
        105
    );
    assert_eq!(
        store
            .stats(&a, MessageClass::Marketing, Figures::Own, now, 24)
            .unwrap()
            .complained,
        1
    );
    assert_eq!(
        store.stats(&b, class, Figures::Own, now, 24).unwrap(),
        Counts {
            sent: 7,
            ..Counts::default()
        }
    );
    let id = MessageId::generate();
    store
        .accepted(None, accepted(id), record(id, &a), None, now)
        .await
        .unwrap();
    // The record was accepted at 1 ms (hour 0); it is sent in the same hour.
    store
        .record_outcome(
            record(id, &a),
            MessageState::Sent,
            event(EventKind::Sent, 2, ""),
        )
        .await
        .unwrap();
    let counted = store.stats(&a, class, Figures::Own, 2, 1).unwrap();
    assert_eq!(
        (counted.accepted, counted.sent),
        (1, 1),
        "accepts and sends count themselves"
    );
}

#[tokio::test]
async fn figures_follow_a_tenant_to_the_cells_it_moves_to_each_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| Store::open(&dir.path().join(format!("{name}.redb"))).unwrap();
    let (x, y) = (open("x"), open("y"));
    let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
    let class = MessageClass::Marketing;
    let now = now_ms();
    let sent = |sent, complained| Counts {
        sent,
        complained,
        ..Counts::default()
    };
    count(&x, &a, class, now, sent(10, 1)).await;
    count(&x, &b, class, now, sent(5, 0)).await;
    // a moves from x to y; the copy is made twice (a retried pass) and counted once.
    for _ in 0..2 {
        let rows = x.figures(&a, "x", now).unwrap();
        assert!(rows.iter().all(|r| r.origin == "x"), "{rows:?}");
        y.carry(&a, "y", rows).await.unwrap();
    }
    count(&y, &a, class, now, sent(3, 0)).await;
    let on = |store: &Store, tenant: &TenantId, figures| {
        store.stats(tenant, class, figures, now, 1).unwrap()
    };
    assert_eq!(on(&y, &a, Figures::Carried), sent(13, 1));
    assert_eq!(on(&y, &a, Figures::Own), sent(3, 0));
    assert_eq!(
        y.window(&a, class, now - 60_000, now).unwrap(),
        sent(13, 1),
        "a's breaker on y weighs what x counted"
    );
    assert_eq!(
        on(&y, &b, Figures::Carried),
        Counts::default(),
        "b stayed on x"
    );
    // a moves back: x takes what y counted and not its own figures a second time.
    x.carry(&a, "x", y.figures(&a, "y", now).unwrap())
        .await
        .unwrap();
    assert_eq!(on(&x, &a, Figures::Carried), sent(13, 1));
    assert_eq!(on(&x, &b, Figures::Carried), sent(5, 0));
    // What a cell carried goes when the tenant's state here is dropped.
    y.forget(&a).await.unwrap();
    assert_eq!(on(&y, &a, Figures::Carried), sent(3, 0));
}

#[tokio::test]
async fn suppression_lists_are_per_tenant_case_folded_and_paged() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store.redb")).unwrap();
    let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
    let entry = |address: &str| Suppressed {
        address: address.into(),
        reason: SuppressionReason::Bounce,
        at_ms: 1,
        message_id: None,
    };
    for address in ["c@x.example", "A@x.example", "b@x.example"] {
        store.suppress(&a, entry(address)).await.unwrap();
    }
    store.suppress(&b, entry("z@x.example")).await.unwrap();
    let found = store
        .suppressions_of(&a, &["a@X.example", "z@x.example"])
        .unwrap();
    assert_eq!(
        found[0].as_ref().map(|s| s.address.as_str()),
        Some("A@x.example")
    );
    assert_eq!(found[1], None, "b's entry is not a's");
    let page = store.list_suppressions(&a, "", 2).unwrap();
    assert_eq!(
        page.iter().map(|s| s.address.as_str()).collect::<Vec<_>>(),
        ["A@x.example", "b@x.example"]
    );
    let rest = store
        .list_suppressions(&a, &suppression_key(&page[1].address), 2)
        .unwrap();
    assert_eq!(
        rest.iter().map(|s| s.address.as_str()).collect::<Vec<_>>(),
        ["c@x.example"]
    );
    assert!(store.unsuppress(&a, "C@X.EXAMPLE").await.unwrap());
    assert!(!store.unsuppress(&a, "c@x.example").await.unwrap());
    assert_eq!(store.list_suppressions(&b, "", 10).unwrap().len(), 1);
}

#[tokio::test]
async fn a_tenants_export_holds_only_its_own_state_and_the_final_copy_what_changed_since() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store.redb")).unwrap();
    let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
    let bounce = Suppressed {
        address: "gone@x.example".into(),
        reason: SuppressionReason::Bounce,
        at_ms: 1,
        message_id: None,
    };
    store.suppress(&a, bounce.clone()).await.unwrap();
    store.suppress(&b, bounce.clone()).await.unwrap();
    let (old, new, theirs) = (
        MessageId::generate(),
        MessageId::generate(),
        MessageId::generate(),
    );
    store.reserve(&a, "old", old, 1_000).await.unwrap();
    store
        .accepted(Some("old"), accepted(old), record(old, &a), None, 1_000)
        .await
        .unwrap();
    store.reserve(&b, "theirs", theirs, 5_000).await.unwrap();
    store.reserve(&a, "new", new, 5_000).await.unwrap();

    after(now_ms()).await;
    let (as_of, precopy) = store.export(&a, 6_000, None).unwrap();
    assert_eq!(precopy.suppressions, std::slice::from_ref(&bounce));
    let keys: Vec<&str> = precopy
        .idempotency
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(keys, ["new", "old"]);
    // After the pre-copy: an address is added and the bounced one taken off the list.
    let later = Suppressed {
        address: "later@x.example".into(),
        ..bounce.clone()
    };
    store.suppress(&a, later.clone()).await.unwrap();
    assert!(store.unsuppress(&a, "Gone@x.example").await.unwrap());
    // The pending key completes, and one whose queueing failed is left pending.
    store
        .accepted(Some("new"), accepted(new), record(new, &a), None, 5_500)
        .await
        .unwrap();
    store
        .reserve(&a, "stray", MessageId::generate(), 5_600)
        .await
        .unwrap();
    let (_, last) = store.export(&a, 6_000, Some(as_of)).unwrap();
    assert_eq!(last.suppressions, std::slice::from_ref(&later));
    assert_eq!(last.removed_suppressions, ["gone@x.example"]);
    let keys: Vec<&str> = last.idempotency.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["new"],
        "only keys completed since the pre-copy, and only a's"
    );

    let target = Store::open(&dir.path().join("target.redb")).unwrap();
    target
        .suppress(
            &a,
            Suppressed {
                address: "stale@x.example".into(),
                ..bounce.clone()
            },
        )
        .await
        .unwrap();
    target.forget(&a).await.unwrap();
    assert!(
        target.list_suppressions(&a, "", 10).unwrap().is_empty(),
        "a stale stay is forgotten"
    );
    target.import(&a, precopy).await.unwrap();
    target.import(&a, last).await.unwrap();
    assert_eq!(
        target
            .reserve(&a, "old", MessageId::generate(), 7_000)
            .await
            .unwrap(),
        Reservation::Done(accepted(old))
    );
    assert_eq!(
        target
            .reserve(&a, "new", MessageId::generate(), 7_000)
            .await
            .unwrap(),
        Reservation::Done(accepted(new))
    );
    assert_eq!(
        target
            .reserve(&a, "stray", MessageId::generate(), 7_000)
            .await
            .unwrap(),
        Reservation::New,
        "a send that was never queued is a new send on the new cell"
    );
    assert_eq!(target.list_suppressions(&a, "", 10).unwrap(), [later]);
    assert!(
        target.list_suppressions(&b, "", 10).unwrap().is_empty(),
        "b's state stayed home"
    );
}

/// Moves `tenant`'s state from `from` to `to` as a move's copies do, from `since_ms`
/// (0: everything).
async fn copy(from: &Store, to: &Store, tenant: &TenantId, since_ms: u64) {
    let since = (since_ms > 0).then_some(since_ms);
    to.import(tenant, from.export(tenant, now_ms(), since).unwrap().1)
        .await
        .unwrap();
    let written = from.written_messages(tenant, since_ms).unwrap();
    to.import_messages(tenant, from.messages(&written).unwrap())
        .await
        .unwrap();
}

/// Waits for the clock to pass `at_ms`, so that what follows is written after it.
async fn after(at_ms: u64) {
    while now_ms() <= at_ms {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn a_tenant_handed_over_and_back_copies_only_what_was_written_since_its_take_over() {
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = (
        Store::open(&dir.path().join("x.redb")).unwrap(),
        Store::open(&dir.path().join("y.redb")).unwrap(),
    );
    let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
    let entry = |address: &str| Suppressed {
        address: address.into(),
        reason: SuppressionReason::Manual,
        at_ms: 1,
        message_id: None,
    };
    // On x: a sends two messages (one bounces later), and has one suppression.
    let (quiet, bounced, theirs) = (
        MessageId::generate(),
        MessageId::generate(),
        MessageId::generate(),
    );
    for (key, id) in [("quiet", quiet), ("bounced", bounced)] {
        store_sent(&x, &a, key, id).await;
    }
    store_sent(&x, &b, "theirs", theirs).await;
    x.suppress(&a, entry("old@x.example")).await.unwrap();
    assert_eq!(x.handed_over(&a, now_ms()).unwrap(), None);

    // a moves to y (epoch 1 to 2): y notes it takes a over, everything is copied, and x
    // notes the hand-over.
    after(now_ms()).await;
    y.take_over(&a, Epoch(2)).await.unwrap();
    let taken_over = y.taken_over(&a, Epoch(2)).unwrap().unwrap();
    assert_eq!(y.taken_over(&a, Epoch(3)).unwrap(), None, "another stay's");
    copy(&x, &y, &a, 0).await;
    let handed = HandOver {
        as_of_ms: now_ms(),
        epoch: Epoch(1),
    };
    x.hand_over(&a, handed).await.unwrap();
    after(handed.as_of_ms).await;

    // On y: a new message, a late bounce of an old one, the list changes.
    let new = MessageId::generate();
    store_sent(&y, &a, "new", new).await;
    let bounce = event(EventKind::Bounce, now_ms(), "permanent");
    assert!(
        y.record_feedback(&a, Some(bounced), vec![bounce.clone()], None)
            .await
            .unwrap()
            == Recorded::New
    );
    y.suppress(&a, entry("new@x.example")).await.unwrap();
    assert!(y.unsuppress(&a, "old@x.example").await.unwrap());

    // a moves back: x kept its state as of the hand-over, and y sends only what it wrote
    // since it took a over, imports from x included (x has those).
    assert_eq!(x.handed_over(&a, now_ms()).unwrap(), Some(handed));
    let ids = |written: Vec<(String, u64)>| -> Vec<String> {
        written.into_iter().map(|(id, _)| id).collect()
    };
    let mut changed = vec![bounced.to_string(), new.to_string()];
    changed.sort();
    assert_eq!(
        ids(y.written_messages(&a, taken_over).unwrap()),
        changed,
        "not the quiet message (y wrote it only as x had it), and not b's"
    );
    let (_, export) = y.export(&a, now_ms(), Some(taken_over)).unwrap();
    let keys: Vec<&str> = export.idempotency.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["new"], "the keys x has are not sent back");
    copy(&y, &x, &a, taken_over).await;

    let record = x.message(&a, bounced).unwrap().unwrap();
    assert_eq!(record.events.last(), Some(&bounce));
    assert!(x.message(&a, new).unwrap().is_some());
    assert!(x.message(&a, quiet).unwrap().is_some());
    assert_eq!(
        x.list_suppressions(&a, "", 10).unwrap(),
        [entry("new@x.example")]
    );
    for (key, id) in [("quiet", quiet), ("new", new)] {
        let again = x.reserve(&a, key, MessageId::generate(), now_ms());
        assert_eq!(again.await.unwrap(), Reservation::Done(accepted(id)));
    }
    assert!(
        y.message(&b, theirs).unwrap().is_none(),
        "b's state stayed home"
    );

    // Imported records keep when they were written, so a move on from x carries what
    // changed on y further; a hand-over older than the indexes keep is not usable.
    assert_eq!(ids(x.written_messages(&a, taken_over).unwrap()), changed);
    let late = handed.as_of_ms + IDEMPOTENCY_WINDOW.as_millis() as u64;
    assert_eq!(x.handed_over(&a, late).unwrap(), None);
    x.forget(&a).await.unwrap();
    y.forget(&a).await.unwrap();
    assert_eq!(x.handed_over(&a, now_ms()).unwrap(), None);
    assert_eq!(y.taken_over(&a, Epoch(2)).unwrap(), None);
}

/// `tenant` sends message `id` with idempotency key `key` on `store`, and it is sent.
async fn store_sent(store: &Store, tenant: &TenantId, key: &str, id: MessageId) {
    let now = now_ms();
    store.reserve(tenant, key, id, now).await.unwrap();
    let record = record(id, tenant);
    store
        .accepted(Some(key), accepted(id), record.clone(), None, now)
        .await
        .unwrap();
    let sent = event(EventKind::Sent, now, "");
    store
        .record_outcome(record, MessageState::Sent, sent)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_tenants_backlog_counts_its_messages_until_sent_or_failed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store.redb")).unwrap();
    let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
    let ids: Vec<MessageId> = (0..3).map(|_| MessageId::generate()).collect();
    for id in &ids {
        store
            .accepted(None, accepted(*id), record(*id, &a), None, 1)
            .await
            .unwrap();
    }
    let theirs = MessageId::generate();
    store
        .accepted(None, accepted(theirs), record(theirs, &b), None, 1)
        .await
        .unwrap();
    assert_eq!(store.backlog(&a).unwrap(), 3);
    let sent = event(EventKind::Sent, 2, "");
    store
        .record_outcome(record(ids[0], &a), MessageState::Sent, sent.clone())
        .await
        .unwrap();
    store
        .record_outcome(record(ids[1], &a), MessageState::Failed, sent.clone())
        .await
        .unwrap();
    store
        .record_outcome(record(ids[2], &a), MessageState::Held, sent)
        .await
        .unwrap();
    assert_eq!(
        store.backlog(&a).unwrap(),
        1,
        "held mail is still to be delivered"
    );
    assert_eq!(store.backlog(&b).unwrap(), 1);
}

#[tokio::test]
async fn records_of_a_store_made_before_the_indexes_are_indexed_when_it_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let tenant = TenantId::new("old").unwrap();
    let (queued, sent) = (MessageId::generate(), MessageId::generate());
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut messages = txn.open_table(MESSAGES).unwrap();
            for (id, state) in [(queued, MessageState::Queued), (sent, MessageState::Sent)] {
                let stored = MessageRecord {
                    state,
                    ..record(id, &tenant)
                };
                let key = id.to_string();
                messages
                    .insert(key.as_str(), json(&stored).as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.backlog(&tenant).unwrap(), 1, "the queued one is open");
    let ids: Vec<MessageId> = store
        .messages(&store.written_messages(&tenant, 0).unwrap())
        .unwrap()
        .into_iter()
        .map(|(r, _)| r.id)
        .collect();
    let mut expected = vec![queued, sent];
    expected.sort_by_key(|id| id.to_string());
    assert_eq!(ids, expected);
    store.erase(&tenant).await.unwrap();
    assert!(store.written_messages(&tenant, 0).unwrap().is_empty());
    assert_eq!(store.backlog(&tenant).unwrap(), 0);
}
