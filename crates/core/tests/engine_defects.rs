//! Regression tests for issue 14 ("Engine defects") and two items of issue 15: each test pins
//! one defect, fails on the core before the fix and passes after it. Every wait is on an event
//! (a channel, a join); a timeout only guards against a hang and never bounds a duration.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use common::{flip_bytes, open_file, put, quiet_redb_panics, Fault, EIO, ENOSPC};
use kvstore_core::{
    check_integrity, envelope, Acquire, Backend, Change, CommitOptions, Database, DatabaseOptions,
    Error, ErrorCode, KeyFormat, LockMode, MapOptions, MapStore, RangeOptions,
};
use redb::backends::FileBackend;
use redb::StorageBackend;

/// Only guards against a hang (a test that fails on the old core by never finishing).
const HANG_GUARD: Duration = Duration::from_secs(60);

// ---- fault injection (the faults of tests/common, plus counts, events and a gate) ----

/// Holds the reads of one thread: the `nth` read (0 = the next) of that thread blocks until
/// released, after saying so.
#[derive(Default)]
struct Gate {
    armed: Mutex<Option<(ThreadId, u64)>>,
    blocked: Mutex<Option<Sender<()>>>,
    release: Mutex<Option<Receiver<()>>>,
}

impl Gate {
    /// Arms the gate for the calling thread; returns (blocked, release).
    fn arm(&self, nth: u64) -> (Receiver<()>, Sender<()>) {
        let (blocked_tx, blocked_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        *self.blocked.lock().unwrap() = Some(blocked_tx);
        *self.release.lock().unwrap() = Some(release_rx);
        *self.armed.lock().unwrap() = Some((std::thread::current().id(), nth));
        (blocked_rx, release_tx)
    }

    fn is_gated_thread(&self) -> bool {
        self.armed
            .lock()
            .unwrap()
            .is_some_and(|(t, _)| t == std::thread::current().id())
    }

    fn pass(&self) {
        let hit = {
            let mut armed = self.armed.lock().unwrap();
            match &mut *armed {
                Some((thread, n)) if *thread == std::thread::current().id() => {
                    if *n == 0 {
                        *armed = None;
                        true
                    } else {
                        *n -= 1;
                        false
                    }
                }
                _ => false,
            }
        };
        if hit {
            if let Some(tx) = self.blocked.lock().unwrap().take() {
                let _ = tx.send(());
            }
            let release = self.release.lock().unwrap().take();
            if let Some(rx) = release {
                let _ = rx.recv_timeout(HANG_GUARD);
            }
        }
    }
}

/// What a [`Probed`] backend does besides storing: faults, counts, events, a read gate.
#[derive(Default)]
struct Probe {
    read: Fault,
    write: Fault,
    sync: Fault,
    /// The next read of a thread other than the gated one fails with this errno, once.
    read_once: AtomicI32,
    /// Hears each failed `read_once` read.
    read_failed: Mutex<Option<Sender<()>>>,
    /// Calls of the backend factory (opens of the file).
    opens: AtomicU64,
    /// Hears the time of each open.
    opened: Mutex<Option<Sender<Instant>>>,
    syncs: AtomicU64,
    /// Hears each `sync_data` call.
    synced: Mutex<Option<Sender<()>>>,
    gate: Gate,
    /// Take the file's lock at open (and give it back at close), as redb does for a plain file.
    /// The old core did not forward redb's lock calls to a custom backend (issue 14 item 17),
    /// so without this a second instance of the file would open there where it cannot now.
    lock_at_open: AtomicBool,
}

fn notify<T>(slot: &Mutex<Option<Sender<T>>>, value: T) {
    if let Some(tx) = slot.lock().unwrap().as_ref() {
        let _ = tx.send(value);
    }
}

fn listen<T>(slot: &Mutex<Option<Sender<T>>>) -> Receiver<T> {
    let (tx, rx) = mpsc::channel();
    *slot.lock().unwrap() = Some(tx);
    rx
}

struct Probed {
    file: FileBackend,
    /// A second descriptor of the same open file, holding the lock taken at open.
    locked: Option<std::fs::File>,
    probe: Arc<Probe>,
}

impl std::fmt::Debug for Probed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probed")
    }
}

impl StorageBackend for Probed {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.probe.gate.pass();
        if !self.probe.gate.is_gated_thread() {
            let errno = self.probe.read_once.swap(0, Ordering::SeqCst);
            if errno != 0 {
                notify(&self.probe.read_failed, ());
                return Err(std::io::Error::from_raw_os_error(errno));
            }
        }
        self.probe.read.check()?;
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.probe.write.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.probe.syncs.fetch_add(1, Ordering::SeqCst);
        notify(&self.probe.synced, ());
        self.probe.sync.check()?;
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.probe.write.check()?;
        self.file.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        if let Some(locked) = &self.locked {
            let _ = locked.unlock();
        }
        self.file.close()
    }
    forward_file_lock!(file);
}

