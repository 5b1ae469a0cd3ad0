//! The open file: its redb instance (reopened after a failed write), the tables' shared state
//! (locks, cache, key sequence) and the bookkeeping table of codecs, key leases and the format.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::time::Duration;

use std::ops::Bound;

use redb::{BackendError, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use crate::cache::EntryCache;
use crate::error::{from_redb, Error, Result};
use crate::file::backups::{BackupGate, BackupTicket};
use crate::file::instance::Instance;
use crate::file::unsynced::UnsyncedChanges;
use crate::keys::KeyFormat;
use crate::locks::LockTable;
use crate::map::MapOptions;
use crate::sequence::KeySequence;

pub(crate) const META_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("kvstore:meta");
pub(crate) const FORMAT_KEY: &str = "format";
/// Version of the on-disk layout (tables, meta keys, envelope); see FORMAT.md.
pub const FORMAT_VERSION: u64 = 1;
/// The format recorded while a write-ahead log is live (FORMAT.md): builds that know no log
/// refuse such a file instead of opening it without the commits still in its log.
pub(crate) const FORMAT_WITH_LOG: u64 = 2;
/// Largest record (envelope + value) one commit may write.
pub const MAX_RECORD_BYTES: usize = 1 << 30;

/// Options that belong to the file; the first opener in a process decides them.
#[derive(Debug, Clone)]
pub struct DatabaseOptions {
    /// redb's page cache. redb's own default is 1 GiB, a ceiling RSS grows into.
    pub page_cache_bytes: usize,
    /// fsync before a commit is acknowledged (`durability: 'immediate'`).
    pub durable: bool,
    /// Non-durable commits are made durable at most this long after the first of them (by the
    /// next transaction, or by the idle writer): a crash loses at most this much of them.
    pub sync_interval: Duration,
    /// Where the bytes go; the plain file when `None`. Used again to reopen after a failed write.
    pub backend: Option<Backend>,
    /// Open the file without write access and change nothing in it: a missing file is not
    /// created, a file that needs a repair is refused, and locks, commits, auto keys and
    /// compaction fail with [`Error::InvalidArgument`]. Reads, walks and backups work.
    pub read_only: bool,
}

impl Default for DatabaseOptions {
    fn default() -> Self {
        DatabaseOptions {
            page_cache_bytes: 64 << 20,
            durable: true,
            sync_interval: Duration::from_secs(1),
            backend: None,
            read_only: false,
        }
    }
}

/// Opens the storage for a file path.
pub type MakeBackend =
    dyn Fn(&Path) -> std::io::Result<Box<dyn redb::StorageBackend>> + Send + Sync;

/// Makes the storage backend for a file (e.g. one that injects faults, for tests).
#[derive(Clone)]
pub struct Backend(pub Arc<MakeBackend>);

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Backend(..)")
    }
}

/// A boxed backend as redb wants it (a sized type).
#[derive(Debug)]
struct BoxedBackend(Box<dyn redb::StorageBackend>);

impl redb::StorageBackend for BoxedBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.0.close()
    }
    // The file lock is the backend's: without these, redb would open a wrapped file unlocked.
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.0.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.query_lock_range(start, end)
    }
}

/// A read snapshot of one table, shared by lookups until the next commit.
pub(crate) type Snapshot = Arc<redb::ReadOnlyTable<&'static str, &'static [u8]>>;

/// One table's shared state: its locks, cache and key sequence.
pub(crate) struct TableState {
    pub name: String,
    pub redb_name: String,
    pub sequence_key: String,
    /// Meta key recording the auto-key format, written with each lease.
    pub keys_key: String,
    pub codec: String,
    /// The format the table's auto keys are generated in: recorded in the file, else set by the
    /// first opener here that generates one.
    key_format: Mutex<Option<KeyFormat>>,
    pub locks: LockTable,
    pub cache: EntryCache<Snapshot>,
    sequence: Mutex<KeySequence>,
}

