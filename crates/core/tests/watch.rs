//! Watches of a file's maps, through the Rust API: every commit after the watch began, from every
//! thread and handle, in commit order; prefixes; overflow; closing a handle ends its watches.

use std::sync::Arc;
use std::time::Duration;

use kvstore_core::{
    envelope, Change, CommitOptions, Database, DatabaseOptions, ErrorCode, LockMode, MapOptions,
    MapStore, WatchEvent, WatchNext, WatchOptions, Watcher,
};

/// A deadline for waits that should end at once: only a broken watch ever reaches it.
const DEADLINE: Duration = Duration::from_secs(60);

fn open(dir: &tempfile::TempDir) -> (Database, MapStore) {
    let db = Database::open(dir.path().join("w.redb"), DatabaseOptions::default()).unwrap();
    let map = db.map_store("jobs", MapOptions::default()).unwrap();
    (db, map)
}

fn put(map: &MapStore, key: &str, value: &[u8]) {
    let guard = map.lock(key, LockMode::Any, None).unwrap();
    guard.commit(envelope::encode(&[], value)).unwrap();
}

/// The next `n` changes, waiting for them.
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

fn value(event: &WatchEvent) -> Vec<u8> {
    event.decoded().unwrap().expect("a put").value
}

#[test]
fn sees_commits_after_it_began_in_order_with_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, map) = open(&dir);
    put(&map, "before", b"0");
    let watcher = map.watch(&WatchOptions::default()).unwrap();
    assert_eq!(map.stats().unwrap().watchers, 1);
    put(&map, "a", b"1");
    put(&map, "a", b"2");
    map.delete("a").unwrap();
    let seen = take(&watcher, 3);
    assert_eq!(
        seen.iter().map(|e| &*e.key).collect::<Vec<_>>(),
        ["a", "a", "a"]
    );
    assert_eq!(value(&seen[0]), b"1");
    assert_eq!(value(&seen[1]), b"2");
    assert!(seen[2].is_delete());
    assert!(matches!(watcher.try_next(10), WatchNext::Pending));
    drop(watcher);
    assert_eq!(map.stats().unwrap().watchers, 0);
}

#[test]
fn eight_threads_on_hot_keys_every_change_once_each_key_in_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let (db, map) = open(&dir);
    let keys: Vec<String> = (0..8).map(|i| format!("hot-{i}")).collect();
    for key in &keys {
        put(&map, key, &0u64.to_le_bytes());
    }
    let watcher = map.watch(&WatchOptions::default()).unwrap();
    // A second handle (as another thread's open would be) watches the same commits.
    let other = db.clone();
    let other_map = other.map_store("jobs", MapOptions::default()).unwrap();
    let second = other_map.watch(&WatchOptions::default()).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let map = map.clone();
            let keys = keys.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let key = &keys[(t + i * 3) % keys.len()];
                    let guard = map.lock(key, LockMode::Existing, None).unwrap();
                    let n = u64::from_le_bytes(
                        guard.decoded().unwrap().unwrap().value[..8]
                            .try_into()
                            .unwrap(),
                    );
                    guard
                        .commit(envelope::encode(&[], &(n + 1).to_le_bytes()))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for watcher in [&watcher, &second] {
        let seen = take(watcher, 800);
        let mut last: std::collections::HashMap<&str, u64> = Default::default();
        for event in &seen {
            let n = u64::from_le_bytes(value(event)[..8].try_into().unwrap());
            let before = last.insert(&event.key, n).unwrap_or(0);
            assert_eq!(n, before + 1, "{}: commit order", event.key);
        }
        assert_eq!(last.values().sum::<u64>(), 800);
        assert!(matches!(watcher.try_next(10), WatchNext::Pending));
    }
}

#[test]
fn a_prefix_filters_and_other_maps_are_not_heard() {
    let dir = tempfile::tempdir().unwrap();
    let (db, map) = open(&dir);
    let other = db.map_store("other", MapOptions::default()).unwrap();
    let watcher = map
        .watch(&WatchOptions {
            prefix: Some("/a/".into()),
            ..WatchOptions::default()
        })
        .unwrap();
    put(&map, "/b/1", b"");
    put(&other, "/a/1", b"");
    put(&map, "/a/1", b"x");
    let seen = take(&watcher, 1);
    assert_eq!(&*seen[0].key, "/a/1");
    assert_eq!(value(&seen[0]), b"x");
    assert!(matches!(watcher.try_next(10), WatchNext::Pending));
}

#[test]
fn overflow_ends_the_watch_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, map) = open(&dir);
    let watcher = map
        .watch(&WatchOptions {
            high_water_mark: 2,
            ..WatchOptions::default()
        })
        .unwrap();
    for key in ["a", "b", "c"] {
        put(&map, key, b"");
    }
    match watcher.try_next(10) {
        WatchNext::Failed(err) => assert_eq!(err.code(), ErrorCode::WatchOverflow),
        other => panic!("{other:?}"),
    }
    assert!(matches!(watcher.try_next(10), WatchNext::Ended));
}

#[test]
fn closing_a_handle_ends_its_watches_and_wakes_a_waiting_reader() {
    let dir = tempfile::tempdir().unwrap();
    let (db, map) = open(&dir);
    let other = Database::open(dir.path().join("w.redb"), DatabaseOptions::default()).unwrap();
    let other_map = other.map_store("jobs", MapOptions::default()).unwrap();
    let kept = other_map.watch(&WatchOptions::default()).unwrap();
    let watcher = Arc::new(map.watch(&WatchOptions::default()).unwrap());
    let reader = {
        let watcher = watcher.clone();
        std::thread::spawn(move || watcher.recv(10, Some(DEADLINE)))
    };
    db.close();
    assert!(matches!(reader.join().unwrap(), WatchNext::Ended));
    assert_eq!(
        map.watch(&WatchOptions::default()).unwrap_err().code(),
        ErrorCode::StoreClosed
    );
    put(&other_map, "k", b"");
    assert_eq!(&*take(&kept, 1)[0].key, "k");
    assert_eq!(other_map.stats().unwrap().watchers, 1);
}

#[test]
fn a_group_commit_is_one_run_among_concurrent_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (db, map) = open(&dir);
    let watcher = map.watch(&WatchOptions::default()).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (db, map) = (db.clone(), map.clone());
            std::thread::spawn(move || {
                for i in 0..50 {
                    if t % 2 == 0 {
                        // Three entries in one commit.
                        let mut guards: Vec<_> = ["a", "b", "c"]
                            .iter()
                            .map(|part| {
                                map.lock(&format!("g{t}-{i}/{part}"), LockMode::New, None)
                                    .unwrap()
                            })
                            .collect();
                        let items = guards
                            .iter_mut()
                            .map(|g| (g, Change::Put(Arc::from(envelope::encode(&[], b"g")))))
                            .collect();
                        db.commit_guards(items, CommitOptions::default()).unwrap();
                    } else {
                        put(&map, &format!("s{t}-{i}"), b"s");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let seen = take(&watcher, 4 * 50 * 3 + 4 * 50);
    let keys: Vec<&str> = seen.iter().map(|e| &*e.key).collect();
    for (at, key) in keys.iter().enumerate() {
        if let Some(group) = key.strip_suffix("/a") {
            assert_eq!(
                keys[at..at + 3],
                [key.to_string(), format!("{group}/b"), format!("{group}/c")],
                "a group's changes, together and in order"
            );
        }
    }
}