fn probed(probe: &Arc<Probe>) -> Backend {
    let probe = probe.clone();
    Backend(Arc::new(move |path: &Path| {
        probe.opens.fetch_add(1, Ordering::SeqCst);
        notify(&probe.opened, Instant::now());
        let file = open_file(path)?;
        let locked = if probe.lock_at_open.load(Ordering::SeqCst) {
            let locked = file.try_clone()?;
            locked.try_lock().map_err(|e| match e {
                std::fs::TryLockError::WouldBlock => std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "the file is locked by another instance",
                ),
                std::fs::TryLockError::Error(e) => e,
            })?;
            Some(locked)
        } else {
            None
        };
        let file = FileBackend::new(file).map_err(std::io::Error::other)?;
        Ok(Box::new(Probed {
            file,
            locked,
            probe: probe.clone(),
        }) as Box<dyn StorageBackend>)
    }))
}

// ---- helpers ----

/// A directory on tmpfs when there is one: the tests that commit thousands of times durably
/// measure the engine, not the disk's fsync.
fn fast_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

/// As [`put`], but through the writer's queue (the blocking API writes inline when it can).
fn put_queued(map: &MapStore, key: &str, value: &[u8]) -> kvstore_core::Result<()> {
    let guard = map.lock(key, LockMode::Any, None)?;
    let (tx, rx) = mpsc::channel();
    map.commit(
        key,
        guard.token(),
        Change::Put(Arc::from(envelope::encode(&[], value))),
        CommitOptions::default(),
        Box::new(move |r| tx.send(r).unwrap()),
    )?;
    // The commit released the lock (or will): the guard has nothing left to release.
    std::mem::forget(guard);
    rx.recv().unwrap()
}

type Put = fn(&MapStore, &str, &[u8]) -> kvstore_core::Result<()>;

fn value(map: &MapStore, key: &str) -> Option<Vec<u8>> {
    map.get_record(key).unwrap().map(|r| r.value)
}

/// Writes `n` entries `key-00000`… (value: the key's number, repeated to `size` bytes) in one
/// transaction.
fn put_many(db: &Database, map: &MapStore, n: usize, size: usize) {
    let (tx, rx) = mpsc::channel();
    let mut prepared = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("key-{i:05}");
        let grant = match map.acquire(&key, 0, || unreachable!()).unwrap() {
            Acquire::Granted(grant) => grant,
            Acquire::Queued => unreachable!("fresh keys are free"),
        };
        let tx = tx.clone();
        prepared.push(
            map.prepare_commit(
                &key,
                grant.token,
                Change::Put(Arc::from(envelope::encode(&[], &vec![i as u8; size]))),
                CommitOptions::default(),
                Box::new(move |r| tx.send(r).unwrap()),
            )
            .unwrap(),
        );
    }
    db.submit(prepared);
    for _ in 0..n {
        rx.recv().unwrap().unwrap();
    }
}

fn non_durable(backend: Option<Backend>) -> DatabaseOptions {
    DatabaseOptions {
        durable: false,
        sync_interval: Duration::from_secs(3600),
        backend,
        ..Default::default()
    }
}

fn uncached() -> MapOptions {
    MapOptions {
        cache_capacity: 0,
        ..Default::default()
    }
}

fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".partial"))
        .collect()
}

/// With the disk "full" (writes fail with ENOSPC), commits `fill-…` entries of 64 KiB until
/// one fails: redb keeps non-durable transactions in memory until its buffer or the file has to
/// grow, so the first few are still acknowledged. Each acknowledged one is added to `acked`.
fn commit_until_the_disk_is_full(
    put: Put,
    map: &MapStore,
    probe: &Probe,
    acked: &mut Vec<(String, Vec<u8>)>,
) {
    probe.write.set(ENOSPC);
    for i in 0..10_000u32 {
        let key = format!("fill-{i:05}");
        let value: Vec<u8> = (0..64 * 1024u32).map(|b| (b ^ i) as u8).collect();
        match put(map, &key, &value) {
            Ok(()) => acked.push((key, value)),
            Err(err) => {
                assert_eq!(io_errno::<()>(Err(err)), Some(ENOSPC));
                return;
            }
        }
    }
    panic!("no commit failed with the disk full");
}

