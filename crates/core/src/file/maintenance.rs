//! Whole-file operations: a consistent backup while commits go on, compaction, and the list
//! of maps with their codecs.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::backends::FileBackend;
use redb::{ReadableTable, TableDefinition, TableHandle};

use crate::cache::EntryCache;
use crate::error::{from_redb, Error, ErrorCode, Result};
use crate::file::backups::BackupTicket;
use crate::file::instance::Instance;
use crate::file::storage::{StoreFile, FORMAT_KEY, FORMAT_VERSION, META_TABLE};
use crate::file::wal::WAL_KEY;
use crate::keys::KeyFormat;

/// Entries copied per write transaction of a backup, so a large copy does not build one huge
/// transaction in memory.
const BACKUP_CHUNK: usize = 10_000;

/// A backup of a file whose snapshot is taken: [`FileBackup::run`] copies it, on any thread.
/// Closing the store (or its reopening after an I/O error) ends the copy with that reason.
pub struct FileBackup {
    snapshot: redb::ReadTransaction,
    source: String,
    dest: PathBuf,
    ticket: BackupTicket,
}

/// Refuses a backup destination that is no path or already exists (checked again, atomically,
/// when the copy is published).
pub(crate) fn check_backup_dest(dest: &Path) -> Result<()> {
    crate::file::storage::check_path(dest, "a backup destination")?;
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(Error::invalid(format!(
            "backup destination '{}' already exists",
            dest.display()
        )));
    }
    Ok(())
}

/// Takes the snapshot a backup will copy. Writers are not held up (MVCC).
pub(crate) fn begin_backup(file: &StoreFile, dest: &Path) -> Result<FileBackup> {
    let source = file.path().to_string();
    check_backup_dest(dest)?;
    crate::error::guard_damage(&source, || {
        let (db, ticket) = file.db_for_backup()?;
        let snapshot = db.begin_read().map_err(|e| from_redb(&source, e.into()))?;
        Ok(FileBackup {
            snapshot,
            source: source.clone(),
            dest: dest.to_path_buf(),
            ticket,
        })
    })
}

impl FileBackup {
    /// Copies every table of the snapshot into a new file (see [`NewFile`]).
    pub fn run(self) -> Result<()> {
        let _copying = self.ticket.start()?;
        let target = NewFile::create(&self.dest)?;
        crate::error::guard_damage(&self.source, || self.copy(&target))?;
        self.ticket.check()?;
        target.publish(&self.dest)
    }

    fn copy(&self, target: &NewFile) -> Result<()> {
        let source_err = |e: redb::Error| from_redb(&self.source, e);
        let names: Vec<String> = self
            .snapshot
            .list_tables()
            .map_err(|e| source_err(e.into()))?
            .map(|t| t.name().to_string())
            .collect();
        for name in names {
            let definition = TableDefinition::<&str, &[u8]>::new(&name);
            let source = self
                .snapshot
                .open_table(definition)
                .map_err(|e| source_err(e.into()))?;
            let entries = source.iter().map_err(|e| source_err(e.into()))?;
            // The tag of the source's write-ahead log is not copied: a backup is self-contained,
            // and put back in the source's place it must not take on the source's log.
            let is_meta = name == META_TABLE.name();
            target.write_table(
                &name,
                entries
                    .filter(|item| {
                        !(is_meta && item.as_ref().is_ok_and(|(key, _)| key.value() == WAL_KEY))
                    })
                    .map(|item| {
                        item.map(|(key, record)| Guarded(key, record))
                            .map_err(|e| source_err(e.into()))
                    }),
                &|| self.ticket.check(),
            )?;
        }
        // The copy has no live log: it is of the format without one.
        target.write_table(
            META_TABLE.name(),
            [Ok((FORMAT_KEY, FORMAT_VERSION.to_le_bytes()))].into_iter(),
            &|| self.ticket.check(),
        )?;
        Ok(())
    }
}

