//! The engine without Node: locks, the commit queue, the key sequence, the cache and ranges,
//! against a real redb file.

use std::sync::mpsc;
use std::time::Duration;

use kvstore_core::{
    envelope, Change, CommitOptions, Database, DatabaseOptions, ErrorCode, LockMode, MapOptions,
    MapStore, RangeOptions,
};

fn open(dir: &tempfile::TempDir) -> (Database, MapStore) {
    let db = Database::open(dir.path().join("t.redb"), DatabaseOptions::default()).unwrap();
    let map = db.map_store("jobs", MapOptions::default()).unwrap();
    (db, map)
}

fn put(map: &MapStore, key: &str, value: &[u8]) {
    let guard = map.lock(key, LockMode::Any, None).unwrap();
    guard.commit(envelope::encode(&[], value)).unwrap();
}

fn value(map: &MapStore, key: &str) -> Option<Vec<u8>> {
    map.get_record(key).unwrap().map(|r| r.value)
}

#[test]
fn create_twice_fails_and_allow_existing_returns_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (db, map) = open(&dir);
    put(&map, "foo", b"1");
    let err = map.lock("foo", LockMode::New, None).err().unwrap();
    assert_eq!(err.code(), ErrorCode::EntryExists);
    let guard = map.lock("foo", LockMode::Any, None).unwrap();
    assert!(guard.existed());
    assert_eq!(guard.decoded().unwrap().unwrap().value, b"1");
    drop(guard);
    assert_eq!(
        map.lock("nope", LockMode::Existing, None)
            .err()
            .unwrap()
            .code(),
        ErrorCode::EntryNotFound
    );
    assert_eq!(map.stats().unwrap().locks_held, 0);
    db.close();
}

#[test]
fn update_only_keeps_the_lock_and_a_waiter_sees_the_final_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, map) = open(&dir);
    let mut guard = map.lock("k", LockMode::New, None).unwrap();
    guard
        .commit_with(
            envelope::encode(&[], b"first"),
            CommitOptions {
                update_only: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(value(&map, "k").unwrap(), b"first");
    let (tx, rx) = mpsc::channel();
    let waiter = {
        let map = map.clone();
        std::thread::spawn(move || {
            tx.send(()).unwrap();
            let g = map.lock("k", LockMode::Existing, None).unwrap();
            g.decoded().unwrap().unwrap().value
        })
    };
    rx.recv().unwrap();
    // The waiter is queued (or about to be); it cannot get the lock before the final commit.
    guard
        .commit_with(envelope::encode(&[], b"final"), CommitOptions::default())
        .unwrap();
    assert_eq!(waiter.join().unwrap(), b"final");
    let err = guard
        .commit_with(envelope::encode(&[], b"again"), CommitOptions::default())
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::LockReleased);
}

#[test]
fn waiter_of_a_deleted_entry_is_told_so_and_create_then_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, map) = open(&dir);
    put(&map, "k", b"v");
    let holder = map.lock("k", LockMode::Existing, None).unwrap();
    let getter = {
        let map = map.clone();
        std::thread::spawn(move || {
            map.lock("k", LockMode::Existing, None)
                .err()
                .map(|e| e.code())
        })
    };
    while map.stats().unwrap().locks_waiting == 0 {
        std::thread::yield_now();
    }
    holder.delete().unwrap();
    assert_eq!(getter.join().unwrap(), Some(ErrorCode::EntryDeleted));
    let created = map.lock("k", LockMode::New, None).unwrap();
    assert!(!created.existed());
    drop(created);
    map.delete("k").unwrap();
    map.delete("k").unwrap();
}

#[test]
fn delete_with_update_only_is_invalid_and_keeps_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, map) = open(&dir);
    let guard = map.lock("k", LockMode::New, None).unwrap();
    let (tx, _rx) = mpsc::channel();
    let err = map
        .commit(
            guard.key(),
            guard.token(),
            Change::Delete,
            CommitOptions {
                update_only: true,
                ..Default::default()
            },
            Box::new(move |r| drop(tx.send(r))),
        )
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert_eq!(map.stats().unwrap().locks_held, 1);
}