fn io_errno<T: std::fmt::Debug>(result: kvstore_core::Result<T>) -> Option<i32> {
    match result {
        Err(Error::Io { errno, .. }) => errno,
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

// ---- item 1 ----

/// The file size after 100 entries in each of two maps and 2 000 durable updates of one key of
/// the second, with or without one missed read of the first before.
fn file_after_updates(read_first: bool) -> u64 {
    let dir = fast_dir();
    let path = dir.path().join("two-maps.redb");
    let db = Database::open(&path, DatabaseOptions::default()).unwrap();
    let paths = db.map_store("paths", MapOptions::default()).unwrap();
    let jobs = db.map_store("jobs", MapOptions::default()).unwrap();
    put_many(&db, &paths, 100, 50);
    put_many(&db, &jobs, 100, 50);
    if read_first {
        // A cache miss: the read keeps a snapshot of `paths`, a table no commit below touches.
        assert_eq!(paths.get("/data/none").unwrap(), None);
    }
    for i in 0..2000u32 {
        put(&jobs, "key-00007", &i.to_le_bytes()).unwrap();
    }
    let size = std::fs::metadata(&path).unwrap().len();
    db.close();
    size
}

#[test]
fn issue14_1_a_read_of_a_rarely_written_map_does_not_grow_the_file() {
    let baseline = file_after_updates(false);
    let with_read = file_after_updates(true);
    eprintln!("after 2000 updates: {baseline} bytes; with one read of the other map first: {with_read} bytes");
    assert!(
        with_read <= 2 * baseline + (1 << 20),
        "one read of another map grew the file from {baseline} to {with_read} bytes"
    );
}

// ---- item 2 ----

#[test]
fn issue14_2_backup_uses_its_own_temporary_file_and_never_replaces_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("src.redb"), DatabaseOptions::default()).unwrap();
    let map = db.map_store("m", MapOptions::default()).unwrap();
    put_many(&db, &map, 50, 10);

    // A user's own file named as the old temporary file is left alone.
    let reports = dir.path().join("reports");
    std::fs::create_dir(&reports).unwrap();
    let own = reports.join("report.partial");
    std::fs::write(&own, b"my own notes").unwrap();
    db.backup(reports.join("report.redb")).unwrap();
    assert_eq!(std::fs::read(&own).unwrap(), b"my own notes");

    // An old kvstore file under that name is not merged into the backup.
    let nightly = dir.path().join("nightly");
    std::fs::create_dir(&nightly).unwrap();
    let stale = nightly.join("nightly.partial");
    {
        let old = Database::open(&stale, DatabaseOptions::default()).unwrap();
        let other = old.map_store("other", MapOptions::default()).unwrap();
        put(&other, "stranger", b"never in the store").unwrap();
        let m = old.map_store("m", MapOptions::default()).unwrap();
        put(&m, "intruder", b"never in the store").unwrap();
        old.close();
    }
    let stale_bytes = std::fs::read(&stale).unwrap();
    db.backup(nightly.join("nightly.redb")).unwrap();
    assert_eq!(
        std::fs::read(&stale).unwrap(),
        stale_bytes,
        "the old file is untouched"
    );
    {
        let copy =
            Database::open(nightly.join("nightly.redb"), DatabaseOptions::default()).unwrap();
        let tables: Vec<String> = copy.tables().unwrap().into_iter().map(|t| t.0).collect();
        assert_eq!(tables, vec!["m".to_string()], "no table of the old file");
        let m = copy.map_store("m", MapOptions::default()).unwrap();
        assert_eq!(m.get("intruder").unwrap(), None, "no key of the old file");
        assert_eq!(m.count(&RangeOptions::default()).unwrap(), 50);
        copy.close();
    }

    // Two backups begun to one destination (and one to a sibling name): exactly one of the
    // two wins, whole; the other is refused; nothing is left behind.
    let twice = dir.path().join("twice");
    std::fs::create_dir(&twice).unwrap();
    let dest = twice.join("x.redb");
    let first = db.begin_backup(&dest).unwrap();
    let second = db.begin_backup(&dest).unwrap();
    let sibling = db.begin_backup(twice.join("x.bak")).unwrap();
    let start = Arc::new(Barrier::new(3));
    let runs: Vec<_> = [first, second, sibling]
        .into_iter()
        .map(|backup| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                backup.run()
            })
        })
        .collect();
    let outcomes: Vec<kvstore_core::Result<()>> =
        runs.into_iter().map(|t| t.join().unwrap()).collect();
    outcomes[2].as_ref().expect("the backup to x.bak");
    let won = outcomes[..2].iter().filter(|o| o.is_ok()).count();
    assert_eq!(won, 1, "exactly one backup to x.redb wins: {outcomes:?}");
    let lost = outcomes[..2].iter().find_map(|o| o.as_ref().err()).unwrap();
    assert_eq!(lost.code(), ErrorCode::InvalidArgument, "{lost}");
    assert!(lost.to_string().contains("already exists"), "{lost}");
    assert_eq!(
        partials(&twice),
        Vec::<String>::new(),
        "no temporary file left"
    );
    for name in ["x.redb", "x.bak"] {
        let path = twice.join(name);
        assert!(check_integrity(&path).unwrap(), "{name} is whole");
        let copy = Database::open(&path, DatabaseOptions::default()).unwrap();
        let m = copy.map_store("m", MapOptions::default()).unwrap();
        assert_eq!(m.count(&RangeOptions::default()).unwrap(), 50, "{name}");
        assert_eq!(value(&m, "key-00042").unwrap(), vec![42u8; 10]);
        copy.close();
    }
    assert_eq!(partials(&reports), vec!["report.partial".to_string()]);
    assert_eq!(partials(&nightly), vec!["nightly.partial".to_string()]);
    db.close();
}

