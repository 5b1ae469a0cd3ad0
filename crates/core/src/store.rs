//! Open files and their tables. One [`Shared`] core per file per process (a static registry, so
//! every thread and every Node worker shares it); each [`Database`] is a handle that owns the
//! locks it takes, and the file closes when its last handle closes.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::time::Duration;

use std::ops::Bound;

use redb::{BackendError, ReadableTable, ReadableTableMetadata, TableDefinition, TableError};

use crate::cache::{EntryCache, Lookup};
use crate::commit_queue::{Change, CommitCallback, CommitJob, CommitQueue, Job};
use crate::envelope::{self, Record};
use crate::error::{from_redb, Error, ErrorCode, Result};
use crate::instance::Instance;
use crate::keys::{validate_key, KeyFormat};
use crate::locks::{Acquire, Grant, GrantCallback, LockTable, LockToken, OwnerId};
use crate::maintenance::{BackupGate, BackupTicket};
use crate::range::{EntryRange, RangeOptions};
use crate::sequence::{KeySequence, NumberCallback, Take};
use crate::unsynced::UnsyncedChanges;

pub(crate) const META_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("kvstore:meta");
const FORMAT_KEY: &str = "format";
/// Version of the on-disk layout (tables, meta keys, envelope); see FORMAT.md.
pub const FORMAT_VERSION: u64 = 1;
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

/// Options of one named map; the first opener of the table in a process decides the cache size.
#[derive(Debug, Clone)]
pub struct MapOptions {
    /// The codec's name, recorded in the file; a different name on a later open is refused.
    pub codec: String,
    pub cache_capacity: usize,
    pub keys: KeyFormat,
    /// Auto-key numbers leased from the file per write.
    pub bandwidth: u64,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            codec: "raw".into(),
            cache_capacity: 10_000,
            keys: KeyFormat::default(),
            bandwidth: 1000,
        }
    }
}

/// What a lock is taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// The entry must exist (`getAndLockEntry`).
    Existing,
    /// The entry must not exist (`createAndLockEntry`).
    New,
    /// Either; `existed` tells which (`allowExisting`).
    Any,
}

