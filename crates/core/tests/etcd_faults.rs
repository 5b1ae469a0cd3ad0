//! The etcd engine when the cluster fails: every member down (Unavailable within the request
//! timeout, reads from the replica, writes again once it is back), a leader killed under a
//! stream of commits (nothing acknowledged is lost), many writers on hot keys (no lost update),
//! closing with waiters.
#![cfg(feature = "etcd")]

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use etcd_cluster::{rec, EtcdCluster};
use kvstore_core::etcd::{ClusterDatabase, ClusterMap, ClusterOptions};
use kvstore_core::{envelope, Acquire, ErrorCode, LockMode, MapOptions};

fn options(timeout: Duration) -> ClusterOptions {
    ClusterOptions {
        request_timeout: timeout,
        ..ClusterOptions::default()
    }
}

fn value(map: &ClusterMap, key: &str) -> Option<String> {
    map.get_record(key)
        .unwrap()
        .map(|r| String::from_utf8(r.value).unwrap())
}

/// Writes `key` = `v`, trying again while the cluster is unavailable (each try is bounded by
/// the request timeout), up to `tries`.
fn write_when_back(map: &ClusterMap, key: &str, v: &str, tries: usize) {
    for _ in 0..tries {
        let outcome = map
            .lock(key, LockMode::Any, None)
            .and_then(|g| g.commit(rec(v)));
        match outcome {
            Ok(()) => return,
            Err(err) => assert_eq!(err.code(), ErrorCode::Unavailable, "{err}"),
        }
    }
    panic!("the cluster did not come back");
}

#[test]
fn a_cluster_that_is_down_is_unavailable_in_time_and_reads_go_on() {
    let mut cluster = EtcdCluster::start(1);
    let timeout = Duration::from_secs(1);
    let db = ClusterDatabase::open(&cluster.url("app"), options(timeout)).unwrap();
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    map.lock("k", LockMode::New, None)
        .unwrap()
        .commit(rec("before"))
        .unwrap();
    let held = map.lock("held", LockMode::Any, None).unwrap();
    cluster.kill(0);

    // Reads serve the replica.
    assert_eq!(value(&map, "k").as_deref(), Some("before"));
    assert_eq!(map.snapshot().unwrap().len(), 1);
    // A commit under a lock taken before: Unavailable within the timeout (plus slack).
    let started = Instant::now();
    let err = held.commit(rec("x")).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    assert!(err.to_string().contains("outcome is unknown"), "{err}");
    assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
    // A new lock: Unavailable within the timeout.
    let started = Instant::now();
    let err = map.lock("new", LockMode::Any, None).err().unwrap();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
    assert_eq!(map.stats().unwrap().locks_held, 0);
    let err = db.sync().unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable);

    cluster.restart(0);
    write_when_back(&map, "k", "after", 30);
    assert_eq!(value(&map, "k").as_deref(), Some("after"));
    // The watch resumed: another core's write reaches this replica.
    let other = ClusterDatabase::open_unshared(&cluster.url("app"), options(timeout)).unwrap();
    let other_map = other.map_store("m", &MapOptions::default()).unwrap();
    other_map
        .lock("from-other", LockMode::New, None)
        .unwrap()
        .commit(rec("o"))
        .unwrap();
    db.sync().unwrap();
    assert_eq!(value(&map, "from-other").as_deref(), Some("o"));
    assert!(db.replica_stats().connected);
}

