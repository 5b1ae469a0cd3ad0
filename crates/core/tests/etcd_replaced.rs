//! A cluster wiped and started afresh under a running process; stores whose prefixes nest; a
//! backup racing `compact()`.
#![cfg(feature = "etcd")]

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Txn, TxnOp};
use etcd_cluster::{options, raw_client, rec, value_of, EtcdCluster};
use kvstore_core::etcd::ClusterDatabase;
use kvstore_core::{Database, DatabaseOptions, ErrorCode, LockMode, MapOptions, RangeOptions};

/// `sync()` until the store answers again (the member is back): Unavailable meanwhile, within a
/// generous bound.
fn sync_when_back(db: &ClusterDatabase) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match db.sync() {
            Ok(()) => return,
            Err(err) if err.code() == ErrorCode::Unavailable && Instant::now() < deadline => {}
            Err(err) => panic!("sync after the member came back: {err}"),
        }
    }
}

#[test]
fn a_wiped_and_restarted_cluster_is_detected_and_the_replica_reloaded() {
    let mut cluster = EtcdCluster::start(1);
    let url = cluster.url("app");
    let db = ClusterDatabase::open(&url, options()).unwrap();
    let map = db.map_store("t", &MapOptions::default()).unwrap();
    // Enough revisions that the fresh cluster's stay below them for the whole test.
    for i in 0..40 {
        map.lock(&format!("k{i}"), LockMode::New, None)
            .unwrap()
            .commit(rec("old"))
            .unwrap();
    }
    let held = map.lock("held", LockMode::Any, None).unwrap();
    assert_eq!(value_of(map.get("k0").unwrap()).as_deref(), Some("old"));
    let reloads = db.replica_stats().reloads;

    cluster.wipe_and_restart(0);
    sync_when_back(&db);

    // The replica is the new cluster's: none of the old keys.
    assert_eq!(map.get("k0").unwrap(), None);
    assert_eq!(map.snapshot().unwrap().len(), 0);
    assert!(db.replica_stats().reloads > reloads);
    // The lock held in the old cluster is lost.
    let err = held.commit(rec("late")).unwrap_err();
    assert_eq!(err.code(), ErrorCode::LockLost, "{err}");
    // The format record is there again.
    let (rt, mut client) = raw_client(&cluster);
    let format = rt.block_on(client.get("/app/meta/format", None)).unwrap();
    assert_eq!(
        format.kvs().first().map(|kv| kv.value().to_vec()),
        Some(b"1".to_vec())
    );
    // New locks and commits work, and another process sees them.
    // The old session's lease went with the old cluster: a lock waits for the new lease, which
    // the session's keep-alive task grants once its current wait on the old one ends (up to the
    // session TTL; a lock gives up after the request timeout with Unavailable, so ask again).
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        match map.lock("k0", LockMode::New, None) {
            Ok(guard) => break guard,
            Err(err) if err.code() == ErrorCode::Unavailable && Instant::now() < deadline => {}
            Err(err) => panic!("a lock after the replacement: {err}"),
        }
    };
    first.commit(rec("new")).unwrap();
    map.lock("held", LockMode::Any, None)
        .unwrap()
        .commit(rec("again"))
        .unwrap();
    assert_eq!(value_of(map.get("k0").unwrap()).as_deref(), Some("new"));
    let other = ClusterDatabase::open_unshared(&url, options()).unwrap();
    let seen = other.map_store("t", &MapOptions::default()).unwrap();
    assert_eq!(
        value_of(seen.get("held").unwrap()).as_deref(),
        Some("again")
    );
    assert_eq!(seen.snapshot().unwrap().len(), 2);
    db.sync().unwrap();
    assert_eq!(map.snapshot().unwrap().len(), 2);
    other.close().unwrap();
    db.close().unwrap();
}

