//! A reader never sees a key go back in time: once it has read a version, every later read of
//! that key returns it or a newer one. Issue 11's review found it broken twice: a reader that
//! missed the cache read the new value from the file while the old one was still cached (the
//! writer applies a batch to the cache after its commit is visible), and a reader kept a
//! snapshot opened before a commit as the snapshot of a generation that began after it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvstore_core::{
    envelope, Change, CommitCallback, CommitOptions, Database, DatabaseOptions, LockMode,
    MapOptions, MapStore,
};

const WRITERS: usize = 4;
const COMMITS: u64 = 15_000;

fn read_version(map: &MapStore, key: &str) -> Option<u64> {
    map.get(key).unwrap().map(|record| version(&record))
}

fn version(record: &[u8]) -> u64 {
    let value = envelope::decode(record).unwrap().value;
    u64::from_le_bytes(value[..8].try_into().unwrap())
}

#[test]
fn versions_read_never_go_backwards_while_small_and_uncached_records_alternate() {
    // A tiny cache: the small versions are cached, the large ones (over an eighth of the
    // budget) are not, so every commit of a key changes whether it is cached.
    let budget = 4096;
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(
        dir.path().join("order.redb"),
        DatabaseOptions {
            durable: false,
            ..Default::default()
        },
    )
    .unwrap();
    let map = db
        .map_store(
            "m",
            MapOptions {
                cache_bytes: budget,
                ..Default::default()
            },
        )
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (map, done) = (map.clone(), done.clone());
            std::thread::spawn(move || {
                let mut seen = [0u64; WRITERS];
                let mut reads = 0u64;
                while !done.load(Ordering::SeqCst) {
                    for (w, last) in seen.iter_mut().enumerate() {
                        let Some(record) = map.get(&format!("k{w}")).unwrap() else {
                            continue;
                        };
                        let v = version(&record);
                        assert!(v >= *last, "k{w}: read version {last}, then {v}");
                        *last = v;
                        reads += 1;
                    }
                }
                reads
            })
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let map = map.clone();
            std::thread::spawn(move || {
                for v in 1..=COMMITS {
                    let len = if v % 2 == 0 { 16 } else { budget / 8 + 100 };
                    let mut value = vec![0u8; len];
                    value[..8].copy_from_slice(&v.to_le_bytes());
                    let guard = map.lock(&format!("k{w}"), LockMode::Any, None).unwrap();
                    guard.commit(envelope::encode(&[], &value)).unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(reads > 0);
    for w in 0..WRITERS {
        let record = map.get(&format!("k{w}")).unwrap().unwrap();
        assert_eq!(version(&record), COMMITS);
    }
}

/// Two commits of one key in one transaction (`update_only` keeps the lock, so its holder may
/// queue a second commit before the first settles). The cache took the batch job by job, so
/// between them it held the first value while the file held the second: a read in between
/// went from 2 back to 1.
#[test]
fn a_key_written_twice_in_one_transaction_is_read_at_its_last_value_from_the_first_callback() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("twice.redb"), DatabaseOptions::default()).unwrap();
    let map = db.map_store("m", MapOptions::default()).unwrap();
    let record = |v: u64| envelope::encode(&[], &v.to_le_bytes());
    map.lock("k", LockMode::Any, None)
        .unwrap()
        .commit(record(0))
        .unwrap();
    assert_eq!(read_version(&map, "k"), Some(0));
    let other = map.lock("other", LockMode::Any, None).unwrap();
    let held = map.lock("k", LockMode::Any, None).unwrap();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let reading = |label: &'static str| -> CommitCallback {
        let (map, seen_tx) = (map.clone(), seen_tx.clone());
        Box::new(move |outcome| {
            outcome.unwrap();
            seen_tx.send((label, read_version(&map, "k"))).unwrap();
        })
    };
    let keep = CommitOptions {
        update_only: true,
        ..Default::default()
    };
    let put = |v: u64| Change::Put(Arc::from(record(v)));
    let commits = vec![
        map.prepare_commit("other", other.token(), put(7), keep, reading("other"))
            .unwrap(),
        map.prepare_commit("k", held.token(), put(1), keep, reading("k = 1"))
            .unwrap(),
        map.prepare_commit("k", held.token(), put(2), keep, reading("k = 2"))
            .unwrap(),
    ];
    // One transaction, whether this thread writes it or the writer does.
    db.write_now(commits);
    let seen: Vec<_> = (0..3).map(|_| seen_rx.recv().unwrap()).collect();
    for (label, v) in &seen {
        assert_eq!(
            *v,
            Some(2),
            "read of k in the callback of {label}: {seen:?}"
        );
    }
    assert_eq!(read_version(&map, "k"), Some(2));
    drop((other, held));
}