impl TableState {
    pub fn sequence(&self) -> MutexGuard<'_, KeySequence> {
        self.sequence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The format to generate keys in for an opener that asked for `wanted`: another format
    /// than the table's keys were generated in would break their creation order.
    pub(crate) fn check_key_format(&self, wanted: KeyFormat) -> Result<KeyFormat> {
        let mut format = self.key_format.lock().unwrap_or_else(|p| p.into_inner());
        match *format {
            Some(recorded) if recorded != wanted => Err(Error::invalid(format!(
                "table '{}' generates auto keys of width {} in base {}; this store was opened \
                 with width {} in base {}",
                self.name, recorded.width, recorded.base, wanted.width, wanted.base
            ))),
            _ => Ok(*format.get_or_insert(wanted)),
        }
    }

    /// The auto-key format to record with a lease.
    pub fn key_format(&self) -> Option<KeyFormat> {
        *self.key_format.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn definition(&self) -> TableDefinition<'_, &'static str, &'static [u8]> {
        TableDefinition::new(&self.redb_name)
    }
}

/// The open file: the redb instance and the tables' shared state. The writer holds it too, so
/// it can reopen the file after a failed write (redb refuses all writes after an I/O error).
pub(crate) struct StoreFile {
    pub(crate) path: String,
    location: PathBuf,
    page_cache_bytes: usize,
    backend: Option<Backend>,
    /// Opened without write access (see [`DatabaseOptions::read_only`]).
    pub(crate) read_only: bool,
    /// The last handle closed: the file is not to be reopened.
    pub(crate) released: AtomicBool,
    /// Taken out when the last handle closes, so the file lock goes even while stray handles
    /// (dropped later by a garbage collector) still point here; swapped on recovery.
    db: RwLock<Option<Arc<Instance>>>,
    tables: Mutex<HashMap<String, Arc<TableState>>>,
    /// A read failed with an I/O error. redb then refuses all I/O until the file is reopened;
    /// the writer does that before its next batch.
    read_failed: AtomicBool,
    /// Backups running on this file (they hold the instance).
    backups: Arc<BackupGate>,
    /// Walks (`getEntries`) holding a snapshot of this file.
    pub(crate) walks: AtomicUsize,
    /// Acknowledged non-durable changes, written again after a reopen (see [`UnsyncedChanges`]).
    unsynced: Mutex<UnsyncedChanges>,
}

/// A map's entries in the bookkeeping table: its codec, how far its keys are leased and how
/// they are spelled.
#[derive(Default)]
struct TableMeta {
    codec: Option<String>,
    leased_until: u64,
    key_format: Option<KeyFormat>,
}

/// The same file reached by another spelling of its path, or through a symlink, must map to
/// the same core (a hard link is matched by the registry, by inode).
pub(crate) fn normalize(path: &Path) -> Result<PathBuf> {
    check_path(path, "a store path")?;
    let absolute = std::path::absolute(path).map_err(|e| Error::io_at(path, e))?;
    if let Ok(real) = absolute.canonicalize() {
        return Ok(real);
    }
    let name = absolute
        .file_name()
        .ok_or_else(|| Error::invalid(format!("'{}' is not a file path", path.display())))?;
    let parent = absolute.parent().unwrap_or(Path::new("/"));
    let parent = parent.canonicalize().map_err(|e| Error::io_at(parent, e))?;
    Ok(parent.join(name))
}

/// Refuses a path no file can have: empty, or with a NUL byte. `what` names it in the message.
pub(crate) fn check_path(path: &Path, what: &str) -> Result<()> {
    if path.as_os_str().is_empty() {
        return Err(Error::invalid(format!("{what} must not be empty")));
    }
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(Error::invalid(format!(
            "{what} must not contain a NUL byte: {path:?}"
        )));
    }
    Ok(())
}