/// One entry to write into a new file, as a redb table iterator or a map gives it.
pub(crate) trait EntryBytes {
    fn key(&self) -> &str;
    fn record(&self) -> &[u8];
}

/// An entry of a redb table being copied.
struct Guarded<'a>(
    redb::AccessGuard<'a, &'static str>,
    redb::AccessGuard<'a, &'static [u8]>,
);

impl EntryBytes for Guarded<'_> {
    fn key(&self) -> &str {
        self.0.value()
    }

    fn record(&self) -> &[u8] {
        self.1.value()
    }
}

impl<K: AsRef<str>, V: AsRef<[u8]>> EntryBytes for (K, V) {
    fn key(&self) -> &str {
        self.0.as_ref()
    }

    fn record(&self) -> &[u8] {
        self.1.as_ref()
    }
}

/// One map of a store to write into a new file: its name, its codec, its auto-key bookkeeping
/// (the end of the last lease and the key format, when it has them) and its entries.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))] // the cluster backup's
pub(crate) struct MapContents<I> {
    pub name: String,
    pub codec: String,
    pub leased_until: Option<u64>,
    pub key_format: Option<KeyFormat>,
    pub entries: I,
}

/// Writes `maps` as a new kvstore file at `dest` (FORMAT.md: a `map:<name>` table per map and
/// the bookkeeping table with the format, each map's codec and auto-key bookkeeping), created
/// and published as [`NewFile`] does. `check` runs between chunks: an error from it ends the
/// copy.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))] // the cluster backup's
pub(crate) fn write_store<I, E>(
    dest: &Path,
    maps: impl IntoIterator<Item = MapContents<I>>,
    check: &dyn Fn() -> Result<()>,
) -> Result<()>
where
    I: Iterator<Item = E>,
    E: EntryBytes,
{
    let target = NewFile::create(dest)?;
    let mut meta: Vec<(String, Vec<u8>)> = vec![(
        FORMAT_KEY.to_string(),
        FORMAT_VERSION.to_le_bytes().to_vec(),
    )];
    for map in maps {
        target.write_table(&format!("map:{}", map.name), map.entries.map(Ok), check)?;
        meta.push((format!("codec:{}", map.name), map.codec.into_bytes()));
        if let Some(until) = map.leased_until {
            meta.push((format!("seq:{}", map.name), until.to_le_bytes().to_vec()));
        }
        if let Some(format) = map.key_format {
            meta.push((format!("keys:{}", map.name), format.encode().into_bytes()));
        }
    }
    target.write_table(META_TABLE.name(), meta.into_iter().map(Ok), check)?;
    check()?;
    target.publish(dest)
}

/// A new file being written: created exclusively beside its destination under a name of its
/// own, filled table by table, and moved into place only when complete, never over an existing
/// file ([`NewFile::publish`]). Dropped unpublished, it removes its working file, and only that.
pub(crate) struct NewFile {
    partial: PathBuf,
    shown: String,
    db: Option<redb::Database>,
}

impl NewFile {
    pub(crate) fn create(dest: &Path) -> Result<NewFile> {
        let (partial, file) = create_partial(dest)?;
        let shown = partial.display().to_string();
        let mut new = NewFile {
            partial,
            shown,
            db: None,
        };
        let backend = FileBackend::new(file).map_err(|e| new.err(e.into()))?;
        let db = redb::Database::builder()
            .create_with_backend(backend)
            .map_err(|e| new.err(e.into()))?;
        new.db = Some(db);
        Ok(new)
    }

    fn err(&self, e: redb::Error) -> Error {
        from_redb(&self.shown, e)
    }

