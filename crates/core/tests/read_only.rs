//! Opening a store read-only (`DatabaseOptions::read_only`): reads work, changes are refused
//! with InvalidArgument, and the file is neither created nor changed.

mod common;

use common::{put, written_store};
use kvstore_core::{Database, DatabaseOptions, ErrorCode, LockMode, MapOptions, RangeOptions};
use std::path::Path;

fn read_only() -> DatabaseOptions {
    DatabaseOptions {
        read_only: true,
        ..DatabaseOptions::default()
    }
}

fn fingerprint(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
    let meta = std::fs::metadata(path).unwrap();
    (std::fs::read(path).unwrap(), meta.modified().unwrap())
}

#[test]
fn reads_work_and_changes_are_refused_without_touching_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = written_store(dir.path(), "ro.redb", 20);
    let before = fingerprint(&path);

    let db = Database::open(&path, read_only()).unwrap();
    assert!(db.is_read_only());
    let map = db.map_store("m", MapOptions::default()).unwrap();
    assert_eq!(
        map.get_record("key-00003").unwrap().unwrap().value,
        vec![3u8; 100]
    );
    assert_eq!(map.count(&RangeOptions::default()).unwrap(), 20);
    assert_eq!(map.range(&RangeOptions::default()).unwrap().count(), 20);
    assert_eq!(
        db.tables().unwrap(),
        vec![("m".to_string(), "raw".to_string())]
    );
    assert_eq!(map.stats().unwrap().entries, 20);

    let refused = map.lock("key-00003", LockMode::Any, None).err().unwrap();
    assert_eq!(refused.code(), ErrorCode::InvalidArgument);
    assert!(refused.to_string().contains("read-only"), "{refused}");
    assert_eq!(
        map.lock_new_auto().err().unwrap().code(),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        map.delete("key-00003").err().unwrap().code(),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        db.compact().err().unwrap().code(),
        ErrorCode::InvalidArgument
    );

    // A map the file does not have is refused, not created.
    let absent = db.map_store("absent", MapOptions::default()).err().unwrap();
    assert_eq!(absent.code(), ErrorCode::InvalidArgument);
    assert!(absent.to_string().contains("no map 'absent'"), "{absent}");

    // A backup reads: it works.
    let copy = dir.path().join("copy.redb");
    db.backup(&copy).unwrap();
    db.try_close().unwrap();

    assert_eq!(
        fingerprint(&path),
        before,
        "a read-only open changed the file"
    );
    let reopened = Database::open(&copy, DatabaseOptions::default()).unwrap();
    let names: Vec<String> = reopened
        .tables()
        .unwrap()
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(names, vec!["m".to_string()]);
}

#[test]
fn a_codec_mismatch_is_refused_read_only_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = written_store(dir.path(), "codec.redb", 1);
    let db = Database::open(&path, read_only()).unwrap();
    let err = db
        .map_store(
            "m",
            MapOptions {
                codec: "json".into(),
                ..MapOptions::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::CodecMismatch);
}

#[test]
fn a_missing_or_empty_file_is_refused_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.redb");
    let err = Database::open(&missing, read_only()).err().unwrap();
    assert_eq!(err.code(), ErrorCode::Io);
    assert!(err.to_string().contains("missing.redb"), "{err}");
    assert!(!missing.exists());

    let empty = dir.path().join("empty.redb");
    std::fs::write(&empty, b"").unwrap();
    let err = Database::open(&empty, read_only()).err().unwrap();
    assert_eq!(err.code(), ErrorCode::DatabaseCorrupt);
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
}

#[test]
fn a_read_only_handle_joins_a_writable_file_and_sees_its_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = written_store(dir.path(), "shared.redb", 1);
    let writer = Database::open(&path, DatabaseOptions::default()).unwrap();
    let reader = Database::open(&path, read_only()).unwrap();
    assert!(!writer.is_read_only());
    assert!(reader.is_read_only());
    let written = writer.map_store("m", MapOptions::default()).unwrap();
    let read = reader.map_store("m", MapOptions::default()).unwrap();
    put(&written, "new", b"v").unwrap();
    assert_eq!(read.get_record("new").unwrap().unwrap().value, b"v");
    assert_eq!(
        read.lock("new", LockMode::Any, None).err().unwrap().code(),
        ErrorCode::InvalidArgument
    );
    // A read-only handle joining a writable file creates no map either (hostile test: it used
    // to record its codec, and the writer's own map then failed with CodecMismatch).
    let before = std::fs::read(&path).unwrap();
    let json = MapOptions {
        codec: "json".into(),
        ..MapOptions::default()
    };
    let refused = reader.map_store("audit", json).err().unwrap();
    assert_eq!(refused.code(), ErrorCode::InvalidArgument);
    assert!(writer.map_store("audit", MapOptions::default()).is_ok());
    assert!(reader
        .tables()
        .unwrap()
        .iter()
        .any(|(name, codec)| name == "audit" && codec == "raw"));
    reader.close();
    writer.close();
    drop(before);
}

#[test]
fn a_writer_cannot_join_a_file_open_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = written_store(dir.path(), "first.redb", 1);
    let reader = Database::open(&path, read_only()).unwrap();
    let err = Database::open(&path, DatabaseOptions::default())
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::DatabaseLocked);
    assert!(err.to_string().contains("read-only"), "{err}");
    // The refused open gave its place back: once the reader closes, a writer opens.
    reader.close();
    let writer = Database::open(&path, DatabaseOptions::default()).unwrap();
    writer.close();
}