pub(crate) fn open_error(path: &str, err: redb::DatabaseError) -> Error {
    use redb::{DatabaseError, StorageError};
    let corrupt = |detail: String| Error::DatabaseCorrupt {
        path: path.to_string(),
        detail,
    };
    match err {
        DatabaseError::DatabaseAlreadyOpen => Error::DatabaseLocked {
            path: path.to_string(),
            holder: "another process".into(),
        },
        DatabaseError::Storage(StorageError::Io(io))
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            corrupt(io.to_string())
        }
        DatabaseError::Storage(StorageError::Corrupted(detail)) => corrupt(detail),
        // Only a read-only open aborts a repair.
        DatabaseError::RepairAborted => corrupt(
            "it needs a repair (it was not closed cleanly, or it is damaged), which a read-only \
             open cannot make: open it read-write once to repair it"
                .into(),
        ),
        DatabaseError::UpgradeRequired(v) => {
            corrupt(format!("written in an unsupported redb file format ({v})"))
        }
        other => from_redb(path, other.into()),
    }
}

/// Runs one of redb's opens. redb can panic on some damaged files instead of returning an
/// error: that is a corrupt file too.
pub(crate) fn open_guarded<T>(
    path: &str,
    open: impl FnOnce() -> std::result::Result<T, redb::DatabaseError>,
) -> Result<T> {
    catch_unwind(AssertUnwindSafe(open))
        .map_err(|_| Error::DatabaseCorrupt {
            path: path.to_string(),
            detail: "the file could not be read as a redb database".into(),
        })?
        .map_err(|e| open_error(path, e))
}

/// Opens (or creates) the redb file. Returns how long redb spent repairing it, when it was not
/// closed cleanly (a crash); redb also reports "repair" progress for a brand-new file, which
/// does not count.
fn open_redb(
    location: &Path,
    path: &str,
    page_cache_bytes: usize,
    backend: Option<&Backend>,
    read_only: bool,
) -> Result<(Instance, Option<Duration>)> {
    if read_only {
        return open_read_only(location, path, page_cache_bytes, backend).map(|db| (db, None));
    }
    let existed = std::fs::metadata(location).is_ok_and(|m| m.len() > 0);
    let repairing = Arc::new(AtomicBool::new(false));
    let mut builder = redb::Database::builder();
    builder.set_cache_size(page_cache_bytes);
    let seen = repairing.clone();
    builder.set_repair_callback(move |_| seen.store(true, Ordering::Relaxed));
    let started = std::time::Instant::now();
    // redb can panic on some damaged files instead of returning an error.
    let storage = backend
        .map(|make| (make.0)(location).map(BoxedBackend))
        .transpose()?;
    let db = open_guarded(path, || match storage {
        Some(storage) => builder.create_with_backend(storage),
        None => builder.create(location),
    })?;
    let repaired = (existed && repairing.load(Ordering::Relaxed)).then(|| started.elapsed());
    Ok((Instance::Writable(db), repaired))
}

/// Opens an existing file without write access (see [`DatabaseOptions::read_only`]).
fn open_read_only(
    location: &Path,
    path: &str,
    page_cache_bytes: usize,
    backend: Option<&Backend>,
) -> Result<Instance> {
    let mut builder = redb::Database::builder();
    builder.set_cache_size(page_cache_bytes);
    let opened = match backend {
        Some(make) => {
            let storage = BoxedBackend((make.0)(location)?);
            open_guarded(path, || builder.open_read_only_with_backend(storage))
        }
        None => {
            // redb opens a missing file's error without the path; an empty file is no store.
            let meta = std::fs::metadata(location).map_err(|e| Error::io_at(location, e))?;
            if meta.len() == 0 {
                return Err(Error::DatabaseCorrupt {
                    path: path.to_string(),
                    detail: "the file is empty (0 bytes): it is not a kvstore file".into(),
                });
            }
            open_guarded(path, || builder.open_read_only(location))
        }
    };
    opened.map(Instance::ReadOnly)
}