    /// Writes the redb table `name` (created even when `entries` is empty), in transactions of
    /// [`BACKUP_CHUNK`] entries that are not durable yet ([`NewFile::publish`] makes them so).
    /// `check` runs before each chunk.
    pub(crate) fn write_table<E: EntryBytes>(
        &self,
        name: &str,
        entries: impl Iterator<Item = Result<E>>,
        check: &dyn Fn() -> Result<()>,
    ) -> Result<()> {
        let Some(target) = &self.db else {
            return Err(Error::StoreClosed);
        };
        let definition = TableDefinition::<&str, &[u8]>::new(name);
        let mut entries = entries.peekable();
        loop {
            check()?;
            let mut txn = target.begin_write().map_err(|e| self.err(e.into()))?;
            txn.set_durability(redb::Durability::None)
                .map_err(|e| self.err(e.into()))?;
            {
                // Opening the table creates it even when there is nothing to copy.
                let mut table = txn.open_table(definition).map_err(|e| self.err(e.into()))?;
                for _ in 0..BACKUP_CHUNK {
                    let Some(item) = entries.next() else { break };
                    let item = item?;
                    table
                        .insert(item.key(), item.record())
                        .map_err(|e| self.err(e.into()))?;
                }
            }
            txn.commit().map_err(|e| self.err(e.into()))?;
            if entries.peek().is_none() {
                return Ok(());
            }
        }
    }

    /// Makes everything written durable, closes the file and moves it to `dest` unless
    /// something appeared there meanwhile.
    pub(crate) fn publish(mut self, dest: &Path) -> Result<()> {
        let Some(target) = self.db.take() else {
            return Err(Error::StoreClosed);
        };
        // One durable commit makes everything before it durable.
        let txn = target.begin_write().map_err(|e| self.err(e.into()))?;
        txn.commit().map_err(|e| self.err(e.into()))?;
        drop(target);
        publish(&self.partial, dest)?;
        // Published, and the working name removed: nothing is left for drop to remove.
        self.partial = PathBuf::new();
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        drop(self.db.take());
        if !self.partial.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Creates the backup's working file beside `dest`, exclusively, under a name no one else uses.
fn create_partial(dest: &Path) -> Result<(PathBuf, std::fs::File)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = match dest.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dest
        .file_name()
        .ok_or_else(|| Error::invalid(format!("'{}' is not a file path", dest.display())))?
        .to_string_lossy();
    // Room for the suffix within the usual 255-byte limit of a file name.
    let mut cut = name.len().min(200);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let name = &name[..cut];
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let partial = dir.join(format!(
            ".{name}.{}-{n}-{nanos:08x}.partial",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&partial)
        {
            Ok(file) => return Ok((partial, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::Io {
                    errno: e.raw_os_error(),
                    message: format!(
                        "cannot create the backup's working file beside '{}': {e}",
                        dest.display()
                    ),
                })
            }
        }
    }
}

/// Moves the finished copy to `dest` unless something appeared there meanwhile: a hard link
/// fails when the name is taken, where a rename would replace it.
fn publish(partial: &Path, dest: &Path) -> Result<()> {
    match std::fs::hard_link(partial, dest) {
        Ok(()) => {
            // Published: the working name is only a second link now, and failing to remove it
            // does not make the backup fail.
            let _ = std::fs::remove_file(partial);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::invalid(format!(
            "backup destination '{}' already exists",
            dest.display()
        ))),
        // A file system without hard links: check, then rename (a narrow window remains).
        Err(_) if std::fs::symlink_metadata(dest).is_err() => {
            std::fs::rename(partial, dest).map_err(|e| Error::io_at(dest, e))
        }
        Err(e) => Err(Error::io_at(dest, e)),
    }
}

/// The maps of a file and the codec each was created with, from the bookkeeping table.
pub(crate) fn tables(file: &StoreFile) -> Result<Vec<(String, String)>> {
    let err = |e: redb::Error| from_redb(file.path(), e);
    let txn = file.db()?.begin_read().map_err(|e| err(e.into()))?;
    let meta = match txn.open_table(META_TABLE) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(err(e.into())),
    };
    let mut found = Vec::new();
    for item in meta.range("codec:"..).map_err(|e| err(e.into()))? {
        let (key, value) = item.map_err(|e| err(e.into()))?;
        let Some(name) = key.value().strip_prefix("codec:") else {
            break;
        };
        found.push((
            name.to_string(),
            String::from_utf8_lossy(value.value()).into_owned(),
        ));
    }
    Ok(found)
}