#[test]
fn every_acknowledged_commit_survives_a_killed_leader() {
    let mut cluster = EtcdCluster::start(3);
    let timeout = Duration::from_secs(3);
    let db = ClusterDatabase::open(&cluster.url("app"), options(timeout)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (acked_tx, acked_rx) = mpsc::channel::<(String, String)>();
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let map = db.map_store("m", &MapOptions::default()).unwrap();
            let (stop, acked_tx) = (stop.clone(), acked_tx.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("t{t}-{}", i % 50);
                    let v = format!("{t}:{i}");
                    match map
                        .lock(&key, LockMode::Any, None)
                        .and_then(|g| g.commit(rec(&v)))
                    {
                        Ok(()) => acked_tx.send((key, v)).unwrap(),
                        Err(err) => failures.push(err),
                    }
                    i += 1;
                }
                failures
            })
        })
        .collect();
    drop(acked_tx);
    let mut acked: HashMap<String, String> = HashMap::new();
    let take = |n: usize, acked: &mut HashMap<String, String>| {
        for _ in 0..n {
            let (k, v) = acked_rx.recv().unwrap();
            acked.insert(k, v);
        }
    };
    take(100, &mut acked);
    let leader = cluster.leader();
    cluster.kill(leader);
    take(200, &mut acked);
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for w in writers {
        failures.extend(w.join().unwrap());
    }
    for (k, v) in acked_rx.iter() {
        acked.insert(k, v);
    }
    for err in &failures {
        assert!(
            matches!(err.code(), ErrorCode::Unavailable | ErrorCode::LockLost),
            "{err}"
        );
    }
    // Read back through another core (its own replica, read at one revision).
    let check = ClusterDatabase::open_unshared(&cluster.url("app"), options(timeout)).unwrap();
    let map = check.map_store("m", &MapOptions::default()).unwrap();
    check.sync().unwrap();
    for (k, v) in &acked {
        assert_eq!(value(&map, k).as_deref(), Some(v.as_str()), "{k}");
    }
    assert!(acked.len() >= 100);
}

