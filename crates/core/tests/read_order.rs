//! A reader never sees a key go back in time: once it has read a version, every later read of
//! that key returns it or a newer one. Issue 11's review found it broken twice: a reader that
//! missed the cache read the new value from the file while the old one was still cached (the
//! writer applies a batch to the cache after its commit is visible), and a reader kept a
//! snapshot opened before a commit as the snapshot of a generation that began after it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvstore_core::{envelope, Database, DatabaseOptions, LockMode, MapOptions};

const WRITERS: usize = 4;
const COMMITS: u64 = 15_000;

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
