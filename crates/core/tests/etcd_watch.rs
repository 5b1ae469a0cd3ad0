//! Watches of a cluster store against a real etcd member: changes of this core and of another
//! (as of another process) in revision order, a multi-lock commit as one run, a commit that
//! resolved before the watch began not reported, and a replica reload after a compaction ending
//! every watch with WatchOverflow.
#![cfg(feature = "etcd")]

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::sync::Arc;
use std::time::Duration;

use etcd_cluster::{options, rec, EtcdCluster};
use kvstore_core::etcd::ClusterDatabase;
use kvstore_core::{
    Change, CommitOptions, Database, ErrorCode, LockMode, MapOptions, WatchEvent, WatchNext,
    WatchOptions, Watcher,
};

/// A deadline for waits that should end soon: only a broken watch ever reaches it.
const DEADLINE: Duration = Duration::from_secs(60);

fn take(watcher: &Watcher, n: usize) -> Vec<WatchEvent> {
    let mut seen = Vec::new();
    while seen.len() < n {
        match watcher.recv(n - seen.len(), Some(DEADLINE)) {
            WatchNext::Changes(events) => seen.extend(events),
            other => panic!("after {} of {n} changes: {other:?}", seen.len()),
        }
    }
    seen
}

fn text(event: &WatchEvent) -> String {
    String::from_utf8(event.decoded().unwrap().expect("a put").value).unwrap()
}

#[test]
fn hears_this_core_and_another_in_order_and_a_group_as_one_run() {
    let cluster = EtcdCluster::start(1);
    let url = cluster.url("app");
    let db = Database::open_cluster(&url, options()).unwrap();
    let map = db.map_store("jobs", MapOptions::default()).unwrap();
    // Committed and acknowledged before the watch: never reported, though its watch event may
    // still be on its way.
    let g = map.lock("before", LockMode::New, None).unwrap();
    g.commit(rec("0")).unwrap();
    let watcher = map.watch(&WatchOptions::default()).unwrap();
    assert_eq!(map.stats().unwrap().watchers, 1);

    let other = ClusterDatabase::open_unshared(&url, options()).unwrap();
    let other_map = other.map_store("jobs", &MapOptions::default()).unwrap();
    let mine = {
        let map = map.clone();
        std::thread::spawn(move || {
            for _ in 0..20 {
                let g = map.lock("hot", LockMode::Any, None).unwrap();
                let n = g.decoded().unwrap().map_or(0, |r| {
                    String::from_utf8(r.value).unwrap().parse::<u32>().unwrap()
                });
                g.commit(rec(&(n + 1).to_string())).unwrap();
            }
        })
    };
    let theirs = std::thread::spawn(move || {
        for _ in 0..20 {
            let g = other_map.lock("hot", LockMode::Any, None).unwrap();
            let n = g.decoded().unwrap().map_or(0, |r| {
                String::from_utf8(r.value).unwrap().parse::<u32>().unwrap()
            });
            g.commit(rec(&(n + 1).to_string())).unwrap();
        }
        other
    });
    // A group of three, through this core, among them.
    // (A guard dropped after the group released its lock releases nothing: its token is spent.)
    let guards: Vec<_> = ["g/a", "g/b", "g/c"]
        .iter()
        .map(|k| map.lock(k, LockMode::New, None).unwrap())
        .collect();
    let items = guards
        .iter()
        .map(|g| {
            let change = Change::Put(Arc::from(rec("g")));
            (map.clone(), g.key().to_string(), g.token(), change)
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    db.commit_group(
        items,
        CommitOptions::default(),
        Box::new(move |r| tx.send(r).unwrap()),
    )
    .unwrap();
    rx.recv().unwrap().unwrap();
    mine.join().unwrap();
    let other = theirs.join().unwrap();

    let seen = take(&watcher, 40 + 3);
    let keys: Vec<&str> = seen.iter().map(|e| &*e.key).collect();
    assert!(!keys.contains(&"before"));
    let at = keys.iter().position(|k| *k == "g/a").unwrap();
    assert_eq!(keys[at..at + 3], ["g/a", "g/b", "g/c"], "one run");
    let hot: Vec<u32> = seen
        .iter()
        .filter(|e| &*e.key == "hot")
        .map(|e| text(e).parse().unwrap())
        .collect();
    assert_eq!(hot, (1..=40).collect::<Vec<_>>(), "revision order");
    let (tx, rx) = std::sync::mpsc::channel();
    db.sync_with(Box::new(move |r| tx.send(r).unwrap()));
    rx.recv().unwrap().unwrap();
    assert!(matches!(watcher.try_next(10), WatchNext::Pending));
    drop(other);
    db.close();
    assert!(matches!(watcher.try_next(10), WatchNext::Ended));
}

#[test]
fn a_reload_after_compaction_ends_every_watch_with_overflow() {
    let cluster = EtcdCluster::start(1);
    let a = ClusterDatabase::open(&cluster.url("app"), options()).unwrap();
    let b = ClusterDatabase::open_unshared(&cluster.url("app"), options()).unwrap();
    let map_a = a.map_store("m", &MapOptions::default()).unwrap();
    let map_b = b.map_store("m", &MapOptions::default()).unwrap();
    let watcher = map_a.watch(&WatchOptions::default()).unwrap();
    map_b
        .lock("seen", LockMode::New, None)
        .unwrap()
        .commit(rec("x"))
        .unwrap();
    a.sync().unwrap();
    assert_eq!(&*take(&watcher, 1)[0].key, "seen");
    a.pause_replica(true);
    for i in 0..10 {
        let g = map_b.lock(&format!("k{i}"), LockMode::Any, None).unwrap();
        g.commit(rec("v")).unwrap();
        let g = map_b.lock(&format!("k{i}"), LockMode::Any, None).unwrap();
        g.commit(rec("w")).unwrap();
    }
    b.compact().unwrap();
    let reloads = a.replica_stats().reloads;
    a.pause_replica(false);
    a.sync().unwrap();
    assert_eq!(a.replica_stats().reloads, reloads + 1);
    match watcher.recv(10, Some(DEADLINE)) {
        WatchNext::Failed(err) => {
            assert_eq!(err.code(), ErrorCode::WatchOverflow);
            assert!(err.to_string().contains("compacted"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(watcher.try_next(10), WatchNext::Ended));
    assert_eq!(map_a.stats().unwrap().watchers, 0);
    // A watch begun after the reload hears what comes next.
    let again = map_a.watch(&WatchOptions::default()).unwrap();
    map_b
        .lock("after", LockMode::New, None)
        .unwrap()
        .commit(rec("y"))
        .unwrap();
    let seen = take(&again, 1);
    assert_eq!((&*seen[0].key, text(&seen[0]).as_str()), ("after", "y"));
}