// ---- item 5 ----

#[test]
fn issue14_5_a_failed_write_does_not_roll_back_acknowledged_non_durable_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none.redb");
    let probe = Arc::new(Probe::default());
    let db = Database::open(&path, non_durable(Some(probed(&probe)))).unwrap();
    let map = db.map_store("m", uncached()).unwrap();
    let mut acked: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| (format!("acked-{i}"), format!("value-{i}").into_bytes()))
        .collect();
    for (key, value) in &acked {
        put(&map, key, value).unwrap();
    }
    assert!(map.stats().unwrap().unsynced_batches > 0, "not yet durable");

    commit_until_the_disk_is_full(put, &map, &probe, &mut acked);
    probe.write.clear();
    put(&map, "after", b"ok").unwrap();
    acked.push(("after".into(), b"ok".to_vec()));
    let check = |map: &MapStore, when: &str| {
        for (key, expected) in &acked {
            assert!(
                value(map, key).as_ref() == Some(expected),
                "{key} was acknowledged; missing {when}"
            );
        }
    };
    check(&map, "after the next commit");
    db.close();

    let plain = Database::open(&path, DatabaseOptions::default()).unwrap();
    check(
        &plain.map_store("m", MapOptions::default()).unwrap(),
        "after reopening",
    );
    plain.close();
}

// ---- item 6 ----

#[test]
fn issue14_6_a_key_lease_is_durable_before_its_numbers_are_used_under_durability_none() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let db = Database::open(
        dir.path().join("lease.redb"),
        non_durable(Some(probed(&probe))),
    )
    .unwrap();
    let map = db.map_store("m", MapOptions::default()).unwrap();
    let before = probe.syncs.load(Ordering::SeqCst);
    let key = map.next_key_blocking().unwrap();
    let after = probe.syncs.load(Ordering::SeqCst);
    assert_eq!(key, "0000000000000");
    assert!(
        after > before,
        "the lease was not fsynced before its first key was handed out"
    );
    db.close();
}

// ---- item 7 ----

/// A store `name` of `n` entries of 100 bytes, written in one transaction and closed cleanly;
/// returns its path.
fn written_store(dir: &Path, name: &str, n: usize) -> PathBuf {
    let path = dir.join(name);
    let db = Database::open(&path, DatabaseOptions::default()).unwrap();
    let map = db.map_store("m", MapOptions::default()).unwrap();
    put_many(&db, &map, n, 100);
    db.close();
    path
}

/// Writes 150 damaged copies (8 seeded byte flips each) of a store of `n` entries over `path`
/// in turn, and hands each that opens to `visit`. Returns how many opened.
fn for_each_damaged_file(dir: &Path, n: usize, mut visit: impl FnMut(usize, Database)) -> usize {
    let path = written_store(dir, "damaged.redb", n);
    let good = std::fs::read(&path).unwrap();
    let mut seed = 7u64;
    let mut opened = 0;
    for round in 0..150 {
        let bytes = flip_bytes(&good, &mut seed);
        std::fs::write(&path, &bytes).unwrap();
        let opening = catch_unwind(|| Database::open(&path, DatabaseOptions::default()));
        let Ok(Ok(db)) = opening else {
            assert!(opening.is_ok(), "file {round}: open panicked");
            continue;
        };
        opened += 1;
        visit(round, db);
    }
    opened
}

#[test]
fn issue14_7_backup_of_a_damaged_file_never_panics() {
    quiet_redb_panics();
    let dir = tempfile::tempdir().unwrap();
    let n = 2000;
    let mut panics: Vec<String> = Vec::new();
    let mut codes: Vec<ErrorCode> = Vec::new();
    let opened = for_each_damaged_file(dir.path(), n, |round, db| {
        let map = match db.map_store("m", uncached()) {
            Ok(map) => Some(map),
            Err(e) => {
                codes.push(e.code());
                None
            }
        };
        let mut step =
            |name: &str, op: &mut dyn FnMut() -> kvstore_core::Result<()>| match catch_unwind(
                AssertUnwindSafe(op),
            ) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => codes.push(e.code()),
                Err(_) => panics.push(format!("file {round}: {name} panicked")),
            };
        if let Some(map) = &map {
            step("get", &mut || {
                for i in (0..n).step_by(97) {
                    map.get(&format!("key-{i:05}"))?;
                }
                Ok(())
            });
            step("walk", &mut || {
                for item in map.range(&RangeOptions::default())? {
                    item?;
                }
                Ok(())
            });
        }
        let dest = dir.path().join(format!("backup-{round}.redb"));
        step("backup", &mut || db.backup(&dest));
        let _ = std::fs::remove_file(&dest);
        step("compact", &mut || db.compact().map(drop));
        drop(map);
        if catch_unwind(AssertUnwindSafe(|| db.close())).is_err() {
            panics.push(format!("file {round}: close panicked"));
        }
    });
    eprintln!(
        "{opened} of 150 damaged files opened; {} errors met",
        codes.len()
    );
    assert!(opened > 10, "enough damaged files opened ({opened})");
    assert_eq!(panics, Vec::<String>::new(), "no panic escapes");
    assert!(
        codes.contains(&ErrorCode::DatabaseCorrupt),
        "damage was reported: {codes:?}"
    );
}

