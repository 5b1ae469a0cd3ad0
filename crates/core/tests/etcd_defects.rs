//! Regression tests for defects of the etcd engine found in review: lost lock wake-ups, the
//! lock after a commit of unknown outcome, a replaced cluster, nested prefixes, backups racing
//! compaction.
#![cfg(feature = "etcd")]

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::sync::mpsc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use etcd_cluster::{open_other, options, rec, EtcdCluster};
use kvstore_core::etcd::ClusterDatabase;
use kvstore_core::{LockMode, MapOptions};

/// Watches the cluster's keys under `prefix` from now on; `next_put` waits for the next put.
struct KeyWatch {
    rt: tokio::runtime::Runtime,
    stream: etcd_client::WatchStream,
    _client: etcd_client::Client,
}

impl KeyWatch {
    fn new(cluster: &EtcdCluster, prefix: &str) -> KeyWatch {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (client, stream) = rt.block_on(async {
            let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
                .await
                .unwrap();
            let stream = client
                .watch(prefix, Some(WatchOptions::new().with_prefix()))
                .await
                .unwrap();
            (client, stream)
        });
        KeyWatch {
            rt,
            stream,
            _client: client,
        }
    }

    /// The key of the next put event (in 30 s at most).
    fn next_put(&mut self) -> Vec<u8> {
        let stream = &mut self.stream;
        self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    let resp = stream.message().await.unwrap().unwrap();
                    for event in resp.events() {
                        if event.event_type() == EventType::Put {
                            return event.kv().unwrap().key().to_vec();
                        }
                    }
                }
            })
            .await
            .expect("no put in time")
        })
    }
}

/// The waiter's replica misses the predecessor's release and re-lock (the same lock key name,
/// deleted and put again): it must still wake, by the create revision.
#[test]
fn a_waiter_wakes_when_the_predecessor_key_is_deleted_and_put_again_while_it_is_behind() {
    let cluster = EtcdCluster::start(1);
    let a = open_other(&cluster, "app");
    let b = open_other(&cluster, "app");
    let map_a = a.map_store("m", &MapOptions::default()).unwrap();
    let map_b = b.map_store("m", &MapOptions::default()).unwrap();
    let mut locks = KeyWatch::new(&cluster, "/app/lock/");
    let held = map_a.lock("k", LockMode::Any, None).unwrap();
    let a_key = locks.next_put();

    b.pause_replica(true);
    let (b_done, b_got) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let g = map_b.lock("k", LockMode::Any, None).unwrap();
        b_done.send(()).unwrap();
        g.commit(rec("b")).unwrap();
    });
    let b_key = locks.next_put();
    assert_ne!(a_key, b_key);
    // B waits for A's key (registered while its replica is paused).
    assert!(b.wait_lock_waits(1, Duration::from_secs(20)));

    // A releases and queues again at once (same key name, new create revision, behind B).
    held.commit(rec("a1")).unwrap();
    let (a_done, a_got) = mpsc::channel();
    let relock = std::thread::spawn(move || {
        let g = map_a.lock("k", LockMode::Any, None).unwrap();
        a_done.send(()).unwrap();
        g.commit(rec("a2")).unwrap();
    });
    assert_eq!(locks.next_put(), a_key);
    b.pause_replica(false);

    b_got
        .recv_timeout(Duration::from_secs(20))
        .expect("the waiter never woke (lost wake-up)");
    a_got.recv_timeout(Duration::from_secs(20)).unwrap();
    waiter.join().unwrap();
    relock.join().unwrap();
}

/// Waits (bounded, as a failure guard) until `count` lock waits are queued on `map`.
fn wait_for_waiters(map: &kvstore_core::etcd::ClusterMap, count: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while map.stats().unwrap().locks_waiting < count {
        assert!(
            std::time::Instant::now() < deadline,
            "the waiter never queued"
        );
        std::thread::yield_now();
    }
}