/// Compacts the file. Call on the writer, between batches.
pub(crate) fn compact(file: &StoreFile) -> Result<bool> {
    let mut slot = file.lock_slot(EntryCache::refuse_snapshots);
    let compacted = crate::error::guard_damage(file.path(), || {
        if slot.is_none() {
            // A failed reopen left it empty: try again, as any reader would.
            *slot = Some(file.reopen()?);
        }
        compact_in_slot(file, &mut slot)
    });
    if let Err(err) = &compacted {
        if matches!(err.code(), ErrorCode::Io | ErrorCode::DatabaseCorrupt) {
            // redb refuses all I/O after a failed write: the writer reopens the file before its
            // next batch.
            file.mark_read_failed();
        }
    }
    compacted
}

/// Compacts the file in place. Runs on the writer between batches, so no commit is in flight,
/// with the instance slot locked (readers wait): it refuses at once while a backup or a walk
/// (`getEntries`) is open, and otherwise waits only for reads already under way, which take
/// microseconds.
fn compact_in_slot(file: &StoreFile, slot: &mut Option<Arc<Instance>>) -> Result<bool> {
    let busy = || -> Option<Error> {
        if file.backups().begun() > 0 {
            return Some(Error::invalid(
                "compact cannot run while a backup is running; wait for it to finish",
            ));
        }
        if file.open_walks() > 0 {
            return Some(Error::invalid(
                "compact cannot run while a walk (getEntries) is open; finish or dispose it first",
            ));
        }
        None
    };
    if let Some(err) = busy() {
        return Err(err);
    }
    if slot.as_ref().is_some_and(|db| db.is_read_only()) {
        return Err(crate::file::instance::read_only(file.path()));
    }
    let mut shared = slot.take().ok_or(Error::StoreClosed)?;
    let mut tries = 0;
    let mut db = loop {
        match Arc::try_unwrap(shared) {
            Ok(owned) => break owned,
            Err(still_shared) => shared = still_shared,
        }
        let refused = busy().or_else(|| {
            (tries == READ_WAIT_TRIES).then(|| {
                Error::invalid(
                    "compact could not have the file to itself: a read held it too long; try again",
                )
            })
        });
        if let Some(err) = refused {
            *slot = Some(shared);
            return Err(err);
        }
        tries += 1;
        std::thread::sleep(READ_WAIT);
    };
    let compacted = catch_unwind(AssertUnwindSafe(|| {
        let mut outcome = db.compact();
        // A read transaction a reader began just before the slot was locked ends within
        // microseconds; walks and backups were ruled out above.
        for _ in 0..READ_WAIT_TRIES {
            if !matches!(outcome, Err(redb::CompactionError::TransactionInProgress)) {
                break;
            }
            std::thread::sleep(READ_WAIT);
            outcome = db.compact();
        }
        outcome
    }));
    let outcome = match compacted {
        Ok(outcome) => outcome,
        Err(panic) => {
            // redb failed on a damaged page midway: this instance is not to be trusted. The
            // slot stays empty, so the next caller opens the file afresh. (Dropping a damaged
            // instance can panic too.)
            let _ = catch_unwind(AssertUnwindSafe(move || drop(db)));
            return Err(Error::DatabaseCorrupt {
                path: file.path().to_string(),
                detail: format!(
                    "compaction stopped at a damaged page: {}",
                    crate::error::panic_message(&*panic)
                ),
            });
        }
    };
    *slot = Some(Arc::new(db));
    outcome.map_err(|e| match e {
        redb::CompactionError::TransactionInProgress => Error::invalid(
            "compact cannot run while a read transaction is open (a walk or a backup); try again",
        ),
        other => from_redb(file.path(), other.into()),
    })
}

