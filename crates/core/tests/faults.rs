//! Injected storage faults: a backend over the real file that fails writes or syncs on demand
//! (EIO, ENOSPC). A failing transaction rejects exactly its commits with the OS errno, nothing
//! committed before is lost, no lock leaks, and commits work again once the fault clears.
//! While the fault lasts, reads that need the file fail too (redb refuses all I/O after an I/O
//! error until the file is reopened, and reopening needs the disk).

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{flip_bytes, open_faulty, put, quiet_redb_panics, written_store, Faults, EIO, ENOSPC};
use kvstore_core::{
    check_integrity, Database, DatabaseOptions, ErrorCode, LockMode, MapOptions, RangeOptions,
};

fn io_errno(result: kvstore_core::Result<()>) -> Option<i32> {
    match result {
        Err(kvstore_core::Error::Io { errno, .. }) => errno,
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn failed_syncs_and_writes_reject_their_commits_and_the_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("faults.redb");
    let faults = Arc::new(Faults::default());
    let db = open_faulty(&path, &faults);
    let map = db.map_store("m", MapOptions::default()).unwrap();
    for i in 0..10 {
        put(&map, &format!("before-{i}"), b"ok").unwrap();
    }

    let mut injected = 0;
    for (which, errno) in [
        (&faults.sync, EIO),
        (&faults.write, ENOSPC),
        (&faults.sync, ENOSPC),
    ] {
        which.set(errno);
        assert_eq!(
            io_errno(put(&map, &format!("failed-{injected}"), b"bad")),
            Some(errno)
        );
        // Still failing: the next commit fails the same way, the queue is not wedged.
        assert_eq!(
            io_errno(put(&map, &format!("failed-again-{injected}"), b"bad")),
            Some(errno)
        );
        which.clear();
        // Cleared: the writer reopens the file and the next commit lands.
        put(&map, &format!("after-{injected}"), b"ok").unwrap();
        assert_eq!(
            map.stats().unwrap().locks_held,
            0,
            "failed commits released their locks"
        );
        injected += 1;
    }

    let keys: Vec<String> = map
        .range(&RangeOptions::default())
        .unwrap()
        .map(|e| e.unwrap().key().to_string())
        .collect();
    let mut expected: Vec<String> = (0..10).map(|i| format!("before-{i}")).collect();
    expected.extend((0..injected).map(|i| format!("after-{i}")));
    for key in &expected {
        assert!(
            keys.contains(key),
            "{key} was acknowledged and must be there"
        );
    }
    // A failed write (set_len/write, round 1) leaves the file as it was. A failed fsync (rounds
    // 0 and 2) comes after redb wrote the transaction: its outcome is unknown, and the entry may
    // be there, whole.
    for key in keys.iter().filter(|k| k.starts_with("failed")) {
        assert!(
            !key.ends_with("-1"),
            "{key}: a failed write must leave nothing"
        );
        assert_eq!(map.get_record(key).unwrap().unwrap().value, b"bad");
    }
    assert!(keys.len() <= expected.len() + 4);
    assert!(map.stats().unwrap().failed_batches >= 6);
    db.close();

    assert!(check_integrity(&path).unwrap());
    let plain = Database::open(&path, DatabaseOptions::default()).unwrap();
    let reopened = plain.map_store("m", MapOptions::default()).unwrap();
    assert_eq!(
        reopened.count(&RangeOptions::default()).unwrap(),
        keys.len() as u64
    );
    assert_eq!(
        reopened.get("failed-1").unwrap(),
        None,
        "a failed write left nothing behind"
    );
    assert_eq!(
        reopened
            .lock("failed-1", LockMode::Existing, None)
            .err()
            .unwrap()
            .code(),
        ErrorCode::EntryNotFound
    );
}

/// Opens a damaged file and reads everything: each step either works or fails with a typed
/// error; nothing panics. Returns the error codes met.
fn read_all(path: &Path, n: usize) -> Vec<ErrorCode> {
    let mut met = Vec::new();
    let db = match Database::open(path, DatabaseOptions::default()) {
        Ok(db) => db,
        Err(e) => {
            return vec![e.code()];
        }
    };
    match db.map_store(
        "m",
        MapOptions {
            cache_capacity: 0,
            ..Default::default()
        },
    ) {
        Err(e) => met.push(e.code()),
        Ok(map) => {
            for i in 0..n {
                if let Err(e) = map.get(&format!("key-{i:05}")) {
                    met.push(e.code());
                }
            }
            for key in ["key-00007", "key-new"] {
                if let Err(e) = put(&map, key, b"rewritten") {
                    met.push(e.code());
                }
            }
            match map.range(&RangeOptions::default()) {
                Err(e) => met.push(e.code()),
                Ok(walk) => {
                    for item in walk {
                        if let Err(e) = item {
                            met.push(e.code());
                        }
                    }
                }
            }
        }
    }
    db.close();
    met
}

/// The Nth write or fsync of a commit fails, for every N a commit reaches: the commit is
/// rejected with the errno, everything acknowledged stays, and the next commit lands.
#[test]
fn each_write_and_each_fsync_of_a_commit_can_fail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nth.redb");
    let faults = Arc::new(Faults::default());
    let db = open_faulty(&path, &faults);
    let map = db.map_store("m", MapOptions::default()).unwrap();
    let mut acknowledged = Vec::new();
    let mut injected = 0;
    for (name, fault, errno) in [
        ("write", &faults.write, ENOSPC),
        ("sync", &faults.sync, EIO),
    ] {
        // Raise N until a commit gets through all its calls before the fault fires.
        for n in 0.. {
            let key = format!("{name}-{n}");
            fault.fail_after(n, errno);
            let outcome = put(&map, &key, key.as_bytes());
            fault.clear();
            match outcome {
                Ok(()) => {
                    acknowledged.push(key);
                    break;
                }
                Err(err) => {
                    injected += 1;
                    assert_eq!(err.code(), ErrorCode::Io, "{key}: {err}");
                    assert_eq!(io_errno(Err(err)), Some(errno));
                }
            }
            let after = format!("after-{name}-{n}");
            put(&map, &after, b"ok").unwrap();
            acknowledged.push(after);
            assert!(n < 64, "a commit should need only a few writes and syncs");
        }
    }
    assert!(
        injected >= 3,
        "the fault fired at several points ({injected})"
    );
    eprintln!(
        "{injected} commits failed at each write/fsync position; {} acknowledged",
        acknowledged.len()
    );
    assert_eq!(map.stats().unwrap().locks_held, 0);
    db.close();

    assert!(check_integrity(&path).unwrap());
    let plain = Database::open(&path, DatabaseOptions::default()).unwrap();
    let reopened = plain.map_store("m", MapOptions::default()).unwrap();
    for key in &acknowledged {
        assert!(
            reopened.get(key).unwrap().is_some(),
            "{key} was acknowledged"
        );
    }
    for i in 0.. {
        // A failed write leaves nothing; the outcome of a failed fsync is unknown.
        let key = format!("write-{i}");
        if acknowledged.contains(&key) {
            break;
        }
        assert_eq!(reopened.get(&key).unwrap(), None, "{key} failed to write");
    }
}