/// A lock that was granted, with the committed record at that moment.
#[derive(Debug, Clone)]
pub struct LockedEntry {
    pub token: LockToken,
    pub record: Option<Arc<[u8]>>,
    pub existed: bool,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CommitOptions {
    /// Keep the lock after a successful write; the holder may commit again.
    pub update_only: bool,
    /// On failure keep the lock so the caller can retry.
    pub hold_lock_on_failure: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapStats {
    pub entries: u64,
    pub file_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_entries: u64,
    pub locks_held: u64,
    pub locks_waiting: u64,
    pub commits: u64,
    pub batches: u64,
    pub failed_batches: u64,
    pub largest_batch: u64,
    /// Non-durable transactions not yet made durable (a crash now would lose them).
    pub unsynced_batches: u64,
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
    fn check_key_format(&self, wanted: KeyFormat) -> Result<KeyFormat> {
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

    fn definition(&self) -> TableDefinition<'_, &'static str, &'static [u8]> {
        TableDefinition::new(&self.redb_name)
    }
}

/// The open file: the redb instance and the tables' shared state. The writer holds it too, so
/// it can reopen the file after a failed write (redb refuses all writes after an I/O error).
pub(crate) struct StoreFile {
    path: String,
    location: PathBuf,
    page_cache_bytes: usize,
    backend: Option<Backend>,
    /// Opened without write access (see [`DatabaseOptions::read_only`]).
    read_only: bool,
    /// The last handle closed: the file is not to be reopened.
    released: AtomicBool,
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
    walks: AtomicUsize,
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

/// The per-file core shared by every handle in the process.
pub(crate) struct Shared {
    file: Arc<StoreFile>,
    queue: CommitQueue,
    /// How long redb spent repairing the file at open, after an unclean shutdown.
    repaired: Option<Duration>,
}

impl std::ops::Deref for Shared {
    type Target = StoreFile;

    fn deref(&self) -> &StoreFile {
        &self.file
    }
}

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// The same file reached by another spelling of its path, or through a symlink, must map to
/// the same core (a hard link is matched by the registry, by inode).
fn normalize(path: &Path) -> Result<PathBuf> {
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

fn open_error(path: &str, err: redb::DatabaseError) -> Error {
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
        DatabaseError::RepairAborted => Error::invalid(format!(
            "'{path}' was not closed cleanly and needs a repair, which a read-only open cannot \
             make: open it read-write once"
        )),
        DatabaseError::UpgradeRequired(v) => {
            corrupt(format!("written in an unsupported redb file format ({v})"))
        }
        other => from_redb(path, other.into()),
    }
}

/// Runs one of redb's opens. redb can panic on some damaged files instead of returning an
/// error: that is a corrupt file too.
fn open_guarded<T>(
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
    fn reopen(&self) -> Result<Arc<Instance>> {
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
        drop(slot.take());
        *slot = Some(self.reopen()?);
        Ok(())
    }

    /// Locks the instance slot for a change of instance (recovery, compaction, close), after
    /// `each` has let go of every table's snapshot. `tables` before `db`: table() takes them in
    /// that order.
    fn lock_slot(
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

    /// True once after a read failed with an I/O error (see `read_failed`).
    pub(crate) fn take_read_failure(&self) -> bool {
        self.read_failed.swap(false, Ordering::SeqCst)
    }

    /// Compacts the file; see [`crate::maintenance`]. Call on the writer, between batches.
    pub(crate) fn compact(&self) -> Result<bool> {
        let mut slot = self.lock_slot(EntryCache::refuse_snapshots);
        let compacted = crate::error::guard_damage(&self.path, || {
            if slot.is_none() {
                // A failed reopen left it empty: try again, as any reader would.
                *slot = Some(self.reopen()?);
            }
            crate::maintenance::compact(self, &mut slot)
        });
        if let Err(err) = &compacted {
            if matches!(err.code(), ErrorCode::Io | ErrorCode::DatabaseCorrupt) {
                // redb refuses all I/O after a failed write: the writer reopens the file
                // before its next batch.
                self.read_failed.store(true, Ordering::SeqCst);
            }
        }
        compacted
    }

    /// Drops every table's kept read snapshot (after each transaction; see the cache).
    pub(crate) fn forget_snapshots(&self) {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        for table in tables.values() {
            table.cache.forget_snapshot();
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
    fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        let mut slot = self.lock_slot(EntryCache::refuse_snapshots);
        self.backups.end_all(Error::StoreClosed);
        drop(slot.take());
    }

    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    fn redb_err(&self, err: impl Into<redb::Error>) -> Error {
        from_redb(&self.path, err.into())
    }

    fn table(&self, name: &str, options: &MapOptions) -> Result<Arc<TableState>> {
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
        let found = if self.read_only {
            // Nothing is created: a map the file does not have reads as empty.
            let txn = db.begin_read().map_err(|e| self.redb_err(e))?;
            let found = match txn.open_table(META_TABLE) {
                Ok(meta) => self.table_meta(&meta, &codec_key, &sequence_key, &keys_key)?,
                Err(TableError::TableDoesNotExist(_)) => TableMeta::default(),
                Err(e) => return Err(self.redb_err(e)),
            };
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
            cache: EntryCache::new(options.cache_capacity),
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

impl Shared {
    fn open(location: &Path, options: &DatabaseOptions) -> Result<Shared> {
        let path = location.display().to_string();
        let (db, repaired) = open_redb(
            location,
            &path,
            options.page_cache_bytes,
            options.backend.as_ref(),
            options.read_only,
        )?;
        let db = Arc::new(db);
        crate::error::guard_damage(&path, || check_format(&db, &path))?;
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
        let queue = CommitQueue::start(file.clone(), options.sync_interval)?;
        Ok(Shared {
            file,
            queue,
            repaired,
        })
    }

    /// After an I/O error on a read (a page beyond the end of the file is one), redb refuses
    /// all I/O: the writer is woken to reopen the file, so reads and commits work again as soon
    /// as the disk does.
    pub(crate) fn read_error(&self, err: &Error) {
        if matches!(err.code(), ErrorCode::Io | ErrorCode::DatabaseCorrupt) {
            self.file.read_failed.store(true, Ordering::SeqCst);
            self.queue.submit(Job::Barrier(Box::new(|| {})));
        }
    }

    /// Names this file's writer (see [`crate::commit_queue::current_writer`]).
    pub(crate) fn queue_id(&self) -> u64 {
        self.queue.id()
    }

    /// Returns once every job submitted before has been settled (at once on the writer itself,
    /// where waiting would never end).
    fn barrier(&self) {
        if self.queue.is_current_writer() {
            return;
        }
        let (tx, rx) = mpsc::channel();
        self.queue.submit(Job::Barrier(Box::new(move || {
            let _ = tx.send(());
        })));
        let _ = rx.recv();
    }
}

fn decode_u64(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    let n = bytes.len().min(8);
    raw[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(raw)
}

fn check_format(db: &Instance, path: &str) -> Result<()> {
    let err = |e: redb::Error| from_redb(path, e);
    let check = |stored: Option<u64>| match stored {
        Some(FORMAT_VERSION) | None => Ok(()),
        Some(other) => Err(Error::DatabaseCorrupt {
            path: path.to_string(),
            detail: format!(
                "kvstore format {other} is not supported (this build reads {FORMAT_VERSION})"
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

struct Handle {
    shared: Arc<Shared>,
    key: PathBuf,
    /// Where the registry keeps the file (another path to it, for a link).
    registered: PathBuf,
    owner: OwnerId,
    durable: bool,
    /// Opened with `read_only` (or joined a file open read-only): changes are refused.
    read_only: bool,
    closed: AtomicBool,
    /// This handle's open found the file closed and opened it (rather than joining a core).
    opened_file: bool,
}

impl Handle {
    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(crate::instance::read_only(&self.shared.path));
        }
        Ok(())
    }

    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Commits already submitted by this handle land before its locks are let go.
        self.shared.barrier();
        for table in self.shared.tables() {
            table.locks.release_owner(self.owner);
        }
        let mut outcome = Ok(());
        crate::registry::close(&self.registered, &self.shared, || {
            outcome = self.shared.queue.shutdown();
            self.shared.release();
        });
        outcome
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A handle on a store file. Cheap to clone; every clone is the same handle.
#[derive(Clone)]
pub struct Database {
    handle: Arc<Handle>,
}

impl Database {
    /// Opens (creating if needed) the file, or joins the core already open in this process.
    pub fn open(path: impl AsRef<Path>, options: DatabaseOptions) -> Result<Database> {
        let key = normalize(path.as_ref())?;
        let registration = crate::registry::open(&key, || Shared::open(&key, &options))?;
        let opened_file = registration.opened;
        let file_read_only = registration.shared.read_only;
        let handle = Arc::new(Handle {
            shared: registration.shared,
            key,
            registered: registration.key,
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            durable: options.durable,
            read_only: options.read_only || file_read_only,
            closed: AtomicBool::new(false),
            opened_file,
        });
        if file_read_only && !options.read_only {
            // Dropping the handle gives the registration back.
            return Err(Error::DatabaseLocked {
                path: handle.key.display().to_string(),
                holder: "this process, which opened it read-only".into(),
            });
        }
        Ok(Database { handle })
    }

    /// When this handle opened the file and redb had to repair it first (the last process
    /// using it did not close it cleanly): how long the repair took.
    pub fn repaired(&self) -> Option<Duration> {
        if self.handle.opened_file {
            self.handle.shared.repaired
        } else {
            None
        }
    }

    pub fn map_store(&self, name: &str, options: MapOptions) -> Result<MapStore> {
        self.check_open()?;
        if name.is_empty() || name.len() > 255 {
            return Err(Error::invalid(
                "a table name must be between 1 and 255 bytes",
            ));
        }
        if options.bandwidth == 0 {
            return Err(Error::invalid("keys.bandwidth must be at least 1"));
        }
        let shared = &self.handle.shared;
        let table = crate::error::guard_damage(&shared.path, || shared.table(name, &options))?;
        Ok(MapStore {
            handle: self.handle.clone(),
            table,
            keys: options.keys,
        })
    }

    /// Whether this handle was opened read-only (or joined a file open read-only).
    pub fn is_read_only(&self) -> bool {
        self.handle.read_only
    }

    /// Whether this handle's commits wait for an fsync.
    pub fn is_durable(&self) -> bool {
        self.handle.durable
    }

    pub fn path(&self) -> &Path {
        &self.handle.key
    }

    pub fn is_closed(&self) -> bool {
        self.handle.closed.load(Ordering::SeqCst)
    }

    /// Waits for this handle's commits in flight, releases its locks and rejects its waiters;
    /// closes the file if this was its last handle. Idempotent.
    pub fn close(&self) {
        let _ = self.handle.close();
    }

    /// As [`Database::close`], and says whether anything acknowledged was lost: when this was
    /// the last handle and the final sync failed (say the disk is still full), the non-durable
    /// commits since the last sync are gone, and the error says how many transactions.
    pub fn try_close(&self) -> Result<()> {
        self.handle.close()
    }

    fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::StoreClosed);
        }
        Ok(())
    }

    /// Writes a consistent copy of the whole file, as of one snapshot, to `dest` (which must not
    /// exist). Commits go on meanwhile. Blocks the calling thread for the copy.
    pub fn backup(&self, dest: impl AsRef<Path>) -> Result<()> {
        self.begin_backup(dest)?.run()
    }

    /// Takes the snapshot for a backup now; run the copy later, on any thread.
    pub fn begin_backup(&self, dest: impl AsRef<Path>) -> Result<crate::maintenance::Backup> {
        self.check_open()?;
        crate::maintenance::begin_backup(&self.handle.shared, dest.as_ref())
    }

    /// Compacts the file once the commits queued before are written; `done` hears whether
    /// anything was reclaimed. Fails while a walk is open.
    pub fn compact_with(&self, done: Box<dyn FnOnce(Result<bool>) + Send>) -> Result<()> {
        self.check_open()?;
        self.handle.check_writable()?;
        let file = self.handle.shared.file.clone();
        self.handle
            .shared
            .queue
            .submit(Job::Barrier(Box::new(move || done(file.compact()))));
        Ok(())
    }

    /// Blocking [`Database::compact_with`].
    pub fn compact(&self) -> Result<bool> {
        refuse_on_writer(&self.handle.shared.queue, "compact")?;
        let (tx, rx) = mpsc::channel();
        self.compact_with(Box::new(move |r| {
            let _ = tx.send(r);
        }))?;
        rx.recv().map_err(|_| Error::StoreClosed)?
    }

    /// The maps of this file and the codec each was created with.
    pub fn tables(&self) -> Result<Vec<(String, String)>> {
        self.check_open()?;
        crate::maintenance::tables(&self.handle.shared)
    }

    /// Queues prepared commits (of any maps of this file) as one unit: they share a transaction.
    pub fn submit(&self, commits: Vec<PreparedCommit>) {
        if let Some(jobs) = self.writable(commits) {
            self.handle.shared.queue.submit(Job::Many(jobs));
        }
    }

    /// As [`Database::submit`], but when the writer is idle the commits are written on this
    /// thread and settled before this returns (true), saving two thread hand-offs. The caller
    /// blocks for the write, fsync included when durable. Otherwise they are queued (false).
    pub fn write_now(&self, commits: Vec<PreparedCommit>) -> bool {
        self.writable(commits)
            .is_some_and(|jobs| self.handle.shared.queue.write_inline(jobs))
    }

    /// The jobs of `commits`, unless there are none or this handle is closed (closing released
    /// its locks, so they may no longer write: they fail with StoreClosed here).
    fn writable(&self, commits: Vec<PreparedCommit>) -> Option<Vec<Job>> {
        let jobs: Vec<Job> = commits.into_iter().map(|c| c.0).collect();
        if jobs.is_empty() {
            return None;
        }
        if self.is_closed() {
            crate::commit_queue::fail_job(Job::Many(jobs), &Error::StoreClosed);
            return None;
        }
        Some(jobs)
    }
}

/// A commit that passed its checks and waits to be queued (see [`MapStore::prepare_commit`]).
pub struct PreparedCommit(Job);

/// Runs redb's integrity check over a file that is not open: true when it is clean, false when
/// redb had to repair it; a damaged file it cannot repair is [`Error::DatabaseCorrupt`].
pub fn check_integrity(path: impl AsRef<Path>) -> Result<bool> {
    let key = normalize(path.as_ref())?;
    let shown = key.display().to_string();
    if crate::registry::is_open(&key) {
        return Err(Error::DatabaseLocked {
            path: shown,
            holder: "this process".into(),
        });
    }
    let mut db = open_guarded(&shown, || redb::Database::open(&key))?;
    db.check_integrity().map_err(|e| open_error(&shown, e))
}

/// What a walk knows of its store: the handle it was taken through. The walk counts as open
/// for compaction until the range (and this) is dropped.
struct WalkOf {
    handle: Arc<Handle>,
}

impl WalkOf {
    fn new(handle: &Arc<Handle>) -> Self {
        handle.shared.walks.fetch_add(1, Ordering::SeqCst);
        WalkOf {
            handle: handle.clone(),
        }
    }
}

impl Drop for WalkOf {
    fn drop(&mut self) {
        self.handle.shared.walks.fetch_sub(1, Ordering::SeqCst);
    }
}

impl crate::range::WalkSource for WalkOf {
    fn closed(&self) -> bool {
        self.handle.closed.load(Ordering::SeqCst)
    }

    fn failed(&self, err: Error) -> Error {
        let shared = &self.handle.shared;
        shared.read_error(&err);
        match err {
            // redb closed the instance under the walk while the store stays open: the writer
            // reopened the file after an I/O error, and the walk's snapshot went with the old
            // instance (keeping it would keep redb from reopening the file).
            Error::StoreClosed if !self.closed() && !shared.released.load(Ordering::SeqCst) => {
                Error::Io {
                    errno: None,
                    message: format!(
                        "the walk's snapshot of '{}' was discarded when the store reopened the \
                         file after an I/O error; start the walk again",
                        shared.path
                    ),
                }
            }
            other => other,
        }
    }
}

/// One named map of a [`Database`], through one handle.
#[derive(Clone)]
pub struct MapStore {
    handle: Arc<Handle>,
    table: Arc<TableState>,
    /// How this opener spells auto keys; it must match how the table's keys were generated.
    keys: KeyFormat,
}

/// Outcome of [`MapStore::next_key`] when no number was at hand.
pub enum NextKey {
    Ready(String),
    Pending,
}

impl MapStore {
    pub fn name(&self) -> &str {
        &self.table.name
    }

    pub fn codec(&self) -> &str {
        &self.table.codec
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    fn check_open(&self) -> Result<()> {
        if self.handle.closed.load(Ordering::SeqCst) {
            return Err(Error::StoreClosed);
        }
        Ok(())
    }

    // ---- locks ----

    /// Asks for `key`'s lock. When it is free the grant comes back at once; otherwise
    /// `make_waiter` builds the callback that will hear the grant (or why it never came).
    /// `ticket` names the wait for [`MapStore::cancel_wait`].
    pub fn acquire(
        &self,
        key: &str,
        ticket: u64,
        make_waiter: impl FnOnce() -> Result<GrantCallback>,
    ) -> Result<Acquire> {
        self.check_open()?;
        self.handle.check_writable()?;
        validate_key(key)?;
        self.table
            .locks
            .acquire(key, self.handle.owner, ticket, make_waiter)
    }

    /// Turns a grant into a locked entry per `mode`: reads the committed record and checks it
    /// exists (or not). On failure the lock is released and the error returned.
    pub fn finish_acquire(&self, key: &str, grant: Grant, mode: LockMode) -> Result<LockedEntry> {
        let record = match self.check_open().and_then(|_| self.read(key)) {
            Ok(record) => record,
            Err(err) => {
                let _ = self
                    .table
                    .locks
                    .release(key, grant.token, grant.after_delete);
                return Err(err);
            }
        };
        let failure = match (mode, &record) {
            (LockMode::Existing, None) if grant.after_delete => Some(Error::EntryDeleted {
                key: key.to_string(),
            }),
            (LockMode::Existing, None) => Some(Error::EntryNotFound {
                key: key.to_string(),
            }),
            (LockMode::New, Some(_)) => Some(Error::EntryExists {
                key: key.to_string(),
            }),
            _ => None,
        };
        if let Some(err) = failure {
            // Later waiters for a deleted entry learn of the deletion too.
            let _ =
                self.table
                    .locks
                    .release(key, grant.token, grant.after_delete && record.is_none());
            return Err(err);
        }
        Ok(LockedEntry {
            token: grant.token,
            existed: record.is_some(),
            record,
        })
    }

    /// Gives up a queued wait (timeout, abort). False if it was granted meanwhile: the grant
    /// then stands and must be used or released.
    pub fn cancel_wait(&self, ticket: u64, reason: Error) -> bool {
        self.table.locks.cancel(self.handle.owner, ticket, reason)
    }

    /// Drops a lock without writing.
    pub fn release(&self, key: &str, token: LockToken) -> Result<()> {
        self.table.locks.release(key, token, false)
    }

    /// Whether `token` still holds `key`'s lock (closing its handle frees it).
    pub fn holds(&self, key: &str, token: LockToken) -> bool {
        self.table.locks.holds(key, token)
    }

    /// Queues a write of `key` under its lock. Errors found before queueing (a released lock,
    /// bad options, an oversize record) come back at once; the rest reach `done`.
    pub fn commit(
        &self,
        key: &str,
        token: LockToken,
        change: Change,
        options: CommitOptions,
        done: CommitCallback,
    ) -> Result<()> {
        let prepared = self.prepare_commit(key, token, change, options, done)?;
        self.handle.shared.queue.submit(prepared.0);
        Ok(())
    }

    /// Checks a commit as [`MapStore::commit`] does, without queueing it yet; hand a group of
    /// them to [`Database::submit`] to have them written in one transaction.
    pub fn prepare_commit(
        &self,
        key: &str,
        token: LockToken,
        change: Change,
        options: CommitOptions,
        done: CommitCallback,
    ) -> Result<PreparedCommit> {
        if matches!(change, Change::Delete) && options.update_only {
            return Err(Error::invalid(
                "commit cannot both delete and keep the lock (delete with updateOnly)",
            ));
        }
        if !self.table.locks.holds(key, token) {
            return Err(Error::LockReleased {
                key: key.to_string(),
            });
        }
        let refused = if self.handle.closed.load(Ordering::SeqCst) {
            Some(Error::StoreClosed)
        } else {
            match &change {
                Change::Put(record) if record.len() > MAX_RECORD_BYTES => {
                    Some(Error::invalid(format!(
                        "the record for '{key}' is {} bytes; the limit is {MAX_RECORD_BYTES}",
                        record.len()
                    )))
                }
                _ => None,
            }
        };
        if let Some(err) = refused {
            if !options.hold_lock_on_failure {
                let _ = self.table.locks.release(key, token, false);
            }
            return Err(err);
        }
        Ok(PreparedCommit(Job::Commit(CommitJob {
            table: self.table.clone(),
            key: key.into(),
            token,
            change,
            release: !options.update_only,
            hold_on_failure: options.hold_lock_on_failure,
            durable: self.handle.durable,
            done,
        })))
    }

    // ---- reads ----

    /// The committed record of `key`, from the cache or the file.
    pub fn get(&self, key: &str) -> Result<Option<Arc<[u8]>>> {
        self.check_open()?;
        validate_key(key)?;
        self.read(key)
    }

    fn read(&self, key: &str) -> Result<Option<Arc<[u8]>>> {
        let shared = self.shared();
        let read = || crate::error::guard_damage(&shared.path, || self.read_unguarded(key));
        match read() {
            // The kept snapshot's instance was swapped by a recovery meanwhile: the cache was
            // cleared with it, so the second try reads the reopened file.
            Err(Error::StoreClosed) if !shared.file.released.load(Ordering::SeqCst) => read(),
            // redb refuses all I/O after an I/O error until the file is reopened: wait for the
            // writer to reopen it and try once more, so a passing fault fails one read only.
            Err(err @ Error::Io { .. }) if !shared.queue.is_current_writer() => {
                shared.read_error(&err);
                shared.barrier();
                read().map_err(|_| err)
            }
            other => other,
        }
        .map_err(|e| self.read_error(e))
    }

    fn read_error(&self, err: Error) -> Error {
        self.shared().read_error(&err);
        err
    }

    fn read_unguarded(&self, key: &str) -> Result<Option<Arc<[u8]>>> {
        let (generation, snapshot) = match self.table.cache.lookup(key) {
            Lookup::Hit(found) => return Ok(found),
            Lookup::Miss {
                generation,
                snapshot,
            } => (generation, snapshot),
        };
        let snapshot = match snapshot {
            Some(snapshot) => Some(snapshot),
            None => {
                let opened = self.read_table()?.map(Arc::new);
                if let Some(table) = &opened {
                    self.table.cache.keep_snapshot(generation, table.clone());
                }
                opened
            }
        };
        let found = match snapshot {
            Some(table) => table
                .get(key)
                .map_err(|e| self.shared().redb_err(e))?
                .map(|g| Arc::<[u8]>::from(g.value())),
            None => None,
        };
        self.table.cache.fill(key, generation, found.clone());
        Ok(found)
    }

    fn read_table(&self) -> Result<Option<redb::ReadOnlyTable<&'static str, &'static [u8]>>> {
        let shared = self.shared();
        crate::error::guard_damage(&shared.path, || {
            let txn = shared.db()?.begin_read().map_err(|e| shared.redb_err(e))?;
            match txn.open_table(self.table.definition()) {
                Ok(table) => Ok(Some(table)),
                Err(TableError::TableDoesNotExist(_)) => Ok(None),
                Err(e) => Err(shared.redb_err(e)),
            }
        })
        .map_err(|e| self.read_error(e))
    }

    /// A walk over one snapshot of the table.
    pub fn range(&self, options: &RangeOptions) -> Result<EntryRange> {
        self.check_open()?;
        let table = self.read_table()?;
        let path = &self.shared().path;
        let source = Arc::new(WalkOf::new(&self.handle));
        crate::error::guard_damage(path, || EntryRange::new(table, options, path, source))
            .map_err(|e| self.read_error(e))
    }

    pub fn count(&self, options: &RangeOptions) -> Result<u64> {
        self.check_open()?;
        let unbounded = options.prefix.as_deref().unwrap_or("").is_empty()
            && options.start.is_none()
            && options.stop.is_none();
        if unbounded {
            let table = self.read_table()?;
            let len = match table {
                Some(t) => t.len().map_err(|e| self.shared().redb_err(e))?,
                None => 0,
            };
            return Ok(options.limit.map_or(len, |l| len.min(l)));
        }
        let mut n = 0;
        for item in self.range(options)? {
            item?;
            n += 1;
        }
        Ok(n)
    }

    // ---- auto keys ----

    /// The next auto key. When the current lease is used up, `make_waiter`'s callback hears
    /// the key once the next lease is committed.
    pub fn next_key(
        &self,
        make_waiter: impl FnOnce() -> Box<dyn FnOnce(Result<String>) + Send>,
    ) -> Result<NextKey> {
        self.check_open()?;
        self.handle.check_writable()?;
        let keys = self.table.check_key_format(self.keys)?;
        let take = self.table.sequence().take(|| {
            let notify = make_waiter();
            let waiter: NumberCallback = Box::new(move |n| notify(n.and_then(|n| keys.format(n))));
            waiter
        });
        match take {
            Take::Number(n) => Ok(NextKey::Ready(keys.format(n)?)),
            Take::NeedLease(until) => {
                if let Some(until) = until {
                    // Always durable: a number must never be handed out twice, even after a
                    // crash under durability 'none'.
                    self.shared().queue.submit(Job::Lease {
                        table: self.table.clone(),
                        until,
                        durable: true,
                    });
                }
                Ok(NextKey::Pending)
            }
        }
    }

    // ---- insight ----

    pub fn stats(&self) -> Result<MapStats> {
        self.check_open()?;
        let shared = self.shared();
        let entries = match self.read_table()? {
            Some(t) => t.len().map_err(|e| shared.redb_err(e))?,
            None => 0,
        };
        let cache = self.table.cache.counts();
        let locks = self.table.locks.counts();
        let commits = &shared.queue.stats;
        Ok(MapStats {
            entries,
            file_bytes: std::fs::metadata(&self.handle.key).map_or(0, |m| m.len()),
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            cache_entries: cache.entries,
            locks_held: locks.held,
            locks_waiting: locks.waiting,
            commits: commits.commits.load(Ordering::Relaxed),
            batches: commits.batches.load(Ordering::Relaxed),
            failed_batches: commits.failed_batches.load(Ordering::Relaxed),
            largest_batch: commits.largest_batch.load(Ordering::Relaxed),
            unsynced_batches: commits.unsynced_batches.load(Ordering::Relaxed),
        })
    }

    // ---- the blocking API for Rust callers ----

    /// Waits for `key`'s lock (up to `timeout`) and returns the entry locked per `mode`.
    pub fn lock(&self, key: &str, mode: LockMode, timeout: Option<Duration>) -> Result<EntryGuard> {
        static TICKETS: AtomicU64 = AtomicU64::new(1);
        let ticket = TICKETS.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let grant = match self.acquire(key, ticket, || {
            Ok(Box::new(move |r| {
                let _ = tx.send(r);
            }))
        })? {
            Acquire::Granted(grant) => grant,
            Acquire::Queued => {
                if let Err(err) = refuse_on_writer(&self.shared().queue, "lock a held key") {
                    if self.cancel_wait(ticket, err.clone()) {
                        return Err(err);
                    }
                }
                let received = match timeout {
                    Some(t) => rx.recv_timeout(t).ok(),
                    None => rx.recv().ok(),
                };
                match received {
                    Some(outcome) => outcome?,
                    None if self.cancel_wait(
                        ticket,
                        Error::LockTimeout {
                            key: key.to_string(),
                        },
                    ) =>
                    {
                        return Err(Error::LockTimeout {
                            key: key.to_string(),
                        })
                    }
                    // Granted just as the wait ran out: take it.
                    None => rx.recv().map_err(|_| Error::StoreClosed)??,
                }
            }
        };
        let locked = self.finish_acquire(key, grant, mode)?;
        Ok(EntryGuard {
            store: self.clone(),
            key: key.to_string(),
            locked,
            held: true,
        })
    }

    /// Creates an entry under a fresh auto key, locked.
    pub fn lock_new_auto(&self) -> Result<EntryGuard> {
        let key = self.next_key_blocking()?;
        self.lock(&key, LockMode::New, None)
    }

    pub fn next_key_blocking(&self) -> Result<String> {
        let (tx, rx) = mpsc::channel();
        match self.next_key(|| {
            Box::new(move |r| {
                let _ = tx.send(r);
            })
        })? {
            NextKey::Ready(key) => Ok(key),
            NextKey::Pending => {
                refuse_on_writer(&self.shared().queue, "wait for an auto key")?;
                rx.recv().map_err(|_| Error::StoreClosed)?
            }
        }
    }

    /// The committed record of `key`, decoded from its envelope.
    pub fn get_record(&self, key: &str) -> Result<Option<Record>> {
        self.get(key)?
            .map(|bytes| envelope::decode(&bytes))
            .transpose()
    }

    /// Deletes `key` once its lock is free. Idempotent.
    pub fn delete(&self, key: &str) -> Result<()> {
        let guard = self.lock(key, LockMode::Any, None)?;
        if guard.existed() {
            guard.delete()
        } else {
            guard.release();
            Ok(())
        }
    }
}

/// The blocking calls wait for the writer; inside a commit or grant callback (which the writer
/// runs, or a thread writing a batch inline) they would wait forever, so they are refused.
fn refuse_on_writer(queue: &CommitQueue, what: &str) -> Result<()> {
    if queue.is_current_writer() {
        return Err(Error::invalid(format!(
            "cannot {what} and wait inside a commit or grant callback: it runs on the writer, \
             which the wait needs; use the callback-taking calls or another thread"
        )));
    }
    Ok(())
}

/// A held lock, for Rust callers. Dropping it releases the lock without writing.
pub struct EntryGuard {
    store: MapStore,
    key: String,
    locked: LockedEntry,
    held: bool,
}

impl EntryGuard {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn existed(&self) -> bool {
        self.locked.existed
    }

    /// The token that proves this guard holds the lock (for [`MapStore::commit`]).
    pub fn token(&self) -> LockToken {
        self.locked.token
    }

    /// The committed record when the lock was granted (or last committed through this guard).
    pub fn record(&self) -> Option<&[u8]> {
        self.locked.record.as_deref()
    }

    pub fn decoded(&self) -> Result<Option<Record>> {
        self.record().map(envelope::decode).transpose()
    }

    fn write(&mut self, change: Change, options: CommitOptions) -> Result<()> {
        refuse_on_writer(&self.store.shared().queue, "commit")?;
        let (tx, rx) = mpsc::channel();
        let written = match &change {
            Change::Put(record) => Some(record.clone()),
            Change::Delete => None,
        };
        // This thread waits for the outcome anyway: it writes the batch itself when the
        // writer is idle.
        let outcome = self
            .store
            .prepare_commit(
                &self.key,
                self.locked.token,
                change,
                options,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
            .and_then(|prepared| {
                self.store
                    .handle
                    .shared
                    .queue
                    .write_inline(vec![prepared.0]);
                rx.recv().map_err(|_| Error::StoreClosed)?
            });
        let keeps_lock = match &outcome {
            Ok(()) => options.update_only,
            Err(_) => {
                options.hold_lock_on_failure
                    && self.store.table.locks.holds(&self.key, self.locked.token)
            }
        };
        self.held = keeps_lock;
        if outcome.is_ok() {
            self.locked.existed = written.is_some();
            self.locked.record = written;
        }
        outcome
    }

    /// Writes `record` (an envelope) and releases the lock.
    pub fn commit(mut self, record: Vec<u8>) -> Result<()> {
        self.write(Change::Put(record.into()), CommitOptions::default())
    }

    /// Writes `record` and keeps the lock, per `options`.
    pub fn commit_with(&mut self, record: Vec<u8>, options: CommitOptions) -> Result<()> {
        if !self.held {
            return Err(Error::LockReleased {
                key: self.key.clone(),
            });
        }
        self.write(Change::Put(record.into()), options)
    }

    /// Deletes the entry and releases the lock.
    pub fn delete(mut self) -> Result<()> {
        self.write(Change::Delete, CommitOptions::default())
    }

    /// Drops the lock without writing.
    pub fn release(mut self) {
        self.release_now();
    }

    fn release_now(&mut self) {
        if std::mem::take(&mut self.held) {
            let _ = self.store.release(&self.key, self.locked.token);
        }
    }
}

impl Drop for EntryGuard {
    fn drop(&mut self) {
        self.release_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parks the writer in a barrier (holding the writer state) until the returned sender sends.
    fn park_writer(map: &MapStore) -> mpsc::Sender<()> {
        let (park_tx, park_rx) = mpsc::channel::<()>();
        let (parked_tx, parked_rx) = mpsc::channel::<()>();
        map.shared().queue.submit(Job::Barrier(Box::new(move || {
            parked_tx.send(()).unwrap();
            let _ = park_rx.recv();
        })));
        parked_rx.recv().unwrap();
        park_tx
    }

    #[test]
    fn commits_queued_behind_a_busy_writer_share_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("g.redb"), DatabaseOptions::default()).unwrap();
        let map = db.map_store("m", MapOptions::default()).unwrap();
        // Park the writer so that everything submitted next is pending at once.
        let park_tx = park_writer(&map);
        let before = map.stats().unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        for i in 0..200 {
            let key = format!("g{i:03}");
            let grant = match map.acquire(&key, 0, || unreachable!()).unwrap() {
                Acquire::Granted(g) => g,
                Acquire::Queued => unreachable!("fresh keys are free"),
            };
            let done_tx = done_tx.clone();
            map.commit(
                &key,
                grant.token,
                Change::Put(Arc::from(envelope::encode(&[], b"v"))),
                CommitOptions::default(),
                Box::new(move |r| done_tx.send(r).unwrap()),
            )
            .unwrap();
        }
        park_tx.send(()).unwrap();
        for _ in 0..200 {
            done_rx.recv().unwrap().unwrap();
        }
        let after = map.stats().unwrap();
        assert_eq!(after.commits - before.commits, 200);
        assert_eq!(
            after.batches - before.batches,
            1,
            "one transaction, one fsync"
        );
        assert_eq!(after.largest_batch, 200);
        assert_eq!(after.locks_held, 0);
        assert_eq!(after.entries, 200);
    }

    #[test]
    fn write_now_writes_on_the_calling_thread_when_idle_and_queues_when_busy() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("i.redb"), DatabaseOptions::default()).unwrap();
        let map = db.map_store("m", MapOptions::default()).unwrap();
        let prepare = |key: &str, done: mpsc::Sender<(Result<()>, std::thread::ThreadId)>| {
            let grant = match map.acquire(key, 0, || unreachable!()).unwrap() {
                Acquire::Granted(g) => g,
                Acquire::Queued => unreachable!("fresh keys are free"),
            };
            map.prepare_commit(
                key,
                grant.token,
                Change::Put(Arc::from(envelope::encode(&[], b"v"))),
                CommitOptions::default(),
                Box::new(move |r| done.send((r, std::thread::current().id())).unwrap()),
            )
            .unwrap()
        };
        let me = std::thread::current().id();

        let (done_tx, done_rx) = mpsc::channel();
        assert!(db.write_now(vec![prepare("idle", done_tx.clone())]));
        let (outcome, settled_on) = done_rx
            .try_recv()
            .expect("settled before write_now returned");
        outcome.unwrap();
        assert_eq!(settled_on, me);
        assert!(map.get("idle").unwrap().is_some());

        // A busy writer (parked in a barrier, holding the writer state): the commit is queued.
        let park_tx = park_writer(&map);
        assert!(!db.write_now(vec![prepare("busy", done_tx)]));
        assert!(done_rx.try_recv().is_err(), "not written yet");
        park_tx.send(()).unwrap();
        let (outcome, settled_on) = done_rx.recv().unwrap();
        outcome.unwrap();
        assert_ne!(settled_on, me, "written by the writer thread");
        assert_eq!(map.stats().unwrap().locks_held, 0);
        assert_eq!(map.count(&RangeOptions::default()).unwrap(), 2);
    }

    #[test]
    fn an_oversize_record_fails_alone_and_releases_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("f.redb"), DatabaseOptions::default()).unwrap();
        let map = db.map_store("m", MapOptions::default()).unwrap();
        let keep = map.lock("keep", LockMode::New, None).unwrap();
        keep.commit(envelope::encode(&[], b"old")).unwrap();
        let oversize = map.lock("big", LockMode::New, None).unwrap();
        let err = map
            .commit(
                "big",
                oversize.token(),
                Change::Put(Arc::from(vec![0u8; MAX_RECORD_BYTES + 1])),
                CommitOptions::default(),
                Box::new(|_| unreachable!("refused before queueing")),
            )
            .unwrap_err();
        assert_eq!(err.code(), crate::ErrorCode::InvalidArgument);
        assert_eq!(
            map.stats().unwrap().locks_held,
            0,
            "released without holdLockOnFailure"
        );
        drop(oversize);
        assert_eq!(map.get_record("keep").unwrap().unwrap().value, b"old");
    }
}