/// How long compaction waits, at most, for reads already under way: tries × pause.
const READ_WAIT_TRIES: usize = 500;
const READ_WAIT: std::time::Duration = std::time::Duration::from_micros(200);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Database, DatabaseOptions, ErrorCode, MapOptions};

    fn map(
        name: &str,
        codec: &str,
        leased_until: Option<u64>,
        key_format: Option<KeyFormat>,
        entries: &[(&str, &[u8])],
    ) -> MapContents<std::vec::IntoIter<(String, Vec<u8>)>> {
        let entries: Vec<(String, Vec<u8>)> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        MapContents {
            name: name.into(),
            codec: codec.into(),
            leased_until,
            key_format,
            entries: entries.into_iter(),
        }
    }

    #[test]
    fn write_store_makes_a_file_with_codecs_entries_and_auto_keys() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("new.redb");
        let base10 = KeyFormat::new(6, 10).unwrap();
        let many: Vec<(String, Vec<u8>)> = (0..BACKUP_CHUNK + 5)
            .map(|i| (format!("k{i:06}"), vec![1, 0, i as u8]))
            .collect();
        let maps = vec![
            map(
                "jobs",
                "msgpack",
                Some(42),
                Some(base10),
                &[("a/b", b"\x01\x00x")],
            ),
            map("empty", "custom-codec", None, None, &[]),
            MapContents {
                name: "many".into(),
                codec: "raw".into(),
                leased_until: None,
                key_format: None,
                entries: many.clone().into_iter(),
            },
        ];
        write_store(&dest, maps, &|| Ok(())).unwrap();
        // Never over an existing file, and its working file is gone.
        let again = write_store(&dest, vec![map("x", "raw", None, None, &[])], &|| Ok(()));
        assert_eq!(again.unwrap_err().code(), ErrorCode::InvalidArgument);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1);

        let db = Database::open(&dest, DatabaseOptions::default()).unwrap();
        let mut tables = db.tables().unwrap();
        tables.sort();
        assert_eq!(
            tables,
            vec![
                ("empty".to_string(), "custom-codec".to_string()),
                ("jobs".to_string(), "msgpack".to_string()),
                ("many".to_string(), "raw".to_string()),
            ]
        );
        let options = |codec: &str, keys: KeyFormat| MapOptions {
            codec: codec.into(),
            keys,
            ..MapOptions::default()
        };
        let jobs = db.map_store("jobs", options("msgpack", base10)).unwrap();
        assert_eq!(jobs.get("a/b").unwrap().as_deref(), Some(&b"\x01\x00x"[..]));
        // Auto keys resume after the recorded lease, in the recorded format.
        assert_eq!(jobs.next_key_blocking().unwrap(), "000042");
        let other = db.map_store("jobs", options("msgpack", KeyFormat::default()));
        let refused = other.and_then(|m| m.next_key_blocking());
        assert_eq!(refused.unwrap_err().code(), ErrorCode::InvalidArgument);
        let many_store = db
            .map_store("many", options("raw", KeyFormat::default()))
            .unwrap();
        let count = many_store.count(&Default::default()).unwrap();
        assert_eq!(count, many.len() as u64);
        assert_eq!(
            many_store.get("k010004").unwrap().as_deref(),
            Some(&[1u8, 0, 10004u32 as u8][..])
        );
        let mismatch = db.map_store("empty", options("json", KeyFormat::default()));
        assert_eq!(mismatch.err().unwrap().code(), ErrorCode::CodecMismatch);
        db.close();
    }

    #[test]
    fn write_store_stopped_by_its_check_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("new.redb");
        let stopped = write_store(
            &dest,
            vec![map("m", "raw", None, None, &[("k", b"\x01\x00")])],
            &|| Err(Error::StoreClosed),
        );
        assert_eq!(stopped.unwrap_err().code(), ErrorCode::StoreClosed);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
