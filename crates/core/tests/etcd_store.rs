//! The etcd engine against a real cluster: maps and codecs, locks within a process and across
//! cores (as across processes), fenced and group commits, the replica (read-your-writes, sync,
//! compaction), auto keys.
#![cfg(feature = "etcd")]

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::sync::mpsc;
use std::time::Duration;

use etcd_cluster::{open_other, options, raw_client, rec, value_of, EtcdCluster};
use kvstore_core::etcd::{ClusterDatabase, ClusterOptions};
use kvstore_core::{envelope, Acquire, Change, CommitOptions, ErrorCode, LockMode, MapOptions};

fn open(cluster: &EtcdCluster, prefix: &str) -> ClusterDatabase {
    ClusterDatabase::open(&cluster.url(prefix), options()).unwrap()
}

#[test]
fn maps_record_their_codec_and_the_format() {
    let cluster = EtcdCluster::start(1);
    let db = open(&cluster, "app");
    let json = MapOptions {
        codec: "json".into(),
        ..MapOptions::default()
    };
    let jobs = db.map_store("jobs", &json).unwrap();
    assert_eq!(jobs.codec(), "json");
    db.map_store("a/b", &MapOptions::default()).unwrap();
    assert_eq!(
        db.tables().unwrap(),
        vec![
            ("a/b".to_string(), "raw".to_string()),
            ("jobs".to_string(), "json".to_string())
        ]
    );
    // The same core knows the codec; another core reads it from the cluster.
    let err = db.map_store("jobs", &MapOptions::default()).err().unwrap();
    assert_eq!(err.code(), ErrorCode::CodecMismatch);
    let other = open_other(&cluster, "app");
    let err = other
        .map_store("jobs", &MapOptions::default())
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::CodecMismatch);
    assert_eq!(other.map_store("jobs", &json).unwrap().name(), "jobs");
    // Another prefix is another store.
    let elsewhere = open(&cluster, "other");
    assert!(elsewhere.tables().unwrap().is_empty());

    for url in [
        "etcd://127.0.0.1/app",
        "http://127.0.0.1:1/app",
        "etcd://127.0.0.1:1/",
    ] {
        let err = ClusterDatabase::open(url, options()).err().unwrap();
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{url}");
    }
    // A layout this build does not know is refused.
    let (rt, mut client) = raw_client(&cluster);
    rt.block_on(client.put("/future/meta/format", "2", None))
        .unwrap();
    let err = ClusterDatabase::open(&cluster.url("future"), options())
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::DatabaseCorrupt);
    db.close().unwrap();
    assert!(db.is_closed());
    assert_eq!(
        jobs.get("x").unwrap_err().code(),
        ErrorCode::StoreClosed,
        "a closed handle's maps are closed"
    );
}