/// A failing read rejects that read with its errno; reads and commits work again once the
/// disk does (redb refuses all I/O after an error until the file is reopened: the writer
/// reopens it, and the next commit waits for that).
#[test]
fn a_failed_read_reports_its_errno_and_the_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let n = 2000;
    let path = written_store(dir.path(), "damaged.redb", n);
    let faults = Arc::new(Faults::default());
    let db = open_faulty(&path, &faults);
    let uncached = MapOptions {
        cache_capacity: 0,
        ..Default::default()
    };
    let map = db.map_store("m", uncached).unwrap();

    faults.read.set(EIO);
    // A fresh instance has not read the leaf pages yet.
    let failed = map.get("key-01500").map(|_| ());
    assert_eq!(io_errno(failed), Some(EIO));
    let walk = map
        .range(&RangeOptions::default())
        .and_then(|walk| walk.into_iter().try_for_each(|item| item.map(|_| ())));
    assert!(walk.is_err(), "a walk over unread pages fails too");
    faults.read.clear();

    put(&map, "after", b"ok").unwrap();
    for i in 0..n {
        let record = map.get_record(&format!("key-{i:05}")).unwrap().unwrap();
        assert_eq!(record.value, vec![i as u8; 100]);
    }
    assert_eq!(map.count(&RangeOptions::default()).unwrap(), n as u64 + 1);
    assert_eq!(map.stats().unwrap().locks_held, 0);
    db.close();
    assert!(check_integrity(&path).unwrap());
}

/// A torn (truncated) file reports ERR_DATABASE_CORRUPT on open. A file with flipped bytes
/// either opens, and then every read and write returns data or a typed error, or is refused
/// as corrupt: never a panic into the caller.
#[test]
fn a_torn_or_damaged_file_reports_corruption_and_never_panics() {
    quiet_redb_panics();
    let dir = tempfile::tempdir().unwrap();
    let n = 2000;
    let path = written_store(dir.path(), "damaged.redb", n);
    let good = std::fs::read(&path).unwrap();
    for cut in [1, 100, 511, 4096, good.len() / 2, good.len() - 1] {
        std::fs::write(&path, &good[..cut]).unwrap();
        assert_eq!(
            read_all(&path, n),
            vec![ErrorCode::DatabaseCorrupt],
            "truncated to {cut} bytes"
        );
    }

    let mut seed = 7u64;
    let mut detected = 0;
    for _ in 0..150 {
        let bytes = flip_bytes(&good, &mut seed);
        std::fs::write(&path, &bytes).unwrap();
        let met = read_all(&path, n);
        for code in &met {
            assert!(
                matches!(code, ErrorCode::DatabaseCorrupt | ErrorCode::Io),
                "unexpected {code:?}"
            );
        }
        if met.contains(&ErrorCode::DatabaseCorrupt) {
            detected += 1;
        }
    }
    assert!(
        detected > 10,
        "damage was reported ({detected} of 150 files)"
    );
    eprintln!("6 torn files refused; {detected} of 150 damaged files reported as corrupt");
}

#[test]
fn a_file_open_through_a_custom_backend_keeps_its_file_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.redb");
    let faults = Arc::new(Faults::default());
    let db = open_faulty(&path, &faults);
    let map = db.map_store("m", MapOptions::default()).unwrap();
    put(&map, "k", b"v").unwrap();
    // Another opener of the file (as another process would be) is refused while it is open.
    assert!(matches!(
        redb::Database::create(&path),
        Err(redb::DatabaseError::DatabaseAlreadyOpen)
    ));
    db.close();
    drop(map);
    redb::Database::create(&path).expect("free once closed");
}