/// A commit whose answer is lost after the cluster applied it (an unknown outcome): the next
/// local waiter must not be handed the lock with the record from before it, and the old
/// fence must not be reused.
#[test]
fn the_lock_after_a_commit_of_unknown_outcome_reads_what_the_cluster_holds() {
    let cluster = EtcdCluster::start(1);
    let db = open_other(&cluster, "doubt");
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    map.lock("k", LockMode::Any, None)
        .unwrap()
        .commit(rec("v1"))
        .unwrap();
    // The replica hears nothing more by its watch: only what the lock layer reads itself.
    db.pause_replica(true);
    let held = map.lock("k", LockMode::Any, None).unwrap();
    let (tx, rx) = mpsc::channel();
    let waiter_map = map.clone();
    let waiter = std::thread::spawn(move || {
        let g = waiter_map.lock("k", LockMode::Any, None).unwrap();
        tx.send(g.record().map(<[u8]>::to_vec)).unwrap();
        g.commit(rec("v3")).unwrap();
    });
    wait_for_waiters(&map, 1);

    db.lose_commit_answers(1);
    let err = held.commit(rec("v2")).unwrap_err();
    assert_eq!(err.code(), kvstore_core::ErrorCode::Unavailable, "{err}");
    let seen = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(
        seen.as_deref(),
        Some(rec("v2").as_slice()),
        "the next holder read the record from before the commit of unknown outcome"
    );
    waiter.join().unwrap();
    db.pause_replica(false);
    db.sync().unwrap();
    assert_eq!(map.get("k").unwrap().as_deref(), Some(rec("v3").as_slice()));
}

/// The holder that keeps its lock after an unknown outcome (`hold_lock_on_failure`) commits
/// again under it; the lock is renewed only for the next holder.
#[test]
fn a_holder_kept_after_an_unknown_outcome_commits_again() {
    let cluster = EtcdCluster::start(1);
    let db = open_other(&cluster, "doubt-hold");
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    let mut held = map.lock("k", LockMode::Any, None).unwrap();
    let keep = kvstore_core::CommitOptions {
        hold_lock_on_failure: true,
        ..Default::default()
    };
    db.lose_commit_answers(1);
    assert!(held.commit_with(rec("v1"), keep).is_err());
    held.commit_with(rec("v2"), keep).unwrap();
    // Released: the next lock (another process's, then this one's) sees v2.
    let other = open_other(&cluster, "doubt-hold");
    let other_map = other.map_store("m", &MapOptions::default()).unwrap();
    let g = other_map.lock("k", LockMode::Any, None).unwrap();
    assert_eq!(g.record(), Some(rec("v2").as_slice()));
    g.commit(rec("v3")).unwrap();
    let g = map.lock("k", LockMode::Any, None).unwrap();
    assert_eq!(g.record(), Some(rec("v3").as_slice()));
    g.release();
}

/// A commit callback that panics does not take the committer down: later commits are written.
#[test]
fn a_panicking_commit_callback_does_not_stop_later_commits() {
    let cluster = EtcdCluster::start(1);
    let db = open_other(&cluster, "panics");
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    let g = map.lock("a", LockMode::Any, None).unwrap();
    let commit = map
        .prepare_commit(
            "a",
            g.token(),
            kvstore_core::Change::Put(rec("x").into()),
            Default::default(),
            Box::new(|_| panic!("a caller's callback panics")),
        )
        .unwrap();
    std::mem::forget(g);
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    db.submit(vec![commit]);
    // The next commit of the same key waits for the first to settle: both get written.
    let g = map
        .lock("a", LockMode::Any, Some(Duration::from_secs(30)))
        .unwrap();
    std::panic::set_hook(quiet);
    assert_eq!(g.record(), Some(rec("x").as_slice()));
    g.commit(rec("y")).unwrap();
    assert_eq!(map.get("a").unwrap().as_deref(), Some(rec("y").as_slice()));
}

/// A refused commit (one entry twice in a join) whose first callback panics: the other callback
/// still hears the refusal, and the commit is not left counted in flight (close waited for it
/// forever).
#[test]
fn a_panicking_callback_of_a_refused_commit_does_not_hang_close() {
    use kvstore_core::etcd::ClusterCommit;
    let cluster = EtcdCluster::start(1);
    let db = open_other(&cluster, "refused-panic");
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    let g = map.lock("a", LockMode::Any, None).unwrap();
    let prepare = |done: kvstore_core::CommitCallback| {
        map.prepare_commit(
            "a",
            g.token(),
            kvstore_core::Change::Put(rec("x").into()),
            Default::default(),
            done,
        )
        .unwrap()
    };
    let (tx, rx) = mpsc::channel();
    let joined = ClusterCommit::join(vec![
        prepare(Box::new(|_| panic!("a caller's callback panics"))),
        prepare(Box::new(move |r| {
            let _ = tx.send(r);
        })),
    ]);
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| db.submit(vec![joined])));
    std::panic::set_hook(quiet);
    // Closed on a thread of its own, which keeps the handle if the close hangs.
    let (closed, closed_rx) = mpsc::channel();
    let closer = db.clone();
    std::thread::spawn(move || {
        closer.close().unwrap();
        let _ = closed.send(());
    });
    let heard = rx.recv_timeout(Duration::from_secs(30));
    let close = closed_rx.recv_timeout(Duration::from_secs(30));
    assert_eq!(
        heard.ok().map(|r| r.unwrap_err().code()),
        Some(kvstore_core::ErrorCode::InvalidArgument),
        "the second callback never heard of its refused commit"
    );
    close.expect("close waited for a refused commit (counted in flight, never finished)");
    drop(g);
}