#[test]
fn commits_are_read_back_at_once_and_entries_follow_lock_modes() {
    let cluster = EtcdCluster::start(1);
    let db = open(&cluster, "app");
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    let guard = map.lock("k", LockMode::New, None).unwrap();
    assert!(!guard.existed());
    guard.commit(rec("one")).unwrap();
    // Read-your-writes: the replica has it as soon as the commit is acknowledged.
    assert_eq!(value_of(map.get("k").unwrap()).as_deref(), Some("one"));
    assert_eq!(
        map.lock("k", LockMode::New, None).err().unwrap().code(),
        ErrorCode::EntryExists
    );
    let mut guard = map.lock("k", LockMode::Existing, None).unwrap();
    assert_eq!(guard.decoded().unwrap().unwrap().value, b"one");
    guard
        .commit_with(
            rec("two"),
            CommitOptions {
                update_only: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(map.holds("k", guard.token()));
    assert_eq!(value_of(map.get("k").unwrap()).as_deref(), Some("two"));
    guard.delete().unwrap();
    assert_eq!(map.get("k").unwrap(), None);
    assert_eq!(
        map.lock("k", LockMode::Existing, None)
            .err()
            .unwrap()
            .code(),
        ErrorCode::EntryNotFound
    );
    map.delete("k").unwrap();
    let stats = map.stats().unwrap();
    assert_eq!(stats.entries, 0);
    assert_eq!(stats.locks_held, 0);
    assert!(stats.commits >= 3);
    // Delete with updateOnly is refused, the lock still held.
    let guard = map.lock("z", LockMode::Any, None).unwrap();
    let err = map
        .prepare_commit(
            "z",
            guard.token(),
            Change::Delete,
            CommitOptions {
                update_only: true,
                ..Default::default()
            },
            Box::new(|_| unreachable!()),
        )
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert!(map.holds("z", guard.token()));
    // A record over the cluster's request limit is refused before sending.
    let big = vec![0u8; kvstore_core::etcd::MAX_CLUSTER_RECORD_BYTES + 1];
    let err = map
        .prepare_commit(
            "z",
            guard.token(),
            Change::Put(big.into()),
            CommitOptions::default(),
            Box::new(|_| unreachable!()),
        )
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert!(err.to_string().contains("1.5 MiB"), "{err}");
    assert!(
        !map.holds("z", guard.token()),
        "released without holdLockOnFailure"
    );
}

#[test]
fn waiters_in_one_process_are_served_in_order() {
    let cluster = EtcdCluster::start(1);
    let db = open(&cluster, "app");
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    let first = map.lock("hot", LockMode::Any, None).unwrap();
    let (tx, rx) = mpsc::channel();
    for ticket in 0..20u64 {
        let tx = tx.clone();
        let outcome = map
            .acquire("hot", ticket, || {
                Ok(Box::new(move |grant| {
                    tx.send((ticket, grant.unwrap())).unwrap()
                }))
            })
            .unwrap();
        assert!(matches!(outcome, Acquire::Queued));
    }
    assert_eq!(map.stats().unwrap().locks_waiting, 20);
    first.release();
    for expected in 0..20u64 {
        let (ticket, grant) = rx.recv().unwrap();
        assert_eq!(ticket, expected);
        assert!(map.holds("hot", grant.token));
        assert!(rx.try_recv().is_err(), "one holder at a time");
        map.release("hot", grant.token).unwrap();
    }
    // A waiter that gives up leaves no trace.
    let held = map.lock("hot", LockMode::Any, None).unwrap();
    let err = map
        .lock("hot", LockMode::Any, Some(Duration::from_millis(50)))
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::LockTimeout);
    assert_eq!(map.stats().unwrap().locks_waiting, 0);
    held.release();
}

#[test]
fn two_cores_take_turns_and_a_grant_sees_the_latest_value() {
    let cluster = EtcdCluster::start(1);
    let a = open(&cluster, "app");
    let b = open_other(&cluster, "app");
    let map_a = a.map_store("m", &MapOptions::default()).unwrap();
    let map_b = b.map_store("m", &MapOptions::default()).unwrap();
    let held = map_a.lock("k", LockMode::Any, None).unwrap();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let guard = map_b.lock("k", LockMode::Existing, None).unwrap();
        tx.send(()).unwrap();
        // The grant carries what A committed just before, whatever the watch delay.
        assert_eq!(guard.decoded().unwrap().unwrap().value, b"from a");
        guard.commit(rec("from b")).unwrap();
        map_b
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "B waits while A holds the lock"
    );
    held.commit(rec("from a")).unwrap();
    rx.recv().unwrap();
    let map_b = waiter.join().unwrap();
    assert_eq!(value_of(map_b.get("k").unwrap()).as_deref(), Some("from b"));
    a.sync().unwrap();
    assert_eq!(value_of(map_a.get("k").unwrap()).as_deref(), Some("from b"));
    // And back: A's grant sees B's value.
    let guard = map_a.lock("k", LockMode::Existing, None).unwrap();
    assert_eq!(guard.decoded().unwrap().unwrap().value, b"from b");
}

#[test]
fn sync_makes_another_cores_commits_visible() {
    let cluster = EtcdCluster::start(1);
    let a = open(&cluster, "app");
    let b = open_other(&cluster, "app");
    let map_a = a.map_store("m", &MapOptions::default()).unwrap();
    let map_b = b.map_store("m", &MapOptions::default()).unwrap();
    for i in 0..50 {
        map_b
            .lock(&format!("k{i:02}"), LockMode::New, None)
            .unwrap()
            .commit(rec(&i.to_string()))
            .unwrap();
        a.sync().unwrap();
        assert_eq!(
            value_of(map_a.get(&format!("k{i:02}")).unwrap()),
            Some(i.to_string())
        );
    }
    let (tx, rx) = mpsc::channel();
    a.sync_with(Box::new(move |r| tx.send(r).unwrap()));
    rx.recv().unwrap().unwrap();
    let snapshot = map_a.snapshot().unwrap();
    assert_eq!(snapshot.len(), 50);
    assert_eq!(
        snapshot.keys().next().map(String::as_str),
        Some("k00"),
        "byte order"
    );
    assert!(a.replica_stats().connected);
}