/// Compaction runs on the writer thread: on some damaged files redb panics there (bitmap.rs),
/// which must not kill the writer; and when the instance could not be reopened after a failed
/// read, compact must say why, not "the store is closed".
#[test]
fn issue14_7_compact_of_a_damaged_file_reports_corruption_and_the_writer_survives() {
    quiet_redb_panics();
    let dir = tempfile::tempdir().unwrap();
    let n = 2000;
    let mut wrong: Vec<String> = Vec::new();
    for_each_damaged_file(dir.path(), n, |round, db| {
        if let Ok(map) = db.map_store("m", uncached()) {
            for i in (0..n).step_by(97) {
                let _ = map.get(&format!("key-{i:05}"));
            }
            if let Ok(walk) = map.range(&RangeOptions::default()) {
                walk.for_each(drop);
            }
            if let Err(e) = db.compact() {
                if !matches!(e.code(), ErrorCode::DatabaseCorrupt | ErrorCode::Io) {
                    wrong.push(format!("file {round}: compact: {e} ({:?})", e.code()));
                }
            }
            // A commit through the writer's queue (not written inline) after the compaction.
            let (tx, rx) = mpsc::channel();
            let queued = match map.acquire("after-compact", 0, || unreachable!()).unwrap() {
                Acquire::Granted(grant) => map.commit(
                    "after-compact",
                    grant.token,
                    Change::Put(Arc::from(envelope::encode(&[], b"v"))),
                    CommitOptions::default(),
                    Box::new(move |r| tx.send(r).unwrap()),
                ),
                Acquire::Queued => unreachable!("a fresh key is free"),
            };
            let outcome = queued.and_then(|()| rx.recv_timeout(HANG_GUARD).unwrap());
            if let Err(e) = outcome {
                if !matches!(e.code(), ErrorCode::DatabaseCorrupt | ErrorCode::Io) {
                    wrong.push(format!(
                        "file {round}: a commit after compact: {e} ({:?})",
                        e.code()
                    ));
                }
            }
        }
        db.close();
    });
    assert_eq!(wrong, Vec::<String>::new(), "damage reported as such");
}

// ---- item 8 ----

