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
use crate::file::storage::{StoreFile, META_TABLE};

/// Entries copied per write transaction of a backup, so a large copy does not build one huge
/// transaction in memory.
const BACKUP_CHUNK: usize = 10_000;

/// A backup whose snapshot is taken: [`Backup::run`] copies it, on any thread. Closing the
/// store (or its reopening after an I/O error) ends the copy with that reason.
pub struct Backup {
    snapshot: redb::ReadTransaction,
    source: String,
    dest: PathBuf,
    ticket: BackupTicket,
}

/// Takes the snapshot a backup will copy. Writers are not held up (MVCC).
pub(crate) fn begin_backup(file: &StoreFile, dest: &Path) -> Result<Backup> {
    let source = file.path().to_string();
    crate::file::storage::check_path(dest, "a backup destination")?;
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(Error::invalid(format!(
            "backup destination '{}' already exists",
            dest.display()
        )));
    }
    crate::error::guard_damage(&source, || {
        let (db, ticket) = file.db_for_backup()?;
        let snapshot = db.begin_read().map_err(|e| from_redb(&source, e.into()))?;
        Ok(Backup {
            snapshot,
            source: source.clone(),
            dest: dest.to_path_buf(),
            ticket,
        })
    })
}

impl Backup {
    /// Copies every table of the snapshot into a new file, created beside the destination under
    /// a name of its own, and moves it into place only when complete, never over an existing
    /// file. Only that file is ever removed.
    pub fn run(self) -> Result<()> {
        let _copying = self.ticket.start()?;
        let (partial, file) = create_partial(&self.dest)?;
        let copied = crate::error::guard_damage(&self.source, || self.copy(&partial, file))
            .and_then(|()| {
                self.ticket.check()?;
                publish(&partial, &self.dest)
            });
        if copied.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        copied
    }

    fn copy(&self, partial: &Path, file: std::fs::File) -> Result<()> {
        let shown = partial.display().to_string();
        let source_err = |e: redb::Error| from_redb(&self.source, e);
        let target_err = |e: redb::Error| from_redb(&shown, e);
        let backend = FileBackend::new(file).map_err(|e| target_err(e.into()))?;
        let target = redb::Database::builder()
            .create_with_backend(backend)
            .map_err(|e| target_err(e.into()))?;
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
            let mut entries = source.iter().map_err(|e| source_err(e.into()))?.peekable();
            loop {
                self.ticket.check()?;
                let mut txn = target.begin_write().map_err(|e| target_err(e.into()))?;
                txn.set_durability(redb::Durability::None)
                    .map_err(|e| target_err(e.into()))?;
                {
                    // Opening the table creates it even when the source table is empty.
                    let mut table = txn
                        .open_table(definition)
                        .map_err(|e| target_err(e.into()))?;
                    for _ in 0..BACKUP_CHUNK {
                        let Some(item) = entries.next() else { break };
                        let (key, value) = item.map_err(|e| source_err(e.into()))?;
                        table
                            .insert(key.value(), value.value())
                            .map_err(|e| target_err(e.into()))?;
                    }
                }
                txn.commit().map_err(|e| target_err(e.into()))?;
                if entries.peek().is_none() {
                    break;
                }
            }
        }
        self.ticket.check()?;
        // One durable commit makes everything above durable.
        let txn = target.begin_write().map_err(|e| target_err(e.into()))?;
        txn.commit().map_err(|e| target_err(e.into()))
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