impl StoreFile {
    /// Opens (or creates) the file and checks its format. Returns how long redb spent repairing
    /// it, when it was not closed cleanly.
    pub(crate) fn open(
        location: &Path,
        options: &DatabaseOptions,
    ) -> Result<(Arc<StoreFile>, Option<Duration>)> {
        let path = location.display().to_string();
        let (db, repaired) = open_redb(
            location,
            &path,
            options.page_cache_bytes,
            options.backend.as_ref(),
            options.read_only,
        )?;
        let db = Arc::new(db);
        let checked =
            crate::error::guard_damage(&path, || check_format(&db, &path)).and_then(|()| {
                crate::error::guard_damage(&path, || {
                    replay_log(&db, location, options.backend.as_ref(), &path)
                })
            });
        if let Err(err) = checked {
            // Closing an instance of a damaged file can panic too.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(db)));
            return Err(err);
        }
        let file = Arc::new(StoreFile {
            path,
            location: location.to_path_buf(),
            page_cache_bytes: options.page_cache_bytes,
            backend: options.backend.clone(),
            read_only: options.read_only,
            released: AtomicBool::new(false),
            db: RwLock::new(Some(db)),
            tables: Mutex::new(HashMap::new()),
            read_failed: AtomicBool::new(false),
            backups: Arc::default(),
            walks: AtomicUsize::new(0),
            unsynced: Mutex::default(),
        });
        Ok((file, repaired))
    }