/// Acknowledged non-durable commits, then a commit that fails (disk full) and none after: the
/// writer reopens the broken file by itself, with backoff, and makes them durable.
fn broken_writer_reopens_the_file_by_itself(put: Put) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.redb");
    let probe = Arc::new(Probe::default());
    let opened = listen(&probe.opened);
    let db = Database::open(&path, non_durable(Some(probed(&probe)))).unwrap();
    opened.recv().unwrap();
    let map = db.map_store("m", uncached()).unwrap();
    let mut acked: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("acked-{i}"), format!("value-{i}").into_bytes()))
        .collect();
    for (key, value) in &acked {
        put(&map, key, value).unwrap();
    }
    assert!(map.stats().unwrap().unsynced_batches > 0);
    assert_eq!(probe.opens.load(Ordering::SeqCst), 1);

    // The disk is full: a commit fails, and the writer is left with a broken file that holds
    // acknowledged work. It tries to reopen it, with backoff (10 ms, doubling), not in a loop.
    let failed_at = Instant::now();
    commit_until_the_disk_is_full(put, &map, &probe, &mut acked);
    let mut attempts = Vec::new();
    for _ in 0..4 {
        match opened.recv_timeout(HANG_GUARD) {
            Ok(at) => attempts.push(at),
            Err(_) => panic!(
                "the broken writer made {} attempts to reopen the file in {HANG_GUARD:?}",
                attempts.len()
            ),
        }
    }
    let fourth = attempts[3].duration_since(failed_at);
    assert!(
        fourth >= Duration::from_millis(10 + 20 + 40),
        "4 reopen attempts within {fourth:?}: no backoff"
    );
    assert!(
        attempts[3].duration_since(attempts[0]) >= Duration::from_millis(20 + 40),
        "attempts 1 to 4 came too fast: {attempts:?}"
    );

    // The disk has room again; no further commit: the writer reopens the file and writes what
    // was acknowledged, durably.
    probe.write.clear();
    let cleared = Instant::now();
    loop {
        if map.stats().is_ok_and(|stats| stats.unsynced_batches == 0) {
            break;
        }
        assert!(
            cleared.elapsed() < HANG_GUARD,
            "acknowledged commits were never made durable"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Durable now, before any close: a copy of the file holds them.
    let copy = dir.path().join("copy.redb");
    std::fs::copy(&path, &copy).unwrap();
    for file in [&copy, &path] {
        if file == &path {
            db.close();
        }
        let plain = Database::open(file, DatabaseOptions::default()).unwrap();
        let map = plain.map_store("m", MapOptions::default()).unwrap();
        for (key, expected) in &acked {
            assert!(
                value(&map, key).as_ref() == Some(expected),
                "{key} was acknowledged; missing in {}",
                file.display()
            );
        }
        plain.close();
    }
}

/// The commits are written inline (the blocking API's path when the writer is idle).
#[test]
fn issue14_8_a_broken_writer_reopens_the_file_by_itself_with_backoff() {
    broken_writer_reopens_the_file_by_itself(put);
}

/// The commits go through the writer's queue.
#[test]
fn issue14_8_a_broken_writer_reopens_the_file_by_itself_with_backoff_queued() {
    broken_writer_reopens_the_file_by_itself(put_queued);
}

// ---- item 9 ----

#[test]
fn issue14_9_compact_refuses_at_once_during_a_backup_and_not_for_point_reads() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("compact.redb"), DatabaseOptions::default()).unwrap();
    let map = db.map_store("m", uncached()).unwrap();
    put_many(&db, &map, 1000, 20);

    let backup = db.begin_backup(dir.path().join("pending.redb")).unwrap();
    let err = db.compact().unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    assert!(err.to_string().contains("backup"), "the true reason: {err}");
    drop(backup);
    db.compact().unwrap();

    // Another thread only reads single keys (every read a cache miss): no walk is open.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (map, stop) = (map.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                map.get(&format!("key-{:05}", i % 1000)).unwrap();
                i += 7;
            }
        })
    };
    let mut refused = Vec::new();
    for round in 0..30 {
        put(&map, &format!("key-{:05}", round), b"changed").unwrap();
        if let Err(err) = db.compact() {
            refused.push(err.to_string());
        }
    }
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    eprintln!("{} of 30 compactions refused: {refused:?}", refused.len());
    for message in &refused {
        assert!(
            !message.contains("walk"),
            "no walk is open, yet compact said: {message}"
        );
    }
    db.close();
}

// ---- item 10 ----

#[test]
fn issue14_10_a_slow_open_does_not_hold_up_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let slow_path = dir.path().join("slow.redb");
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let entered_tx = Mutex::new(entered_tx);
    let release_rx = Mutex::new(release_rx);
    let slow_at = slow_path.clone();
    // Opening this file waits (as a long crash repair would) until released; its write-ahead
    // log (the same backend, another path) opens at once.
    let slow = Backend(Arc::new(move |path: &Path| {
        if path == slow_at {
            entered_tx.lock().unwrap().send(()).unwrap();
            let _ = release_rx.lock().unwrap().recv_timeout(HANG_GUARD);
        }
        let file = FileBackend::new(open_file(path)?).map_err(std::io::Error::other)?;
        Ok(Box::new(file) as Box<dyn StorageBackend>)
    }));
    let opening = std::thread::spawn(move || {
        Database::open(
            &slow_path,
            DatabaseOptions {
                backend: Some(slow),
                ..Default::default()
            },
        )
    });
    entered_rx.recv_timeout(HANG_GUARD).unwrap();

    let other_path = dir.path().join("other.redb");
    let (done_tx, done_rx) = mpsc::channel();
    let other = std::thread::spawn(move || {
        for round in 0..2 {
            let db = Database::open(&other_path, DatabaseOptions::default()).unwrap();
            let map = db.map_store("m", MapOptions::default()).unwrap();
            put(&map, &format!("k{round}"), b"v").unwrap();
            assert_eq!(value(&map, "k0").unwrap(), b"v");
            db.close();
        }
        done_tx.send(()).unwrap();
    });
    let finished = done_rx.recv_timeout(HANG_GUARD);
    // Let the slow open finish either way, so the test ends.
    release_tx.send(()).unwrap();
    let slow_db = opening.join().unwrap().unwrap();
    other.join().unwrap();
    assert!(
        finished.is_ok(),
        "another file could not be opened and closed while one open was slow"
    );
    let map = slow_db.map_store("m", MapOptions::default()).unwrap();
    put(&map, "k", b"v").unwrap();
    slow_db.close();
}

// ---- item 11 ----