#[test]
fn two_cores_of_eight_writers_lose_no_update_on_hot_keys() {
    let cluster = EtcdCluster::start(1);
    let cores = [
        ClusterDatabase::open(&cluster.url("app"), options(Duration::from_secs(5))).unwrap(),
        ClusterDatabase::open_unshared(&cluster.url("app"), options(Duration::from_secs(5)))
            .unwrap(),
    ];
    const KEYS: usize = 5;
    const ROUNDS: usize = 40;
    let workers: Vec<_> = cores
        .iter()
        .flat_map(|db| {
            (0..8).map(move |t| {
                let map = db.map_store("counters", &MapOptions::default()).unwrap();
                std::thread::spawn(move || {
                    for i in 0..ROUNDS {
                        let key = format!("c{}", (t + i) % KEYS);
                        let guard = map.lock(&key, LockMode::Any, None).unwrap();
                        let n: u64 = guard
                            .decoded()
                            .unwrap()
                            .map_or(0, |r| String::from_utf8(r.value).unwrap().parse().unwrap());
                        guard.commit(rec(&(n + 1).to_string())).unwrap();
                    }
                })
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let map = cores[0]
        .map_store("counters", &MapOptions::default())
        .unwrap();
    cores[0].sync().unwrap();
    let total: u64 = (0..KEYS)
        .map(|k| {
            value(&map, &format!("c{k}"))
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(total, (2 * 8 * ROUNDS) as u64, "no lost update");
    let stats = map.stats().unwrap();
    assert_eq!(stats.locks_held, 0);
    assert_eq!(stats.locks_waiting, 0);
}

#[test]
fn closing_a_handle_rejects_its_waiters_and_frees_its_locks_for_other_processes() {
    let cluster = EtcdCluster::start(1);
    let opts = || options(Duration::from_secs(5));
    let a = ClusterDatabase::open(&cluster.url("app"), opts()).unwrap();
    let a2 = ClusterDatabase::open(&cluster.url("app"), opts()).unwrap();
    let b = ClusterDatabase::open_unshared(&cluster.url("app"), opts()).unwrap();
    let map_a = a.map_store("m", &MapOptions::default()).unwrap();
    let map_a2 = a2.map_store("m", &MapOptions::default()).unwrap();
    let map_b = b.map_store("m", &MapOptions::default()).unwrap();
    let _held = map_a2.lock("k", LockMode::Any, None).unwrap();
    let (tx, rx) = mpsc::channel();
    let queued = map_a
        .acquire("k", 1, || {
            Ok(Box::new(move |r| {
                tx.send(r).unwrap();
            }))
        })
        .unwrap();
    assert!(matches!(queued, Acquire::Queued));
    let mine = map_a.lock("mine", LockMode::Any, None).unwrap();
    a.close().unwrap();
    assert_eq!(
        rx.recv().unwrap().unwrap_err().code(),
        ErrorCode::StoreClosed
    );
    assert!(!map_a.holds("mine", mine.token()));
    // The core stays open for a2; another process gets the lock a closed handle held.
    let guard = map_b.lock("mine", LockMode::Any, None).unwrap();
    guard.commit(rec("b")).unwrap();
    drop(mine);
    a2.close().unwrap();
    // The last handle revoked the session: a2's lock on "k" is free for B at once.
    let guard = map_b.lock("k", LockMode::Any, None).unwrap();
    guard.commit(rec("b too")).unwrap();
    let reopened = ClusterDatabase::open(&cluster.url("app"), opts()).unwrap();
    let map = reopened.map_store("m", &MapOptions::default()).unwrap();
    assert_eq!(value(&map, "k").as_deref(), Some("b too"));
}

#[test]
fn a_session_lost_while_the_cluster_was_down_is_replaced_and_locks_work_again() {
    let mut cluster = EtcdCluster::start(1);
    let opts = ClusterOptions {
        session_ttl: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        ..ClusterOptions::default()
    };
    let db = ClusterDatabase::open(&cluster.url("app"), opts).unwrap();
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    let held = map.lock("k", LockMode::Any, None).unwrap();
    let lease = db.session_lease().unwrap();
    cluster.kill(0);
    // Down for longer than the TTL: each failed lock attempt takes up to the request timeout.
    for _ in 0..3 {
        let err = map.lock("other", LockMode::Any, None).err().unwrap();
        assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    }
    assert!(
        db.session_losses() >= 1,
        "no keep-alive answered for a whole TTL"
    );
    assert!(
        !map.holds("k", held.token()),
        "the lock went with the session"
    );
    let err = held.commit(rec("late")).unwrap_err();
    assert_eq!(err.code(), ErrorCode::LockLost, "{err}");
    cluster.restart(0);
    write_when_back(&map, "k", "after", 30);
    assert_ne!(db.session_lease(), Some(lease));
    assert_eq!(value(&map, "k").as_deref(), Some("after"));
}

#[test]
fn a_cluster_with_tighter_limits_refuses_what_is_too_large_and_takes_the_rest() {
    let cluster =
        EtcdCluster::start_with_args(1, &["--max-request-bytes=65536", "--max-txn-ops=16"]);
    let db = ClusterDatabase::open(&cluster.url("app"), options(Duration::from_secs(5))).unwrap();
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    // Over the cluster's request limit (under the default one): InvalidArgument naming it.
    let guard = map.lock("big", LockMode::New, None).unwrap();
    let err = guard
        .commit(envelope::encode(&[], &vec![b'x'; 100_000]))
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    assert!(err.to_string().contains("max-request-bytes"), "{err}");
    assert_eq!(map.get("big").unwrap(), None);
    // 64 locks and 64 commits at once do not fit 16 operations a transaction: they are taken
    // and written anyway.
    let guards: Vec<_> = std::thread::scope(|s| {
        let takers: Vec<_> = (0..64)
            .map(|i| {
                let map = &map;
                s.spawn(move || map.lock(&format!("k{i:02}"), LockMode::New, None).unwrap())
            })
            .collect();
        takers.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let (tx, rx) = mpsc::channel();
    let commits: Vec<_> = guards
        .iter()
        .map(|g| {
            let tx = tx.clone();
            map.prepare_commit(
                g.key(),
                g.token(),
                kvstore_core::Change::Put(rec("v").into()),
                Default::default(),
                Box::new(move |r| tx.send(r).unwrap()),
            )
            .unwrap()
        })
        .collect();
    db.submit(commits);
    for _ in 0..64 {
        rx.recv().unwrap().unwrap();
    }
    assert_eq!(map.snapshot().unwrap().len(), 64);
}
