//! The queue suite: SQS semantics as one generic test per behaviour, run against each
//! `Queue` implementation, plus the embedded queue's crash test.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cellmail_cell::queue::local::LocalQueue;
use cellmail_cell::queue::sqs::{SqsQueue, SqsQueueNames};
use cellmail_cell::queue::{Queue, QueueConfig, QueueError, QueueKind};
use cellmail_cell::store::Store;
use cellmail_proto::{CellId, MessageId};

const MAX_RECEIVES: u32 = 3;
const CONFIG: QueueConfig = QueueConfig {
    max_receives: MAX_RECEIVES,
};

struct Subject {
    queue: Arc<dyn Queue>,
    /// Where the embedded queue keeps its file.
    _dir: Option<tempfile::TempDir>,
}

async fn local() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
    let queue = LocalQueue::open(store, CONFIG).unwrap();
    Subject {
        queue: Arc::new(queue),
        _dir: Some(dir),
    }
}

/// SQS on the AWS emulator, with queues of a cell no other test uses.
async fn sqs() -> Subject {
    let cell = CellId::new(format!(
        "q{}",
        MessageId::generate().to_string().to_lowercase()
    ))
    .unwrap();
    let config = cellmail_tests::emulator::aws_config().await;
    let queue = SqsQueue::open(&config, SqsQueueNames::for_cell("cellmail-", &cell), CONFIG)
        .await
        .unwrap();
    Subject {
        queue: Arc::new(queue),
        _dir: None,
    }
}

const NOW: Duration = Duration::ZERO;
const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(60);

async fn an_unacked_message_reappears_after_its_visibility_timeout(s: Subject) {
    s.queue
        .send(QueueKind::Transactional, b"m1".to_vec())
        .await
        .unwrap();
    let first = s
        .queue
        .receive(QueueKind::Transactional, 10, SHORT, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].receive_count, 1);
    assert!(
        s.queue
            .receive(QueueKind::Transactional, 10, SHORT, NOW)
            .await
            .unwrap()
            .is_empty(),
        "invisible while in flight"
    );
    let again = s
        .queue
        .receive(QueueKind::Transactional, 10, LONG, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "visible again after the timeout");
    assert_eq!(
        (again[0].body.as_slice(), again[0].receive_count),
        (b"m1".as_slice(), 2)
    );
    // The first receipt is stale now: deleting with it deletes nothing.
    s.queue
        .delete(QueueKind::Transactional, &[first[0].receipt.clone()])
        .await
        .unwrap();
    assert!(matches!(
        s.queue
            .change_visibility(QueueKind::Transactional, &first[0].receipt, NOW)
            .await,
        Err(QueueError::ReceiptInvalid(_))
    ));
    s.queue
        .delete(QueueKind::Transactional, &[again[0].receipt.clone()])
        .await
        .unwrap();
    assert!(
        s.queue
            .receive(QueueKind::Transactional, 10, LONG, SHORT)
            .await
            .unwrap()
            .is_empty(),
        "deleted for good"
    );
}

async fn a_message_is_dead_lettered_after_max_receives(s: Subject) {
    s.queue
        .send(QueueKind::Marketing, b"poison".to_vec())
        .await
        .unwrap();
    s.queue
        .send(QueueKind::Marketing, b"fine".to_vec())
        .await
        .unwrap();
    for attempt in 1..=MAX_RECEIVES {
        let got = s
            .queue
            .receive(QueueKind::Marketing, 10, LONG, Duration::from_secs(2))
            .await
            .unwrap();
        let poison = got
            .iter()
            .find(|d| d.body == b"poison")
            .expect("poison received");
        assert_eq!(poison.receive_count, attempt);
        for d in &got {
            let back = if d.body == b"poison" { NOW } else { LONG };
            s.queue
                .change_visibility(QueueKind::Marketing, &d.receipt, back)
                .await
                .unwrap();
        }
    }
    let after = s
        .queue
        .receive(QueueKind::Marketing, 10, LONG, SHORT)
        .await
        .unwrap();
    assert!(
        after.is_empty(),
        "past max receives it is gone from its queue: {after:?}"
    );
    let dead = s
        .queue
        .receive(QueueKind::DeadLetter, 10, LONG, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, b"poison");
}