/// Prepares a commit of `value` under `guard`'s lock, reporting its outcome on `tx`.
fn prepare(
    map: &kvstore_core::etcd::ClusterMap,
    key: &str,
    token: u64,
    value: &str,
    tx: &mpsc::Sender<(String, kvstore_core::Result<()>)>,
) -> kvstore_core::etcd::ClusterCommit {
    let tx = tx.clone();
    let name = key.to_string();
    map.prepare_commit(
        key,
        token,
        Change::Put(rec(value).into()),
        CommitOptions::default(),
        Box::new(move |r| tx.send((name, r)).unwrap()),
    )
    .unwrap()
}

#[test]
fn a_commit_after_the_session_was_revoked_fails_and_the_next_holder_wins() {
    let cluster = EtcdCluster::start(1);
    let a = open(&cluster, "app");
    let b = open_other(&cluster, "app");
    let map_a = a.map_store("m", &MapOptions::default()).unwrap();
    let map_b = b.map_store("m", &MapOptions::default()).unwrap();
    let guard = map_a.lock("k", LockMode::Any, None).unwrap();
    let (tx, rx) = mpsc::channel();
    // Prepared while the lock was held: only the fence in the transaction can stop it now.
    let late = prepare(&map_a, "k", guard.token(), "stale write from a", &tx);
    let b_waits = std::thread::spawn(move || {
        let guard = map_b.lock("k", LockMode::Any, None).unwrap();
        guard.commit(rec("from b")).unwrap();
        map_b
    });
    let lease = a.session_lease().unwrap();
    let (rt, mut client) = raw_client(&cluster);
    rt.block_on(client.lease_revoke(lease)).unwrap();
    // B is granted once A's lock key goes with its lease.
    let map_b = b_waits.join().unwrap();
    a.submit(vec![late]);
    let (_, outcome) = rx.recv().unwrap();
    assert_eq!(outcome.unwrap_err().code(), ErrorCode::LockLost);
    assert!(!map_a.holds("k", guard.token()));
    b.sync().unwrap();
    assert_eq!(value_of(map_b.get("k").unwrap()).as_deref(), Some("from b"));
    a.sync().unwrap();
    assert_eq!(value_of(map_a.get("k").unwrap()).as_deref(), Some("from b"));
    drop(guard);
    // A new session serves A's later locks.
    let guard = map_a.lock("k", LockMode::Existing, None).unwrap();
    assert_eq!(guard.decoded().unwrap().unwrap().value, b"from b");
    guard.commit(rec("a again")).unwrap();
    assert_ne!(a.session_lease(), Some(lease));
}

#[test]
fn an_expired_session_loses_its_locks_to_the_next_process() {
    let cluster = EtcdCluster::start(1);
    let short = ClusterOptions {
        session_ttl: Duration::from_secs(1),
        ..options()
    };
    let a = ClusterDatabase::open_unshared(&cluster.url("app"), short).unwrap();
    let b = open_other(&cluster, "app");
    let map_a = a.map_store("m", &MapOptions::default()).unwrap();
    let map_b = b.map_store("m", &MapOptions::default()).unwrap();
    let guard = map_a.lock("k", LockMode::Any, None).unwrap();
    let (tx, rx) = mpsc::channel();
    let late = prepare(&map_a, "k", guard.token(), "stale", &tx);
    a.pause_keep_alive(true);
    // B waits on the deletion of A's lock key: the lease expires on the server.
    let guard_b = map_b.lock("k", LockMode::Any, None).unwrap();
    guard_b.commit(rec("from b")).unwrap();
    a.submit(vec![late]);
    assert_eq!(
        rx.recv().unwrap().1.unwrap_err().code(),
        ErrorCode::LockLost
    );
    a.pause_keep_alive(false);
    a.sync().unwrap();
    assert_eq!(value_of(map_a.get("k").unwrap()).as_deref(), Some("from b"));
}