#[test]
fn concurrent_committers_share_transactions_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, map) = open(&dir);
    for k in 0..5 {
        put(&map, &format!("k{k}"), &0u64.to_le_bytes());
    }
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let map = map.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let key = format!("k{}", (t + i) % 5);
                    let guard = map.lock(&key, LockMode::Existing, None).unwrap();
                    let rec = guard.decoded().unwrap().unwrap();
                    let n = u64::from_le_bytes(rec.value.try_into().unwrap()) + 1;
                    guard
                        .commit(envelope::encode(&[], &n.to_le_bytes()))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let total: u64 = (0..5)
        .map(|k| u64::from_le_bytes(value(&map, &format!("k{k}")).unwrap().try_into().unwrap()))
        .sum();
    assert_eq!(total, 800);
    let stats = map.stats().unwrap();
    assert_eq!(stats.commits, 805);
    assert!(stats.batches <= stats.commits);
    assert_eq!(stats.locks_held + stats.locks_waiting, 0);
}

#[test]
fn auto_keys_rise_and_never_repeat_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let db = Database::open(dir.path().join("t.redb"), DatabaseOptions::default()).unwrap();
        let map = db
            .map_store(
                "auto",
                MapOptions {
                    bandwidth: 7,
                    ..Default::default()
                },
            )
            .unwrap();
        for _ in 0..10 {
            let guard = map.lock_new_auto().unwrap();
            seen.push(guard.key().to_string());
            guard.commit(envelope::encode(&[], b"")).unwrap();
        }
        db.close();
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "strictly increasing across reopen");
    assert!(seen.iter().all(|k| k.len() == 13));
}

#[test]
fn ranges_honour_order_prefix_start_stop_reverse_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, map) = open(&dir);
    let mut keys: Vec<String> = (0..100).map(|i| format!("{i:03}")).collect();
    keys.extend((0..100).map(|i| format!("/foo/{i}")));
    keys.extend(["/baz/0".to_string(), "/baz/2".to_string()]);
    for k in &keys {
        put(&map, k, k.as_bytes());
    }
    let walk = |opts: RangeOptions| -> Vec<String> {
        map.range(&opts)
            .unwrap()
            .map(|e| e.unwrap().key().to_string())
            .collect()
    };
    let all = walk(RangeOptions::default());
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(all, sorted);
    let foo = walk(RangeOptions {
        prefix: Some("/foo/".into()),
        ..Default::default()
    });
    assert_eq!(foo.len(), 100);
    let from = walk(RangeOptions {
        prefix: Some("/foo/".into()),
        start: Some("/foo/10".into()),
        stop: Some("/foo/20".into()),
        ..Default::default()
    });
    assert_eq!(from.first().unwrap(), "/foo/10");
    assert!(!from.contains(&"/foo/20".to_string()));
    assert_eq!(from.len(), 11); // /foo/10..=/foo/19 plus /foo/2 sorts before /foo/20
    let baz = walk(RangeOptions {
        start: Some("/baz/1".into()),
        stop: Some("/baz/3".into()),
        ..Default::default()
    });
    assert_eq!(baz, vec!["/baz/2"]);
    let last = walk(RangeOptions {
        reverse: true,
        limit: Some(2),
        ..Default::default()
    });
    assert_eq!(last, vec!["099", "098"]);
    assert_eq!(
        map.count(&RangeOptions {
            prefix: Some("/baz".into()),
            ..Default::default()
        })
        .unwrap(),
        2
    );
    assert_eq!(map.count(&RangeOptions::default()).unwrap(), 202);
}

#[test]
fn a_snapshot_does_not_see_later_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, map) = open(&dir);
    put(&map, "a", b"1");
    put(&map, "c", b"3");
    let mut walk = map.range(&RangeOptions::default()).unwrap();
    assert_eq!(walk.next().unwrap().unwrap().key(), "a");
    put(&map, "b", b"2");
    map.delete("c").unwrap();
    let rest: Vec<String> = walk.map(|e| e.unwrap().key().to_string()).collect();
    assert_eq!(rest, vec!["c"]);
    assert_eq!(value(&map, "b").unwrap(), b"2");
    assert!(value(&map, "c").is_none());
}

#[test]
fn lock_timeout_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, map) = open(&dir);
    let held = map.lock("k", LockMode::Any, None).unwrap();
    let err = map
        .lock("k", LockMode::Any, Some(Duration::from_millis(20)))
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::LockTimeout);
    let stats = map.stats().unwrap();
    assert_eq!((stats.locks_held, stats.locks_waiting), (1, 0));
    drop(held);
    assert_eq!(map.stats().unwrap().locks_held, 0);
}