fn refused(cluster: &EtcdCluster, prefix: &str, other: &str) {
    let err = match ClusterDatabase::open_unshared(&cluster.url(prefix), options()) {
        Ok(_) => panic!("{prefix} opened beside {other}"),
        Err(err) => err,
    };
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    let message = err.to_string();
    for name in [prefix, other] {
        assert!(message.contains(&format!("'/{name}'")), "{message}");
    }
}

#[test]
fn a_store_inside_another_stores_prefix_is_refused_either_way() {
    let cluster = EtcdCluster::start(1);
    // Outer first.
    let outer = ClusterDatabase::open_unshared(&cluster.url("n"), options()).unwrap();
    let map = outer.map_store("t", &MapOptions::default()).unwrap();
    map.lock("x", LockMode::New, None)
        .unwrap()
        .commit(rec("v"))
        .unwrap();
    refused(&cluster, "n/data/t", "n");
    refused(&cluster, "n/x", "n");
    // Inner first.
    let inner = ClusterDatabase::open_unshared(&cluster.url("a/b"), options()).unwrap();
    refused(&cluster, "a", "a/b");
    let deeper = ClusterDatabase::open_unshared(&cluster.url("c/d/e"), options()).unwrap();
    refused(&cluster, "c", "c/d/e");
    refused(&cluster, "c/d", "c/d/e");
    // A refused open leaves nothing behind: the inner store opens again.
    inner.close().unwrap();
    deeper.close().unwrap();
    ClusterDatabase::open_unshared(&cluster.url("a/b"), options())
        .unwrap()
        .close()
        .unwrap();
    // Neighbours that only share a spelling are no nesting; a data key ending in
    // "/meta/format" is data.
    map.lock("y/meta/format", LockMode::New, None)
        .unwrap()
        .commit(rec("1"))
        .unwrap();
    for prefix in ["nx", "a/bc", "ab", "n"] {
        ClusterDatabase::open_unshared(&cluster.url(prefix), options())
            .unwrap()
            .close()
            .unwrap();
    }
    outer.close().unwrap();
}

#[test]
fn a_backup_racing_compactions_holds_every_key() {
    const KEYS: usize = 5500;
    let cluster = EtcdCluster::start(1);
    let url = cluster.url("big");
    let db = Database::open_cluster(&url, options()).unwrap();
    db.map_store("t", MapOptions::default()).unwrap();
    // Written straight to the cluster, 100 a transaction: more than two pages of the prefix.
    let (rt, mut client) = raw_client(&cluster);
    rt.block_on(async {
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(100) {
            let puts: Vec<TxnOp> = chunk
                .iter()
                .map(|i| TxnOp::put(format!("/big/data/t/k{i:05}"), rec("v"), None))
                .collect();
            client.txn(Txn::new().and_then(puts)).await.unwrap();
        }
    });

    let stop = Arc::new(AtomicBool::new(false));
    let compactions = Arc::new(AtomicU64::new(0));
    let compactor = {
        let (db, stop, compactions) = (db.clone(), stop.clone(), compactions.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                db.compact().unwrap();
                compactions.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let mut outcomes = Vec::new();
    for n in 0..6 {
        let dest = dir.path().join(format!("copy{n}.redb"));
        let before = compactions.load(Ordering::SeqCst);
        outcomes.push((dest.clone(), db.backup(&dest), before));
    }
    stop.store(true, Ordering::SeqCst);
    compactor.join().unwrap();
    assert!(compactions.load(Ordering::SeqCst) > 0);
    for (dest, outcome, _) in outcomes {
        outcome.unwrap_or_else(|e| panic!("backup {}: {e}", dest.display()));
        let copy = Database::open(&dest, DatabaseOptions::default()).unwrap();
        let map = copy.map_store("t", MapOptions::default()).unwrap();
        assert_eq!(map.count(&RangeOptions::default()).unwrap(), KEYS as u64);
        for i in [0, 1999, 2000, 4001, KEYS - 1] {
            assert_eq!(
                value_of(map.get(&format!("k{i:05}")).unwrap()).as_deref(),
                Some("v")
            );
        }
        copy.close();
    }
    db.close();
}
