//! Walks (`MapStore::range`) end at their end or with a true, typed error: `StoreClosed` once
//! their handle closed, an I/O error when a recovery discarded their snapshot while the store
//! stays open, `DatabaseCorrupt` for a damaged key — never early without a word, never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{open_faulty, put, written_store, Faults, EIO};
use kvstore_core::{
    Database, DatabaseOptions, Error, ErrorCode, MapOptions, MapStore, RangeOptions,
};

/// Walks to the end; the keys seen and the error that ended the walk, if one did.
fn walk(map: &MapStore, options: &RangeOptions) -> (Vec<String>, Option<Error>) {
    let mut keys = Vec::new();
    for item in map.range(options).unwrap() {
        match item {
            Ok(entry) => keys.push(entry.key().to_string()),
            Err(err) => return (keys, Some(err)),
        }
    }
    (keys, None)
}

#[test]
fn closing_the_handle_ends_its_walks_with_store_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = written_store(dir.path(), "walks.redb", 501);
    let a = Database::open(&path, DatabaseOptions::default()).unwrap();
    let b = Database::open(&path, DatabaseOptions::default()).unwrap();
    let map_a = a.map_store("m", MapOptions::default()).unwrap();
    let map_b = b.map_store("m", MapOptions::default()).unwrap();
    let mut walk_a = map_a.range(&RangeOptions::default()).unwrap();
    let mut walk_b = map_b.range(&RangeOptions::default()).unwrap();
    for _ in 0..64 {
        walk_a.next().unwrap().unwrap();
        walk_b.next().unwrap().unwrap();
    }
    // The file stays open through `b`: `a`'s walk could read on, but its handle is closed.
    a.close();
    let ended = walk_a.next().expect("an error, not the end of the walk");
    assert_eq!(ended.err().map(|e| e.code()), Some(ErrorCode::StoreClosed));
    assert!(walk_a.next().is_none());
    let rest: Vec<_> = walk_b.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(rest.len(), 501 - 64);

    // The last handle: redb closes the instance under the walk.
    let mut last = map_b.range(&RangeOptions::default()).unwrap();
    last.next().unwrap().unwrap();
    b.close();
    let ended = last.next().expect("an error, not the end of the walk");
    assert_eq!(ended.err().map(|e| e.code()), Some(ErrorCode::StoreClosed));
}

#[test]
fn a_walk_whose_snapshot_a_recovery_discarded_fails_with_an_io_error_not_store_closed() {
    let dir = tempfile::tempdir().unwrap();
    let n = 2000;
    let path = written_store(dir.path(), "walks.redb", n);
    let faults = Arc::new(Faults::default());
    let db = open_faulty(&path, &faults);
    let map = db
        .map_store(
            "m",
            MapOptions {
                cache_capacity: 0,
                ..Default::default()
            },
        )
        .unwrap();
    let mut open = map.range(&RangeOptions::default()).unwrap();
    for _ in 0..10 {
        open.next().unwrap().unwrap();
    }

    // A passing read fault: the read fails, the writer reopens the file once the disk is back.
    faults.read.set(EIO);
    assert_eq!(
        map.get("key-01500").err().map(|e| e.code()),
        Some(ErrorCode::Io)
    );
    faults.read.clear();
    put(&map, "after", b"ok").unwrap();

    let mut walked = 10;
    let ended = loop {
        match open.next() {
            Some(Ok(_)) => walked += 1,
            Some(Err(err)) => break err,
            None => panic!("the walk ended early without an error after {walked} entries"),
        }
    };
    assert!(
        walked < n,
        "the old instance is gone: the walk cannot finish"
    );
    assert_eq!(ended.code(), ErrorCode::Io, "{ended}");
    let message = ended.to_string();
    assert!(
        message.contains("discarded") && message.contains("walks.redb"),
        "{message}"
    );
    assert!(open.next().is_none());

    // The store is open and sound: a new walk sees everything.
    assert!(!db.is_closed());
    let (keys, failed) = walk(&map, &RangeOptions::default());
    assert!(failed.is_none(), "{failed:?}");
    assert_eq!(keys.len(), n + 1);
    db.close();
}

/// A store whose key `damaged-ZQXJ` is stored as bytes that are not UTF-8 (its marker's second
/// byte set to 0xff in every copy in the file), between two sound keys.
fn damaged_key_store(dir: &Path) -> PathBuf {
    let path = dir.join("damaged-key.redb");
    let db = Database::open(&path, DatabaseOptions::default()).unwrap();
    let map = db.map_store("m", MapOptions::default()).unwrap();
    for key in ["damaged-A", "damaged-ZQXJ", "damaged-ZZ"] {
        put(&map, key, b"value").unwrap();
    }
    db.close();
    let mut bytes = std::fs::read(&path).unwrap();
    let mut flipped = 0;
    for at in 0..bytes.len() - 4 {
        if &bytes[at..at + 4] == b"ZQXJ" {
            bytes[at + 1] = 0xff;
            flipped += 1;
        }
    }
    assert!(flipped > 0, "the key is in the file");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_damaged_key_ends_a_walk_with_database_corrupt_instead_of_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = damaged_key_store(dir.path());
    let db = Database::open(&path, DatabaseOptions::default()).unwrap();
    let map = db.map_store("m", MapOptions::default()).unwrap();
    let prefixed = RangeOptions {
        prefix: Some("damaged-".into()),
        ..Default::default()
    };
    let reversed = RangeOptions {
        reverse: true,
        ..Default::default()
    };
    for (options, before) in [
        (RangeOptions::default(), "damaged-A"),
        (prefixed.clone(), "damaged-A"),
        (reversed, "damaged-ZZ"),
    ] {
        let (keys, failed) = walk(&map, &options);
        assert_eq!(keys, vec![before.to_string()], "{options:?}");
        let failed = failed.expect("the damaged key ends the walk");
        assert_eq!(failed.code(), ErrorCode::DatabaseCorrupt, "{failed}");
        assert!(failed.to_string().contains("UTF-8"), "{failed}");
    }
    assert_eq!(
        map.count(&prefixed).err().map(|e| e.code()),
        Some(ErrorCode::DatabaseCorrupt)
    );
    // Nothing is left open: compaction is not refused for a walk.
    db.compact().unwrap();
    assert!(map.get("damaged-A").unwrap().is_some());
    db.close();
}