/// A cancel that comes while a local grant is on its way to wait for the etcd lock (here: from
/// the caller's make_waiter, the one caller code that runs in that gap) reaches the wait; it
/// was lost (cancel_wait said "granted", and the grant came only once the etcd lock was taken).
#[test]
fn a_cancel_while_a_local_grant_goes_to_wait_for_etcd_is_not_lost() {
    let cluster = EtcdCluster::start(1);
    let db = open_other(&cluster, "cancel-gap");
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    let ticket = 4242;
    let (tx, rx) = mpsc::channel();
    let (cancelled_tx, cancelled_rx) = mpsc::channel();
    let canceller = map.clone();
    let outcome = map
        .acquire("k", ticket, move || {
            cancelled_tx
                .send(canceller.cancel_wait(ticket, kvstore_core::Error::Aborted))
                .unwrap();
            Ok(Box::new(move |r| {
                let _ = tx.send(r);
            }))
        })
        .unwrap();
    assert!(matches!(outcome, kvstore_core::Acquire::Queued));
    assert!(
        cancelled_rx.recv().unwrap(),
        "the cancel did not find the wait"
    );
    let heard = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(
        heard.map(|g| g.token).unwrap_err().code(),
        kvstore_core::ErrorCode::Aborted
    );
    // Nothing is left held or waiting.
    map.lock("k", LockMode::Any, Some(Duration::from_secs(30)))
        .unwrap()
        .release();
    let stats = map.stats().unwrap();
    assert_eq!((stats.locks_held, stats.locks_waiting), (0, 0));
}

/// A ticket still waiting (queued behind a local holder) is refused for a second wait, as the
/// in-process lock table does: the second wait used to take over the first's cancel slot (a
/// cancel of the first then found nothing once its grant was on its way).
#[test]
fn a_ticket_still_waiting_is_refused_for_another_wait() {
    let cluster = EtcdCluster::start(1);
    let db = open_other(&cluster, "ticket-reuse");
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    let held = map.lock("a", LockMode::Any, None).unwrap();
    let ticket = 77;
    let (tx, rx) = mpsc::channel();
    let first = map
        .acquire("a", ticket, move || {
            Ok(Box::new(move |r| {
                let _ = tx.send(r);
            }))
        })
        .unwrap();
    assert!(matches!(first, kvstore_core::Acquire::Queued));
    // "b" is free here but not yet locked in etcd: this wait would queue under the same ticket.
    let second = map.acquire("b", ticket, || Ok(Box::new(|_| {})));
    assert_eq!(
        second.err().map(|e| e.code()),
        Some(kvstore_core::ErrorCode::InvalidArgument)
    );
    // The first wait is intact: released to it, it is granted.
    held.release();
    let grant = rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
    map.release("a", grant.token).unwrap();
    let stats = map.stats().unwrap();
    assert_eq!((stats.locks_held, stats.locks_waiting), (0, 0));
}

/// A handle closed on a thread of a tokio runtime (a Rust caller's async code, or a callback)
/// cannot wait there for its commits in flight; its locks must still not pass to the next
/// holder before those commits land (the next holder was handed the lock at once, under the
/// same fence, with the record from before the write on its way).
#[test]
fn a_handle_closed_on_a_runtime_thread_hands_its_locks_on_after_its_commits_land() {
    let mut cluster = EtcdCluster::start(1);
    let url = cluster.url("close-rt");
    let h1 = ClusterDatabase::open(&url, options()).unwrap();
    let h2 = ClusterDatabase::open(&url, options()).unwrap();
    let map1 = h1.map_store("m", &MapOptions::default()).unwrap();
    let map2 = h2.map_store("m", &MapOptions::default()).unwrap();
    let g1 = map1.lock("k", LockMode::Any, None).unwrap();
    let token = g1.token();
    std::mem::forget(g1);
    let (events, order) = mpsc::channel();
    let granted = events.clone();
    let waiter_map = map2.clone();
    let waiter = std::thread::spawn(move || {
        let g = waiter_map
            .lock("k", LockMode::Any, Some(Duration::from_secs(60)))
            .unwrap();
        granted
            .send(("granted", g.record().map(<[u8]>::to_vec)))
            .unwrap();
        g.release();
    });
    wait_for_waiters(&map2, 1);
    // The commit goes out while the cluster does not answer: it is in flight.
    cluster.pause(0);
    map1.commit(
        "k",
        token,
        kvstore_core::Change::Put(rec("v1").into()),
        // Kept: only the close hands the lock on.
        kvstore_core::CommitOptions {
            update_only: true,
            ..Default::default()
        },
        Box::new(move |r| {
            events
                .send(("committed", r.err().map(|e| e.to_string().into_bytes())))
                .unwrap();
        }),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async { h1.close().unwrap() });
    cluster.resume(0);
    let first = order.recv_timeout(Duration::from_secs(60)).unwrap();
    let second = order.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(
        (first.0, second.0),
        ("committed", "granted"),
        "the lock passed on before the closed handle's commit landed"
    );
    if first.1.is_none() {
        // Written: the next holder reads it.
        assert_eq!(second.1.as_deref(), Some(rec("v1").as_slice()));
    }
    waiter.join().unwrap();
    drop(map2);
    h2.close().unwrap();
}