#[test]
fn one_core_per_file_and_codec_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.redb");
    let a = Database::open(&path, DatabaseOptions::default()).unwrap();
    let b = Database::open(
        dir.path().join(".").join("t.redb"),
        DatabaseOptions::default(),
    )
    .unwrap();
    let ma = a
        .map_store(
            "m",
            MapOptions {
                codec: "json".into(),
                ..Default::default()
            },
        )
        .unwrap();
    let mb = b
        .map_store(
            "m",
            MapOptions {
                codec: "json".into(),
                ..Default::default()
            },
        )
        .unwrap();
    put(&ma, "x", b"1");
    assert_eq!(value(&mb, "x").unwrap(), b"1");
    let err = b
        .map_store(
            "m",
            MapOptions {
                codec: "msgpack".into(),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::CodecMismatch);
    a.close();
    assert_eq!(ma.get("x").unwrap_err().code(), ErrorCode::StoreClosed);
    assert_eq!(value(&mb, "x").unwrap(), b"1");
    b.close();
    let c = Database::open(&path, DatabaseOptions::default()).unwrap();
    let err = c
        .map_store(
            "m",
            MapOptions {
                codec: "msgpack".into(),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!(
        err.code(),
        ErrorCode::CodecMismatch,
        "the codec name is recorded in the file"
    );
}

#[test]
fn garbage_file_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.redb");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = Database::open(&path, DatabaseOptions::default())
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::DatabaseCorrupt);
}

/// The same vectors are checked by __test__/envelope.spec.mjs against the TypeScript encoder.
#[test]
fn envelope_matches_the_shared_vectors() {
    let text = include_str!("vectors/envelope.json");
    let vectors: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
    assert!(vectors.len() >= 5);
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let metadata: Vec<(String, String)> = v["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_string(),
                    p[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let value = hex(v["value"].as_str().unwrap());
        let record = hex(v["record"].as_str().unwrap());
        assert_eq!(envelope::encode(&metadata, &value), record, "{name}");
        let decoded = envelope::decode(&record).unwrap();
        assert_eq!(decoded.metadata, metadata, "{name}");
        assert_eq!(decoded.value, value, "{name}");
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn reads_without_a_cache_always_see_the_last_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("t.redb"), DatabaseOptions::default()).unwrap();
    let map = db
        .map_store(
            "nocache",
            MapOptions {
                cache_capacity: 0,
                ..Default::default()
            },
        )
        .unwrap();
    put(&map, "other", b"x");
    assert_eq!(value(&map, "other").unwrap(), b"x"); // a snapshot is now kept
    for i in 0..50u32 {
        put(&map, "k", &i.to_le_bytes());
        assert_eq!(value(&map, "k").unwrap(), i.to_le_bytes(), "round {i}");
        assert_eq!(value(&map, "other").unwrap(), b"x");
    }
    map.delete("k").unwrap();
    assert!(value(&map, "k").is_none());
    assert!(!map.lock("k", LockMode::New, None).unwrap().existed());
}

#[test]
fn backup_under_concurrent_writes_is_one_consistent_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("live.redb"), DatabaseOptions::default()).unwrap();
    let map = db.map_store("pairs", MapOptions::default()).unwrap();
    for i in 0..200 {
        put(&map, &format!("filler-{i:03}"), &[1u8; 100]);
    }
    let writer = {
        let db = db.clone();
        let map = map.clone();
        std::thread::spawn(move || {
            for n in 1..300u32 {
                let g = map
                    .lock(&format!("more-{n:03}"), LockMode::New, None)
                    .unwrap();
                g.commit(envelope::encode(&[], &n.to_le_bytes())).unwrap();
            }
            drop(db);
        })
    };
    let dest = dir.path().join("copy.redb");
    db.backup(&dest).unwrap();
    writer.join().unwrap();
    assert_eq!(
        db.backup(&dest).unwrap_err().code(),
        ErrorCode::InvalidArgument,
        "never overwrites"
    );

    let copy = Database::open(&dest, DatabaseOptions::default()).unwrap();
    let copied = copy.map_store("pairs", MapOptions::default()).unwrap();
    assert_eq!(
        copied
            .count(&RangeOptions {
                prefix: Some("filler-".into()),
                ..Default::default()
            })
            .unwrap(),
        200
    );
    let more = copied
        .count(&RangeOptions {
            prefix: Some("more-".into()),
            ..Default::default()
        })
        .unwrap();
    // The copy holds a prefix of the concurrent writes, in commit order.
    let keys: Vec<String> = copied
        .range(&RangeOptions {
            prefix: Some("more-".into()),
            ..Default::default()
        })
        .unwrap()
        .map(|e| e.unwrap().key().to_string())
        .collect();
    assert_eq!(
        keys,
        (1..=more as u32)
            .map(|n| format!("more-{n:03}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        copy.tables().unwrap(),
        vec![("pairs".to_string(), "raw".to_string())]
    );
}

#[test]
fn compact_waits_for_commits_and_refuses_while_a_walk_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let (db, map) = open(&dir);
    for i in 0..500 {
        put(&map, &format!("k{i:04}"), &[9u8; 500]);
    }
    for i in 0..500 {
        map.delete(&format!("k{i:04}")).unwrap();
    }
    let walk = map.range(&RangeOptions::default()).unwrap();
    assert_eq!(db.compact().unwrap_err().code(), ErrorCode::InvalidArgument);
    drop(walk);
    db.compact().unwrap();
    put(&map, "after", b"ok");
    assert_eq!(value(&map, "after").unwrap(), b"ok");
    assert_eq!(map.count(&RangeOptions::default()).unwrap(), 1);
}