#[test]
fn one_broken_fence_fails_only_its_own_commit_in_a_shared_transaction() {
    let cluster = EtcdCluster::start(1);
    let db = open(&cluster, "app");
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    let guards: Vec<_> = (0..64)
        .map(|i| map.lock(&format!("k{i:02}"), LockMode::New, None).unwrap())
        .collect();
    let (tx, rx) = mpsc::channel();
    let commits: Vec<_> = guards
        .iter()
        .map(|g| prepare(&map, g.key(), g.token(), g.key(), &tx))
        .collect();
    // Break one fence behind the engine's back: delete k13's lock key.
    let (rt, mut client) = raw_client(&cluster);
    let lock_prefix = format!("/app/lock/m/{}/", hex("k13"));
    let deleted = rt
        .block_on(client.delete(
            lock_prefix,
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        ))
        .unwrap();
    assert_eq!(deleted.deleted(), 1);
    let before = map.stats().unwrap();
    db.submit(commits);
    let mut outcomes: Vec<(String, kvstore_core::Result<()>)> =
        (0..64).map(|_| rx.recv().unwrap()).collect();
    outcomes.sort_by(|x, y| x.0.cmp(&y.0));
    for (key, outcome) in &outcomes {
        if key == "k13" {
            assert_eq!(outcome.as_ref().unwrap_err().code(), ErrorCode::LockLost);
        } else {
            outcome.as_ref().unwrap();
        }
    }
    let after = map.stats().unwrap();
    assert!(
        after.batches - before.batches <= 2,
        "64 commits shared transactions: {} batches",
        after.batches - before.batches
    );
    assert_eq!(after.entries, 63);
    assert_eq!(map.get("k13").unwrap(), None);
    assert_eq!(after.locks_held, 0);
    drop(guards);
    db.sync().unwrap();
    assert_eq!(map.snapshot().unwrap().len(), 63);
}