/// A commit under a lock of one handle, submitted through another handle of the same core (a
/// group commit may mix them): closing the lock's handle waits for it before handing the lock
/// on (it was counted in flight only by the submitting handle, so the close released the lock
/// at once, with the write under its fence still on its way).
#[test]
fn closing_a_handle_waits_for_a_commit_under_its_lock_submitted_through_another() {
    let mut cluster = EtcdCluster::start(1);
    let url = cluster.url("close-other");
    let h1 = ClusterDatabase::open(&url, options()).unwrap();
    let h2 = ClusterDatabase::open(&url, options()).unwrap();
    let h3 = ClusterDatabase::open(&url, options()).unwrap();
    let map2 = h2.map_store("m", &MapOptions::default()).unwrap();
    let map3 = h3.map_store("m", &MapOptions::default()).unwrap();
    let g2 = map2.lock("k", LockMode::Any, None).unwrap();
    let token = g2.token();
    std::mem::forget(g2);
    let (events, order) = mpsc::channel();
    let granted = events.clone();
    let waiter = std::thread::spawn(move || {
        let got = map3.lock("k", LockMode::Any, Some(Duration::from_secs(60)));
        let _ = granted.send(("lock", got.is_ok()));
        if let Ok(g) = got {
            g.release();
        }
    });
    wait_for_waiters(&map2, 1);
    // Sent while the cluster does not answer: in flight until the request times out.
    cluster.pause(0);
    let commit = map2
        .prepare_commit(
            "k",
            token,
            kvstore_core::Change::Put(rec("v1").into()),
            Default::default(),
            Box::new(move |r| {
                let _ = events.send(("commit", r.is_ok()));
            }),
        )
        .unwrap();
    h1.submit(vec![commit]);
    let closer = h2.clone();
    let closing = std::thread::spawn(move || closer.close().unwrap());
    let first = order.recv_timeout(Duration::from_secs(60)).unwrap();
    cluster.resume(0);
    assert_eq!(
        first.0, "commit",
        "the lock passed on before the commit under it was settled"
    );
    order.recv_timeout(Duration::from_secs(60)).unwrap();
    closing.join().unwrap();
    waiter.join().unwrap();
    drop(map2);
    h1.close().unwrap();
    h3.close().unwrap();
}

/// A waiter in another process whose key the holder deletes hears EntryDeleted, as a waiter
/// in the holder's own process does (it heard EntryNotFound: the grant from etcd did not say
/// the record was deleted under it).
#[test]
fn a_waiter_in_another_process_hears_that_the_holder_deleted_the_entry() {
    let cluster = EtcdCluster::start(1);
    let a = open_other(&cluster, "deleted");
    let b = open_other(&cluster, "deleted");
    let map_a = a.map_store("m", &MapOptions::default()).unwrap();
    let map_b = b.map_store("m", &MapOptions::default()).unwrap();
    map_a
        .lock("k", LockMode::New, None)
        .unwrap()
        .commit(rec("v"))
        .unwrap();
    b.sync().unwrap();
    let held = map_a.lock("k", LockMode::Existing, None).unwrap();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let local = map_b.lock("k", LockMode::Existing, None);
        tx.send(local.err().map(|e| e.code())).unwrap();
    });
    assert!(b.wait_lock_waits(1, Duration::from_secs(30)));
    held.delete().unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        Some(kvstore_core::ErrorCode::EntryDeleted)
    );
    waiter.join().unwrap();
    // A lock of a key that was never there is still EntryNotFound.
    let other = a.map_store("m", &MapOptions::default()).unwrap();
    let err = other.lock("never", LockMode::Existing, None).err().unwrap();
    assert_eq!(err.code(), kvstore_core::ErrorCode::EntryNotFound);
}