#[test]
fn a_prepared_commit_whose_lock_was_lost_never_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.redb");
    let a = Database::open(&path, DatabaseOptions::default()).unwrap();
    let b = Database::open(&path, DatabaseOptions::default()).unwrap();
    let ma = a.map_store("m", MapOptions::default()).unwrap();
    let mb = b.map_store("m", MapOptions::default()).unwrap();
    let outcome = |prepared_by: &MapStore, token| {
        let (tx, rx) = mpsc::channel();
        let prepared = prepared_by
            .prepare_commit(
                "k",
                token,
                kvstore_core::Change::Put(envelope::encode(&[], b"stale").into()),
                CommitOptions::default(),
                Box::new(move |r| tx.send(r).unwrap()),
            )
            .unwrap();
        (prepared, rx)
    };

    // Released by hand before the prepared commit is queued: the writer refuses it.
    let guard = ma.lock("k", LockMode::New, None).unwrap();
    let (prepared, rx) = outcome(&ma, guard.token());
    ma.release("k", guard.token()).unwrap();
    std::mem::forget(guard);
    put(&mb, "k", b"fresh");
    a.submit(vec![prepared]);
    assert_eq!(
        rx.recv().unwrap().unwrap_err().code(),
        ErrorCode::LockReleased
    );
    assert_eq!(value(&mb, "k").unwrap(), b"fresh");

    // Its handle closed (releasing its locks) before it was queued: refused as well.
    let guard = ma.lock("k", LockMode::Existing, None).unwrap();
    let (prepared, rx) = outcome(&ma, guard.token());
    std::mem::forget(guard);
    a.close();
    put(&mb, "k", b"newer");
    a.submit(vec![prepared]);
    assert_eq!(
        rx.recv().unwrap().unwrap_err().code(),
        ErrorCode::StoreClosed
    );
    assert_eq!(value(&mb, "k").unwrap(), b"newer");
}

#[test]
fn a_backup_begun_before_close_is_ended_by_it_and_the_file_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let (db, map) = open(&dir);
    for i in 0..50 {
        put(&map, &format!("k{i:02}"), b"v");
    }
    let backup = db.begin_backup(dir.path().join("copy.redb")).unwrap();
    db.close();
    drop(map);
    // The file is free at once: the pending backup does not hold it.
    let (again, _) = open(&dir);
    assert_eq!(
        backup.run().unwrap_err().code(),
        kvstore_core::ErrorCode::StoreClosed
    );
    assert!(!dir.path().join("copy.redb").exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    again.close();
}