fn hex(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_replica_behind_a_compacted_revision_reads_the_prefix_again() {
    let cluster = EtcdCluster::start(1);
    let a = open(&cluster, "app");
    let b = open_other(&cluster, "app");
    let map_a = a.map_store("m", &MapOptions::default()).unwrap();
    let map_b = b.map_store("m", &MapOptions::default()).unwrap();
    map_b
        .lock("gone", LockMode::New, None)
        .unwrap()
        .commit(rec("x"))
        .unwrap();
    a.sync().unwrap();
    assert!(map_a.get("gone").unwrap().is_some());
    a.pause_replica(true);
    for i in 0..30 {
        let key = format!("k{i:02}");
        let g = map_b.lock(&key, LockMode::Any, None).unwrap();
        g.commit(rec("v1")).unwrap();
        let g = map_b.lock(&key, LockMode::Any, None).unwrap();
        g.commit(rec("v2")).unwrap();
    }
    map_b.delete("gone").unwrap();
    b.compact().unwrap();
    assert!(map_a.get("gone").unwrap().is_some(), "A is behind");
    let reloads = a.replica_stats().reloads;
    a.pause_replica(false);
    a.sync().unwrap();
    assert_eq!(a.replica_stats().reloads, reloads + 1);
    assert_eq!(map_a.get("gone").unwrap(), None);
    let snapshot = map_a.snapshot().unwrap();
    assert_eq!(snapshot.len(), 30);
    assert!(snapshot
        .values()
        .all(|r| envelope::decode(r).unwrap().value == b"v2"));
    assert_eq!(snapshot, map_b.snapshot().unwrap());
}

#[test]
fn auto_keys_never_repeat_across_cores() {
    let cluster = EtcdCluster::start(1);
    let small = MapOptions {
        bandwidth: 7,
        ..MapOptions::default()
    };
    let cores = [open(&cluster, "app"), open_other(&cluster, "app")];
    let workers: Vec<_> = cores
        .iter()
        .map(|db| {
            let map = db.map_store("jobs", &small).unwrap();
            std::thread::spawn(move || {
                (0..300)
                    .map(|_| map.next_key_blocking().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        let keys = w.join().unwrap();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "increasing in a core");
        all.extend(keys);
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "no key handed out twice");
    // A clean close of both gives back the rest of the last lease only.
    for db in &cores {
        db.close().unwrap();
    }
    let again = open(&cluster, "app");
    let next = again
        .map_store("jobs", &small)
        .unwrap()
        .next_key_blocking()
        .unwrap();
    assert!(next > *all.last().unwrap());
}

#[test]
fn a_joined_commit_is_written_whole_or_not_at_all_and_only_through_its_store() {
    let cluster = EtcdCluster::start(1);
    let db = open(&cluster, "app");
    let jobs = db.map_store("jobs", &MapOptions::default()).unwrap();
    let paths = db.map_store("paths", &MapOptions::default()).unwrap();
    let (tx, rx) = mpsc::channel();
    let job = jobs.lock("j1", LockMode::New, None).unwrap();
    let path = paths.lock("/data/a", LockMode::New, None).unwrap();
    let both = kvstore_core::etcd::ClusterCommit::join(vec![
        prepare(&jobs, "j1", job.token(), "queued", &tx),
        prepare(&paths, "/data/a", path.token(), "j1", &tx),
    ]);
    db.submit(vec![both]);
    for _ in 0..2 {
        rx.recv().unwrap().1.unwrap();
    }
    assert_eq!(value_of(jobs.get("j1").unwrap()).as_deref(), Some("queued"));
    assert_eq!(
        value_of(paths.get("/data/a").unwrap()).as_deref(),
        Some("j1")
    );

    // One broken fence: neither is written.
    let job = jobs.lock("j2", LockMode::New, None).unwrap();
    let path = paths.lock("/data/b", LockMode::New, None).unwrap();
    let both = kvstore_core::etcd::ClusterCommit::join(vec![
        prepare(&jobs, "j2", job.token(), "queued", &tx),
        prepare(&paths, "/data/b", path.token(), "j2", &tx),
    ]);
    let (rt, mut client) = raw_client(&cluster);
    rt.block_on(client.delete(
        format!("/app/lock/paths/{}/", hex("/data/b")),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    ))
    .unwrap();
    db.submit(vec![both]);
    for _ in 0..2 {
        assert_eq!(
            rx.recv().unwrap().1.unwrap_err().code(),
            ErrorCode::LockLost
        );
    }
    db.sync().unwrap();
    assert_eq!(jobs.get("j2").unwrap(), None);
    assert_eq!(paths.get("/data/b").unwrap(), None);

    // A commit prepared through one store cannot be written through another.
    let other = open_other(&cluster, "app");
    let guard = jobs.lock("j3", LockMode::New, None).unwrap();
    other.submit(vec![prepare(&jobs, "j3", guard.token(), "x", &tx)]);
    assert_eq!(
        rx.recv().unwrap().1.unwrap_err().code(),
        ErrorCode::InvalidArgument
    );
    assert!(jobs.holds("j3", guard.token()), "the lock is still held");
    let elsewhere = other.map_store("jobs", &MapOptions::default()).unwrap();
    let foreign = elsewhere.lock("j4", LockMode::New, None).unwrap();
    db.submit(vec![kvstore_core::etcd::ClusterCommit::join(vec![
        prepare(&jobs, "j3", guard.token(), "x", &tx),
        prepare(&elsewhere, "j4", foreign.token(), "y", &tx),
    ])]);
    for _ in 0..2 {
        assert_eq!(
            rx.recv().unwrap().1.unwrap_err().code(),
            ErrorCode::InvalidArgument
        );
    }
    assert!(jobs.holds("j3", guard.token()));
    assert!(elsewhere.holds("j4", foreign.token()));
    assert_eq!(jobs.get("j3").unwrap(), None);
}

#[test]
fn snapshot_all_reads_every_map_at_one_revision() {
    let cluster = EtcdCluster::start(1);
    let db = open(&cluster, "app");
    let json = MapOptions {
        codec: "json".into(),
        ..MapOptions::default()
    };
    let jobs = db.map_store("jobs", &json).unwrap();
    let paths = db.map_store("a/b", &MapOptions::default()).unwrap();
    db.map_store("empty", &MapOptions::default()).unwrap();
    for i in 0..5 {
        jobs.lock(&format!("j{i}"), LockMode::New, None)
            .unwrap()
            .commit(rec("job"))
            .unwrap();
    }
    paths
        .lock("/x/y", LockMode::New, None)
        .unwrap()
        .commit(rec("p"))
        .unwrap();
    let (revision, maps) = db.snapshot_all().unwrap();
    assert!(revision > 0);
    let names: Vec<(&str, &str, usize)> = maps
        .iter()
        .map(|(n, c, m)| (n.as_str(), c.as_str(), m.len()))
        .collect();
    assert_eq!(
        names,
        vec![("a/b", "raw", 1), ("empty", "raw", 0), ("jobs", "json", 5)]
    );
    assert_eq!(
        value_of(maps[0].2.get("/x/y").cloned()).as_deref(),
        Some("p")
    );
}