    pub(crate) fn db(&self) -> Result<Arc<Instance>> {
        if let Some(db) = self.db.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(db.clone());
        }
        if self.released.load(Ordering::SeqCst) {
            return Err(Error::StoreClosed);
        }
        // A failed write took the instance out and reopening failed then (the fault was still
        // there): any caller tries again, so reads recover as soon as the disk does.
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        let db = self.reopen()?;
        *slot = Some(db.clone());
        Ok(db)
    }

    /// Opens the file again, as it was first opened, and writes again what non-durable
    /// transactions had acknowledged before the old instance was dropped.
    pub(crate) fn reopen(&self) -> Result<Arc<Instance>> {
        // A writer still finishing after the last close (closed from inside its own callback)
        // must not open the file again.
        if self.released.load(Ordering::SeqCst) {
            return Err(Error::StoreClosed);
        }
        let (db, _) = open_redb(
            &self.location,
            &self.path,
            self.page_cache_bytes,
            self.backend.as_ref(),
            self.read_only,
        )?;
        let mut unsynced = self.unsynced();
        if !unsynced.is_empty() {
            let writable = db.writable(&self.path)?;
            crate::error::guard_damage(&self.path, || unsynced.rewrite(writable, &self.path))?;
            unsynced.clear();
        }
        Ok(Arc::new(db))
    }

    pub(crate) fn unsynced(&self) -> MutexGuard<'_, UnsyncedChanges> {
        self.unsynced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets go of the redb instance (and every snapshot and cached entry of it: the failed
    /// batch may have landed after all) and opens the file afresh.
    /// Readers wait on the lock meanwhile; running backups are ended first (they hold the
    /// instance). If the reopen fails (the fault is still there), the slot stays empty and the
    /// next caller tries again.
    pub(crate) fn recover(&self) -> Result<()> {
        let mut slot = self.lock_slot(EntryCache::clear);
        self.backups.end_all(Error::Io {
            errno: None,
            message: format!(
                "the backup of '{}' was stopped: the store reopened the file after an I/O error",
                self.path
            ),
        });
        // Closing the old instance makes its non-durable commits durable, which can panic on
        // a damaged page: reopening writes them again anyway.
        let old = slot.take();
        let _ = catch_unwind(AssertUnwindSafe(move || drop(old)));
        *slot = Some(self.reopen()?);
        Ok(())
    }

    /// Locks the instance slot for a change of instance (recovery, compaction, close), after
    /// `each` has let go of every table's snapshot. `tables` before `db`: table() takes them in
    /// that order.
    pub(crate) fn lock_slot(
        &self,
        each: impl Fn(&EntryCache<Snapshot>),
    ) -> RwLockWriteGuard<'_, Option<Arc<Instance>>> {
        let tables = self.tables();
        let slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        for table in tables {
            each(&table.cache);
        }
        slot
    }

    /// A read failed with an I/O error (see `read_failed`).
    pub(crate) fn is_released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    pub(crate) fn mark_read_failed(&self) {
        self.read_failed.store(true, Ordering::SeqCst);
    }

    /// True once after a read failed with an I/O error (see `read_failed`).
    pub(crate) fn take_read_failure(&self) -> bool {
        self.read_failed.swap(false, Ordering::SeqCst)
    }

    /// A write transaction committed or failed (see [`EntryCache::begin_commit`]): every
    /// table's cache learns so. No read snapshot kept from before outlives it: it would keep
    /// redb from reusing the pages freed from now on (see the cache).
    pub(crate) fn end_commit(&self) {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        for table in tables.values() {
            table.cache.end_commit();
        }
    }

    /// The instance, with a place in the backup gate taken while the slot is locked: a close
    /// or recovery (which locks the slot, then ends the backups) cannot miss this backup.
    pub(crate) fn db_for_backup(&self) -> Result<(Arc<Instance>, BackupTicket)> {
        loop {
            let db = self.db()?;
            let slot = self.db.read().unwrap_or_else(|p| p.into_inner());
            if slot
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, &db))
            {
                let ticket = self.backups.enter(&db);
                return Ok((db, ticket));
            }
        }
    }

    pub(crate) fn backups(&self) -> &BackupGate {
        &self.backups
    }

    pub(crate) fn open_walks(&self) -> usize {
        self.walks.load(Ordering::SeqCst)
    }

    /// Closes the file for good (last handle gone): running backups end first.
    pub(crate) fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        let mut slot = self.lock_slot(EntryCache::refuse_snapshots);
        self.backups.end_all(Error::StoreClosed);
        drop(slot.take());
    }

    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    pub(crate) fn redb_err(&self, err: impl Into<redb::Error>) -> Error {
        from_redb(&self.path, err.into())
    }

    /// The shared state of map `name`, created (and its codec recorded) on first use, unless
    /// `read_only`: a read-only handle finds only the maps the file has.
    pub(crate) fn table(
        &self,
        name: &str,
        options: &MapOptions,
        read_only: bool,
    ) -> Result<Arc<TableState>> {
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(table) = tables.get(name) {
            if table.codec != options.codec {
                return Err(Error::CodecMismatch {
                    table: name.into(),
                    stored: table.codec.clone(),
                    requested: options.codec.clone(),
                });
            }
            return Ok(table.clone());
        }
        let redb_name = format!("map:{name}");
        let codec_key = format!("codec:{name}");
        let sequence_key = format!("seq:{name}");
        let keys_key = format!("keys:{name}");
        let db = self.db()?;
        let mismatch = |stored: &Option<String>| match stored {
            Some(stored) if *stored != options.codec => Err(Error::CodecMismatch {
                table: name.into(),
                stored: stored.clone(),
                requested: options.codec.clone(),
            }),
            _ => Ok(()),
        };
        let found = if read_only || self.read_only {
            // Nothing is created (like LMDB's MDB_NOTFOUND for a read-only open).
            let txn = db.begin_read().map_err(|e| self.redb_err(e))?;
            let found = match txn.open_table(META_TABLE) {
                Ok(meta) => self.table_meta(&meta, &codec_key, &sequence_key, &keys_key)?,
                Err(TableError::TableDoesNotExist(_)) => TableMeta::default(),
                Err(e) => return Err(self.redb_err(e)),
            };
            if found.codec.is_none() {
                return Err(Error::invalid(format!(
                    "'{}' has no map '{name}', and a read-only handle does not create one",
                    self.path
                )));
            }
            mismatch(&found.codec)?;
            found
        } else {
            let txn = db
                .writable(&self.path)?
                .begin_write()
                .map_err(|e| self.redb_err(e))?;
            let found = {
                txn.open_table(TableDefinition::<&str, &[u8]>::new(&redb_name))
                    .map_err(|e| self.redb_err(e))?;
                let mut meta = txn.open_table(META_TABLE).map_err(|e| self.redb_err(e))?;
                let found = self.table_meta(&meta, &codec_key, &sequence_key, &keys_key)?;
                mismatch(&found.codec)?;
                if found.codec.is_none() {
                    meta.insert(codec_key.as_str(), options.codec.as_bytes())
                        .map_err(|e| self.redb_err(e))?;
                }
                found
            };
            txn.commit().map_err(|e| self.redb_err(e))?;
            found
        };
        let (leased_until, key_format) = (found.leased_until, found.key_format);
        let table = Arc::new(TableState {
            name: name.to_string(),
            redb_name,
            sequence_key,
            keys_key,
            codec: options.codec.clone(),
            key_format: Mutex::new(key_format),
            locks: LockTable::new(),
            cache: EntryCache::new(options.cache_capacity, options.cache_bytes),
            sequence: Mutex::new(KeySequence::new(leased_until, options.bandwidth)),
        });
        tables.insert(name.to_string(), table.clone());
        Ok(table)
    }

    /// What the bookkeeping table says of one map.
    fn table_meta(
        &self,
        meta: &impl ReadableTable<&'static str, &'static [u8]>,
        codec_key: &str,
        sequence_key: &str,
        keys_key: &str,
    ) -> Result<TableMeta> {
        let get = |key: &str| meta.get(key).map_err(|e| self.redb_err(e));
        Ok(TableMeta {
            codec: get(codec_key)?.map(|g| String::from_utf8_lossy(g.value()).into_owned()),
            leased_until: get(sequence_key)?.map_or(0, |g| decode_u64(g.value())),
            key_format: get(keys_key)?.and_then(|g| KeyFormat::decode(g.value())),
        })
    }

    pub(crate) fn tables(&self) -> Vec<Arc<TableState>> {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        tables.values().cloned().collect()
    }
}