#[test]
fn a_blocking_call_inside_a_commit_callback_is_refused_not_a_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, map) = open(&dir);
    let inner = map.lock("inner", LockMode::New, None).unwrap();
    let outer = map.lock("outer", LockMode::New, None).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let in_callback = map.clone();
    map.commit(
        "outer",
        outer.token(),
        kvstore_core::Change::Put(envelope::encode(&[], b"o").into()),
        kvstore_core::CommitOptions::default(),
        Box::new(move |outcome| {
            outcome.unwrap();
            let commit = inner.commit(envelope::encode(&[], b"i"));
            let auto_key = in_callback.next_key_blocking().map(drop);
            tx.send((commit, auto_key)).unwrap();
        }),
    )
    .unwrap();
    let (commit, auto_key) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the callback returned (no deadlock)");
    drop(outer); // its lock went with the commit above: nothing left to release
    for refused in [commit, auto_key] {
        assert_eq!(
            refused.unwrap_err().code(),
            kvstore_core::ErrorCode::InvalidArgument
        );
    }
    assert_eq!(map.get_record("outer").unwrap().unwrap().value, b"o");
}

#[test]
fn auto_keys_are_generated_in_one_format_per_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.redb");
    let narrow = MapOptions {
        keys: kvstore_core::KeyFormat::new(4, 10).unwrap(),
        ..Default::default()
    };
    let db = Database::open(&path, DatabaseOptions::default()).unwrap();
    let first = db.map_store("jobs", narrow.clone()).unwrap();
    assert_eq!(first.next_key_blocking().unwrap(), "0000");
    // A second opener asking for another format is refused when it generates a key...
    let other = db.map_store("jobs", MapOptions::default()).unwrap();
    let err = other.next_key_blocking().unwrap_err();
    assert_eq!(err.code(), kvstore_core::ErrorCode::InvalidArgument);
    assert!(err.to_string().contains("width 4"), "{err}");
    // ...but reads through it as usual.
    assert!(other.get("0000").unwrap().is_none());
    assert_eq!(first.next_key_blocking().unwrap(), "0001");
    db.close();
    // The format is recorded in the file: a later open with another one is refused too.
    let db = Database::open(&path, DatabaseOptions::default()).unwrap();
    let reopened = db.map_store("jobs", MapOptions::default()).unwrap();
    assert_eq!(
        reopened.next_key_blocking().unwrap_err().code(),
        kvstore_core::ErrorCode::InvalidArgument
    );
    let same = db.map_store("jobs", narrow).unwrap();
    assert_eq!(
        same.next_key_blocking().unwrap(),
        "0002",
        "the rest of the lease was given back at close"
    );
}

#[test]
fn a_callback_of_one_file_may_wait_for_another_files_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (_a, map_a) = open(&dir);
    let db_b = Database::open(dir.path().join("b.redb"), DatabaseOptions::default()).unwrap();
    let map_b = db_b.map_store("jobs", MapOptions::default()).unwrap();
    let lock = map_a.lock("k", LockMode::New, None).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    map_a
        .commit(
            "k",
            lock.token(),
            kvstore_core::Change::Put(envelope::encode(&[], b"a").into()),
            kvstore_core::CommitOptions::default(),
            Box::new(move |outcome| {
                outcome.unwrap();
                // Runs on file A's writer: waiting for file B's writer is fine.
                let key = map_b.next_key_blocking();
                let commit = key.as_ref().map_err(Clone::clone).and_then(|key| {
                    map_b
                        .lock(key, LockMode::New, None)?
                        .commit(envelope::encode(&[], b"b"))
                });
                tx.send((key, commit)).unwrap();
            }),
        )
        .unwrap();
    let (key, commit) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the callback returned");
    drop(lock);
    assert_eq!(key.unwrap(), "0000000000000");
    commit.unwrap();
}

#[test]
fn odd_paths_are_invalid_arguments_and_backup_errors_name_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let nul = dir.path().join("a\0b.redb");
    assert_eq!(
        Database::open(&nul, DatabaseOptions::default())
            .err()
            .unwrap()
            .code(),
        kvstore_core::ErrorCode::InvalidArgument
    );
    let (db, map) = open(&dir);
    put(&map, "k", b"v");
    assert_eq!(
        db.backup(&nul).unwrap_err().code(),
        kvstore_core::ErrorCode::InvalidArgument
    );
    // A legal 250-byte name: the working file's longer name must still fit.
    let long = dir.path().join(format!("{}.redb", "n".repeat(245)));
    db.backup(&long).unwrap();
    assert!(long.exists());
    let missing = dir.path().join("missing").join("copy.redb");
    let err = db.backup(&missing).unwrap_err();
    assert_eq!(err.code(), kvstore_core::ErrorCode::Io);
    assert!(
        err.to_string().contains(&*missing.to_string_lossy()),
        "{err}"
    );
}