async fn change_visibility_to_zero_returns_a_message_at_once(s: Subject) {
    s.queue
        .send(QueueKind::Transactional, b"retry".to_vec())
        .await
        .unwrap();
    let got = s
        .queue
        .receive(QueueKind::Transactional, 1, LONG, Duration::from_secs(2))
        .await
        .unwrap();
    s.queue
        .change_visibility(QueueKind::Transactional, &got[0].receipt, NOW)
        .await
        .unwrap();
    let again = s
        .queue
        .receive(QueueKind::Transactional, 1, LONG, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].receive_count, 2);
}

async fn queues_of_each_class_are_separate(s: Subject) {
    s.queue
        .send(QueueKind::Marketing, b"promo".to_vec())
        .await
        .unwrap();
    assert!(
        s.queue
            .receive(QueueKind::Transactional, 10, LONG, SHORT)
            .await
            .unwrap()
            .is_empty()
    );
    let got = s
        .queue
        .receive(QueueKind::Marketing, 10, LONG, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
}

async fn concurrent_sends_are_each_acknowledged_and_one_delete_removes_them_all(s: Subject) {
    const COUNT: usize = 40;
    let sends: Vec<_> = (0..COUNT)
        .map(|i| {
            let queue = s.queue.clone();
            tokio::spawn(async move {
                let mut body = format!("m{i:02}").into_bytes();
                // A few large bodies, so batches are cut by size as well as by count.
                if i % 10 == 0 {
                    body.resize(100 * 1024, b' ');
                }
                queue.send(QueueKind::Transactional, body).await
            })
        })
        .collect();
    for send in sends {
        send.await.unwrap().unwrap();
    }
    let mut seen = HashSet::new();
    let mut receipts = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < COUNT && std::time::Instant::now() < deadline {
        for d in s
            .queue
            .receive(QueueKind::Transactional, 10, LONG, Duration::from_secs(1))
            .await
            .unwrap()
        {
            assert!(seen.insert(d.body[..3].to_vec()), "received twice");
            receipts.push(d.receipt);
        }
    }
    assert_eq!(seen.len(), COUNT, "every acknowledged send is received");
    s.queue
        .delete(QueueKind::Transactional, &receipts)
        .await
        .unwrap();
    for receipt in &receipts {
        assert!(
            matches!(
                s.queue
                    .change_visibility(QueueKind::Transactional, receipt, NOW)
                    .await,
                Err(QueueError::ReceiptInvalid(_))
            ),
            "deleted, so its receipt is no longer current"
        );
    }
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
    an_unacked_message_reappears_after_its_visibility_timeout,
    a_message_is_dead_lettered_after_max_receives,
    change_visibility_to_zero_returns_a_message_at_once,
    queues_of_each_class_are_separate,
    concurrent_sends_are_each_acknowledged_and_one_delete_removes_them_all,
);

suite!(sqs:
    an_unacked_message_reappears_after_its_visibility_timeout,
    a_message_is_dead_lettered_after_max_receives,
    change_visibility_to_zero_returns_a_message_at_once,
    queues_of_each_class_are_separate,
    concurrent_sends_are_each_acknowledged_and_one_delete_removes_them_all,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_refuses_a_body_over_256_kib_as_too_large() {
    let s = sqs().await;
    let limit = 256 * 1024;
    assert!(matches!(
        s.queue
            .send(QueueKind::Transactional, vec![b'x'; limit + 1])
            .await,
        Err(QueueError::TooLarge { size, limit: 262_144 }) if size == limit + 1
    ));
    s.queue
        .send(QueueKind::Transactional, vec![b'x'; limit])
        .await
        .unwrap();
}

/// A child process sends from 16 tasks and is SIGKILLed mid-stream; every send it saw
/// acknowledged must be in the queue when it is reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_queue_process_mid_batch_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellmail-queue-crash-child"))
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut acked = HashSet::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let n: u64 = line.strip_prefix("acked ").unwrap().parse().unwrap();
        acked.insert(n);
        if acked.len() == 2000 {
            child.kill().unwrap();
            break;
        }
    }
    child.wait().unwrap();
    assert_eq!(acked.len(), 2000);

    let store = Arc::new(Store::open(&path).unwrap());
    let queue = LocalQueue::open(store, QueueConfig::default()).unwrap();
    let mut stored = HashSet::new();
    loop {
        let got = queue
            .receive(QueueKind::Transactional, 1000, LONG, NOW)
            .await
            .unwrap();
        if got.is_empty() {
            break;
        }
        for d in got {
            let n: u64 = String::from_utf8(d.body).unwrap().parse().unwrap();
            assert!(stored.insert(n), "message {n} stored twice");
        }
    }
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(stored.len() >= acked.len());
}
