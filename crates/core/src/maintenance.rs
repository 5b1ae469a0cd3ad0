//! Whole-file operations: a consistent backup while commits go on, compaction, and the list
//! of maps with their codecs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use crate::error::{from_redb, Error, Result};
use crate::store::{StoreFile, META_TABLE};

/// Entries copied per write transaction of a backup, so a large copy does not build one huge
/// transaction in memory.
const BACKUP_CHUNK: usize = 10_000;

/// A backup whose snapshot is taken: [`Backup::run`] copies it, on any thread, even if the
/// store closes meanwhile.
pub struct Backup {
    snapshot: redb::ReadTransaction,
    /// Keeps the instance open (declared after `snapshot`, so dropped after it): redb fails
    /// reads of a dropped instance, and the store may close while the copy runs.
    _db: Arc<redb::Database>,
    source: String,
    dest: PathBuf,
}

/// Takes the snapshot a backup will copy. Writers are not held up (MVCC).
pub(crate) fn begin_backup(file: &StoreFile, dest: &Path) -> Result<Backup> {
    if dest.exists() {
        return Err(Error::invalid(format!(
            "backup destination '{}' already exists",
            dest.display()
        )));
    }
    let db = file.db()?;
    let snapshot = db
        .begin_read()
        .map_err(|e| from_redb(file.path(), e.into()))?;
    Ok(Backup {
        snapshot,
        _db: db,
        source: file.path().to_string(),
        dest: dest.to_path_buf(),
    })
}

impl Backup {
    /// Copies every table of the snapshot into a new file, written next to the destination and
    /// renamed into place only when complete.
    pub fn run(self) -> Result<()> {
        let partial = self.dest.with_extension("partial");
        match self.copy(&partial) {
            Ok(()) => std::fs::rename(&partial, &self.dest).map_err(Error::from),
            Err(err) => {
                let _ = std::fs::remove_file(&partial);
                Err(err)
            }
        }
    }

    fn copy(&self, partial: &Path) -> Result<()> {
        let shown = self.dest.display().to_string();
        let source_err = |e: redb::Error| from_redb(&self.source, e);
        let target_err = |e: redb::Error| from_redb(&shown, e);
        let target = redb::Database::create(partial).map_err(|e| target_err(e.into()))?;
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
        // One durable commit makes everything above durable.
        let txn = target.begin_write().map_err(|e| target_err(e.into()))?;
        txn.commit().map_err(|e| target_err(e.into()))
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

/// Compacts the file in place. Runs on the writer between batches, so no commit is in flight;
/// refuses while a walk (`getEntries`) holds a snapshot.
pub(crate) fn compact(file: &StoreFile, slot: &mut Option<Arc<redb::Database>>) -> Result<bool> {
    let shared = slot.take().ok_or(Error::StoreClosed)?;
    // Readers that cloned the handle just before we took the slot finish within microseconds.
    let mut shared = Some(shared);
    let mut db = None;
    for _ in 0..1000 {
        match Arc::try_unwrap(shared.take().expect("kept until unwrapped")) {
            Ok(owned) => {
                db = Some(owned);
                break;
            }
            Err(still_shared) => {
                shared = Some(still_shared);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
    let Some(mut db) = db else {
        *slot = shared;
        return Err(Error::invalid(
            "compact needs the file to itself; a reader did not let go",
        ));
    };
    let outcome = db.compact();
    *slot = Some(Arc::new(db));
    outcome.map_err(|e| match e {
        redb::CompactionError::TransactionInProgress => Error::invalid(
            "compact cannot run while a walk (getEntries) is open; finish or dispose it first",
        ),
        other => from_redb(file.path(), other.into()),
    })
}
