//! Injected storage faults: a backend over the real file that fails writes or syncs on demand
//! (EIO, ENOSPC). A failing transaction rejects exactly its commits with the OS errno, nothing
//! committed before is lost, no lock leaks, and commits work again once the fault clears.
//! While the fault lasts, reads that need the file fail too (redb refuses all I/O after an I/O
//! error until the file is reopened, and reopening needs the disk).

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use kvstore_core::{
    check_integrity, envelope, Backend, Database, DatabaseOptions, ErrorCode, LockMode, MapOptions,
    MapStore, RangeOptions,
};
use redb::backends::FileBackend;
use redb::StorageBackend;

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

/// Which calls fail, with which errno (0: none).
#[derive(Debug, Default)]
struct Faults {
    write: AtomicI32,
    sync: AtomicI32,
}

#[derive(Debug)]
struct Faulty {
    file: FileBackend,
    faults: Arc<Faults>,
}

fn check(errno: &AtomicI32) -> std::io::Result<()> {
    match errno.load(Ordering::SeqCst) {
        0 => Ok(()),
        n => Err(std::io::Error::from_raw_os_error(n)),
    }
}

impl StorageBackend for Faulty {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        check(&self.faults.write)?;
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        check(&self.faults.sync)?;
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        check(&self.faults.write)?;
        self.file.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.file.close()
    }
}

fn faulty(faults: Arc<Faults>) -> Backend {
    Backend(Arc::new(move |path: &Path| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let file = FileBackend::new(file).map_err(std::io::Error::other)?;
        Ok(Box::new(Faulty {
            file,
            faults: faults.clone(),
        }) as Box<dyn StorageBackend>)
    }))
}

fn put(map: &MapStore, key: &str, value: &[u8]) -> kvstore_core::Result<()> {
    map.lock(key, LockMode::Any, None)?
        .commit(envelope::encode(&[], value))
}

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
    let db = Database::open(
        &path,
        DatabaseOptions {
            backend: Some(faulty(faults.clone())),
            ..Default::default()
        },
    )
    .unwrap();
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
        which.store(errno, Ordering::SeqCst);
        assert_eq!(
            io_errno(put(&map, &format!("failed-{injected}"), b"bad")),
            Some(errno)
        );
        // Still failing: the next commit fails the same way, the queue is not wedged.
        assert_eq!(
            io_errno(put(&map, &format!("failed-again-{injected}"), b"bad")),
            Some(errno)
        );
        which.store(0, Ordering::SeqCst);
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