fn decode_u64(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    let n = bytes.len().min(8);
    raw[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(raw)
}

/// After a crash: a writable open replays the write-ahead log (see `wal`); a read-only open,
/// which cannot, refuses a file whose log holds records it lacks.
fn replay_log(db: &Instance, location: &Path, backend: Option<&Backend>, path: &str) -> Result<()> {
    match db {
        Instance::Writable(db) => crate::file::wal::replay(db, location, backend, path).map(drop),
        Instance::ReadOnly(db) => {
            let txn = db.begin_read().map_err(|e| from_redb(path, e.into()))?;
            if crate::file::wal::needs_replay(&txn, location, backend, path)? {
                return Err(Error::DatabaseCorrupt {
                    path: path.to_string(),
                    detail: "it was not closed cleanly and its write-ahead log holds commits \
                             that a read-only open cannot apply: open it read-write once"
                        .into(),
                });
            }
            Ok(())
        }
    }
}

fn check_format(db: &Instance, path: &str) -> Result<()> {
    let err = |e: redb::Error| from_redb(path, e);
    let check = |stored: Option<u64>| match stored {
        Some(FORMAT_VERSION | FORMAT_WITH_LOG) | None => Ok(()),
        Some(other) => Err(Error::DatabaseCorrupt {
            path: path.to_string(),
            detail: format!(
                "kvstore format {other} is not supported (this build reads {FORMAT_VERSION} and \
                 {FORMAT_WITH_LOG})"
            ),
        }),
    };
    let Instance::Writable(db) = db else {
        // Read-only: check what is there, record nothing.
        let txn = db.begin_read().map_err(|e| err(e.into()))?;
        return match txn.open_table(META_TABLE) {
            Ok(meta) => check(
                meta.get(FORMAT_KEY)
                    .map_err(|e| err(e.into()))?
                    .map(|g| decode_u64(g.value())),
            ),
            Err(TableError::TableDoesNotExist(_)) => Ok(()),
            Err(e) => Err(err(e.into())),
        };
    };
    let txn = db.begin_write().map_err(|e| err(e.into()))?;
    {
        let mut meta = txn.open_table(META_TABLE).map_err(|e| err(e.into()))?;
        let stored = meta
            .get(FORMAT_KEY)
            .map_err(|e| err(e.into()))?
            .map(|g| decode_u64(g.value()));
        check(stored)?;
        if stored.is_none() {
            meta.insert(FORMAT_KEY, FORMAT_VERSION.to_le_bytes().as_slice())
                .map_err(|e| err(e.into()))?;
        }
    }
    txn.commit().map_err(|e| err(e.into()))
}