#[test]
fn issue14_11_opening_a_file_while_its_last_handle_closes_is_never_locked_out() {
    let dir = fast_dir();
    let path = dir.path().join("churn.redb");
    let start = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let (path, start) = (path.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut failures = Vec::new();
                for i in 0..300 {
                    let outcome =
                        Database::open(&path, DatabaseOptions::default()).and_then(|db| {
                            let map = db.map_store("m", MapOptions::default())?;
                            let written = put(&map, &format!("t{t}-{}", i % 10), b"v");
                            db.close();
                            written
                        });
                    if let Err(err) = outcome {
                        failures.push(format!("{err} ({:?})", err.code()));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of 600 cycles failed, e.g. {:?}",
        failures.len(),
        failures.first()
    );
}

// ---- item 12 ----

/// Runs `backup` on a thread of its own, held in its 8th read of the file (within its first
/// chunk of 10 000 entries) until the returned sender sends.
fn run_held(
    backup: kvstore_core::Backup,
    probe: &Arc<Probe>,
) -> (
    std::thread::JoinHandle<kvstore_core::Result<()>>,
    Sender<()>,
) {
    let (gate_tx, gate_rx) = mpsc::channel();
    let copying = {
        let probe = probe.clone();
        std::thread::spawn(move || {
            gate_tx.send(probe.gate.arm(8)).unwrap();
            backup.run()
        })
    };
    let (blocked, release) = gate_rx.recv().unwrap();
    blocked
        .recv_timeout(HANG_GUARD)
        .expect("the copy reads the file");
    (copying, release)
}

/// Whether a backup that is copying when the store closes is ended by the close. Returns None
/// when the copy finished before the close reached it (the race this test cannot rule out).
fn backup_running_at_close(attempt: usize) -> Option<kvstore_core::Result<()>> {
    let dir = tempfile::tempdir().unwrap();
    let path = written_store(dir.path(), "large.redb", 30_000);
    let probe = Arc::new(Probe::default());
    probe.lock_at_open.store(true, Ordering::SeqCst);
    let options = || non_durable(Some(probed(&probe)));
    let db = Database::open(&path, options()).unwrap();
    let map = db.map_store("m", MapOptions::default()).unwrap();
    // Not yet durable: closing writes it, which tells this test the close has begun.
    put(&map, "unsynced", b"v").unwrap();
    let dest = dir.path().join("copy.redb");
    let backup = db.begin_backup(&dest).unwrap();
    let (copying, release) = run_held(backup, &probe);
    let synced = listen(&probe.synced);
    let closing = {
        let db = db.clone();
        std::thread::spawn(move || db.close())
    };
    // The close has made the unsynced commit durable: it is about to end the backup.
    synced.recv_timeout(HANG_GUARD).expect("close syncs");
    release.send(()).unwrap();
    closing.join().unwrap();
    // Right after close returns, the file opens again: nothing holds it.
    let reopened = Database::open(&path, options());
    let outcome = copying.join().unwrap();
    let reopened = reopened.unwrap_or_else(|e| {
        panic!("attempt {attempt}: reopening right after close failed: {e} (backup: {outcome:?})")
    });
    let map = reopened.map_store("m", MapOptions::default()).unwrap();
    assert_eq!(value(&map, "unsynced").unwrap(), b"v");
    reopened.close();
    assert_eq!(partials(dir.path()), Vec::<String>::new());
    if outcome.is_ok() {
        assert!(check_integrity(&dest).unwrap());
        return None;
    }
    assert!(!dest.exists(), "a stopped backup leaves no file");
    Some(outcome)
}

#[test]
fn issue14_12_a_running_backup_is_ended_by_close_and_the_file_reopens() {
    for attempt in 0..3 {
        if let Some(outcome) = backup_running_at_close(attempt) {
            let err = outcome.unwrap_err();
            assert_eq!(err.code(), ErrorCode::StoreClosed, "{err}");
            return;
        }
        eprintln!("attempt {attempt}: the copy finished before the close reached it");
    }
    panic!("in 3 attempts, no backup copying while the store closed was ended by the close");
}

/// Commits and uncached reads, each must work.
fn commits_and_reads_work(map: &MapStore, tag: &str) -> kvstore_core::Result<()> {
    for i in 0..3 {
        put(map, &format!("{tag}-{i}"), b"ok")?;
    }
    for i in (0..30_000).step_by(1499) {
        let got = map.get_record(&format!("key-{i:05}"))?;
        assert_eq!(got.expect("written").value, vec![i as u8; 100]);
    }
    Ok(())
}

/// A read fault while a backup copies: the store reopens the file, which ends the backup; the
/// backup fails with an I/O error, and commits and uncached reads work, both while the backup
/// is still copying (they wait for it to stop) and after.
#[test]
fn issue14_12_a_recovery_during_a_backup_ends_it_and_the_store_works_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = written_store(dir.path(), "large.redb", 30_000);
    let probe = Arc::new(Probe::default());
    probe.lock_at_open.store(true, Ordering::SeqCst);
    let db = Database::open(
        &path,
        DatabaseOptions {
            backend: Some(probed(&probe)),
            ..Default::default()
        },
    )
    .unwrap();
    let map = db.map_store("m", uncached()).unwrap();
    let dest = dir.path().join("copy.redb");
    let backup = db.begin_backup(&dest).unwrap();
    let (copying, release) = run_held(backup, &probe);
    // One read of another thread fails: the store reopens the file.
    let read_failed = listen(&probe.read_failed);
    probe.read_once.store(EIO, Ordering::SeqCst);
    let reader = {
        let map = map.clone();
        std::thread::spawn(move || map.get("key-29999"))
    };
    read_failed
        .recv_timeout(HANG_GUARD)
        .expect("the read reaches the file");
    // Commits and uncached reads while the copy is still held in its read.
    let (during_tx, during_rx) = mpsc::channel();
    let during = {
        let map = map.clone();
        std::thread::spawn(move || {
            let _ = during_tx.send(commits_and_reads_work(&map, "during"));
        })
    };
    // They wait for the reopen, which waits for the backup to stop: let the copy go on after a
    // moment (the old core failed them at once, with the file still locked by the backup).
    let during_outcome = match during_rx.recv_timeout(Duration::from_millis(200)) {
        Ok(outcome) => {
            release.send(()).unwrap();
            outcome
        }
        Err(_) => {
            release.send(()).unwrap();
            during_rx.recv_timeout(HANG_GUARD).expect("they finish")
        }
    };
    during.join().unwrap();
    let outcome = copying.join().unwrap();
    let read = reader.join().unwrap();
    assert!(
        matches!(&read, Ok(Some(_)) | Err(Error::Io { .. })),
        "the read that failed: {read:?}"
    );
    if let Err(e) = during_outcome {
        panic!(
            "a commit or read during the backup, after the recovery: {e} ({:?})",
            e.code()
        );
    }
    let err = outcome.expect_err("the recovery ended the backup");
    assert_eq!(err.code(), ErrorCode::Io, "{err}");
    assert!(!dest.exists(), "a stopped backup leaves no file");
    commits_and_reads_work(&map, "after").unwrap();
    db.close();
    assert_eq!(partials(dir.path()), Vec::<String>::new());
}

// ---- item 13 ----

#[test]
fn issue14_13_a_symlink_or_hard_link_joins_the_open_core() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.redb");
    let db = Database::open(&real, DatabaseOptions::default()).unwrap();
    let map = db.map_store("m", MapOptions::default()).unwrap();
    put(&map, "a", b"1").unwrap();
    let held = map.lock("held", LockMode::Any, None).unwrap();

    let symlink = dir.path().join("symlink.redb");
    std::os::unix::fs::symlink(&real, &symlink).unwrap();
    let hard = dir.path().join("hard.redb");
    std::fs::hard_link(&real, &hard).unwrap();
    for (i, link) in [&symlink, &hard].into_iter().enumerate() {
        let other = Database::open(link, DatabaseOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", link.display()));
        let through = other.map_store("m", MapOptions::default()).unwrap();
        assert_eq!(
            through.stats().unwrap().locks_held,
            1,
            "{}: the lock held through the real path",
            link.display()
        );
        assert_eq!(value(&through, "a").unwrap(), b"1");
        let key = format!("via-{i}");
        put(&through, &key, b"2").unwrap();
        assert_eq!(value(&map, &key).unwrap(), b"2", "{}", link.display());
        other.close();
    }

    for path in [&real, &symlink, &hard] {
        let err = check_integrity(path).unwrap_err();
        assert_eq!(err.code(), ErrorCode::DatabaseLocked, "{err}");
        let message = err.to_string();
        assert!(
            message.contains("this process") && !message.contains("another process"),
            "{}: {message}",
            path.display()
        );
    }
    drop(held);
    db.close();
    assert!(check_integrity(&hard).unwrap());
}

// ---- issue 15 ----

#[test]
fn issue15_4_auto_keys_continue_where_they_stopped_after_a_clean_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let options = MapOptions {
        keys: KeyFormat { width: 4, base: 10 },
        ..Default::default()
    };
    let keys: Vec<String> = (0..12)
        .map(|_| {
            let db = Database::open(&path, DatabaseOptions::default()).unwrap();
            let map = db.map_store("m", options.clone()).unwrap();
            let key = map
                .next_key_blocking()
                .unwrap_or_else(|e| format!("error: {e}"));
            db.close();
            key
        })
        .collect();
    let expected: Vec<String> = (0..12).map(|i| format!("{i:04}")).collect();
    assert_eq!(keys, expected);
}

#[test]
fn issue15_6_opening_in_a_missing_directory_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-dir");
    let err = Database::open(missing.join("x.redb"), DatabaseOptions::default())
        .err()
        .expect("no such directory");
    assert_eq!(err.code(), ErrorCode::Io, "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&*missing.to_string_lossy()),
        "the message names the path: {message}"
    );
}
